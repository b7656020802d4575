"""bench/compile_processes.py: the split step's compile over processes sharing JAX's cache."""

import json
import os
import pathlib
import subprocess
import sys

import pytest

from tests.tools.helpers import bench_module

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]


def test_shares_give_each_program_once_longest_first_to_the_least_loaded():
  bench = bench_module("compile_processes")
  names = ["accumulate", "backward.evoformer", "backward.extra_msa", "forward.evoformer",
           "update", "new.program"]
  plan = bench.shares(names, 2)
  assert sorted(name for share in plan for name in share) == sorted(names)
  # backward.extra_msa 12.2 to one worker, backward.evoformer 11.4 to the other, then the
  # unknown program (5.0) and forward.evoformer (5.1) each to the lighter one, ...
  assert plan[0][0] == "backward.extra_msa" and plan[1][0] == "backward.evoformer"
  loads = [sum(bench._ALONE_S.get(n, bench._UNKNOWN_S) for n in share) for share in plan]
  assert abs(loads[0] - loads[1]) <= max(bench._ALONE_S.values())
  for share in plan:  # each worker compiles its longest first
    weights = [bench._ALONE_S.get(n, bench._UNKNOWN_S) for n in share]
    assert weights == sorted(weights, reverse=True)


def test_more_processes_than_programs_leave_no_idle_worker():
  bench = bench_module("compile_processes")
  assert bench.shares(["update", "accumulate"], 5) == [["update"], ["accumulate"]]


def _run(*args, timeout=900):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  return subprocess.run([sys.executable, "bench/compile_processes.py", *args], cwd=REPO_ROOT,
                        env=env, capture_output=True, text=True, timeout=timeout, check=False)


def test_a_one_program_step_is_refused_by_name():
  done = _run("--smoke", "--variant", "bf16-xla", "--processes", "1", timeout=300)
  assert done.returncode != 0
  assert "--variant bf16-xla: not a split step" in done.stderr


@pytest.mark.slow
def test_the_main_process_finds_every_program_in_the_workers_cache(tmp_path):
  out = tmp_path / "row.json"
  done = _run("--smoke", "--processes", "2", "--cache_dir", str(tmp_path / "cache"),
              "--json", str(out))
  assert done.returncode == 0, done.stderr[-3000:]
  row = json.loads(out.read_text())
  assert row["processes"] == 2 and len(row["workers"]) == 2
  compiled = [name for worker in row["workers"] for name in worker["compile_s"]]
  assert sorted(compiled) == sorted(row["main"]["compile_s"])  # every program, once
  assert row["main"]["new_cache_entries"] == 0  # the main process compiled none itself
  assert "every program from the cache" in done.stdout
