"""bench/train_step.py --lower_only: traces and lowers the product's train step without a GPU."""

import os
import pathlib
import subprocess
import sys

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]


def test_lower_only_reports_trace_and_lower_times():
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  done = subprocess.run([sys.executable, "bench/train_step.py", "--lower_only", "--smoke",
                         "--variants", "bf16-xla"], cwd=REPO_ROOT, env=env, capture_output=True,
                        text=True, timeout=600, check=False)
  assert done.returncode == 0, done.stderr[-2000:]
  rows = [line.split() for line in done.stdout.splitlines() if line.startswith("bf16-xla")]
  assert len(rows) == 1, done.stdout
  variant, shapes, trace_s, lower_s, lines = rows[0][:5]
  assert (variant, shapes) == ("bf16-xla", "smoke")
  assert float(trace_s) > 0 and float(lower_s) > 0
  assert int(lines) > 1000  # the whole step: recycling loop, block scans, losses, Adam, EMA
