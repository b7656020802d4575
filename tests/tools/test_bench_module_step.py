"""bench/module_step.py --smoke: one module's forward and gradient-pass times on the CPU."""

import gzip
import json
import os
import subprocess
import sys

import pytest

from tests.conftest import REPO_ROOT
from tests.tools.helpers import bench_module


def test_smoke_rows_one_per_module_and_value(tmp_path):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  out = tmp_path / "rows.json"
  command = [sys.executable, "bench/module_step.py", "--smoke", "--stack", "extra_msa",
             "--modules", "outer_product_mean,msa_column_attention",
             "--ab", "outer_product_mean_layout=alphafold,rows_first", "--json", str(out),
             "--profile_dir", str(tmp_path / "prof")]
  done = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                        timeout=600, check=False)
  assert done.returncode == 0, done.stderr[-2000:]
  table = [line.split() for line in done.stdout.splitlines()
           if line.startswith(("outer_product_mean", "msa_column_attention"))]
  assert [(row[0], row[1]) for row in table] == [
      ("outer_product_mean", "outer_product_mean_layout=alphafold"),
      ("outer_product_mean", "outer_product_mean_layout=rows_first"),
      ("msa_column_attention", "outer_product_mean_layout=alphafold"),
      ("msa_column_attention", "outer_product_mean_layout=rows_first")], done.stdout
  written = json.loads(out.read_text())
  assert written["stack"] == "extra_msa" and len(written["rows"]) == 4
  for row in written["rows"]:
    assert row["forward_ms"] > 0 and row["gradient_ms"] > 0, row
    assert row["outer_product_mean_layout"] in ("alphafold", "rows_first")
  # One trace and the optimised HLO per row, where bench/profile_summary.py reads them.
  for number, name in enumerate(["outer_product_mean"] * 2 + ["msa_column_attention"] * 2):
    traced = tmp_path / "prof" / f"{name}-{number}"
    assert "dot" in gzip.open(traced / "gradient.hlo.txt.gz", "rt").read()
    assert list(traced.rglob("perfetto_trace.json.gz")), traced


def test_arguments_are_checked(capsys):
  module_step = bench_module("module_step")
  # --set is read as bench/train_step.py reads it (one parser for both).
  assert module_step.parse_set.__module__ == "train_step"
  assert module_step.parse_set(["a=1", "b=0.5", "c=true", "d=x"]) == {
      "a": 1, "b": 0.5, "c": True, "d": "x"}
  assert module_step.parse_ab("k=1,x") == [{"k": 1}, {"k": "x"}]
  assert module_step.parse_ab(None) == [{}]
  assert module_step.parse_ab("t=|a=1,b=2|a=2") == [{"t": ""}, {"t": "a=1,b=2"}, {"t": "a=2"}]
  with pytest.raises(ValueError, match="expected KEY=VALUE"):
    module_step.parse_set(["nonsense"])
  with pytest.raises(SystemExit):
    module_step.main(["--smoke", "--modules", "pair_transition", "--set", "nonsense"])
  assert "--set 'nonsense': expected KEY=VALUE" in capsys.readouterr().err
  with pytest.raises(SystemExit, match="expected KEY=V1,V2"):
    module_step.parse_ab("k=")
  with pytest.raises(SystemExit, match="no_such_key: not a global_config key"):
    module_step.build("pair_transition", "evoformer", {"no_such_key": 1})
  with pytest.raises(SystemExit, match="unknown module 'tri'"):
    module_step.build("tri", "evoformer", {})
