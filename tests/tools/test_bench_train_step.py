"""bench/train_step.py --lower_only: traces and lowers the product's train step without a GPU."""

import json
import os
import pathlib
import re
import subprocess
import sys

import pytest

from tests.tools.helpers import bench_module

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]


def _lower_only(*extra):
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_backend_optimization_level=0")
  done = subprocess.run([sys.executable, "bench/train_step.py", "--lower_only", "--smoke",
                         "--variants", "bf16-xla", *extra], cwd=REPO_ROOT, env=env,
                        capture_output=True, text=True, timeout=600, check=False)
  assert done.returncode == 0, done.stderr[-2000:]
  rows = [line.split() for line in done.stdout.splitlines() if line.startswith("bf16-xla")]
  assert len(rows) == 1, done.stdout
  return done.stdout, rows[0]


def test_lower_only_reports_trace_and_lower_times():
  stdout, row = _lower_only("--set", "remat_submodules=all")
  variant, shapes, trace_s, lower_s, lines = row[:5]
  assert (variant, shapes) == ("bf16-xla", "smoke")
  assert float(trace_s) > 0 and float(lower_s) > 0
  assert int(lines) > 1000  # the whole step: recycling loop, block scans, losses, Adam, EMA
  assert "set {'remat_submodules': 'all'}" in stdout
  # One program tunes each of its distinct matrix products once.
  counts = re.search(r"matrix products: (\d+) distinct, (\d+) summed over the programs", stdout)
  assert counts and int(counts[1]) == int(counts[2]) > 50, stdout


@pytest.mark.slow
def test_compile_only_reports_the_scratch_estimate():
  _, row = _lower_only("--compile_only")
  compile_s, scratch_gib = row[5:7]
  assert float(compile_s) > 0 and float(scratch_gib) > 0


def test_set_needs_key_and_value():
  done = subprocess.run([sys.executable, "bench/train_step.py", "--lower_only", "--smoke",
                         "--set", "remat_group_size"], cwd=REPO_ROOT, capture_output=True,
                        text=True, timeout=120, check=False)
  assert done.returncode != 0 and "expected KEY=VALUE" in done.stderr


def test_lower_only_runs_under_the_variants_xla_flags(tmp_path):
  """In-process runs (--lower_only) add the variant's flags to XLA_FLAGS and the row says so."""
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_backend_optimization_level=0")
  out = tmp_path / "row.json"
  done = subprocess.run([sys.executable, "bench/train_step.py", "--lower_only", "--smoke",
                         "--variants", "bf16-auto-nocb", "--json", str(out)], cwd=REPO_ROOT,
                        env=env, capture_output=True, text=True, timeout=600, check=False)
  assert done.returncode == 0, done.stderr[-2000:]
  rows = json.loads(out.read_text())
  row = rows[0] if isinstance(rows, list) else rows
  assert row["xla_flags"] == ("--xla_backend_optimization_level=0 "
                              "--xla_gpu_enable_command_buffer=")


def test_lower_only_refuses_variants_with_different_xla_flags():
  done = subprocess.run([sys.executable, "bench/train_step.py", "--lower_only", "--smoke",
                         "--variants", "bf16-auto,bf16-auto-nocb"], cwd=REPO_ROOT,
                        capture_output=True, text=True, timeout=120, check=False)
  assert done.returncode != 0
  assert "different xla_flags" in done.stderr and "one at a time" in done.stderr


def _bench_module():
  return bench_module("train_step")


def test_parallel_workers_time_their_steps_one_at_a_time(tmp_path, monkeypatch):
  """--parallel: the timing lock keeps two workers' timed sections apart."""
  import threading
  import time

  bench = _bench_module()
  monkeypatch.setenv("AF2FLAX_BENCH_LOCK", str(tmp_path / "lock"))
  spans = []

  def worker():
    with bench._timing_lock():  # pylint: disable=protected-access
      start = time.monotonic()
      time.sleep(0.2)
      spans.append((start, time.monotonic()))

  threads = [threading.Thread(target=worker) for _ in range(3)]
  for thread in threads:
    thread.start()
  for thread in threads:
    thread.join()
  spans.sort()
  assert len(spans) == 3
  assert all(later[0] >= earlier[1] for earlier, later in zip(spans, spans[1:])), spans


def test_workers_time_steps_only_once_no_other_worker_compiles(tmp_path, monkeypatch):
  """--parallel: a compiled worker waits while another started worker has neither compiled
  nor exited (XLA's autotuning runs on the GPU), and goes on once it has."""
  import threading
  import time

  bench = _bench_module()
  monkeypatch.setenv("AF2FLAX_BENCH_BARRIER", str(tmp_path))
  monkeypatch.setenv("AF2FLAX_BENCH_WORKER_ID", "1-0")
  for worker in ("1-0", "1-1", "1-2"):
    (tmp_path / f"started-{worker}").touch()
  (tmp_path / "exited-1-2").touch()    # failed before compiling: not waited for
  done = []
  waiter = threading.Thread(target=lambda: done.append(
      bench._wait_for_compilations(poll_s=0.01)))  # pylint: disable=protected-access
  waiter.start()
  time.sleep(0.3)
  assert not done and (tmp_path / "compiled-1-0").exists()  # 1-1 still compiling
  (tmp_path / "compiled-1-1").touch()
  waiter.join(timeout=5)
  assert done == [True]


def test_the_wait_for_other_compilations_has_a_limit(tmp_path, monkeypatch):
  """--compile_wait: past it a compiled worker times its steps all the same, and says that
  another worker was still compiling (its row is marked)."""
  bench = _bench_module()
  monkeypatch.setenv("AF2FLAX_BENCH_BARRIER", str(tmp_path))
  monkeypatch.setenv("AF2FLAX_BENCH_WORKER_ID", "1-0")
  monkeypatch.setenv("AF2FLAX_BENCH_COMPILE_WAIT", "0.2")
  for worker in ("1-0", "1-1"):
    (tmp_path / f"started-{worker}").touch()
  assert bench._wait_for_compilations(poll_s=0.01) is False  # pylint: disable=protected-access
  (tmp_path / "compiled-1-1").touch()
  assert bench._wait_for_compilations(poll_s=0.01) is True  # pylint: disable=protected-access
  row = {"variant": "bf16-auto", "shapes": "initial", "ok": True, "step_s": {"0": 0.5},
         "expected_s": None, "tflops": 100.0, "peak_gib": 6.0, "compile_s": 150.0,
         "device": "H200", "jax": "0.11.2", "trace_s": 10.0, "lower_s": 3.0, "init_s": 30.0,
         "dtype": "bfloat16", "timed_beside_compilation": True}
  assert "TIMED BESIDE ANOTHER COMPILATION" in bench._format([row])  # pylint: disable=protected-access


def test_a_worker_keeps_its_log_and_returns_its_row(tmp_path):
  """A worker's stderr goes to its log file (read while a run goes on); its RESULT line is
  the row, and without one the row is a failure quoting the log's last lines."""
  bench = _bench_module()
  log = tmp_path / "w.log"
  ok = [sys.executable, "-c", "import sys; print('progress 1', file=sys.stderr); "
        "print('RESULT {\"variant\": \"v\", \"ok\": true}')"]
  assert bench._worker_result(ok, dict(os.environ), "v", "s", str(log), 60) == {  # pylint: disable=protected-access
      "variant": "v", "ok": True}
  assert "progress 1" in log.read_text()
  failing = [sys.executable, "-c", "import sys; sys.exit('no memory left')"]
  row = bench._worker_result(failing, dict(os.environ), "v", "s", str(log), 60)  # pylint: disable=protected-access
  assert row["ok"] is False and "no memory left" in row["error"]
  slow = [sys.executable, "-c", "import time; time.sleep(30)"]
  row = bench._worker_result(slow, dict(os.environ), "v", "s", str(log), 0.5)  # pylint: disable=protected-access
  assert row["ok"] is False and "timeout" in row["error"]


_STOPPABLE_RUN = """
import sys, time
from tests.tools.helpers import bench_module
bench = bench_module("train_step")
def fake_worker(variant, shape_name, args, env):
  if variant == "bf16-xla":  # a worker process that would outlast the run: killed on SIGTERM
    time.sleep({delay})  # > 0: the stop comes before this worker's process starts
    return bench._worker_result([sys.executable, "-c", "import time; time.sleep(120)"], env,
                                variant, shape_name, {log!r}, 300)
  return {{"variant": variant, "shapes": shape_name, "ok": False, "error": "fake row"}}
bench._run_worker = fake_worker
if {signals} == 2:  # `timeout`'s second SIGTERM (to the process group) during the stop, and after
  import os, signal
  stop_workers = bench._stop_workers
  def stop_workers_signalled():
    os.kill(os.getpid(), signal.SIGTERM)
    stop_workers()
  bench._stop_workers = stop_workers_signalled
status = bench.main(["--variants", "bf16-auto,bf16-xla", "--parallel", "2",
                     "--json", {json_path!r}])
if {signals} == 2:
  os.kill(os.getpid(), signal.SIGTERM)
sys.exit(status)
"""


@pytest.mark.parametrize("delay,signals", [(0.0, 1), (1.0, 1), (0.0, 2)])
def test_a_stopped_run_reports_the_rows_that_finished(tmp_path, delay, signals):
  """SIGTERM (`timeout`'s) stops the run: the rows that finished are printed and in the
  --json file, the unfinished jobs are named, and the exit status says it stopped. `timeout`
  signals twice (the process, then its process group): a second, during the stop or after
  it, changes nothing."""
  import json
  import signal
  import time

  json_path = tmp_path / "rows.json"
  script = _STOPPABLE_RUN.format(json_path=str(json_path), log=str(tmp_path / "slow.log"),
                                 delay=delay, signals=signals)
  process = subprocess.Popen([sys.executable, "-c", script], cwd=REPO_ROOT, text=True,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
  deadline = time.monotonic() + 60
  while not json_path.exists() and time.monotonic() < deadline:
    time.sleep(0.05)
  assert json_path.exists(), "the finished row was not written before the run ended"
  process.send_signal(signal.SIGTERM)
  stdout, stderr = process.communicate(timeout=60)
  assert process.returncode == 1, stderr[-2000:]
  assert "bf16-auto" in stdout and "fake row" in stdout
  assert "1 of 2 jobs finished; unfinished: bf16-xla,initial" in stdout
  assert [row["variant"] for row in json.loads(json_path.read_text())] == ["bf16-auto"]
  assert time.monotonic() < deadline  # the slow worker was killed, not waited for


def test_unknown_variant_is_named():
  done = subprocess.run([sys.executable, "bench/train_step.py", "--smoke", "--variants",
                         "bf16-nonesuch"], cwd=REPO_ROOT, capture_output=True, text=True,
                        timeout=120, check=False)
  assert done.returncode != 0
  assert "bf16-nonesuch" in done.stderr and "bf16-cudnn-subremat" in done.stderr


def test_result_table_names_shapes_dtype_remat_and_every_recycle_count():
  """The printed table (issue 9, criterion 5): shapes, dtype, remat policy, the median step at
  each recycling count and the expected one, TFLOP/s, peak GiB, compile seconds."""
  bench = _bench_module()
  row = {"variant": "bf16-cudnn", "shapes": "initial", "ok": True, "device": "H200",
         "jax": "0.11.2", "init_s": 39.2, "compile_s": 209.5, "trace_s": 9.5, "lower_s": 2.8,
         "init_parts": {"trace_lower": 4.3, "compile": 20.1, "run": 0.4, "train_state": 14.4},
         "step_s": {"0": 0.577, "1": 0.691, "2": 0.791, "3": 0.896}, "expected_s": 0.739,
         "tflops": 87.9, "peak_gib": 6.07, "dtype": "bfloat16", "use_remat": True,
         "remat_policy": "nothing_saveable", "remat_group_size": 4, "remat_submodules": "none",
         "shape_sizes": {"num_res": 256, "num_msa": 128, "num_extra_msa": 1024,
                         "num_templates": 4}}
  failed = {"variant": "fp32-xla", "shapes": "finetune", "ok": False, "error": "OOM"}
  header, line, failure = bench._format([row, failed]).splitlines()  # pylint: disable=protected-access
  assert header.split()[:10] == ["variant", "shapes", "dtype", "remat", "r=0", "s", "r=1", "s",
                                 "r=2", "s"]
  assert line.split()[:13] == ["bf16-cudnn", "initial", "256/128/1024/4", "bf16", "nothing,g4",
                               "0.577", "0.691", "0.791", "0.896", "0.739", "87.9", "6.07",
                               "209.5"]
  assert line.endswith("init 39.2 s (trace+lower 4.3, compile 20.1, run 0.4, train state 14.4)")
  assert "FAILED: OOM" in failure


def test_result_table_marks_offloaded_block_inputs():
  """`remat_offload` shows in the remat column, and the host memory it takes in the note."""
  bench = _bench_module()
  row = {"variant": "bf16-auto-offload", "shapes": "initial", "ok": True, "device": "H200",
         "jax": "0.11.2", "init_s": 30.0, "compile_s": 150.0, "trace_s": 10.0, "lower_s": 3.0,
         "step_s": {"0": 0.5}, "expected_s": None, "tflops": 90.0, "peak_gib": 5.0,
         "dtype": "bfloat16", "use_remat": True, "remat_policy": "nothing_saveable",
         "remat_offload": True, "host_gib": 1.52}
  line = bench._format([row]).splitlines()[1]  # pylint: disable=protected-access
  assert line.split()[3] == "nothing,host"
  assert line.endswith("init 30.0 s, host memory 1.52 GiB")
  partly = {**row, "remat_offload_fraction": 0.875}
  assert bench._format([partly]).splitlines()[1].split()[3] == "nothing,host88%"  # pylint: disable=protected-access
  # The split step: its residuals left on the device (those in host memory: host memory).
  split = {**row, "residual_gib": {"device": 2.35, "host": 1.52}}
  assert bench._format([split]).splitlines()[1].endswith(  # pylint: disable=protected-access
      "host memory 1.52 GiB, split: residuals 2.35 GiB on the device")


def test_examples_vmapped_or_one_at_a_time(monkeypatch):
  """--examples N vmaps N examples per step; with --one_at_a_time they run one after another
  in the loop over the device's examples (vmap_batch_size 1), and the table says which."""
  bench = _bench_module()
  monkeypatch.setenv("AF2FLAX_BENCH_EXAMPLES", "2")
  monkeypatch.delenv("AF2FLAX_BENCH_ONE_AT_A_TIME", raising=False)
  config = bench._train_config("bf16-auto", True, "finetune")  # pylint: disable=protected-access
  assert (config.batch_size, config.vmap_batch_size) == (2, 2)
  monkeypatch.setenv("AF2FLAX_BENCH_ONE_AT_A_TIME", "1")
  config = bench._train_config("bf16-auto", True, "finetune")  # pylint: disable=protected-access
  assert (config.batch_size, config.vmap_batch_size) == (2, 1)
  row = {"variant": "bf16-auto", "shapes": "finetune", "ok": True, "device": "H200",
         "jax": "0.11.2", "init_s": 30.0, "compile_s": 150.0, "trace_s": 10.0, "lower_s": 3.0,
         "step_s": {"0": 4.0}, "expected_s": None, "tflops": 90.0, "peak_gib": 14.0,
         "dtype": "bfloat16", "examples": 2}
  for vmapped, words in ((True, "(vmapped;"), (False, "(one at a time;")):
    line = bench._format([dict(row, vmapped=vmapped)]).splitlines()[1]  # pylint: disable=protected-access
    assert "2.000" in line.split() and f"2 examples per step {words} seconds per example" in line


def test_every_variant_sets_existing_global_config_keys():
  """A variant's overrides are model `global_config` keys of the presets (ConfigDict.update
  would add a misspelt key silently, and the variant would time the preset)."""
  import importlib  # pylint: disable=g-import-not-at-top
  train_step = bench_module("train_step")
  keys = set(importlib.import_module("configs.initial_training").get_config()
             .model.global_config.keys())
  for name, overrides in train_step.VARIANTS.items():
    unknown = set(overrides) - keys - set(train_step.STEP_KEYS)
    assert not unknown, f"{name}: {sorted(unknown)}"


@pytest.mark.slow
def test_split_step_compiled_together_only_with_no_alone():
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_backend_optimization_level=0")
  done = subprocess.run([sys.executable, "bench/train_step.py", "--lower_only", "--compile_only",
                         "--no_alone", "--smoke", "--variants", "bf16-auto-split3hr-flatupdate"],
                        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=900,
                        check=False)
  assert done.returncode == 0, done.stderr[-2000:]
  programs = [line for line in done.stdout.splitlines() if " lines, XLA" in line]
  assert len(programs) == 16, done.stdout
  assert all(" s together" in line and " s alone" not in line for line in programs), done.stdout


@pytest.mark.slow
def test_split_step_compiled_by_worker_processes_is_read_from_their_cache(tmp_path):
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_backend_optimization_level=0")
  out = tmp_path / "rows.json"
  done = subprocess.run([sys.executable, "bench/train_step.py", "--smoke", "--variants",
                         "bf16-auto-split3hr-flatupdate-procs4", "--recycles", "0", "--steps",
                         "1", "--json", str(out)], cwd=REPO_ROOT, env=env, capture_output=True,
                        text=True, timeout=900, check=False)
  assert done.returncode == 0, done.stderr[-2000:]
  row = json.loads(out.read_text())[0]
  assert row["ok"] and row["finite"], row
  assert row["compile_processes"] == 4 and "compiled by 4 worker processes" in done.stdout
  compiled = sorted(n for report in row["compile_worker_reports"] for n in report["programs"])
  assert compiled == sorted(k for k in row["program_compile_s"]
                            if k not in ("trace_lower", "wall"))
  assert row["new_cache_entries"] == 0  # this process compiled nothing itself


def test_preset_variants_time_the_shipped_presets():
  """bf16-auto is configs/initial_training.py's model and step, and the fine-tuning variant
  configs/finetune.py's (which asks for cuDNN on the extra MSA through 'auto_cudnn': the same
  kernels on a GPU), so the default rows and the docs' preset rows time what users train."""
  import importlib  # pylint: disable=g-import-not-at-top
  bench = bench_module("train_step")
  for variant, stage, allowed in (
      ("bf16-auto", "initial_training", {}),
      ("bf16-pallas512-extracudnn-offload55", "finetune",
       {"extra_msa_attention_impl": ("cudnn", "auto_cudnn")})):
    ours = bench._train_config(variant, False, stage)  # pylint: disable=protected-access
    preset = importlib.import_module(f"configs.{stage}").get_config()
    gc_ours, gc_preset = ours.model.global_config.to_dict(), preset.model.global_config.to_dict()
    differ = {k: (gc_ours.get(k), gc_preset.get(k)) for k in set(gc_ours) | set(gc_preset)
              if gc_ours.get(k) != gc_preset.get(k)}
    assert differ == allowed, (variant, differ)
    rest = lambda c: {k: v for k, v in c.model.to_dict().items() if k != "global_config"}
    assert rest(ours) == rest(preset), variant
    for key in ("step_programs", "trunk_stages", "head_stages", "recycle_stages",
                "compile_workers"):
      assert ours.get(key) == preset.get(key), (variant, key)
    assert ours.optimizer.to_dict() == preset.optimizer.to_dict(), variant


def test_program_times_time_each_program_and_put_the_programs_back():
  """`--program_times`: a split step's programs, each waited for, timed per call with their
  calls per step; the step's own programs are restored afterwards."""
  import time

  import jax.numpy as jnp

  bench = _bench_module()

  def program(seconds):
    def run(*args):
      time.sleep(seconds)
      return args[0]
    return run

  class FakeSplitStep:
    def __init__(self):
      self.compiled = {"forward": program(0.002), "backward": program(0.006)}

    def __call__(self, state, batch):
      for _ in range(3):  # three recycling iterations through the forward program
        state = self.compiled["forward"](state)
      state = self.compiled["backward"](state)
      return state, {"loss": jnp.float32(0.0)}

  step = FakeSplitStep()
  originals = dict(step.compiled)
  example = {"aatype": jnp.zeros((2, 4), jnp.int32)}
  state, result = bench._time_programs(step, jnp.float32(1.0), example, 3)
  assert step.compiled == originals
  assert float(state) == 1.0
  assert result["forward"][1] == 3 and result["backward"][1] == 1
  assert 1.5 <= result["forward"][0] < 20 and 5 <= result["backward"][0] < 40
  assert result["(step)"][0] >= 3 * result["forward"][0] + result["backward"][0] - 1
  assert result["(gaps)"][0] >= 0


def test_pipelined_steps_run_back_to_back(monkeypatch):
  """`--pipelined`: per recycling count, one warm-up step, then `steps` steps with a single
  wait after the last; their mean is the count's time."""
  import jax.numpy as jnp

  bench = _bench_module()
  calls = []

  def step(state, batch):
    calls.append(int(batch["n"][0]))
    return state + 1, {"loss": jnp.float32(0.0)}

  monkeypatch.setattr(bench, "_batch_of", lambda example: {"n": [example["n"]]})
  examples = {0: {"n": 0}, 2: {"n": 2}}
  pipelined = {}
  times, losses, programs = bench._time_steps(step, jnp.float32(0.0), examples, (0, 2), 3,
                                              None, pipelined=pipelined)
  # 1 warm-up + 3 timed (median), then 1 warm-up + 3 back to back, per count.
  assert calls == [0] * 4 + [2] * 4 + [0] * 4 + [2] * 4
  assert set(pipelined) == {"0", "2"} and all(0 <= s < 1 for s in pipelined.values())
  assert set(times) == {0, 2} and programs == {}
