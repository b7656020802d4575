"""The training run's input: the train iterator and the validation batches of one process.

`create_input(config, workdir=..., local_batch_size=..., process_index=..., process_count=...)`
reads the training config's `data` (sampling and transforms), `dataset` (where the records are)
and `seed`:
  dataset.train_dirs   comma-separated build_dataset outputs (PDB and self-distillation sets);
                       empty: build one from dataset.build_structures / build_alignments into
                       <workdir>/dataset first (process 0 builds, the others wait);
  dataset.eval_dirs    validation sets; empty: hold `num_eval_examples` records out of training;
  dataset.eval_batch_size  global validation batch.
Validation examples are deterministic (fixed crop and MSA sample per record, no block deletion,
the top templates, every recycling iteration) so that val metrics of different steps compare.
`config.data.backend` picks tf.data or the TensorFlow-free numpy backend for both the training
iterator and the validation batches (input_pipeline.resolve_backend).
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import os
import time
from typing import Callable, Iterable, Iterator

import ml_collections
import numpy as np

from af2flax.data import fileio
from af2flax.data import input_pipeline
from af2flax.data import numpy_pipeline
from af2flax.data import records as records_lib
from af2flax.data import sampling
from af2flax.data import training_example

EVAL_MASK_KEY = "eval_mask"
# Validation examples draw their randomness from this pseudo-step (training never reaches it).
_EVAL_STEP = 2**40
_BUILD_WAIT_S = 24 * 3600


@dataclasses.dataclass
class TrainingInput:
  """train: numpy batches with get_state/set_state; eval_batches: None or a callable returning
  this process's validation batches (same count on every process, `eval_mask` 0 = padding)."""
  train: Iterator[dict[str, np.ndarray]]
  eval_batches: Callable[[], Iterable[dict[str, np.ndarray]]] | None


def eval_data_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The data config of validation: deterministic choices, all recycling iterations."""
  config = ml_collections.ConfigDict(config.to_dict())
  config.train.block_delete_msa.enabled = False
  config.train.subsample_templates = False
  config.train.uniform_recycling = False
  config.train.clamp_fape_prob = 1.0
  return config


def _eval_slots(num_records: int, batch_size: int, process_index: int,
                process_count: int) -> tuple[np.ndarray, np.ndarray]:
  """(record of each of this process's validation slots, eval_mask): records process_index,
  +process_count, ... once each, padded with record 0 (mask 0) to whole batches."""
  num_batches = -(-num_records // (batch_size * process_count))
  slots = np.arange(num_batches * batch_size) * process_count + process_index
  return np.where(slots < num_records, slots, 0), (slots < num_records).astype(np.float32)


def _eval_example_loader(table: records_lib.RecordTable, config: ml_collections.ConfigDict,
                         seed: int, decode_fn: input_pipeline.DecodeFn | None,
                         use_tensorflow_reader: bool | None = None
                         ) -> Callable[[int], tuple[dict[str, np.ndarray], np.ndarray]]:
  """record index -> (prepared example, seed [2]): a pure function of (seed, record)."""
  decode_fn = decode_fn or input_pipeline.default_decode_fn()
  reader = records_lib.RecordReader(table.paths, use_tensorflow=use_tensorflow_reader)

  def load(record: int) -> tuple[dict[str, np.ndarray], np.ndarray]:
    rng, example_seed = sampling.example_seeds(seed, _EVAL_STEP, record)
    raw = dict(decode_fn(reader.read(int(table.file_index[record]), int(table.offsets[record]))))
    raw["is_distillation"] = np.float32(table.is_distillation[record])
    return training_example.prepare_example(raw, config, rng), example_seed

  return load


def make_eval_dataset(table: records_lib.RecordTable, config: ml_collections.ConfigDict, *,
                      batch_size: int, seed: int, process_index: int, process_count: int,
                      decode_fn: input_pipeline.DecodeFn | None = None) -> "tf.data.Dataset":
  """This process's validation batches: records process_index, +process_count, ... once each,
  padded (eval_mask 0) so that every process yields ceil(N / (batch * processes)) batches.

  `config` is a data config (usually `eval_data_config(...)`); example i is a pure function of
  (seed, i). Unreadable records raise (a validation set should be clean). tf.data backend.
  """
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  load_prepared = _eval_example_loader(table, config, seed, decode_fn, use_tensorflow_reader=True)
  records, mask = _eval_slots(len(table), batch_size, process_index, process_count)
  signature = training_example.prepared_signature()
  keys = list(signature)
  recycles = np.int32(config.common.num_recycle)

  def load_flat(index: np.ndarray) -> list[np.ndarray]:
    prepared, example_seed = load_prepared(int(index))
    return [prepared[key] for key in keys] + [example_seed]

  featurize_graph = input_pipeline._featurize_function(config)  # pylint: disable=protected-access

  def load(index: tf.Tensor, eval_mask: tf.Tensor) -> dict[str, tf.Tensor]:
    outputs = tf.numpy_function(load_flat, [index],
                                [signature[key].dtype for key in keys] + [tf.int64])
    example = {}
    for key, value in zip(keys, outputs):
      value.set_shape(signature[key].shape)
      example[key] = value
    batch = featurize_graph(example, tf.ensure_shape(outputs[-1], [2]), tf.constant(recycles))
    batch[EVAL_MASK_KEY] = eval_mask
    return batch

  dataset = tf.data.Dataset.from_tensor_slices((records, mask))
  dataset = dataset.map(load, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  return dataset.batch(batch_size, drop_remainder=True).prefetch(1)


def make_eval_batches(table: records_lib.RecordTable, config: ml_collections.ConfigDict, *,
                      batch_size: int, seed: int, process_index: int, process_count: int,
                      decode_fn: input_pipeline.DecodeFn | None = None,
                      workers: int | None = None
                      ) -> Callable[[], Iterator[dict[str, np.ndarray]]]:
  """`make_eval_dataset` without TensorFlow (numpy backend): a callable that yields this
  process's validation batches (the same slots, eval_mask and per-record determinism), computed
  by `workers` threads (default config.pipeline.workers)."""
  load_prepared = _eval_example_loader(table, config, seed, decode_fn, use_tensorflow_reader=False)
  records, mask = _eval_slots(len(table), batch_size, process_index, process_count)
  recycles = int(config.common.num_recycle)
  workers = numpy_pipeline.default_workers(workers or config.pipeline.get("workers", 0))

  def example(slot: int) -> dict[str, np.ndarray]:
    prepared, example_seed = load_prepared(int(records[slot]))
    features = training_example.featurize_numpy(prepared, example_seed, recycles, config)
    features[EVAL_MASK_KEY] = np.float32(mask[slot])
    return features

  def batches() -> Iterator[dict[str, np.ndarray]]:
    # At most one batch plus one example per worker in flight (not the whole validation set).
    window = batch_size + workers
    with concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="af2flax-eval") as pool:
      pending = collections.deque(pool.submit(example, slot)
                                  for slot in range(min(window, len(records))))
      next_slot = len(pending)
      for _ in range(len(records) // batch_size):
        examples = []
        for _ in range(batch_size):
          examples.append(pending.popleft().result())
          if next_slot < len(records):
            pending.append(pool.submit(example, next_slot))
            next_slot += 1
        yield numpy_pipeline.stack_examples(examples)

  return batches


def _split_dirs(value: str) -> list[str]:
  return [item.strip() for item in str(value or "").split(",") if item.strip()]


def _build_dataset(config: ml_collections.ConfigDict, workdir: str, process_index: int) -> str:
  """Builds the dataset into <workdir>/dataset (process 0) or waits for it (other processes)."""
  out = os.path.join(str(workdir), "dataset")
  info = os.path.join(out, records_lib.DATASET_INFO_FILE)
  if process_index == 0:
    from af2flax.data import build_dataset  # pylint: disable=import-outside-toplevel
    build_dataset.build(build_dataset.BuildOptions(
        structures=config.dataset.build_structures,
        alignments=config.dataset.get("build_alignments") or None, out=out))
  else:
    deadline = time.monotonic() + _BUILD_WAIT_S
    while not fileio.exists(info):
      if time.monotonic() > deadline:
        raise TimeoutError(f"process {process_index}: {info} did not appear (process 0 builds)")
      time.sleep(10)
  return out


def _load_tables(directories: list[str]) -> records_lib.RecordTable:
  table = None
  for directory in directories:
    part = input_pipeline.load_table(directory)
    table = part if table is None else table.concat(part)
  return table


def create_input(config: ml_collections.ConfigDict, *, workdir: str, local_batch_size: int,
                 process_index: int, process_count: int) -> TrainingInput:
  """The train iterator and validation batches of one process (see the module docstring).

  Args:
    config: the training config (with `data`, `dataset` and `seed`).
    workdir: the run's directory (a dataset built from structures goes to <workdir>/dataset).
    local_batch_size: examples per process and step.
    process_index, process_count: this process and the number of processes.
  """
  for field in ("data", "dataset", "seed"):
    if field not in config:
      raise ValueError(f"create_input needs the training config (with .data, .dataset and "
                       f".seed); this config has no {field!r}")
  train_dirs = _split_dirs(config.dataset.train_dirs)
  if not train_dirs:
    if not config.dataset.get("build_structures"):
      raise ValueError("set config.dataset.train_dirs (build_dataset outputs) or "
                       "config.dataset.build_structures (build one into the workdir)")
    train_dirs = [_build_dataset(config, workdir, process_index)]
  table = _load_tables(train_dirs)
  eval_dirs = _split_dirs(config.dataset.get("eval_dirs", ""))
  eval_table = None
  if eval_dirs:
    eval_table = _load_tables(eval_dirs)
  elif config.dataset.get("num_eval_examples", 0):
    # Held out by a seeded permutation: the same split on every process and every restart.
    order = np.random.default_rng([config.seed, 7]).permutation(len(table))
    held_out = np.sort(order[:config.dataset.num_eval_examples])
    eval_table = table.subset(held_out)
    table = table.subset(np.sort(order[config.dataset.num_eval_examples:]))
  backend = input_pipeline.resolve_backend(config.data)
  train = input_pipeline.InputIterator(table, config.data, batch_size=local_batch_size,
                                       seed=config.seed, process_index=process_index,
                                       process_count=process_count, backend=backend)
  eval_batches = None
  if eval_table is not None and len(eval_table):
    eval_batch = max(1, config.dataset.get("eval_batch_size", 8) // process_count)
    eval_args = dict(batch_size=eval_batch, seed=config.seed, process_index=process_index,
                     process_count=process_count)
    if backend == "numpy":
      eval_batches = make_eval_batches(eval_table, eval_data_config(config.data), **eval_args)
    else:
      eval_batches = make_eval_dataset(eval_table, eval_data_config(config.data),
                                       **eval_args).as_numpy_iterator
  return TrainingInput(train=train, eval_batches=eval_batches)
