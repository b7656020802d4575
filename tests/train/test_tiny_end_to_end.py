"""The README's command on the tiny preset: real data, real model, resume (slow: ~5 min on CPU).

`python -m af2flax.train --config=configs/tiny.py` builds the dataset from data/samples through
the dataset builder and the input pipeline, trains AlphaFold with every loss, validates with the
EMA parameters, checkpoints, and a second run resumes where the first stopped.
"""

import os
import subprocess
import sys

import numpy as np
import pytest

from tests.conftest import REPO_ROOT


def _train(workdir, cache_dir, *overrides):
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO_ROOT))
  command = [sys.executable, "-m", "af2flax.train", "--config=configs/tiny.py",
             f"--workdir={workdir}", f"--jax_compilation_cache_dir={cache_dir}",
             "--config.log_every_steps=2", "--config.eval_every_steps=4",
             "--config.checkpoint.every_steps=2", *overrides]
  result = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                          timeout=1800, check=False)
  assert result.returncode == 0, result.stderr[-4000:]
  return result.stderr


@pytest.mark.slow
def test_tiny_preset_trains_validates_and_resumes(tmp_path):
  workdir, cache = tmp_path / "run", tmp_path / "jax_cache"
  log = _train(workdir, cache, "--config.num_train_steps=4")
  assert "training on 18 examples" in log and "validation (EMA params)" in log
  assert sorted(p.name for p in (workdir / "checkpoints").iterdir()
                if p.name.isdigit()) == ["2", "4"]
  assert (workdir / "dataset" / "0_pdb_chains" / "index.tsv").exists()
  assert (workdir / "config.json").exists()

  log = _train(workdir, cache, "--config.num_train_steps=6")
  assert "resuming from" in log and "training from step 4 to 6" in log
  assert "finished at step 6" in log

  from tensorboard.backend.event_processing import event_accumulator  # pylint: disable=g-import-not-at-top
  events = event_accumulator.EventAccumulator(str(workdir), size_guidance={"tensors": 0})
  events.Reload()
  tags = set(events.Tags()["tensors"]) | set(events.Tags()["scalars"])
  for tag in ("train/loss", "train/structure_module/fape", "train/distogram/loss",
              "train/masked_msa/loss", "train/grad_norm", "train/learning_rate",
              "train/examples_per_sec", "val/lddt_ca", "val/gdt_ts", "val/tm_score",
              "val/ca_rmsd", "val/loss"):
    assert tag in tags, sorted(tags)
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  lddt = [float(tf.make_ndarray(e.tensor_proto)) for e in events.Tensors("val/lddt_ca")]
  assert len(lddt) == 2 and all(0.0 <= v <= 1.0 for v in lddt)
  assert np.isfinite([float(tf.make_ndarray(e.tensor_proto))
                      for e in events.Tensors("train/loss")]).all()
