"""Metrics: averaging over the log interval, and the writer when clu/TensorFlow are absent."""

import os
import subprocess
import sys

import jax.numpy as jnp
import numpy as np

from af2flax.train import metrics as metrics_lib
from tests.conftest import REPO_ROOT


def test_accumulator_averages_applied_steps_and_keeps_counters():
  acc = metrics_lib.MetricAccumulator()
  acc.add({"loss": jnp.float32(2.0), "skipped": jnp.float32(0.0), "skipped_steps": 0,
           "learning_rate": jnp.float32(1e-4)})
  acc.add({"loss": jnp.float32(jnp.nan), "skipped": jnp.float32(1.0), "skipped_steps": 1,
           "learning_rate": jnp.float32(1e-4)})
  acc.add({"loss": jnp.float32(4.0), "skipped": jnp.float32(0.0), "skipped_steps": 1,
           "learning_rate": jnp.float32(2e-4)})
  summary = acc.summary()
  assert summary["train/loss"] == 3.0  # the skipped step's NaN is left out
  np.testing.assert_allclose(summary["train/skipped"], 1 / 3)
  assert summary["train/skipped_steps"] == 1
  np.testing.assert_allclose(summary["train/learning_rate"], 2e-4)
  assert len(acc) == 0 and acc.summary() == {}


FALLBACK_SCRIPT = """
import sys
sys.modules["clu"] = None          # as on the GPU image: no clu ...
sys.modules["tensorflow"] = None   # ... and no TensorFlow
from af2flax.train import metrics
writer = metrics.create_writer(sys.argv[1])
assert isinstance(writer, metrics.FallbackWriter), type(writer)
for step in (1, 2, 3):
  writer.write_scalars(step, {"train/loss": 1.0 / step})
actions = metrics.periodic_actions(
    type("C", (), {"log_every_steps": 1, "get": lambda self, k, d=None: d})(), sys.argv[1],
    writer, 3)
for step in (1, 2, 3):
  for action in actions:
    action(step)
writer.close()
"""


def test_fallback_writer_without_clu_or_tensorflow(tmp_path):
  env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), JAX_PLATFORMS="cpu")
  subprocess.run([sys.executable, "-c", FALLBACK_SCRIPT, str(tmp_path)], cwd=REPO_ROOT,
                 env=env, check=True, capture_output=True, text=True)
  from tensorboard.backend.event_processing import event_accumulator  # pylint: disable=g-import-not-at-top
  events = event_accumulator.EventAccumulator(str(tmp_path))
  events.Reload()
  losses = {e.step: e.value for e in events.Scalars("train/loss")}
  assert losses == {1: 1.0, 2: 0.5, 3: np.float32(1 / 3)}
  assert [e.step for e in events.Scalars("steps_per_sec")] == [2, 3]


def test_format_line():
  line = metrics_lib.format_line(7, {"train/loss": 1.23456, "train/grad_norm": 0.5},
                                 ("train/loss", "train/missing", "train/grad_norm"))
  assert line == "step 7: loss 1.235, grad_norm 0.5"
