r"""Inference speed and memory of the full model: seconds and peak memory per sequence length.

    python bench/predict.py                      # 256, 512, 1024, 2048 residues; chunk 0 and 128
    python bench/predict.py --lengths 1024 --chunk_sizes 0,64,128 --json bench_predict.json
    python bench/predict.py --smoke              # a tiny model on the CPU, seconds

For every (length, chunk size) a fresh process builds the preset (`--model`, default
model_1_ptm: 48 Evoformer blocks, templates, pTM head) with random parameters and random
features of AlphaFold's inference shapes (a single query with a random MSA: `--num_msa` cluster
centres, `--num_extra_msa` extra rows, `--num_templates` templates), then predicts with
`af2flax.inference.runner.ModelRunner` (`--num_recycle` recycles, so num_recycle + 1 network
iterations): once to compile, then `--repeats` timed runs. Reported per row: compile seconds
(first run minus a timed run), predict seconds (median of the timed runs, all iterations),
seconds per iteration, the device's peak memory (`memory_stats()['peak_bytes_in_use']`, fresh
per process; on CPU the peak resident set) and, with `--xla_memory`, XLA's temporary buffer
size of one iteration. A configuration that runs out of memory is reported as
OOM and the others still run. Needs neither TensorFlow nor clu.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GIB = 1024.0 ** 3


def smoke_config(config):
  """A tiny variant of a preset for CPU smoke runs (same structure, few small layers)."""
  emb = config.embeddings_and_evoformer
  emb.evoformer_num_block = 1
  emb.extra_msa_stack_num_block = 1
  emb.msa_channel, emb.pair_channel, emb.seq_channel, emb.extra_msa_channel = 16, 8, 16, 8
  emb.template.template_pair_stack.num_block = 1
  sm = config.heads.structure_module
  sm.num_layer, sm.num_channel = 2, 16
  for head in ("predicted_lddt", "predicted_aligned_error"):
    config.heads[head].num_channels = 16
  return config


def random_params(abstract):
  """Random parameters of the model's shapes: N(0, 0.02), layer-norm scales 1 (no init run:
  initialising the full model costs a compilation of its own)."""
  import jax
  import numpy as np
  rng = np.random.default_rng(0)

  def draw(path, leaf):
    name = getattr(path[-1], "key", "")
    if name == "scale":
      return np.ones(leaf.shape, leaf.dtype)
    return (0.02 * rng.standard_normal(leaf.shape)).astype(leaf.dtype)
  return jax.tree_util.tree_map_with_path(draw, abstract)


def _worker_env() -> dict:
  """The worker's environment: the caller's, with the repository put first on PYTHONPATH
  (kept, not replaced: packages may come from an existing PYTHONPATH)."""
  path = [REPO_ROOT] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
  return dict(os.environ, PYTHONPATH=os.pathsep.join(path))


def run_one(args: argparse.Namespace) -> dict:
  """One (length, chunk) measurement in this process; returns the row as a dict."""
  import jax
  import numpy as np

  from af2flax.inference import model_loading
  from af2flax.inference import runner as runner_lib
  from af2flax.model import batch_spec
  from af2flax.model import config as config_lib

  config = config_lib.model_config(args.model)
  if args.smoke:
    config = smoke_config(config)
  config = runner_lib.inference_config(config, num_recycle=args.num_recycle,
                                       chunk_size=args.chunk_size or None, dtype=args.dtype)
  num_slices = args.num_recycle + 1
  num_templates = args.num_templates if config.embeddings_and_evoformer.template.enabled else 0
  batch = batch_spec.random_features(0, args.length, args.num_msa, args.num_extra_msa,
                                     max(num_templates, 1), num_slices=num_slices,
                                     num_iter_recycling=args.num_recycle)
  start = time.perf_counter()
  params = random_params(model_loading.abstract_params(config))
  init_seconds = time.perf_counter() - start
  runner = runner_lib.ModelRunner(args.model, config, params)
  temp_bytes = aot_seconds = None
  if args.xla_memory:
    first = {key: value[0] for key, value in batch.items() if key != "num_iter_recycling"}
    start = time.perf_counter()
    analysis = runner_lib.compiled_step(config).lower(
        runner.params, first, runner_lib.initial_prev(args.length, config)).compile(
        ).memory_analysis()
    aot_seconds = time.perf_counter() - start
    temp_bytes = getattr(analysis, "temp_size_in_bytes", None)
  first_seconds = runner.predict(batch).seconds   # compiles the iteration, then runs
  times = []
  for _ in range(args.repeats):
    prediction = runner.predict(batch)
    times.append(prediction.seconds)
  stats = jax.devices()[0].memory_stats() or {}
  peak = stats.get("peak_bytes_in_use")
  if peak is None:  # CPU: the process's peak resident memory
    import resource
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
  predict_seconds = statistics.median(times)
  compile_seconds = (aot_seconds if aot_seconds is not None
                     else max(first_seconds - predict_seconds, 0.0))
  assert np.all(np.isfinite(prediction.plddt)), "non-finite pLDDT"
  return {"length": args.length, "chunk_size": args.chunk_size, "status": "ok",
          "params_s": init_seconds, "compile_s": compile_seconds, "predict_s": predict_seconds,
          "per_iteration_s": predict_seconds / num_slices, "peak_gib": peak / GIB,
          "xla_temp_gib": None if temp_bytes is None else temp_bytes / GIB,
          "device": jax.devices()[0].device_kind, "jax": jax.__version__}


def _worker_command(args: argparse.Namespace, length: int, chunk: int) -> list[str]:
  command = [sys.executable, os.path.abspath(__file__), "--worker", "--length", str(length),
             "--chunk_size", str(chunk), "--model", args.model, "--num_recycle",
             str(args.num_recycle), "--num_msa", str(args.num_msa), "--num_extra_msa",
             str(args.num_extra_msa), "--num_templates", str(args.num_templates),
             "--repeats", str(args.repeats)]
  if args.xla_memory:
    command.append("--xla_memory")
  if args.dtype:
    command += ["--dtype", args.dtype]
  if args.smoke:
    command.append("--smoke")
  return command


def _format(rows: list[dict]) -> str:
  header = (f"{'length':>6} {'chunk':>5} {'status':>6} {'compile s':>9} {'predict s':>9} "
            f"{'s/iter':>7} {'peak GiB':>8} {'XLA tmp GiB':>11}")
  lines = [header, "-" * len(header)]
  for row in rows:
    if row["status"] != "ok":
      lines.append(f"{row['length']:>6} {row['chunk_size'] or '-':>5} {row['status']:>6}")
      continue
    temp = "-" if row["xla_temp_gib"] is None else f"{row['xla_temp_gib']:.2f}"
    lines.append(f"{row['length']:>6} {row['chunk_size'] or '-':>5} {'ok':>6} "
                 f"{row['compile_s']:>9.1f} {row['predict_s']:>9.2f} "
                 f"{row['per_iteration_s']:>7.2f} {row['peak_gib']:>8.2f} {temp:>11}")
  return "\n".join(lines)


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--lengths", default="256,512,1024,2048")
  parser.add_argument("--chunk_sizes", default="0,128", help="0 = no chunking")
  parser.add_argument("--model", default="model_1_ptm")
  parser.add_argument("--num_recycle", type=int, default=3)
  parser.add_argument("--num_msa", type=int, default=512)
  parser.add_argument("--num_extra_msa", type=int, default=1024)
  parser.add_argument("--num_templates", type=int, default=4)
  parser.add_argument("--dtype", choices=("bfloat16", "float32"))
  parser.add_argument("--repeats", type=int, default=1)
  parser.add_argument("--timeout", type=float, default=3600, help="seconds per configuration")
  parser.add_argument("--json", help="also write the rows here")
  parser.add_argument("--xla_memory", action="store_true", help="also report XLA's temporary "
                      "buffer size of one iteration (compiles a second time)")
  parser.add_argument("--smoke", action="store_true", help="tiny model, short lengths, CPU")
  parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
  parser.add_argument("--length", type=int, help=argparse.SUPPRESS)
  parser.add_argument("--chunk_size", type=int, default=0, help=argparse.SUPPRESS)
  args = parser.parse_args()
  sys.path.insert(0, REPO_ROOT)
  if args.worker:
    print("RESULT " + json.dumps(run_one(args)), flush=True)
    return 0
  if args.smoke:
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    # As bench/train_step.py's smoke runs: LLVM unoptimised, the CPU compiles in less time.
    os.environ.setdefault("XLA_FLAGS", "--xla_backend_optimization_level=0")
    if args.lengths == parser.get_default("lengths"):
      args.lengths = "16,32"
    if args.chunk_sizes == parser.get_default("chunk_sizes"):
      args.chunk_sizes = "0,8"
    args.num_msa, args.num_extra_msa = min(args.num_msa, 8), min(args.num_extra_msa, 16)
    args.num_recycle = min(args.num_recycle, 1)
  rows = []
  for length in [int(x) for x in args.lengths.split(",")]:
    for chunk in [int(x) for x in args.chunk_sizes.split(",")]:
      command = _worker_command(args, length, chunk)
      try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=args.timeout,
                              check=False, env=_worker_env())
        results = [line[7:] for line in done.stdout.splitlines() if line.startswith("RESULT ")]
        if results:
          row = json.loads(results[-1])
        else:
          oom = "RESOURCE_EXHAUSTED" in done.stderr or "out of memory" in done.stderr.lower()
          row = {"length": length, "chunk_size": chunk, "status": "OOM" if oom else "error"}
          print(f"length {length} chunk {chunk}: {row['status']}\n{done.stderr[-3000:]}",
                file=sys.stderr)
      except subprocess.TimeoutExpired:
        row = {"length": length, "chunk_size": chunk, "status": "timeout"}
      rows.append(row)
      print(_format([row]).splitlines()[-1], flush=True)
  device = next((r.get("device") for r in rows if r.get("device")), "?")
  print(f"\n{args.model}, {args.num_recycle} recycles, MSA {args.num_msa} + extra "
        f"{args.num_extra_msa}, {args.num_templates} templates, device {device}")
  print(_format(rows))
  if args.json:
    with open(args.json, "w") as handle:
      json.dump(rows, handle, indent=1)
  return 0 if all(r["status"] == "ok" for r in rows) else 1


if __name__ == "__main__":
  sys.exit(main())
