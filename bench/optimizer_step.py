"""The train step's end alone: per-example clipping and the update, on the full model's
parameter tree.

    python bench/optimizer_step.py [--shapes initial] [--runs 20] [--variants a,b,...]

The split train step (`af2flax.train.programs`) runs these as programs of their own:
`accumulate` (one example's gradient clipped to its norm, Suppl. 1.11.3, in float32) and
`update` (the sums averaged; Adam, the EMA, the finiteness guard; `step.apply_summed_gradients`).
On an H100 (2026-12-06) they took 7.0 and 17.3 ms per step, timed one by one inside the
step (`bench/train_step.py --program_times`), against a memory-bound floor of about 1 ms for
the update's ~3 GB of float32 traffic. This bench times each variant alone on random
parameters of the preset's model (93.2 M in 334 arrays), so that their costs can be read
without compiling the model: median ms of `--runs` calls after a warm-up, with the number of
kernels XLA launches (fusions, library calls and copies in the optimised HLO, branches
included), the compile seconds, and how long the call took to return (the host's part:
flattening the ~1,700 arrays of the state and the gradient, dispatch).

Variants: `accumulate` (the split step's accumulate program), `accumulate-flat` (the same on
the gradient concatenated into one vector first), `update` (the presets' update, array by
array), `update-flat` (`optimizer.flat_update`: on the parameters concatenated). H200,
2026-12-06 (docs/benchmarks.md): 6.30, 2.67, 18.89 and 15.49 ms; 753, 8, 608 and 1,368
kernels. The kernels' count does not explain the update's time (the 608 kernels of the
update per array take longer than the 1,368 of the flat one); the host's share (the
returned-after column, added since) was not yet measured on a GPU.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import pathlib
import re
import statistics
import sys
import time

REPO = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))


def _kernels(hlo_text: str) -> int:
  """Kernels an optimised GPU HLO module launches (at most): fusions, custom calls (library
  products, our kernels) and copies, in every computation that is not itself a fusion's body."""
  count, in_fused = 0, False
  for line in hlo_text.splitlines():
    if line and not line.startswith(" "):  # a computation's header (or the module's)
      in_fused = "fused" in line.split(" ")[0] or "fusion" in line.split(" ")[0]
      continue
    if in_fused:
      continue
    if re.search(r"= \S+ (fusion|custom-call|copy|copy-start)\(", line):
      count += 1
  return count


def _parameter_shapes(shape_name: str):
  """The preset's model parameters as shapes (no initialisation run)."""
  import jax

  import train_step as bench_step  # bench/train_step.py

  variant = "bf16-pallas512-extracudnn-offload55" if shape_name == "finetune" else "bf16-auto"
  config, _, state, _ = bench_step.abstract_step(variant, shape_name, False)
  return config, jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state.params)


def _random_like(shapes, seed: int):
  import jax
  import jax.numpy as jnp

  leaves, treedef = jax.tree.flatten(shapes)
  keys = jax.random.split(jax.random.PRNGKey(seed), len(leaves))
  return jax.tree.unflatten(treedef, [
      0.02 * jax.random.normal(k, s.shape, jnp.float32).astype(s.dtype)
      for k, s in zip(keys, leaves)])


def _variants(config):
  """{name: (function, whether it takes the train state before the gradient and scalars)}.
  Its array arguments (the state, the gradient) are donated, as the split step's are."""
  import jax
  import jax.numpy as jnp

  from af2flax.train import optimizer as optimizer_lib
  from af2flax.train import step as step_lib

  optimizer = optimizer_lib.make_optimizer(config.optimizer)
  clip_norm = float(config.optimizer.clip_norm)
  ema_decay = float(config.optimizer.ema_decay)

  def accumulate(grads, scalars):
    clipped, example = step_lib.clip_example_gradient(grads, scalars, clip_norm)
    return jax.tree.map(lambda g: g.astype(jnp.float32), clipped), example

  def update(flat):
    def fn(state, grads, scalars):
      return step_lib.apply_summed_gradients(state, grads, scalars, 1, optimizer, ema_decay,
                                             flat)
    return fn

  def accumulate_flat(grads, scalars):
    vector = step_lib.FlatView(grads).ravel(grads)
    return step_lib.clip_example_gradient(vector, scalars, clip_norm)

  return optimizer, {
      "accumulate": (accumulate, False),
      "accumulate-flat": (accumulate_flat, False),
      "update": (update(False), True),
      "update-flat": (update(True), True),
  }


def run(variants: list[str], shape_name: str, runs: int, profile_dir: str | None = None
        ) -> list[dict]:
  """Each variant compiled and timed (`profile_dir`: then one more call traced into
  PROFILE_DIR/VARIANT, for `bench/profile_summary.py`)."""
  import jax
  import jax.numpy as jnp

  from af2flax.train import state as state_lib

  config, shapes = _parameter_shapes(shape_name)
  optimizer, known = _variants(config)
  unknown = [v for v in variants if v not in known]
  if unknown:
    raise SystemExit(f"--variants: unknown {unknown}; known: {', '.join(known)}")
  leaves = jax.tree.leaves(shapes)
  sizes = [math.prod(s.shape) for s in leaves]
  rows = []
  for name in variants:
    fn, takes_state = known[name]
    state = (jax.jit(lambda p: state_lib.create_train_state(p, optimizer,
                                                            jax.random.PRNGKey(1)))(
        _random_like(shapes, 0)) if takes_state else None)
    scalars = {"loss": jnp.float32(1.0)}
    jitted = jax.jit(fn, donate_argnums=(0, 1) if takes_state else (0,))

    def arguments():  # the gradient is donated: a new one for each call
      return ((state,) if takes_state else ()) + (_random_like(shapes, 1), scalars)

    args = arguments()
    start = time.perf_counter()
    compiled = jitted.lower(*args).compile()
    compile_s = time.perf_counter() - start
    kernels = _kernels(compiled.as_text())
    times, dispatch = [], []
    for i in range(runs + 1 + bool(profile_dir)):  # a warm-up, the runs, the traced call
      args = arguments()
      jax.block_until_ready(args)
      tracing = (jax.profiler.trace(os.path.join(profile_dir, name), create_perfetto_trace=True)
                 if profile_dir and i == runs + 1 else contextlib.nullcontext())
      with tracing:
        start = time.perf_counter()
        out = compiled(*args)
        returned = time.perf_counter()
        jax.block_until_ready(out)
      if 0 < i <= runs:
        times.append(time.perf_counter() - start)
        dispatch.append(returned - start)
      if takes_state:
        state = out[0]
    rows.append({"variant": name, "shapes": shape_name, "ms": 1e3 * statistics.median(times),
                 "dispatch_ms": 1e3 * statistics.median(dispatch),
                 "kernels": kernels, "compile_s": compile_s, "arrays": len(leaves),
                 "parameters": sum(sizes), "device": jax.devices()[0].device_kind,
                 "jax": jax.__version__})
    print(f"{name:28s} {rows[-1]['ms']:9.2f} ms (returned after {rows[-1]['dispatch_ms']:6.2f}) "
          f"{kernels:7d} kernels  compile {compile_s:6.1f} s"
          f"  {len(leaves)} arrays, {sum(sizes) / 1e6:.1f} M parameters, "
          f"{rows[-1]['device']}, jax {jax.__version__}", flush=True)
  return rows


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--variants", default="accumulate,accumulate-flat,update,update-flat")
  parser.add_argument("--shapes", default="initial", choices=("initial", "finetune"))
  parser.add_argument("--runs", type=int, default=20)
  parser.add_argument("--json", help="also write the rows to this file")
  parser.add_argument("--profile_dir", help="trace one more call of each variant into "
                      "PROFILE_DIR/VARIANT")
  args = parser.parse_args(argv)
  rows = run(args.variants.split(","), args.shapes, args.runs, args.profile_dir)
  if args.json:
    pathlib.Path(args.json).write_text(json.dumps(rows, indent=1) + "\n", encoding="utf-8")
  return 0


if __name__ == "__main__":
  sys.exit(main())
