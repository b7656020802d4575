"""Forward+backward time and peak memory of one AlphaFold training step.

    python bench/model_step.py                      # all shapes x dtypes x remat, on the GPU
    python bench/model_step.py --shapes initial --dtypes bfloat16 --remat on
    python bench/model_step.py --smoke              # tiny shapes, CPU, < 1 minute

One training step = the model with `num_iter_recycling` recycles (default 0: only the final
iteration, which carries the gradient), the full AlphaFold loss (`alphafold_loss`) and its
gradient with respect to every parameter, for one example (as inside AlphaFold's per-example
vmap). Shapes (Jumper et al. 2021, Suppl. 1.11.3 and Table 4):
  initial   crop 256 residues, 128 MSA clusters, 1024 extra sequences, 4 templates
  finetune  crop 384 residues, 512 MSA clusters, 5120 extra sequences, 4 templates
with the full model_1_ptm network (48 Evoformer blocks). Each configuration runs in its own
subprocess, so that its peak memory (`memory_stats()['peak_bytes_in_use']`) is its own and an
out-of-memory failure is reported without stopping the others. Prints a table; needs only
jax, flax, numpy and ml_collections (no TensorFlow, no clu).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import pathlib
import subprocess
import sys
import time

SHAPES = {
    "initial": {"num_res": 256, "num_msa": 128, "num_extra_msa": 1024, "num_templates": 4},
    "finetune": {"num_res": 384, "num_msa": 512, "num_extra_msa": 5120, "num_templates": 4},
    "smoke": {"num_res": 16, "num_msa": 4, "num_extra_msa": 8, "num_templates": 2},
}
REPO = pathlib.Path(__file__).resolve().parents[1]


def _training_example(shapes: dict, num_slices: int, num_iter_recycling: int, seed: int = 0):
  """Random features + ground truth of a random chain (numpy)."""
  import numpy as np

  from af2flax.common import residue_constants as rc
  from af2flax.data.targets import make_targets
  from af2flax.model import batch_spec

  batch = batch_spec.random_features(seed, num_slices=num_slices,
                                     num_iter_recycling=num_iter_recycling, **shapes)
  rng = np.random.default_rng(seed)
  aatype = batch["aatype"][0]
  positions = batch_spec._backbone_like(rng, shapes["num_res"])  # pylint: disable=protected-access
  atom_mask = rc.restype_atom37_mask[aatype].astype(np.float32)
  truth = make_targets(aatype, positions, atom_mask)
  truth.update(all_atom_positions=positions, all_atom_mask=atom_mask,
               true_msa=rng.integers(0, 21, (shapes["num_msa"], shapes["num_res"])
                                     ).astype(np.int32),
               bert_mask=(rng.uniform(size=(shapes["num_msa"], shapes["num_res"])) < 0.15
                          ).astype(np.float32),
               resolution=np.asarray(2.0, np.float32), use_clamped_fape=np.asarray(1.0, np.float32))
  for key, value in truth.items():
    if key not in batch:
      batch[key] = np.stack([np.asarray(value)] * num_slices)
  return batch


def run_one(shape_name: str, dtype: str, remat: bool, preset: str, num_iter_recycling: int,
            steps: int, smoke: bool) -> dict:
  """Compiles and times one configuration in this process; returns a result row."""
  import jax
  import jax.numpy as jnp

  from af2flax.losses.total import alphafold_loss
  from af2flax.model.alphafold import AlphaFold, slice_recycle
  from af2flax.model.config import model_config

  config = model_config(preset)
  config.global_config.dtype = dtype
  config.global_config.use_remat = remat
  if smoke:  # Same code paths, one block each and no recycling loop: compiles fast on a CPU.
    config.embeddings_and_evoformer.evoformer_num_block = 1
    config.embeddings_and_evoformer.extra_msa_stack_num_block = 1
    config.embeddings_and_evoformer.template.template_pair_stack.num_block = 1
    config.heads.structure_module.num_layer = 1
    config.num_recycle = 0
  shapes = SHAPES[shape_name]
  batch = _training_example(shapes, config.num_recycle + 1, num_iter_recycling)
  batch = jax.device_put(batch)
  model = AlphaFold(config)
  params = jax.jit(model.init)(jax.random.PRNGKey(0), batch)

  def loss_fn(p, features, key):
    outputs = model.apply(p, features, deterministic=False, rngs={"dropout": key})
    final = slice_recycle(features, jnp.minimum(features["num_iter_recycling"][0],
                                                config.num_recycle))
    return alphafold_loss(final, outputs, config.heads)[0]

  step = jax.jit(jax.value_and_grad(loss_fn))
  start = time.perf_counter()
  compiled = step.lower(params, batch, jax.random.PRNGKey(1)).compile()
  compile_s = time.perf_counter() - start
  loss, grads = compiled(params, batch, jax.random.PRNGKey(1))  # warm-up
  jax.block_until_ready(grads)
  times = []
  for index in range(steps):
    start = time.perf_counter()
    loss, grads = compiled(params, batch, jax.random.PRNGKey(2 + index))
    jax.block_until_ready(grads)
    times.append(time.perf_counter() - start)
  device = jax.devices()[0]
  stats = device.memory_stats() or {}
  analysis = compiled.memory_analysis()
  temp_bytes = getattr(analysis, "temp_size_in_bytes", None) if analysis is not None else None
  times.sort()
  return {
      "shapes": shape_name, "dtype": dtype, "remat": remat, "ok": True,
      "device": device.device_kind, "compile_s": compile_s,
      "step_s": times[len(times) // 2], "min_step_s": times[0],
      "peak_gib": stats.get("peak_bytes_in_use", 0) / 2 ** 30 if stats else None,
      "temp_gib": temp_bytes / 2 ** 30 if temp_bytes is not None else None,
      "loss": float(loss),
  }


def _format(rows: list[dict]) -> str:
  header = (f"{'shapes':9s} {'dtype':9s} {'remat':5s} {'step_s':>8s} {'min_s':>8s} "
            f"{'compile_s':>9s} {'peak_GiB':>9s} {'temp_GiB':>9s}  device / note")
  lines = [header]
  for row in rows:
    def num(key, fmt="9.2f"):
      value = row.get(key)
      return format(value, fmt) if isinstance(value, (int, float)) else f"{'-':>{fmt[0]}s}"
    note = row.get("device", "") if row.get("ok") else f"FAILED: {row.get('error', '')[:80]}"
    lines.append(f"{row['shapes']:9s} {row['dtype']:9s} {str(row['remat']):5s} "
                 f"{num('step_s', '8.3f')} {num('min_step_s', '8.3f')} {num('compile_s')} "
                 f"{num('peak_gib')} {num('temp_gib')}  {note}")
  return "\n".join(lines)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--shapes", nargs="+", choices=["initial", "finetune"],
                      default=["initial", "finetune"])
  parser.add_argument("--dtypes", nargs="+", choices=["float32", "bfloat16"],
                      default=["float32", "bfloat16"])
  parser.add_argument("--remat", nargs="+", choices=["on", "off"], default=["on", "off"])
  parser.add_argument("--preset", default="model_1_ptm")
  parser.add_argument("--num-iter-recycling", type=int, default=0,
                      help="no-gradient recycling iterations before the final one")
  parser.add_argument("--steps", type=int, default=5, help="timed steps after a warm-up step")
  parser.add_argument("--smoke", action="store_true",
                      help="tiny shapes and blocks on the CPU (checks the script, < 1 min)")
  parser.add_argument("--timeout", type=int, default=1800, help="seconds per configuration")
  parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one config, print JSON
  args = parser.parse_args(argv)

  if args.one:
    shape_name, dtype, remat = args.one.split(",")
    row = run_one(shape_name, dtype, remat == "on", args.preset, args.num_iter_recycling,
                  args.steps, args.smoke)
    print("RESULT " + json.dumps(row))
    return 0

  if args.smoke:
    configs = [("smoke", "bfloat16", "on")]
    args.steps = 1
  else:
    configs = list(itertools.product(args.shapes, args.dtypes, args.remat))
  env = dict(os.environ)
  if args.smoke:
    env.setdefault("JAX_PLATFORMS", "cpu")
    # Timings of the smoke run mean nothing; spend less time in LLVM.
    env.setdefault("XLA_FLAGS", "--xla_backend_optimization_level=0")
  env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
  rows = []
  for shape_name, dtype, remat in configs:
    command = [sys.executable, str(pathlib.Path(__file__).resolve()), "--one",
               f"{shape_name},{dtype},{remat}", "--preset", args.preset,
               "--num-iter-recycling", str(args.num_iter_recycling), "--steps", str(args.steps)]
    if args.smoke:
      command.append("--smoke")
    try:
      done = subprocess.run(command, capture_output=True, text=True, timeout=args.timeout,
                            env=env, check=False)
      results = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
      if results:
        rows.append(json.loads(results[-1][len("RESULT "):]))
      else:
        error = (done.stderr.strip().splitlines() or ["no output"])[-1]
        rows.append({"shapes": shape_name, "dtype": dtype, "remat": remat == "on", "ok": False,
                     "error": error})
    except subprocess.TimeoutExpired:
      rows.append({"shapes": shape_name, "dtype": dtype, "remat": remat == "on", "ok": False,
                   "error": f"timeout after {args.timeout} s"})
    print(_format(rows[-1:]).splitlines()[-1], flush=True)
  print()
  print(f"preset {args.preset}, num_iter_recycling {args.num_iter_recycling}, "
        f"median of {args.steps} steps after one warm-up step")
  print(_format(rows))
  return 0 if all(row.get("ok") for row in rows) else 1


if __name__ == "__main__":
  sys.exit(main())
