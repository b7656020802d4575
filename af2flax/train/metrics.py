"""Training metrics: clu writers (TensorBoard + log), periodic progress and profiling.

clu (and the TensorFlow that its TensorBoard writer imports) is optional: GPU images may have
neither. Without clu, `create_writer` returns a small writer that logs every scalar and
writes TensorBoard event files with the pure-Python writer of the `tensorboard` package (or a
`metrics.jsonl` file if that is missing too), and the periodic actions fall back to a plain
steps/s report and `jax.profiler` traces. The train step never depends on any of this.

`MetricAccumulator` keeps each step's metrics on the device and averages them only when they
are written, so the loop does not wait for the device every step.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any, Mapping, Protocol, Sequence

from absl import logging
import jax
import numpy as np

# Step metrics that are counters or the latest value, not averaged over the log interval.
LATEST_VALUE_METRICS = ("learning_rate", "skipped_steps", "consecutive_skips")
# Step metrics averaged over all steps (including skipped ones); others over applied steps.
ALL_STEP_METRICS = ("skipped",)


class MetricWriter(Protocol):
  def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None: ...
  def write_hparams(self, hparams: Mapping[str, Any]) -> None: ...
  def flush(self) -> None: ...
  def close(self) -> None: ...


class FallbackWriter:
  """Log + TensorBoard events (or JSON lines) without clu and without TensorFlow."""

  def __init__(self, logdir: str | os.PathLike | None, just_logging: bool = False):
    self._events = None
    self._jsonl = None
    if logdir is None or just_logging:
      return
    os.makedirs(logdir, exist_ok=True)
    try:
      from tensorboard.compat.proto import event_pb2, summary_pb2  # pylint: disable=g-import-not-at-top
      from tensorboard.summary.writer.event_file_writer import EventFileWriter  # pylint: disable=g-import-not-at-top
      self._event_pb2, self._summary_pb2 = event_pb2, summary_pb2
      self._events = EventFileWriter(os.fspath(logdir))
    except ImportError:
      self._jsonl = open(os.path.join(logdir, "metrics.jsonl"), "a", encoding="utf-8")

  def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
    values = {k: float(np.asarray(v)) for k, v in scalars.items()}
    logging.info("[%d] %s", step, ", ".join(f"{k}={v:.6g}" for k, v in sorted(values.items())))
    if self._events is not None:
      summary = self._summary_pb2.Summary(value=[
          self._summary_pb2.Summary.Value(tag=k, simple_value=v) for k, v in values.items()])
      self._events.add_event(self._event_pb2.Event(wall_time=time.time(), step=int(step),
                                                   summary=summary))
    if self._jsonl is not None:
      self._jsonl.write(json.dumps({"step": int(step), **values}) + "\n")

  def write_hparams(self, hparams: Mapping[str, Any]) -> None:
    logging.info("hparams: %s", dict(hparams))

  def flush(self) -> None:
    if self._events is not None:
      self._events.flush()
    if self._jsonl is not None:
      self._jsonl.flush()

  def close(self) -> None:
    self.flush()
    if self._events is not None:
      self._events.close()
    if self._jsonl is not None:
      self._jsonl.close()


def create_writer(logdir: str | os.PathLike, *, just_logging: bool = False) -> MetricWriter:
  """clu's default writer (TensorBoard under `logdir` + log); `FallbackWriter` without clu.

  Only process 0 writes event files; other processes log (`just_logging`).
  """
  try:
    from clu import metric_writers  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    logging.warning("clu metric writers unavailable (%s): using the fallback writer", e)
    return FallbackWriter(logdir, just_logging=just_logging)
  return metric_writers.create_default_writer(os.fspath(logdir), just_logging=just_logging,
                                              asynchronous=True)


class _FallbackReportProgress:
  """Logs steps/s and an ETA every `every_steps` steps (clu.periodic_actions.ReportProgress)."""

  def __init__(self, *, num_train_steps: int, writer: MetricWriter, every_steps: int):
    self._num_train_steps, self._writer, self._every = num_train_steps, writer, every_steps
    self._last_step, self._last_time = None, None

  def __call__(self, step: int) -> None:
    now = time.monotonic()
    if self._last_step is None:
      self._last_step, self._last_time = step, now
      return
    if step % self._every and step != self._num_train_steps:
      return
    rate = (step - self._last_step) / max(now - self._last_time, 1e-9)
    eta = (self._num_train_steps - step) / max(rate, 1e-9)
    logging.info("%.2f steps/s, %d/%d, ETA %.0f s", rate, step, self._num_train_steps, eta)
    self._writer.write_scalars(step, {"steps_per_sec": rate})
    self._last_step, self._last_time = step, now


class _FallbackProfile:
  """Traces `num_profile_steps` steps from `first_profile` with `jax.profiler`."""

  def __init__(self, *, logdir: str, first_profile: int, num_profile_steps: int):
    self._logdir, self._first, self._num = logdir, first_profile, num_profile_steps
    self._running = False

  def __call__(self, step: int) -> None:
    if step == self._first and not self._running:
      jax.profiler.start_trace(self._logdir)
      self._running = True
    elif self._running and step >= self._first + self._num:
      jax.profiler.stop_trace()
      self._running = False


def periodic_actions(config: Any, workdir: str | os.PathLike, writer: MetricWriter,
                     num_train_steps: int) -> list[Any]:
  """ReportProgress on every process, Profile on process 0 (when `config.profile_steps`)."""
  try:
    from clu import periodic_actions as clu_actions  # pylint: disable=g-import-not-at-top
  except ImportError:
    clu_actions = None
  every = int(config.log_every_steps)
  actions = []
  if clu_actions is not None:
    actions.append(clu_actions.ReportProgress(num_train_steps=num_train_steps, writer=writer,
                                              every_steps=every, every_secs=None))
  else:
    actions.append(_FallbackReportProgress(num_train_steps=num_train_steps, writer=writer,
                                           every_steps=every))
  if jax.process_index() == 0 and int(config.get("profile_steps", 0)) > 0:
    logdir = os.fspath(workdir)
    first = int(config.get("profile_first_step", 10))
    if clu_actions is not None:
      actions.append(clu_actions.Profile(logdir=logdir, first_profile=first,
                                         num_profile_steps=int(config.profile_steps),
                                         profile_duration_ms=None, every_secs=None))
    else:
      actions.append(_FallbackProfile(logdir=logdir, first_profile=first,
                                      num_profile_steps=int(config.profile_steps)))
  return actions


class MetricAccumulator:
  """Collects per-step metric dicts (device arrays) and summarises them on `summary()`.

  Loss terms and norms are averaged over the steps whose update was applied (a skipped step's
  loss is not finite by definition); `skipped` is averaged over all steps; counters and the
  learning rate take their latest value.
  """

  def __init__(self):
    self._steps: list[Mapping[str, jax.Array]] = []

  def add(self, metrics: Mapping[str, jax.Array]) -> None:
    self._steps.append(metrics)

  def __len__(self) -> int:
    return len(self._steps)

  def summary(self, prefix: str = "train/") -> dict[str, float]:
    steps = jax.device_get(self._steps)
    self._steps = []
    if not steps:
      return {}
    applied = np.array([1.0 - float(m.get("skipped", 0.0)) for m in steps])
    out = {}
    for key in steps[0]:
      values = np.array([float(m[key]) for m in steps])
      if key in LATEST_VALUE_METRICS:
        out[prefix + key] = float(values[-1])
      elif key in ALL_STEP_METRICS or applied.sum() == 0:
        out[prefix + key] = float(values.mean())
      else:
        out[prefix + key] = float(np.where(applied > 0, values, 0.0).sum() / applied.sum())
    return out


def format_line(step: int, scalars: Mapping[str, float], keys: Sequence[str]) -> str:
  """One short progress line for the terminal, e.g. 'step 100: loss 3.21, lr 1e-04'."""
  shown = [f"{k.split('/')[-1]} {scalars[k]:.4g}" for k in keys if k in scalars]
  return f"step {step}: " + ", ".join(shown)
