"""The training step and loop import without TensorFlow and clu (the GPU image has neither)."""

import os
import subprocess
import sys

from tests.conftest import REPO_ROOT

SCRIPT = """
import sys
sys.modules["tensorflow"] = None
sys.modules["clu"] = None
import af2flax.train.step, af2flax.train.state, af2flax.train.optimizer
import af2flax.train.sharding, af2flax.train.checkpoint, af2flax.train.metrics
import af2flax.train.loop, af2flax.train.evaluate
assert not any(m.startswith(("tensorflow", "clu", "af2flax.data"))
               for m in sys.modules if sys.modules[m] is not None), "TF/clu/data imported"
"""


def test_train_modules_import_without_tensorflow_or_clu():
  env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), JAX_PLATFORMS="cpu")
  result = subprocess.run([sys.executable, "-c", SCRIPT], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, check=False)
  assert result.returncode == 0, result.stderr[-2000:]
