"""The training loop end to end on a small MLP: resume after SIGKILL and SIGTERM, skipped
non-finite steps, the stop after too many of them, metrics in TensorBoard, best checkpoint.

Each run is a separate process (`loop_worker.py`), killed or signalled as a real job would be.
"""

import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest

from tests.conftest import REPO_ROOT

NAN_BATCH = "9"  # batch 9 feeds step 10: one skipped step in every run below


def _env():
  return dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO_ROOT))


def _worker(workdir, *args, expect_rc=0, env=None):
  result = subprocess.run([sys.executable, "-m", "tests.train.loop_worker", str(workdir),
                           *args], cwd=REPO_ROOT, env={**_env(), **(env or {})},
                          capture_output=True, text=True, timeout=600, check=False)
  assert result.returncode == expect_rc, result.stderr[-4000:]
  return json.loads(result.stdout.strip().splitlines()[-1]), result.stderr


def _kill_after(workdir, batch, *args):
  """Starts a run, waits until it blocks before `batch`, and SIGKILLs it."""
  proc = subprocess.Popen([sys.executable, "-m", "tests.train.loop_worker", str(workdir),
                           "--kill_before_batch", str(batch), *args], cwd=REPO_ROOT,
                          env=_env(), stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                          text=True)
  try:
    line = proc.stdout.readline()
    assert json.loads(line) == {"waiting_for_kill_at_batch": batch}, line
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(timeout=60) == -signal.SIGKILL
  finally:
    if proc.poll() is None:
      proc.kill()
      proc.wait()


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("uninterrupted")
  result, _ = _worker(workdir, "--nan_batches", NAN_BATCH)
  return workdir, result


def test_preempted_and_killed_run_resumes_to_same_parameters(uninterrupted, tmp_path):
  _, reference = uninterrupted
  workdir = tmp_path / "interrupted"
  # SIGTERM arrives while batch 3 is read: step 4 finishes, is saved, the process exits 0.
  stopped, _ = _worker(workdir, "--nan_batches", NAN_BATCH, "--sigterm_before_batch", "3")
  assert stopped["latest"] == 4 and stopped["input"] == {"position": 4}
  # Resumed, then SIGKILLed after step 7 (its asynchronous save may be half written).
  _kill_after(workdir, 7, "--nan_batches", NAN_BATCH)
  # Resumed again from whatever checkpoint was complete: runs to step 12.
  final, _ = _worker(workdir, "--nan_batches", NAN_BATCH)
  assert final["latest"] == 12 and final["input"] == {"position": 12}
  assert len(final["params"]) == len(reference["params"])
  for ours, theirs in zip(final["params"], reference["params"]):
    np.testing.assert_array_equal(ours, theirs)
  assert not list(workdir.glob("checkpoints/*tmp*"))  # partial saves were cleaned up


def test_split_step_programs_train_to_the_same_parameters(uninterrupted, tmp_path):
  """`step_programs='split'` (the step as separately compiled programs) runs the same
  training: 12 steps with the non-finite batch skipped end at the one-program run's
  parameters, up to XLA's rounding."""
  _, reference = uninterrupted
  final, stderr = _worker(tmp_path / "split", "--nan_batches", NAN_BATCH,
                          "--step_programs", "split")
  assert "split train step compiled" in stderr
  assert final["latest"] == reference["latest"] == 12 and final["steps"] == reference["steps"]
  np.testing.assert_allclose(final["loss"], reference["loss"], rtol=1e-5)
  assert len(final["params"]) == len(reference["params"])
  for ours, theirs in zip(final["params"], reference["params"]):
    np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("step_programs,beside", [("one", 1), ("split", 1), ("one", 0),
                                                  ("split", 0)])
def test_step_is_prepared_beside_the_state_and_compiled_once(tmp_path, step_programs,
                                                             beside):
  """The step is traced, lowered and (`compile_beside_state`, the worker's default; the
  presets' is off) compiled while the state is created or restored, and XLA compiles it
  once: the one-program step's first call runs that executable (or, lowered only, jit finds
  the lowering cached and compiles it once); the split step compiles the lowered programs
  once, before the loop, with no tracing left."""
  env = {"JAX_LOG_COMPILES": "1"}
  runs = ((2, "creation"), (4, "restore")) if beside else ((2, "creation"),)
  for steps, source in runs:
    final, stderr = _worker(tmp_path, "--steps", str(steps), "--step_programs", step_programs,
                            "--compile_beside_state", str(beside), env=env)
    assert final["latest"] == steps
    assert "train step traced and lowered in" in stderr
    assert ("and compiled in" in stderr) == bool(beside), stderr[-3000:]
    assert f"beside the state's {source}" in stderr
    if step_programs == "one":
      # jit logs "Compiling" as it lowers (a cache miss: twice), XLA's compile "Finished XLA
      # compilation" (a second compile at the first step: twice).
      assert stderr.count("Compiling jit(train_step)") == 1, stderr[-3000:]
      assert stderr.count("Finished XLA compilation of jit(train_step)") == 1, stderr[-3000:]
    else:
      compiled = [line for line in stderr.splitlines() if "split train step compiled" in line]
      assert len(compiled) == 1 and "trace_lower 0.0 s" in compiled[0], compiled


def test_checkpoint_retention_keeps_last_and_best(uninterrupted):
  _, reference = uninterrupted
  # every 2 steps, keep the last 3, plus the best by val/neg_mse among evaluated steps 6, 12.
  assert reference["steps"][-3:] == [8, 10, 12]
  assert set(reference["steps"]) - {8, 10, 12} <= {6}


def test_metrics_in_tensorboard(uninterrupted):
  workdir, _ = uninterrupted
  from tensorboard.backend.event_processing import event_accumulator  # pylint: disable=g-import-not-at-top
  events = event_accumulator.EventAccumulator(str(workdir), size_guidance={"tensors": 0,
                                                                           "scalars": 0})
  events.Reload()
  tags = set(events.Tags()["tensors"]) | set(events.Tags()["scalars"])
  for tag in ("train/loss", "train/mse", "train/grad_norm", "train/learning_rate",
              "train/skipped_steps", "train/skipped", "train/steps_per_sec",
              "train/examples_per_sec", "val/mse", "val/neg_mse"):
    assert tag in tags, sorted(tags)

  def values(tag):
    if tag in events.Tags()["scalars"]:
      return {e.step: e.value for e in events.Scalars(tag)}
    return {e.step: float(np.asarray(
        __import__("tensorflow").make_ndarray(e.tensor_proto))) for e in events.Tensors(tag)}

  skipped = values("train/skipped_steps")
  assert skipped[8] == 0 and skipped[10] == 1 and skipped[12] == 1
  assert all(np.isfinite(v) for v in values("train/loss").values())
  assert sorted(values("val/mse")) == [6, 12]


def test_consecutive_non_finite_steps_stop_the_run(tmp_path, monkeypatch):
  """In this process (no subprocess needed): batches 4, 5, 6 poisoned, max 3 skips -> stop."""
  from af2flax.train import loop  # pylint: disable=g-import-not-at-top
  from tests.train import mlp  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr(loop, "create_model", lambda config: mlp.model_fns())
  monkeypatch.setattr(loop, "create_input", lambda config, workdir, size: loop.InputData(
      train=mlp.MLPInput(size, nan_batches=(4, 5, 6)), eval_batches=None))
  with pytest.raises(loop.NonFiniteTrainingError) as error:
    loop.train_and_evaluate(mlp.loop_config(), tmp_path / "nan")
  message = str(error.value)
  assert "3 consecutive steps up to step 7" in message
  assert "optimizer.learning_rate" in message and "last checkpoint is step 6" in message


def test_profile_trace_is_written(tmp_path, monkeypatch):
  from af2flax.train import loop  # pylint: disable=g-import-not-at-top
  from tests.train import mlp  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr(loop, "create_model", lambda config: mlp.model_fns())
  monkeypatch.setattr(loop, "create_input", lambda config, workdir, size: loop.InputData(
      train=mlp.MLPInput(size), eval_batches=None))
  metrics = loop.train_and_evaluate(
      mlp.loop_config(num_train_steps=6, profile_steps=2, profile_first_step=2), tmp_path)
  assert list(tmp_path.glob("plugins/profile/*/*.xplane.pb"))  # TensorBoard's profile tab
  assert metrics["train/examples_per_sec"] > 0 and "val/mse" not in metrics


def test_compiled_step_runs_batches_of_other_shapes_through_jit():
  """The one-program step compiled beside the state runs its executable for the batch shapes
  it was compiled for, and passes any other batch to the jitted step."""
  import jax  # pylint: disable=g-import-not-at-top
  from af2flax.train import loop  # pylint: disable=g-import-not-at-top

  jitted = jax.jit(lambda state, batch: (state + batch["x"].sum(), {"n": batch["x"].size}))
  calls = []

  def counted(state, batch):
    calls.append(batch["x"].shape)
    return jitted(state, batch)

  state, batch = np.float32(1.0), {"x": np.ones(2, np.float32)}
  compiled = jitted.lower(state, batch).compile()
  step = loop._CompiledStep(compiled, counted, batch)  # pylint: disable=protected-access
  new_state, metrics = step(state, batch)
  assert float(new_state) == 3.0 and int(metrics["n"]) == 2 and not calls
  new_state, metrics = step(state, {"x": np.ones(3, np.float32)})
  assert float(new_state) == 4.0 and int(metrics["n"]) == 3 and calls == [(3,)]


def test_cublas_stages_need_the_split_step():
  """`cublas_stages` names the split step's stages: with the one-program step it would do
  nothing, so the loop refuses it rather than ignore it."""
  from af2flax.train import loop  # pylint: disable=g-import-not-at-top
  from tests.train import mlp  # pylint: disable=g-import-not-at-top
  config = mlp.loop_config(num_train_steps=1)
  config.step_programs, config.cublas_stages = "one", "final"
  with pytest.raises(ValueError, match="cublas_stages='final' names stages of the split"):
    loop.make_step(None, None, config, None, None, None)
