"""Time one Evoformer module (or one whole block) alone: its forward pass, and its gradient
pass under `jax.checkpoint` (the recomputed forward pass and the backward pass).

    python bench/module_step.py --modules outer_product_mean \\
        --ab outer_product_mean_layout=alphafold,rows_first
    python bench/module_step.py --stack extra_msa --modules all
    python bench/module_step.py --smoke                # tiny shapes, CPU, seconds

A full train step compiles in minutes; one module compiles in seconds, so a change to a
module's arithmetic or layout can be timed side by side against the old one in a few seconds
of device time before the full step is timed (`bench/train_step.py`). Each module is built
from the presets' `model_1_ptm` config (bfloat16, `--set KEY=VALUE` over its global_config;
the fine-tuning preset's own settings, e.g. `extra_msa_subbatch_size`, only through `--set`),
with random inputs at the shapes of `--shapes` (initial: 256 residues, 128 MSA rows (+4
template rows in the Evoformer), 1,024 extra sequences; finetune: 384, 512 (+4), 5,120) and
the stack of `--stack`. The gradient pass differentiates sum(output * a random cotangent)
with respect to the parameters and the inputs, the module under `jax.checkpoint` (the
presets' `nothing_saveable`). Only the gradient is returned, so XLA drops the first forward
pass as unused: the gradient time is the recomputation and the backward pass, and a training
step's gradient pass costs the module about forward + gradient (its forward pass runs once
more before, for the next block's input); the forward time alone is what it costs in a
recycling iteration. Times are in
milliseconds per call: the median over 5 repeats of `--steps` calls queued back to back
after a warm-up (so the host's dispatch does not count). Prints one table; with `--json`
also writes the rows.

`--ab KEY=V1,V2,...` runs every module once per value (one row each; `|` separates values
that hold commas, e.g. `--ab "pallas_tiling=|lg_block_q=128,lg_warps=8"`); `--set` applies to
all rows; `--profile_dir` also traces each row's gradient pass (its kernels, by
`bench/profile_summary.py`). Needs only jax, flax, numpy and ml_collections.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

from train_step import parse_set, parse_value  # noqa: E402  pylint: disable=wrong-import-position

SHAPES = {
    "initial": {"num_res": 256, "num_msa": 132, "num_extra_msa": 1024},
    "finetune": {"num_res": 384, "num_msa": 516, "num_extra_msa": 5120},
    "smoke": {"num_res": 16, "num_msa": 6, "num_extra_msa": 8},
}
MSA_MODULES = ("msa_row_attention_with_pair_bias", "msa_column_attention", "msa_transition",
               "outer_product_mean")
PAIR_MODULES = ("triangle_multiplication_outgoing", "triangle_multiplication_incoming",
                "triangle_attention_starting_node", "triangle_attention_ending_node",
                "pair_transition")
MODULES = MSA_MODULES + PAIR_MODULES + ("block",)


def parse_ab(text: str | None) -> list[dict]:
  """'k=v1,v2' -> [{'k': v1}, {'k': v2}]; None -> [{}]. Values that hold commas themselves
  are separated by '|' instead ('pallas_tiling=a=1,b=2|a=2')."""
  if not text:
    return [{}]
  key, sep, values = text.partition("=")
  if not sep or not key or not values:
    raise SystemExit(f"--ab {text!r}: expected KEY=V1,V2,...")
  separator = "|" if "|" in values else ","
  return [{key: parse_value(v)} for v in values.split(separator)]


def build(module_name: str, stack: str, overrides: dict):
  """(module, apply inputs as a function of (msa, pair, msa_mask, pair_mask), the config)."""
  from af2flax.model import config as model_config_lib
  from af2flax.model import evoformer, triangle

  if module_name not in MODULES:
    raise SystemExit(f"unknown module {module_name!r}; known: {', '.join(MODULES)}")
  config = model_config_lib.model_config("model_1_ptm")
  gc = config.global_config
  for key, value in overrides.items():
    if key not in gc:
      raise SystemExit(f"--set/--ab {key}: not a global_config key")
    setattr(gc, key, value)
  gc.zero_init = False  # zero-initialised output layers would give zero gradients upstream
  extra = stack == "extra_msa"
  stack_config = config.embeddings_and_evoformer.evoformer  # the extra-MSA stack's too
  c_z = config.embeddings_and_evoformer.pair_channel
  if module_name == "block":
    module = evoformer.EvoformerIteration(stack_config, gc, is_extra_msa=extra)
    return module, lambda m, p, mm, pm: ((m, p), (mm, pm)), config
  c = stack_config[module_name]
  chunk = triangle.subbatch_size(gc, extra_msa=extra)
  if module_name == "msa_row_attention_with_pair_bias":
    module = evoformer.MSARowAttentionWithPairBias(c, gc, extra)
    return module, lambda m, p, mm, pm: (m, mm, p), config
  if module_name == "msa_column_attention":
    module = (evoformer.MSAColumnGlobalAttention(c, gc) if extra
              else evoformer.MSAColumnAttention(c, gc))
    return module, lambda m, p, mm, pm: (m, mm), config
  if module_name == "msa_transition":
    return evoformer.Transition(c, gc, chunk), lambda m, p, mm, pm: (m, mm), config
  if module_name == "outer_product_mean":
    return evoformer.OuterProductMean(c, gc, c_z), lambda m, p, mm, pm: (m, mm), config
  if module_name.startswith("triangle_multiplication"):
    return triangle.TriangleMultiplication(c, gc), lambda m, p, mm, pm: (p, pm), config
  if module_name.startswith("triangle_attention"):
    return triangle.TriangleAttention(c, gc), lambda m, p, mm, pm: (p, pm), config
  return evoformer.Transition(c, gc, chunk), lambda m, p, mm, pm: (p, pm), config  # pair


def time_module(module_name: str, stack: str, shapes: dict, overrides: dict, steps: int,
                repeats: int = 5, seed: int = 0, profile_dir: str | None = None) -> dict:
  """One row: forward and gradient-pass medians (ms) and compile seconds; with
  `profile_dir`, also a trace of 3 gradient passes there (perfetto JSON) beside the
  optimised HLO (`gradient.hlo.txt.gz`), for `bench/profile_summary.py`."""
  import jax
  import jax.numpy as jnp
  import numpy as np

  from af2flax.model.primitives import compute_dtype  # pylint: disable=g-import-not-at-top

  module, inputs_of, config = build(module_name, stack, overrides)
  dtype = compute_dtype(config.global_config)
  widths = config.embeddings_and_evoformer
  rng = np.random.default_rng(seed)
  num_res = shapes["num_res"]
  num_seq, c_m = ((shapes["num_extra_msa"], widths.extra_msa_channel) if stack == "extra_msa"
                  else (shapes["num_msa"], widths.msa_channel))
  msa = jnp.asarray(rng.normal(size=(num_seq, num_res, c_m)), dtype)
  pair = jnp.asarray(rng.normal(size=(num_res, num_res, widths.pair_channel)), dtype)
  msa_mask = jnp.asarray(rng.random((num_seq, num_res)) > 0.1, jnp.float32)
  pair_mask = jnp.ones((num_res, num_res), jnp.float32)
  args = inputs_of(msa, pair, msa_mask, pair_mask)
  key = jax.random.PRNGKey(seed)
  params = jax.jit(module.init)(key, *args)
  rngs = {"dropout": jax.random.PRNGKey(seed + 1)}

  kwargs = {"deterministic": False} if module_name == "block" else {}  # dropout as in training

  def forward(params, args):
    return module.apply(params, *args, rngs=rngs, **kwargs)

  out = jax.eval_shape(forward, params, args)
  cotangent = jax.tree.map(
      lambda s: jnp.asarray(rng.normal(size=s.shape), s.dtype), out)

  def loss(params, args):
    fn = jax.checkpoint(forward, policy=jax.checkpoint_policies.nothing_saveable,
                        prevent_cse=True)
    result = fn(params, args)
    return sum(jnp.sum(r.astype(jnp.float32) * t.astype(jnp.float32))
               for r, t in zip(jax.tree.leaves(result), jax.tree.leaves(cotangent)))

  def gradient(params, args):
    return jax.grad(loss, argnums=(0, 1), allow_int=True)(params, args)

  row = {"module": module_name, "stack": stack, **overrides}
  for name, fn in (("forward_ms", forward), ("gradient_ms", gradient)):
    start = time.perf_counter()
    compiled = jax.jit(fn).lower(params, args).compile()
    row[name.replace("_ms", "_compile_s")] = round(time.perf_counter() - start, 2)
    jax.block_until_ready(compiled(params, args))
    times = []
    for _ in range(repeats):  # calls queued back to back: the host's dispatch hides
      start = time.perf_counter()
      for _ in range(steps):
        result = compiled(params, args)
      jax.block_until_ready(result)
      times.append((time.perf_counter() - start) / steps)
    row[name] = round(1e3 * statistics.median(times), 3)
  if profile_dir:
    import gzip  # pylint: disable=g-import-not-at-top
    os.makedirs(profile_dir, exist_ok=True)
    with gzip.open(os.path.join(profile_dir, "gradient.hlo.txt.gz"), "wt") as handle:
      handle.write(compiled.as_text())
    with jax.profiler.trace(profile_dir, create_perfetto_trace=True):
      for _ in range(3):
        result = compiled(params, args)
      jax.block_until_ready(result)
  return row


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--modules", default="all",
                      help=f"comma-separated, or 'all' (the block's modules, then the block); "
                           f"known: {', '.join(MODULES)}")
  parser.add_argument("--stack", choices=["evoformer", "extra_msa"], default="evoformer")
  parser.add_argument("--shapes", choices=sorted(SHAPES), default="initial")
  parser.add_argument("--steps", type=int, default=20)
  parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                      help="a global_config value for every row (repeatable)")
  parser.add_argument("--ab", metavar="KEY=V1,V2",
                      help="one row per value of this key ('|' between values that hold commas)")
  parser.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU")
  parser.add_argument("--json", help="also write the rows to this file")
  parser.add_argument("--profile_dir", help="also trace 3 gradient passes of each row into "
                      "DIR/<module>-<row number>/ with the optimised HLO: then "
                      "bench/profile_summary.py DIR/<...> --hlo DIR/<...>/gradient.hlo.txt.gz "
                      "--steps 3 lists its kernels")
  args = parser.parse_args(argv)
  if args.smoke:
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    args.shapes, args.steps = "smoke", min(args.steps, 2)
  import jax

  modules = (list(MSA_MODULES + PAIR_MODULES) + ["block"] if args.modules == "all"
             else args.modules.split(","))
  for name in modules:
    if name not in MODULES:
      parser.error(f"--modules: unknown module {name!r}; known: {', '.join(MODULES)}")
  try:
    base = parse_set(args.set)
  except ValueError as error:
    parser.error(str(error))
  variants = parse_ab(args.ab)
  rows = []
  device = jax.devices()[0].device_kind
  print(f"{device}, jax {jax.__version__}; shapes {args.shapes} {SHAPES[args.shapes]}, "
        f"stack {args.stack}, {args.steps} calls per repeat; set {base or '-'}")
  print(f"{'module':36s} {'variant':40s} {'forward ms':>10s} {'gradient ms':>11s} "
        f"{'compile s':>9s}")
  for name in modules:
    for variant in variants:
      profile_dir = (os.path.join(args.profile_dir, f"{name}-{len(rows)}") if args.profile_dir
                     else None)
      row = time_module(name, args.stack, SHAPES[args.shapes], {**base, **variant}, args.steps,
                        repeats=2 if args.smoke else 5, profile_dir=profile_dir)
      rows.append(row)
      label = ",".join(f"{k}={v}" for k, v in variant.items()) or "-"
      print(f"{name:36s} {label:40s} {row['forward_ms']:10.3f} {row['gradient_ms']:11.3f} "
            f"{row['forward_compile_s'] + row['gradient_compile_s']:9.1f}", flush=True)
  if args.json:
    pathlib.Path(args.json).write_text(json.dumps(
        {"device": device, "jax": jax.__version__, "shapes": args.shapes,
         "stack": args.stack, "rows": rows}, indent=1))
  return 0


if __name__ == "__main__":
  sys.exit(main())
