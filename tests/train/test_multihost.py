"""Multi-host: two processes on one machine (CPU, jax.distributed over loopback) train together."""

import json
import os
import socket
import subprocess
import sys

from tests.conftest import REPO_ROOT


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def test_two_processes_run_three_steps_and_agree(tmp_path):
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO_ROOT))
  env.pop("XLA_FLAGS", None)
  coordinator = f"localhost:{_free_port()}"
  procs = [subprocess.Popen(
      [sys.executable, "-m", "tests.train.loop_worker", str(tmp_path / "run"), "--steps", "3",
       "--process_id", str(i), "--num_processes", "2", "--coordinator", coordinator],
      cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
      for i in range(2)]
  outputs = []
  try:
    for proc in procs:
      stdout, stderr = proc.communicate(timeout=300)
      assert proc.returncode == 0, stderr[-3000:]
      outputs.append(json.loads(stdout.strip().splitlines()[-1]))
  finally:
    for proc in procs:
      if proc.poll() is None:
        proc.kill()
  assert [o["process_index"] for o in outputs] == [0, 1]
  assert outputs[0]["loss"] == outputs[1]["loss"]
  assert outputs[0]["val_mse"] == outputs[1]["val_mse"]
  # Each process saved its own input position with the final checkpoint (step 3).
  for i in range(2):
    saved = json.loads((tmp_path / "run" / "checkpoints" / "3" / "input" /
                        f"process_{i}.json").read_text())
    assert saved == {"process_count": 2, "state": {"position": 3}}
  # Only process 0 writes TensorBoard events.
  assert len(list((tmp_path / "run").glob("events.out.tfevents.*"))) == 1
