"""The training input: sampled records -> fixed-size batches of AlphaFold features.

Design (deterministic and index-based):
  step s --StepSampler(seed)--> the global batch's records (weighted PDB / distillation mixture,
  no record twice in a step, one num_iter_recycling per step) --host h takes its slots-->
  read + decode + per-example transforms (numpy) --> per-iteration MSA features and padding
  --> batch --> prefetch --> numpy iterator.

Two backends (`config.backend`, `resolve_backend`): 'tf' runs this as a tf.data pipeline (the
per-example step in parallel maps, the MSA features as TF graph ops, msa_transforms.py);
'numpy' needs no TensorFlow (GPU images): a thread or process pool (numpy_pipeline.py) runs the
same per-example step and the numpy MSA features (msa_transforms_numpy.py). Both give the same
keys, shapes and distributions; their random draws differ.

Every example is a pure function of (seed, step, slot), so
  * the same seed gives the same batches whatever the thread count,
  * hosts never see the same example within a step, and the global batch does not depend on the
    number of hosts,
  * the iterator's state is the next step: `InputIterator.get_state()` is a small JSON dict that
    the train loop saves with its checkpoint, and a restored iterator yields exactly the batches
    an uninterrupted run would.
Reads are random-access (records.py), so there is no shuffle buffer and no epoch boundary:
weighted sampling with replacement across steps plays the role of shuffle + repeat.

Bad records (corrupt bytes, undecodable protos, inconsistent shapes) are replaced by a
deterministic substitute from the same source, logged, and counted (`InputIterator.bad_records`).
"""

from __future__ import annotations

import atexit
import hashlib
import json
import logging
import weakref
from typing import Any, Callable, Iterator, Mapping, Sequence

import ml_collections
import numpy as np

from af2flax.data import fileio
from af2flax.data import records as records_lib
from af2flax.data import training_example
# The backend-neutral per-example step, and the numpy backend (re-exported: callers use them
# from here).
from af2flax.data.example_loader import BadRecordCounter  # noqa: F401
from af2flax.data.example_loader import DecodeFn
from af2flax.data.example_loader import ExampleLoader
from af2flax.data.example_loader import default_decode_fn
from af2flax.data.example_loader import make_sampler
from af2flax.data.numpy_pipeline import make_numpy_batches

_LOG = logging.getLogger(__name__)
_STATE_VERSION = 1
BACKENDS = ("tf", "numpy", "auto")
# Pipeline threads that call back into Python (the numpy loading step) must be stopped before the
# interpreter shuts down, or the process can hang at exit: close every live iterator at exit.
_LIVE_ITERATORS: "weakref.WeakSet[InputIterator]" = weakref.WeakSet()


@atexit.register
def _close_live_iterators() -> None:
  for iterator in list(_LIVE_ITERATORS):
    iterator.close()


def resolve_backend(config: ml_collections.ConfigDict) -> str:
  """'tf' or 'numpy': `config.backend` ('auto': tf when TensorFlow is importable, else numpy)."""
  backend = str(config.get("backend", "auto"))
  if backend not in BACKENDS:
    raise ValueError(f"config.data.backend must be one of {BACKENDS}, got {backend!r}")
  if backend != "auto":
    return backend
  try:
    import tensorflow  # noqa: F401  pylint: disable=import-outside-toplevel,unused-import
  except ImportError:
    return "numpy"
  return "tf"


def make_dataset(table: records_lib.RecordTable, config: ml_collections.ConfigDict, *,
                 batch_size: int, seed: int, start_step: int = 0, process_index: int | None = None,
                 process_count: int | None = None, decode_fn: DecodeFn | None = None,
                 verify_checksums: bool = True, num_parallel_calls: int | None = None,
                 counter: BadRecordCounter | None = None) -> tf.data.Dataset:
  """The host's batches from `start_step` on, as an infinite tf.data.Dataset.

  Args:
    table: every record of the training set (records.RecordTable).
    config: the data config (af2flax/data/config.py).
    batch_size: examples per batch on this host (leading batch axis).
    seed: the data seed; the same seed gives the same batches.
    start_step: the first step to produce (resuming).
    process_index, process_count: this host and the number of hosts (default: jax's).
    decode_fn: record bytes -> raw feature dict (default: the builder's codec).
    verify_checksums: check TFRecord CRCs on every read.
    num_parallel_calls: parallel examples in flight (default AUTOTUNE).
    counter: where bad records are counted.
  Returns:
    Dataset of dicts {feature name: [batch_size, R, ...]} with training_example.batch_shapes.
  """
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  if process_index is None or process_count is None:
    import jax  # pylint: disable=import-outside-toplevel
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index {process_index} outside 0..{process_count - 1}")
  sampler = make_sampler(table, config, global_batch_size=batch_size * process_count, seed=seed)
  loader = ExampleLoader(
      table, config, sampler=sampler, seed=seed, batch_size=batch_size,
      process_index=process_index, decode_fn=decode_fn or default_decode_fn(),
      verify_checksums=verify_checksums, counter=counter or BadRecordCounter(),
      use_tensorflow_reader=True)
  signature = training_example.prepared_signature()
  keys = list(signature)

  def load_flat(local_index: np.ndarray) -> list[np.ndarray]:
    prepared, tf_seed, recycles = loader.load(int(local_index))
    return [prepared[key] for key in keys] + [tf_seed, np.int32(recycles)]

  def load(local_index: tf.Tensor) -> dict[str, tf.Tensor]:
    outputs = tf.numpy_function(
        load_flat, [local_index], [signature[key].dtype for key in keys] + [tf.int64, tf.int32],
        name="load_example")
    example = {}
    for key, value in zip(keys, outputs):
      value.set_shape(signature[key].shape)
      example[key] = value
    example["_seed"] = tf.ensure_shape(outputs[-2], [2])
    example["_num_iter_recycling"] = tf.ensure_shape(outputs[-1], [])
    return example

  featurize_graph = _featurize_function(config)

  def featurize(example: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
    seed_tensor = example.pop("_seed")
    recycles = example.pop("_num_iter_recycling")
    return featurize_graph(example, seed_tensor, recycles)

  parallel = tf.data.AUTOTUNE if num_parallel_calls is None else num_parallel_calls
  dataset = tf.data.Dataset.counter(start_step * batch_size)
  dataset = dataset.map(load, num_parallel_calls=parallel, deterministic=True)
  dataset = dataset.map(featurize, num_parallel_calls=parallel, deterministic=True)
  dataset = dataset.batch(batch_size, drop_remainder=True)
  dataset = dataset.prefetch(config.pipeline.prefetch_batches)
  options = tf.data.Options()
  options.deterministic = True
  if config.pipeline.threads:
    options.threading.private_threadpool_size = config.pipeline.threads
  if config.pipeline.max_intra_op_parallelism:
    options.threading.max_intra_op_parallelism = config.pipeline.max_intra_op_parallelism
  return dataset.with_options(options)


_FEATURIZE_FUNCTIONS: dict[str, Any] = {}


def _featurize_function(config: ml_collections.ConfigDict):
  """training_example.featurize as a tf.function traced once per config and process.

  tf.data traces a map function for every new dataset; calling an already traced tf.function
  from it reuses that graph, so re-creating the pipeline (resume, tests) costs no re-tracing.
  """
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  key = config.to_json(sort_keys=True)
  if key not in _FEATURIZE_FUNCTIONS:
    frozen = ml_collections.ConfigDict(config.to_dict())

    @tf.function(input_signature=[training_example.prepared_signature(),
                                  tf.TensorSpec([2], tf.int64), tf.TensorSpec([], tf.int32)])
    def featurize(example, seed, num_iter_recycling):
      return training_example.featurize(example, seed, num_iter_recycling, frozen)

    _FEATURIZE_FUNCTIONS[key] = featurize
  return _FEATURIZE_FUNCTIONS[key]


class InputIterator:
  """Numpy batches with a checkpointable position, from either backend (`resolve_backend`).

  `get_state()` returns a JSON-serialisable dict (the next step plus what must match on
  restore); `InputIterator(..., state=saved)` or `set_state(saved)` continues exactly there.
  `backend` overrides config.backend ('tf' | 'numpy' | 'auto').
  """

  def __init__(self, table: records_lib.RecordTable, config: ml_collections.ConfigDict, *,
               batch_size: int, seed: int, process_index: int | None = None,
               process_count: int | None = None, state: Mapping[str, Any] | None = None,
               decode_fn: DecodeFn | None = None, verify_checksums: bool = True,
               num_parallel_calls: int | None = None, backend: str | None = None):
    if process_index is None or process_count is None:
      import jax  # pylint: disable=import-outside-toplevel
      process_index = jax.process_index() if process_index is None else process_index
      process_count = jax.process_count() if process_count is None else process_count
    self._table, self._config = table, config
    self.backend = resolve_backend(
        ml_collections.ConfigDict({"backend": backend or config.get("backend", "auto")}))
    self._kwargs = dict(batch_size=batch_size, seed=seed, process_index=process_index,
                        process_count=process_count, decode_fn=decode_fn,
                        verify_checksums=verify_checksums, num_parallel_calls=num_parallel_calls)
    self._fingerprint = table.fingerprint()
    self.counter = BadRecordCounter()
    self._step = 0
    self._iterator: Iterator | None = None
    if state is not None:
      self.set_state(state)
    _LIVE_ITERATORS.add(self)

  def close(self) -> None:
    """Stops the background work; the next `next()` restarts at the current step."""
    if self._iterator is not None and hasattr(self._iterator, "close"):
      self._iterator.close()
    self._iterator = None

  @property
  def table(self) -> records_lib.RecordTable:
    """The records this iterator samples from."""
    return self._table

  @property
  def step(self) -> int:
    """The step of the next batch."""
    return self._step

  @property
  def bad_records(self) -> int:
    """Records skipped so far (corrupt or inconsistent)."""
    return self.counter.count

  def _identity(self) -> dict[str, Any]:
    """What a saved position must match: the examples of a step depend on nothing else (not on
    the number of hosts), so a run may resume on another host count with the same global
    batch."""
    kwargs = self._kwargs
    return {"version": _STATE_VERSION, "seed": int(kwargs["seed"]),
            "global_batch_size": int(kwargs["batch_size"] * kwargs["process_count"]),
            "table": self._fingerprint, "config": _config_digest(self._config)}

  def get_state(self) -> dict[str, Any]:
    """{'step': next step, ...identity, backend}: JSON-serialisable, a few hundred bytes."""
    return {"step": self._step, **self._identity(), "backend": self.backend,
            "process_index": int(self._kwargs["process_index"]),
            "process_count": int(self._kwargs["process_count"])}

  def set_state(self, state: Mapping[str, Any]) -> None:
    """Continue from a saved state; raises ValueError if it belongs to another pipeline.

    A state saved by the other backend is accepted with a warning (a run may move between
    machines with and without TensorFlow): the batches from there on are equally distributed
    but not the ones the uninterrupted run would have seen.
    """
    identity = self._identity()
    mismatched = {key: (state.get(key), value) for key, value in identity.items()
                  if state.get(key) != value}
    if mismatched:
      raise ValueError(f"input pipeline state does not match this pipeline "
                       f"(saved, current): {mismatched}")
    saved_backend = state.get("backend", "tf")
    if saved_backend != self.backend:
      _LOG.warning("input state was saved by the %r backend; continuing at step %s with the %r "
                   "backend (other random draws than an uninterrupted run)", saved_backend,
                   state["step"], self.backend)
    self._step = int(state["step"])
    self.close()

  def __iter__(self) -> "InputIterator":
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    if self._iterator is None:
      if self.backend == "numpy":
        self._iterator = make_numpy_batches(self._table, self._config, start_step=self._step,
                                            counter=self.counter, **self._kwargs)
      else:
        dataset = make_dataset(self._table, self._config, start_step=self._step,
                               counter=self.counter, **self._kwargs)
        self._iterator = dataset.as_numpy_iterator()
    batch = next(self._iterator)
    self._step += 1
    return batch


def _config_digest(config: ml_collections.ConfigDict) -> str:
  """Digest of everything in the config that changes the batches (not the `pipeline` knobs;
  not the backend, which the state records separately)."""
  content = config.to_dict()
  content.pop("pipeline", None)
  content.pop("backend", None)
  return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()[:16]


def load_table(dataset_dir: str, decode_fn: DecodeFn | None = None,
               verify_checksums: bool = True) -> records_lib.RecordTable:
  """The RecordTable of one dataset: a builder output directory (its index.tsv), or else a
  directory / glob of TFRecord shards whose metadata is read from the records themselves."""
  if fileio.exists(f"{dataset_dir}/{records_lib.DATASET_INFO_FILE}"):
    return records_lib.table_from_dataset(dataset_dir)
  return records_lib.table_by_decoding(records_lib.shard_paths(dataset_dir),
                                       decode_fn or default_decode_fn(), verify_checksums)


def make_iterator(dataset_dirs: str | Sequence[str], config: ml_collections.ConfigDict, *,
                  batch_size: int, seed: int, **kwargs) -> InputIterator:
  """InputIterator over one or more datasets (e.g. the PDB set and a self-distillation set,
  mixed at config.sampling.distillation_fraction by their is_distillation column).

  Args:
    dataset_dirs: build_dataset output directories, or directories / globs of shards.
    config: the data config; batch_size: per host; seed: the data seed.
    **kwargs: InputIterator's (process_index, process_count, state, decode_fn, backend, ...).
  """
  if isinstance(dataset_dirs, str):
    dataset_dirs = [dataset_dirs]
  table = None
  for directory in dataset_dirs:
    part = load_table(directory, kwargs.get("decode_fn"), kwargs.get("verify_checksums", True))
    table = part if table is None else table.concat(part)
  return InputIterator(table, config, batch_size=batch_size, seed=seed, **kwargs)


def create_input(config: ml_collections.ConfigDict, **kwargs):
  """The train loop's entry point; see `af2flax.data.train_input.create_input`."""
  from af2flax.data import train_input  # pylint: disable=import-outside-toplevel
  return train_input.create_input(config, **kwargs)
