"""bench/predict.py: its workers keep the caller's PYTHONPATH, and a smoke run gives valid rows."""

import json
import os
import pathlib
import subprocess
import sys

from tests.tools.helpers import bench_module

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]


def _load_bench():
  return bench_module("predict")


def test_worker_keeps_the_callers_pythonpath(monkeypatch):
  # The GPU image gets ml-collections from a PYTHONPATH folder; replacing it broke every row.
  bench = _load_bench()
  monkeypatch.setenv("PYTHONPATH", os.pathsep.join(["/tmp/site", "/opt/extra"]))
  path = bench._worker_env()["PYTHONPATH"].split(os.pathsep)  # pylint: disable=protected-access
  assert path == [str(REPO_ROOT), "/tmp/site", "/opt/extra"]
  monkeypatch.delenv("PYTHONPATH")
  assert bench._worker_env()["PYTHONPATH"] == str(REPO_ROOT)  # pylint: disable=protected-access


def test_smoke_run_reports_every_row(tmp_path):
  out = tmp_path / "rows.json"
  done = subprocess.run([sys.executable, "bench/predict.py", "--smoke", "--lengths", "16",
                         "--chunk_sizes", "0,8", "--json", str(out)],
                        cwd=REPO_ROOT, capture_output=True, text=True, timeout=600, check=False)
  assert done.returncode == 0, done.stderr[-2000:]
  rows = json.loads(out.read_text())
  assert [(r["length"], r["chunk_size"], r["status"]) for r in rows] == [(16, 0, "ok"),
                                                                         (16, 8, "ok")]
  for row in rows:
    assert row["predict_s"] > 0 and row["peak_gib"] > 0
