"""The loop's input: the training iterator and the validation batches of this process.

Training batches come from `af2flax.data.input_pipeline` (AlphaFold's sampling and transforms,
Suppl. 1.2, per-host sharding, checkpointable position). This module adds what the loop needs
around it:
  * building the dataset into the workdir on the first run when the config names sources instead
    of built datasets (`config.dataset.build_sources`, e.g. the bundled `data/samples`);
  * a held-out validation set: `config.dataset.eval_dirs`, or else `num_eval_examples` records
    taken out of the training table (chosen by a hash of their id, so the split never changes);
  * optionally, the same evaluation on training examples (`num_train_eval_examples`, -1: all),
    logged as `train_eval/...` next to the held-out `val/...`;
  * validation batches: every validation example once, with fixed randomness (the same crop and
    MSA sample at every evaluation), all recycling iterations (`num_iter_recycling` =
    `num_recycle`), padded to whole batches with `eval_mask` 0.
This is the loop's side of the data flow. With `config.data.backend` 'numpy' (or 'auto' on a
machine without TensorFlow) neither the training iterator nor the validation batches import
TensorFlow; the train step never does.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import os
import subprocess
import sys
from typing import Callable, Iterator, Sequence

from absl import logging
import jax
from jax.experimental import multihost_utils
import ml_collections
import numpy as np

from af2flax.data import input_pipeline
from af2flax.data import records as records_lib
from af2flax.data import sampling
from af2flax.data import training_example
from af2flax.train import loop

Batch = dict[str, np.ndarray]
EVAL_MASK_KEY = loop.EVAL_MASK_KEY


def build_datasets(sources: Sequence[Sequence[str]], out_dir: str,
                   default_resolution: float = 0.0) -> list[str]:
  """Runs the dataset builder for each (structures[, alignments]) source into `out_dir/<i>`.

  `default_resolution` (Å, 0: none) is recorded for structures whose file gives none.

  Process 0 builds, the others wait. The builder is resumable and byte-deterministic, so a
  second run (or a resumed training run) only checks that every shard is there.
  """
  dirs = []
  for i, source in enumerate(sources):
    structures, alignments = (list(source) + [""])[:2]
    dataset_dir = os.path.join(out_dir, f"{i}_{os.path.basename(os.path.normpath(structures))}")
    dirs.append(dataset_dir)
    if jax.process_index() == 0:
      # A separate process: the builder's worker pool must not inherit this one's JAX state.
      command = [sys.executable, "-m", "af2flax.data.build_dataset", "--structures",
                 structures, "--out", dataset_dir, "--workers", "2", "--shards", "2",
                 "--no_progress"]
      if alignments:
        command += ["--alignments", alignments]
      if default_resolution:
        command += ["--default_resolution", str(default_resolution)]
      logging.info("building the dataset %s from %s", dataset_dir, structures)
      result = subprocess.run(command, capture_output=True, text=True, check=False)
      logging.info("%s", result.stdout.strip())
      if result.returncode != 0:
        raise RuntimeError(f"building the dataset from {structures} into {dataset_dir} failed "
                           f"(`{' '.join(command)}`):\n{result.stderr[-2000:]}")
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices("af2flax dataset build")
  return dirs


def _load_tables(dirs: Sequence[str]) -> records_lib.RecordTable:
  table = None
  for directory in dirs:
    part = input_pipeline.load_table(directory)
    table = part if table is None else table.concat(part)
  if table is None or len(table) == 0:
    raise ValueError(f"no training examples in {list(dirs)}")
  return table


def _subset(table: records_lib.RecordTable, indices: np.ndarray) -> records_lib.RecordTable:
  return dataclasses.replace(
      table, file_index=table.file_index[indices], offsets=table.offsets[indices],
      ids=tuple(table.ids[i] for i in indices), num_res=table.num_res[indices],
      cluster_ids=tuple(table.cluster_ids[i] for i in indices),
      is_distillation=table.is_distillation[indices])


def _hash_order(table: records_lib.RecordTable) -> list[int]:
  """Record indices ordered by a hash of their ids: a split that never depends on file order."""
  return sorted(range(len(table)),
                key=lambda i: hashlib.sha256(table.ids[i].encode()).hexdigest())


def split_validation(table: records_lib.RecordTable, num_eval: int
                     ) -> tuple[records_lib.RecordTable, records_lib.RecordTable]:
  """(training, validation) tables: `num_eval` records chosen by a hash of their id."""
  if num_eval >= len(table):
    raise ValueError(f"num_eval_examples={num_eval} leaves no training example out of "
                     f"{len(table)}")
  order = _hash_order(table)
  eval_indices = np.sort(np.asarray(order[:num_eval]))
  train_indices = np.setdiff1d(np.arange(len(table)), eval_indices)
  return _subset(table, train_indices), _subset(table, eval_indices)


def training_subset(table: records_lib.RecordTable, num: int) -> records_lib.RecordTable:
  """`num` training records (all of them if `num` < 0 or >= their number), chosen by a hash of
  their id, for evaluating how well the model fits its own training set."""
  if num < 0 or num >= len(table):
    return table
  return _subset(table, np.sort(np.asarray(_hash_order(table)[:num])))


def validation_data_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The data config for validation: no MSA block deletion, every template, clamped FAPE."""
  config = ml_collections.ConfigDict(copy.deepcopy(config.to_dict()))
  config.train.block_delete_msa.enabled = False
  config.train.subsample_templates = False
  config.train.clamp_fape_prob = 1.0
  config.sampling.max_bad_record_retries = 0
  return config


def validation_batches(table: records_lib.RecordTable, data_config: ml_collections.ConfigDict,
                       *, global_batch_size: int, seed: int) -> Callable[[], Iterator[Batch]]:
  """A callable yielding this process's validation batches (see the module docstring).

  Process p takes records p, p + P, ...; every process yields the same number of batches of
  `global_batch_size / P` examples, padded with `eval_mask` 0.
  """
  config = validation_data_config(data_config)
  process_count, process_index = jax.process_count(), jax.process_index()
  local_batch = global_batch_size // process_count
  mine = np.arange(process_index, len(table), process_count)
  most_per_process = -(-len(table) // process_count)  # ceil
  num_batches = -(-most_per_process // local_batch)
  decode = input_pipeline.default_decode_fn()
  num_recycle = int(config.common.num_recycle)
  if input_pipeline.resolve_backend(config) == "numpy":
    def featurize(prepared: Batch, example_seed: np.ndarray) -> Batch:
      return training_example.featurize_numpy(prepared, example_seed, num_recycle, config)
  else:
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    featurize_graph = tf.function(
        lambda ex, s: training_example.featurize(ex, s, tf.constant(num_recycle, tf.int32),
                                                 config),
        input_signature=[training_example.prepared_signature(), tf.TensorSpec([2], tf.int64)])

    def featurize(prepared: Batch, example_seed: np.ndarray) -> Batch:
      return featurize_graph(prepared, tf.constant(example_seed, tf.int64))

  def example(record: int) -> Batch:
    reader = records_lib.RecordReader(table.paths)
    raw = dict(decode(reader.read(int(table.file_index[record]), int(table.offsets[record]))))
    raw["is_distillation"] = np.float32(table.is_distillation[record])
    rng, tf_seed = sampling.example_seeds(seed, 0, record)
    prepared = training_example.prepare_example(raw, config, rng)
    features = featurize(prepared, tf_seed)
    return {k: np.asarray(v) for k, v in features.items()}

  def batches() -> Iterator[Batch]:
    examples = [example(int(r)) for r in mine]
    if not examples:  # a process with nothing left still takes part (all padding)
      examples = [example(0)]
      mask = [0.0]
    else:
      mask = [1.0] * len(examples)
    while len(examples) < num_batches * local_batch:
      examples.append(examples[-1])
      mask.append(0.0)
    for b in range(num_batches):
      chunk = slice(b * local_batch, (b + 1) * local_batch)
      batch = {k: np.stack([e[k] for e in examples[chunk]]) for k in examples[0]}
      batch[EVAL_MASK_KEY] = np.asarray(mask[chunk], np.float32)
      yield batch

  return batches


def create_input(config: ml_collections.ConfigDict, workdir: str,
                 local_batch_size: int) -> loop.InputData:
  """This process's training iterator and validation batches, as `config.dataset` says."""
  dataset = config.dataset
  train_dirs = [d for d in dataset.train_dirs.split(",") if d]
  if not train_dirs:
    if not dataset.build_sources:
      raise ValueError("config.dataset.train_dirs is empty and config.dataset.build_sources "
                       "names nothing to build: give the TFRecord directories written by "
                       "`python -m af2flax.data.build_dataset`")
    train_dirs = build_datasets(dataset.build_sources, os.path.join(workdir, "dataset"),
                                float(dataset.get("default_resolution", 0.0)))
  table = _load_tables(train_dirs)
  eval_dirs = [d for d in dataset.eval_dirs.split(",") if d]
  eval_table = None
  if eval_dirs:
    eval_table = _load_tables(eval_dirs)
  elif dataset.num_eval_examples:
    table, eval_table = split_validation(table, int(dataset.num_eval_examples))
  logging.info("training on %d examples from %s; validation on %s", len(table), train_dirs,
               list(eval_table.ids) if eval_table is not None else None)
  train = input_pipeline.InputIterator(
      table, config.data, batch_size=local_batch_size, seed=config.seed,
      process_index=jax.process_index(), process_count=jax.process_count())
  eval_batches = None
  if eval_table is not None:
    eval_batches = validation_batches(eval_table, config.data,
                                      global_batch_size=dataset.eval_batch_size,
                                      seed=config.seed)
  train_eval_batches = None
  num_train_eval = int(dataset.get("num_train_eval_examples", 0))
  if num_train_eval:
    train_eval_table = training_subset(table, num_train_eval)
    logging.info("training-set evaluation on %s", list(train_eval_table.ids))
    train_eval_batches = validation_batches(train_eval_table, config.data,
                                            global_batch_size=dataset.eval_batch_size,
                                            seed=config.seed)
  return loop.InputData(train=train, eval_batches=eval_batches,
                        train_eval_batches=train_eval_batches)
