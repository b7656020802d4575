"""The split train step's first compile spread over processes sharing JAX's persistent cache.

Measured (H200, 2026-12-05, docs/benchmarks.md twenty-third session): no faster. With 4
workers the compiled step was ready after 112.0 s, with 8 after 133.9 s, against 115.2 s in
one process: each program took about as many times its time alone as there were workers, so
the host's work, two thirds of it XLA's autotuning, is the limit. Kept as that record.

    python bench/compile_processes.py --variant bf16-auto-split3hr-flatupdate --processes 4
    python bench/compile_processes.py --processes 0      # the same, compiled in this process only
    python bench/compile_processes.py --smoke --processes 2   # tiny model on the CPU

Why. The separately compiled step (`step_programs='split'`, `af2flax.train.programs`) hands its
16 programs to XLA on threads of one process. On an H100 (2026-12-05) that took about as long
as the same programs compiled one after another (84-100 s of XLA against a sum of 88 s), with
`compile_workers` 2 or 4 no better. One candidate cause is process-wide: XLA lets LLVM run in
several threads only while they use the same LLVM command-line options
(`LLVMCommandLineOptionsLock`), and its own kernels and the Triton kernels (GEMM fusions,
autotuning candidates, our Pallas kernels) use different ones. Another is the host's 16 cores,
shared by the compiles and by GEMM autotuning. Processes share neither the lock nor XLA's
in-process autotuning cache, so this measures what they give:

- K worker processes start at once; each traces and lowers the step (as the main process does)
  and compiles its share of the programs, one after another, into a new persistent cache
  (JAX's, with XLA's per-fusion autotuning cache in it). Shares are balanced by each
  program's compile time alone on an H100 (`_ALONE_S`), longest first.
- Meanwhile the main process traces and lowers the step too; once the workers are done it
  compiles every program as training does (`SplitTrainStep.compile`), which the cache answers.

The table gives each worker's programs and times (start-up and tracing, each compile, done at,
seconds from the start) and the main process's: tracing, waiting, loading, and the total from
the start to a compiled step, the number to hold against `bench/train_step.py --lower_only
--compile_only --no_alone` (one process). Worker processes also autotune GEMMs side by side on
the one GPU, which may time candidates less cleanly than one process does: compare step times
before keeping this (`bench/train_step.py --variants bf16-auto-split3hr-flatupdate-procs4`
compiles through `Workers` and then times the steps). Needs the device's jax only (no
TensorFlow).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import time

BENCH = pathlib.Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(BENCH))

# Each program's XLA seconds compiled alone, GEMM autotuning cached, one NVIDIA H100,
# bf16-auto-split3hr-flatupdate at initial shapes (docs/benchmarks.md, 2026-12-05): the
# weights that balance the workers' shares. Programs not listed weigh `_UNKNOWN_S`.
_ALONE_S = {
    "backward.extra_msa": 12.2, "backward.evoformer": 11.4, "backward.embeddings": 8.7,
    "recycle.extra_msa": 6.6, "forward.extra_msa": 6.2, "recycle.embeddings": 6.2,
    "forward.embeddings": 5.5, "forward.evoformer": 5.1, "recycle.evoformer": 5.0,
    "gradient.losses": 4.4, "update": 4.1, "forward.structure": 3.5, "recycle.structure": 3.5,
    "backward.structure": 2.9, "accumulate": 2.4, "recycle.start": 0.1,
}
_UNKNOWN_S = 5.0


def shares(names: list[str], processes: int) -> list[list[str]]:
  """`names` over `processes` workers, longest compile first to the least loaded worker; each
  worker's programs in that order. Workers left without a program are dropped."""
  loads = [[0.0, []] for _ in range(processes)]
  for name in sorted(names, key=lambda n: -_ALONE_S.get(n, _UNKNOWN_S)):
    least = min(loads, key=lambda load: load[0])
    least[0] += _ALONE_S.get(name, _UNKNOWN_S)
    least[1].append(name)
  return [programs for _, programs in loads if programs]


def _cache_config(cache_dir: str) -> None:
  """JAX's persistent cache at `cache_dir`, every compiled program written to it."""
  import jax

  jax.config.update("jax_compilation_cache_dir", cache_dir)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)


def _abstract_split_step(variant: str, shapes: str, smoke: bool):
  from train_step import abstract_step  # pylint: disable=g-import-not-at-top

  config, step, state, batch = abstract_step(variant, "smoke" if smoke else shapes, smoke)
  if config.step_programs != "split":
    raise SystemExit(f"--variant {variant}: not a split step (step_programs="
                     f"{config.step_programs!r}); pick a '-split' variant")
  return step, state, batch


def run_worker(args) -> int:
  """A worker: trace and lower the step, compile `--worker`'s programs one after another."""
  started = time.time()
  _cache_config(args.cache_dir)
  step, state, batch = _abstract_split_step(args.variant, args.shapes, args.smoke)
  lowered = step.lower(state, batch)
  traced = time.time()
  seconds = {}
  for name in args.worker.split(","):
    begin = time.perf_counter()
    lowered[name].compile(compiler_options=step.compiler_options(name))
    seconds[name] = time.perf_counter() - begin
  result = {"programs": args.worker.split(","), "started": started - args.t0,
            "traced": traced - args.t0, "compile_s": seconds, "done": time.time() - args.t0}
  pathlib.Path(args.out).write_text(json.dumps(result) + "\n", encoding="utf-8")
  return 0


def cache_entries(cache_dir: str) -> int:
  return sum(1 for path in pathlib.Path(cache_dir).rglob("*") if path.is_file())


def new_cache(cache_dir: str | None = None) -> str:
  """An empty directory for the persistent cache (`cache_dir`, made if missing, or a new
  temporary one), set as this process's: call it before this process's first compile (JAX
  opens its cache once)."""
  cache_dir = cache_dir or tempfile.mkdtemp(prefix="compile_processes_cache_")
  pathlib.Path(cache_dir).mkdir(parents=True, exist_ok=True)
  if any(pathlib.Path(cache_dir).iterdir()):
    raise SystemExit(f"cache directory {cache_dir}: not empty; the first compile needs a new "
                     "cache")
  _cache_config(cache_dir)
  return cache_dir


class Workers:
  """Worker processes compiling `names` of `variant`'s split step into `cache_dir`, in
  `processes` shares (`shares`); started at once, at `t0` (time.time())."""

  def __init__(self, variant: str, shapes: str, smoke: bool, cache_dir: str, names: list[str],
               processes: int, t0: float):
    self.plan = shares(names, processes) if processes > 0 else []
    self._dir = tempfile.mkdtemp(prefix="compile_processes_")
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    # Workers only compile: no preallocation of the accelerator's memory beside the main
    # process (which may hold most of it).
    env["XLA_PYTHON_CLIENT_PREALLOCATE"] = "false"
    self._workers = []
    for k, programs in enumerate(self.plan):
      out = os.path.join(self._dir, f"worker{k}.json")
      command = [sys.executable, str(pathlib.Path(__file__).resolve()), "--variant", variant,
                 "--shapes", shapes, "--cache_dir", cache_dir, "--worker", ",".join(programs),
                 "--t0", repr(t0), "--out", out] + (["--smoke"] if smoke else [])
      with open(os.path.join(self._dir, f"worker{k}.log"), "w", encoding="utf-8") as log:
        process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
      self._workers.append((process, out))

  def wait(self) -> list[dict]:
    """Each worker's report, once all are done; a worker that failed stops the run with the
    end of its log."""
    failed = [k for k, (process, _) in enumerate(self._workers) if process.wait() != 0]
    if failed:
      logs = "\n".join(pathlib.Path(self._dir, f"worker{k}.log").read_text(
          encoding="utf-8")[-3000:] for k in failed)
      raise SystemExit(f"compile workers {failed} failed; the end of their logs:\n{logs}")
    return [json.loads(pathlib.Path(out).read_text(encoding="utf-8"))
            for _, out in self._workers]


def compile_through_workers(step, state, batch, variant: str, shapes: str, smoke: bool,
                            cache_dir: str, processes: int, t0: float | None = None) -> dict:
  """Split step `step` compiled as this bench measures it: `Workers` started, this process
  tracing and lowering meanwhile, waiting for them, then compiling every program (which
  their cache answers). Times in seconds from `t0` (time.time(); default: now): 'setup'
  (the workers started), 'traced', 'waited', 'done'; 'compile_s' is `step.compile`'s
  seconds, 'new_cache_entries' what this process's compile wrote (0: all from the workers),
  'workers' their reports."""
  t0 = time.time() if t0 is None else t0
  workers = Workers(variant, shapes, smoke, cache_dir, step.program_names, processes, t0)
  begin = time.time()
  lowered = step.lower(state, batch)
  traced = time.time()
  reports = workers.wait()
  waited = time.time()
  entries = cache_entries(cache_dir)
  seconds = step.compile(state, batch, lowered=lowered)
  done = time.time()
  return {"processes": len(workers.plan), "workers": reports, "setup": begin - t0,
          "traced": traced - t0, "waited": waited - t0, "done": done - t0,
          "compile_s": seconds, "new_cache_entries": cache_entries(cache_dir) - entries}


def run_main(args) -> dict:
  """The workers, then the main process's compile from their cache: the result row."""
  t0 = time.time()
  cache_dir = new_cache(args.cache_dir)
  import jax

  step, state, batch = _abstract_split_step(args.variant, args.shapes, args.smoke)
  result = compile_through_workers(step, state, batch, args.variant, args.shapes, args.smoke,
                                   cache_dir, args.processes, t0)
  seconds = result["compile_s"]
  return {
      "variant": args.variant, "shapes": "smoke" if args.smoke else args.shapes,
      "processes": result["processes"], "device": jax.devices()[0].device_kind,
      "jax": jax.__version__, "workers": result["workers"],
      "main": {"setup": result["setup"], "traced": result["traced"],
               "waited": result["waited"], "compile_wall_s": seconds["wall"],
               "compile_s": {k: v for k, v in seconds.items() if k not in ("wall", "trace_lower")},
               "new_cache_entries": result["new_cache_entries"]},
      "total_s": result["done"], "cache_dir": cache_dir,
  }


def print_row(row: dict) -> None:
  print(f"{row['variant']} at {row['shapes']} shapes, {row['processes']} worker processes, "
        f"{row['device']}, jax {row['jax']} (seconds from the start)")
  for k, worker in enumerate(row["workers"]):
    compiles = ", ".join(f"{name} {s:.1f}" for name, s in worker["compile_s"].items())
    print(f"  worker {k}: started {worker['started']:.1f}, traced {worker['traced']:.1f}, "
          f"done {worker['done']:.1f}; compiled {compiles}")
  main = row["main"]
  slowest = max(main["compile_s"].items(), key=lambda item: item[1])
  print(f"  main: set up {main['setup']:.1f}, traced {main['traced']:.1f}, workers done "
        f"{main['waited']:.1f}; compiled every program in {main['compile_wall_s']:.1f} "
        f"(longest {slowest[0]} {slowest[1]:.1f}; {main['new_cache_entries']} new cache "
        f"entries: {'every program from the cache' if main['new_cache_entries'] == 0 and row['processes'] else 'compiled here'})")
  print(f"  total {row['total_s']:.1f} s to a compiled step")


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--variant", default="bf16-auto-split3hr-flatupdate",
                      help="a split-step variant of bench/train_step.py")
  parser.add_argument("--shapes", default="initial")
  parser.add_argument("--processes", type=int, default=4,
                      help="worker processes (0: the main process compiles everything itself, "
                      "into the same kind of cache)")
  parser.add_argument("--cache_dir", help="an empty directory for the cache (default: a new one)")
  parser.add_argument("--smoke", action="store_true", help="the tiny model (a CPU check)")
  parser.add_argument("--json", help="also write the row to this file")
  parser.add_argument("--worker", help=argparse.SUPPRESS)
  parser.add_argument("--t0", type=float, help=argparse.SUPPRESS)
  parser.add_argument("--out", help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  if args.worker:
    return run_worker(args)
  if args.processes < 0:
    parser.error(f"--processes {args.processes}: expected 0 or more")
  if args.smoke:
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
  row = run_main(args)
  print_row(row)
  if args.json:
    pathlib.Path(args.json).write_text(json.dumps(row, indent=1) + "\n", encoding="utf-8")
  return 0


if __name__ == "__main__":
  sys.exit(main())
