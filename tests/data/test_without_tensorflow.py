"""GPU images have no TensorFlow: the numpy backend must feed training without it.

Each test runs tests/data/no_tensorflow_worker.py in a fresh process where a meta-path finder
hides tensorflow, tensorflow_datasets and clu (not importable, not findable).
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from tests.conftest import REPO_ROOT


def _run_worker(workdir, *args, timeout):
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO_ROOT))
  done = subprocess.run([sys.executable, "-m", "tests.data.no_tensorflow_worker", str(workdir),
                         *args], cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                        timeout=timeout, check=False)
  assert done.returncode == 0, done.stderr[-4000:]
  return json.loads(done.stdout.strip().splitlines()[-1])


def test_training_input_runs_without_tensorflow(shared_dir, tmp_path):
  """create_input with backend 'auto' picks numpy; train batches, exact resume and validation
  batches come without importing TensorFlow, tfds or clu."""
  report = _run_worker(tmp_path, timeout=300)
  assert report["backend"] == "numpy"
  assert report["blocked_modules_loaded"] == []
  assert report["resumed_equal"] is True
  assert report["msa_feat_shape"] == [1, 2, 4, 32, 49] and report["eval_batches"] == 1
  # The training loop's own input module (af2flax/train/input.py) too.
  assert report["loop_input_msa_feat_shape"] == [1, 2, 4, 32, 49]
  assert report["loop_input_eval_batches"] == 1


@pytest.mark.slow
def test_training_command_runs_on_the_numpy_input_without_tensorflow(shared_dir, tmp_path):
  """`python -m af2flax.train --config=configs/tiny.py --config.data.backend=numpy` for 4 steps
  (dataset build, validation, checkpoints) in a process without TensorFlow (~5-10 min on 2
  cores, mostly XLA compilation)."""
  report = _run_worker(tmp_path, "--train_steps", "4", timeout=1800)
  assert report["blocked_modules_loaded"] == []
  assert len(report["train_loss"]) == 4 and all(np.isfinite(report["train_loss"]))
  assert report["val_lddt_ca"] and all(0 <= value <= 1 for value in report["val_lddt_ca"])
  assert "4" in report["checkpoint_dirs"]
