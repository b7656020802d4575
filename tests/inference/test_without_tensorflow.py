"""GPU machines have neither TensorFlow nor clu: prediction must not need them."""

from __future__ import annotations

import subprocess
import sys

from tests.conftest import REPO_ROOT

MODULES = ("af2flax.predict", "af2flax.distill", "af2flax.inference.cli",
           "af2flax.inference.distillation", "af2flax.inference.feature_processing",
           "af2flax.inference.inputs", "af2flax.inference.model_loading",
           "af2flax.inference.outputs", "af2flax.inference.plots", "af2flax.inference.runner",
           "af2flax.common.protein", "af2flax.data.templates", "af2flax.data.build_dataset",
           "af2flax.data.tools.jackhmmer", "af2flax.data.tools.hhblits",
           "af2flax.data.tools.hhsearch", "af2flax.model.batch_spec", "af2flax.model.alphafold")


def test_prediction_modules_and_feature_processing_run_without_tensorflow_or_clu():
  code = "\n".join([
      "import sys",
      "sys.modules['tensorflow'] = None  # any import of it now raises ImportError",
      "sys.modules['clu'] = None",
      *[f"import {module}" for module in MODULES],
      "import numpy as np",
      "from af2flax.inference import feature_processing as fp",
      "raw = {'aatype': np.eye(21, dtype=np.int32)[[0, 5, 7]],",
      "       'msa': np.array([[0, 5, 7], [0, 21, 7]]), 'deletion_matrix_int': np.zeros((2, 3))}",
      "batch = fp.process_features(raw, fp.FeatureConfig(num_recycle=1))",
      "assert batch['msa_feat'].shape == (2, 2, 3, 49)",
      "print('ok')",
  ])
  done = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True,
                        text=True, timeout=300, env={"JAX_PLATFORMS": "cpu", "PATH": "/usr/bin"})
  assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-3000:]
