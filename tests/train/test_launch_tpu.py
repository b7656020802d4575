"""launch_tpu.sh: dry-run commands for a pod slice, --help, argument errors, shellcheck."""

import shlex
import shutil
import subprocess

import pytest

from tests.conftest import REPO_ROOT

SCRIPT = REPO_ROOT / "launch_tpu.sh"


def _run(*args):
  return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True,
                        check=False, timeout=60)


def test_dry_run_for_a_pod_slice():
  result = _run("--name", "af2-pod", "--zone", "us-central2-b", "--accelerator", "v4-32",
                "--config", "configs/initial_training.py", "--workdir", "gs://bucket/af2",
                "--spot", "--dry-run", "--", "--config.batch_size=32")
  assert result.returncode == 0, result.stderr
  commands = [shlex.split(line) for line in result.stdout.splitlines()
              if line and not line.startswith("#")]
  gcloud = [c for c in commands if c[:4] == ["gcloud", "compute", "tpus", "tpu-vm"]]
  verbs = [c[4] for c in gcloud]
  assert verbs == ["describe", "create", "scp", "ssh", "ssh", "ssh", "ssh"], verbs
  create = gcloud[1]
  assert "af2-pod" in create and "--accelerator-type=v4-32" in create and "--spot" in create
  assert "--zone=us-central2-b" in create
  assert any(c[:2] == ["git", "archive"] for c in commands)  # the code, from git
  scp, unpack, install, train, logs = gcloud[2:]
  for command in (scp, unpack, install, train):
    assert "--worker=all" in command  # every host of the slice
  assert "--worker=0" in logs and "tail" in logs[-1]
  install_cmd = install[-1]
  assert "pip install -q -r requirements.txt" in install_cmd
  assert "jax[tpu]==0.10.2" in install_cmd  # the TPU build of the pinned JAX
  train_cmd = train[-1]
  for part in ("-m af2flax.train", "--config=configs/initial_training.py",
               "--workdir=gs://bucket/af2", "--distributed", "--config.batch_size=32", "nohup"):
    assert part in train_cmd, train_cmd


def test_help_and_errors():
  help_result = _run("--help")
  assert help_result.returncode == 0 and "--dry-run" in help_result.stdout
  assert "--worker" not in help_result.stderr
  missing = _run("--name", "x", "--dry-run")
  assert missing.returncode == 2 and "--zone is required" in missing.stderr
  bad_config = _run("--name", "x", "--zone", "z", "--config", "configs/nope.py",
                    "--workdir", "gs://b/w", "--dry-run")
  assert bad_config.returncode == 2 and "configs/nope.py not found" in bad_config.stderr
  unknown = _run("--frobnicate")
  assert unknown.returncode == 2 and "unknown argument: --frobnicate" in unknown.stderr


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck not installed")
def test_shellcheck_clean():
  result = subprocess.run(["shellcheck", str(SCRIPT)], capture_output=True, text=True,
                          check=False)
  assert result.returncode == 0, result.stdout
