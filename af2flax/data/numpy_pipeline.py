"""The numpy backend of the training input: a pool of workers in place of tf.data.

Each example is a pure function of (seed, step, slot) (input_pipeline.py), so the examples of the
host's batches can be computed in any order by any number of workers: `NumpyBatches` submits the
host's examples in order to a thread or process pool, keeps `prefetch_batches` batches (plus one
example per worker) in flight, and assembles the results in order. The batches are the same for
any worker count and type, and a pipeline started at step s yields what an uninterrupted one
yields from s on (exact resume).

Threads share one loader_lib.ExampleLoader; numpy and BLAS release the GIL in the big operations (the
agreement matmul, one-hot scatters, copies) while decoding and the per-example transforms hold
it. Processes ('spawn', safe after JAX has started its threads) each build their own loader and
send the finished examples back through a pipe (a copy of each example). Measured in
bench/input_pipeline.py and docs/benchmarks.md.
"""

from __future__ import annotations

import collections
import concurrent.futures
import functools
import multiprocessing
import os
from typing import Any, Callable, Mapping, Sequence

import ml_collections
import numpy as np

from af2flax.data import example_loader as loader_lib
from af2flax.data import records as records_lib
from af2flax.data import training_example
from af2flax.data.example_loader import SkippedRecords

Example = dict[str, np.ndarray]
ExampleFn = Callable[[int], tuple[Example, SkippedRecords]]

_MAX_DEFAULT_WORKERS = 8
_WORKER_STATE: dict[str, Any] = {}


def default_workers(requested: int | None) -> int:
  """`requested` if positive, else one worker per host CPU (at most 8)."""
  if requested:
    return int(requested)
  return max(1, min(os.cpu_count() or 1, _MAX_DEFAULT_WORKERS))


def stack_examples(examples: Sequence[Mapping[str, np.ndarray]]) -> Example:
  """The batch [B, ...] of per-example arrays (no copy for a batch of one)."""
  if len(examples) == 1:
    return {key: value[None] for key, value in examples[0].items()}
  return {key: np.stack([example[key] for example in examples]) for key in examples[0]}


def _start_process_worker(make_example_fn: Callable[[], ExampleFn]) -> None:
  _WORKER_STATE["example_fn"] = make_example_fn()


def _example_in_process_worker(local_index: int) -> tuple[Example, SkippedRecords]:
  return _WORKER_STATE["example_fn"](local_index)


class NumpyBatches:
  """The host's batches from `start_step` on, computed by a worker pool, in order.

  Args:
    example_fn: host example index -> (feature dict, records skipped on the way); used by
      threads.
    make_example_fn: a picklable zero-argument callable that builds `example_fn` in a worker
      process (needed for worker_type 'process').
    batch_size: examples per batch; start_step: the first batch's step.
    workers: parallel examples; worker_type: 'thread' or 'process'.
    prefetch_batches: finished batches to keep ahead of the consumer.
    on_skipped: called with the skipped records of every example (bad-record counting).
  """

  def __init__(self, example_fn: ExampleFn | None, *, batch_size: int, start_step: int,
               workers: int, worker_type: str = "thread", prefetch_batches: int = 2,
               make_example_fn: Callable[[], ExampleFn] | None = None,
               on_skipped: Callable[[SkippedRecords], None] | None = None):
    if worker_type == "thread":
      if example_fn is None:
        raise ValueError("worker_type 'thread' needs example_fn")
      self._executor = concurrent.futures.ThreadPoolExecutor(
          workers, thread_name_prefix="af2flax-input")
      self._task = example_fn
    elif worker_type == "process":
      if make_example_fn is None:
        raise ValueError("worker_type 'process' needs make_example_fn")
      self._executor = concurrent.futures.ProcessPoolExecutor(
          workers, mp_context=multiprocessing.get_context("spawn"),
          initializer=_start_process_worker, initargs=(make_example_fn,))
      self._task = _example_in_process_worker
    else:
      raise ValueError(f"config.data.pipeline.worker_type must be 'thread' or 'process', "
                       f"got {worker_type!r}")
    self._batch_size = int(batch_size)
    self._next_index = int(start_step) * self._batch_size
    self._in_flight = max(1, prefetch_batches) * self._batch_size + workers
    self._pending: collections.deque[concurrent.futures.Future] = collections.deque()
    self._on_skipped = on_skipped
    self._closed = False

  def _fill(self) -> None:
    while len(self._pending) < self._in_flight:
      self._pending.append(self._executor.submit(self._task, self._next_index))
      self._next_index += 1

  def __iter__(self) -> "NumpyBatches":
    return self

  def __next__(self) -> Example:
    if self._closed:
      raise RuntimeError("this NumpyBatches was closed")
    examples = []
    for _ in range(self._batch_size):
      self._fill()
      example, skipped = self._pending.popleft().result()
      if skipped and self._on_skipped is not None:
        self._on_skipped(skipped)
      examples.append(example)
    self._fill()
    return stack_examples(examples)

  def close(self) -> None:
    """Cancels the queued examples and lets the workers go (running ones finish)."""
    if not self._closed:
      self._closed = True
      for future in self._pending:
        future.cancel()
      self._pending.clear()
      self._executor.shutdown(wait=False, cancel_futures=True)

  def __del__(self):
    try:
      self.close()
    except Exception:  # noqa: BLE001 - interpreter shutdown
      pass


def _featurize_numpy(prepared: dict[str, np.ndarray], seed: np.ndarray, recycles: int, *,
                     config: ml_collections.ConfigDict) -> dict[str, np.ndarray]:
  return training_example.featurize_numpy(prepared, seed, recycles, config)


def _example_fn_of_process(table: records_lib.RecordTable, config_dict: dict,
                           global_batch_size: int, loader_kwargs: dict) -> ExampleFn:
  """The example function of one worker process (worker_type 'process'): its own loader, whose
  counter collects the skipped records for the main process instead of logging them."""
  config = ml_collections.ConfigDict(config_dict)
  sampler = loader_lib.make_sampler(table, config, global_batch_size=global_batch_size,
                                    seed=loader_kwargs["seed"])
  loader = loader_lib.ExampleLoader(table, config, sampler=sampler,
                                    counter=loader_lib.BadRecordCounter(log=False),
                                    use_tensorflow_reader=False, **loader_kwargs)
  featurize = functools.partial(_featurize_numpy, config=config)

  def example_fn(local_index: int) -> tuple[Example, SkippedRecords]:
    loader.counter.events = []   # one task at a time per process
    features, _, _ = loader.load(local_index, featurize)
    return features, loader.counter.events

  return example_fn


def make_numpy_batches(table: records_lib.RecordTable, config: ml_collections.ConfigDict, *,
                       batch_size: int, seed: int, start_step: int = 0,
                       process_index: int | None = None, process_count: int | None = None,
                       decode_fn: loader_lib.DecodeFn | None = None,
                       verify_checksums: bool = True, num_parallel_calls: int | None = None,
                       counter: loader_lib.BadRecordCounter | None = None) -> NumpyBatches:
  """`input_pipeline.make_dataset` without TensorFlow: the host's batches from `start_step` on.

  The same arguments and per-example work as make_dataset (records, sampling, prepare_example,
  bad-record skipping), then training_example.featurize_numpy, on `num_parallel_calls` (default
  config.pipeline.workers) threads or processes (config.pipeline.worker_type). Returns an
  iterator of dicts {feature name: [batch_size, R, ...]}; call its close() when done.
  """
  if process_index is None or process_count is None:
    import jax  # pylint: disable=import-outside-toplevel
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index {process_index} outside 0..{process_count - 1}")
  counter = counter or loader_lib.BadRecordCounter()
  pipeline = config.pipeline
  workers = default_workers(num_parallel_calls or pipeline.get("workers", 0))
  worker_type = pipeline.get("worker_type", "thread")
  global_batch_size = batch_size * process_count
  loader_kwargs = dict(seed=seed, batch_size=batch_size, process_index=process_index,
                       decode_fn=decode_fn or loader_lib.default_decode_fn(),
                       verify_checksums=verify_checksums)

  def on_skipped(skipped: SkippedRecords) -> None:
    for event in skipped:
      counter.add(*event)

  example_fn = make_example_fn = None
  if worker_type == "process":
    make_example_fn = functools.partial(_example_fn_of_process, table, config.to_dict(),
                                        global_batch_size, loader_kwargs)
  else:
    # Threads share one loader, which counts (and logs) skipped records in `counter` directly.
    sampler = loader_lib.make_sampler(table, config, global_batch_size=global_batch_size,
                                      seed=seed)
    loader = loader_lib.ExampleLoader(table, config, sampler=sampler, counter=counter,
                                      use_tensorflow_reader=False, **loader_kwargs)
    featurize = functools.partial(_featurize_numpy, config=config)

    def example_fn(local_index: int) -> tuple[Example, SkippedRecords]:
      features, _, _ = loader.load(local_index, featurize)
      return features, []

  return NumpyBatches(
      example_fn, make_example_fn=make_example_fn, batch_size=batch_size, start_step=start_step,
      workers=workers, worker_type=worker_type, prefetch_batches=pipeline.prefetch_batches,
      on_skipped=on_skipped)
