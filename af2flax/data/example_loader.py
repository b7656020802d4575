"""The per-example step of the training input, shared by both backends (input_pipeline.py).

`ExampleLoader.load(local_index)`: the host's example -> its step and global slot -> the record
the StepSampler chose (Suppl. 1.2.5) -> read, decode, `prepare_example` (numpy) with the
example's seeds; a bad record (corrupt bytes, undecodable, inconsistent) is counted, logged and
replaced by a deterministic substitute from the same source. No TensorFlow here.
"""

from __future__ import annotations

import logging
import threading
from typing import Callable, Mapping

import ml_collections
import numpy as np

from af2flax.data import records as records_lib
from af2flax.data import sampling
from af2flax.data import training_example

DecodeFn = Callable[[bytes], Mapping[str, np.ndarray]]
FeaturizeFn = Callable[[dict[str, np.ndarray], np.ndarray, int], dict[str, np.ndarray]]
# (record id, shard path, reason) of a record skipped while making an example.
SkippedRecords = list[tuple[str, str, str]]
_LOG = logging.getLogger("af2flax.data.input_pipeline")


def default_decode_fn() -> DecodeFn:
  """The dataset builder's record codec (af2flax/data/tfrecord.py)."""
  from af2flax.data import tfrecord  # pylint: disable=import-outside-toplevel
  return tfrecord.decode_example


class BadRecordCounter:
  """Thread-safe count (and the ids) of records the pipeline had to skip.

  `log=False` (worker processes): no warning, the skips are kept in `events` for the main
  process's counter.
  """

  def __init__(self, log: bool = True):
    self._lock = threading.Lock()
    self.count = 0
    self.ids: list[str] = []
    self.log = log
    self.events: SkippedRecords = []

  def add(self, record_id: str, path: str, reason: str) -> None:
    with self._lock:
      self.count += 1
      if len(self.ids) < 10_000:
        self.ids.append(record_id)
      if not self.log:
        self.events.append((record_id, path, reason))
    if self.log:
      _LOG.warning("skipping bad training record %s in %s (%d skipped so far): %s", record_id,
                 path, self.count, reason)


class ExampleLoader:
  """(step, local example) -> the prepared example arrays, its TF seed and recycling count."""

  def __init__(self, table: records_lib.RecordTable, config: ml_collections.ConfigDict, *,
               sampler: sampling.StepSampler, seed: int, batch_size: int, process_index: int,
               decode_fn: DecodeFn, verify_checksums: bool, counter: BadRecordCounter,
               use_tensorflow_reader: bool | None = None):
    self.table, self.config, self.sampler = table, config, sampler
    self.seed, self.batch_size, self.process_index = seed, batch_size, process_index
    self.decode_fn = decode_fn
    self.reader = records_lib.RecordReader(table.paths, verify_checksums, use_tensorflow_reader)
    self.counter = counter
    self._plans: dict[int, sampling.StepPlan] = {}
    self._lock = threading.Lock()

  def plan(self, step: int) -> sampling.StepPlan:
    with self._lock:
      if step not in self._plans:
        if len(self._plans) > 64:
          self._plans.pop(min(self._plans))
        self._plans[step] = self.sampler.plan(step)
      return self._plans[step]

  def load(self, local_index: int, featurize: FeaturizeFn | None = None
           ) -> tuple[dict[str, np.ndarray], np.ndarray, int]:
    """Prepared arrays, seed [2] and num_iter_recycling of the host's `local_index`-th example.

    With `featurize` (the numpy backend) the arrays are `featurize(prepared, seed, recycles)`:
    a record that fails there is skipped like one that fails to decode.
    """
    step, position = divmod(int(local_index), self.batch_size)
    slot = self.process_index * self.batch_size + position
    plan = self.plan(step)
    record, source = int(plan.records[slot]), int(plan.sources[slot])
    retries = self.config.sampling.max_bad_record_retries
    for attempt in range(retries + 1):
      rng, tf_seed = sampling.example_seeds(self.seed, step, slot)
      try:
        raw = dict(self.decode_fn(self.reader.read(int(self.table.file_index[record]),
                                                   int(self.table.offsets[record]))))
        raw["is_distillation"] = np.float32(self.table.is_distillation[record])
        prepared = training_example.prepare_example(raw, self.config, rng)
        if featurize is not None:
          prepared = featurize(prepared, tf_seed, plan.num_iter_recycling)
        return prepared, tf_seed, plan.num_iter_recycling
      except Exception as error:  # noqa: BLE001 - a long run must survive any bad record
        self.counter.add(self.table.ids[record], self.table.paths[self.table.file_index[record]],
                         f"{type(error).__name__}: {error}")
        if attempt == retries:
          raise RuntimeError(
              f"step {step} slot {slot}: {retries + 1} records in a row were unusable; "
              f"last error: {error}") from error
        record = self.sampler.replacement(step, slot, attempt, source)
    raise AssertionError("unreachable")


def make_sampler(table: records_lib.RecordTable, config: ml_collections.ConfigDict, *,
                 global_batch_size: int, seed: int) -> sampling.StepSampler:
  """The step sampler of a record table with the config's weights and mixture (Suppl. 1.2.5)."""
  weights = sampling.weights_from_config(table.num_res, table.cluster_ids, table.is_distillation,
                                         config.sampling)
  weights[table.num_res <= 0] = 0.0  # records whose metadata could not be read
  return sampling.StepSampler(
      weights, table.is_distillation, config.sampling.distillation_fraction, global_batch_size,
      config.common.num_recycle, config.train.uniform_recycling, seed)
