"""bench/pallas_attention.py --smoke: times and checks our kernels (interpreted) on the CPU."""

import os
import pathlib
import subprocess
import sys

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]


def test_smoke_rows_time_both_implementations_and_check_the_gradient():
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  done = subprocess.run([sys.executable, "bench/pallas_attention.py", "--smoke", "--steps", "1"],
                        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600,
                        check=False)
  assert done.returncode == 0, done.stderr[-2000:]
  rows = [line.split() for line in done.stdout.splitlines() if line.startswith("smoke")]
  by_impl = {(" ".join(row[:-4]), row[-4]): row for row in rows}
  # Two shapes x (xla, pallas, pallas/grouped, pallas/logit_grads).
  assert len(rows) == 8 and len(by_impl) == 8, done.stdout
  assert {impl for _, impl in by_impl} == {"xla", "pallas", "pallas/grouped",
                                           "pallas/logit_grads"}, done.stdout
  for (shape, impl), row in by_impl.items():
    forward_ms, grad_ms, error = (float(value) for value in row[-3:])
    assert forward_ms > 0 and grad_ms > 0, row
    # XLA is the reference (error 0); ours in bf16 differs by rounding only.
    assert (error == 0.0) if impl == "xla" else (0.0 < error < 1e-2), (shape, impl, row)


def test_compare_times_the_named_tilings_interleaved():
  """--compare: one row per named tiling with median ms and the range over rounds; a tiling
  field that does not exist is named."""
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  command = [sys.executable, "bench/pallas_attention.py", "--smoke", "--steps", "1",
             "--rounds", "2", "--compare", "forward_stages=2,lg_stages=2", "--compare", "default"]
  done = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                        timeout=600, check=False)
  assert done.returncode == 0, done.stderr[-2000:]
  rows = [line.split() for line in done.stdout.splitlines() if line.startswith("smoke")]
  assert [row[-5] for row in rows] == ["forward_stages=2,lg_stages=2", "default"], done.stdout
  for row in rows:
    forward_ms, grad_ms = float(row[-4]), float(row[-2])
    assert forward_ms > 0 and grad_ms > 0 and row[-3].startswith("("), row
  bad = subprocess.run(command[:2] + ["--compare", "forward_stage=2"], cwd=REPO_ROOT, env=env,
                       capture_output=True, text=True, timeout=600, check=False)
  assert bad.returncode == 2 and "forward_stage=2" in bad.stderr, bad.stderr[-2000:]
