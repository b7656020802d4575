"""Weak scaling of the training step over the GPUs of one machine (data parallel and FSDP).

    python bench/scaling.py                                  # 1, 2, 4, 8 GPUs (those present)
    python bench/scaling.py --devices 1,2 --modes dp,fsdp --variant bf16-cudnn
    XLA_FLAGS=--xla_force_host_platform_device_count=4 python bench/scaling.py --smoke

One example per device (AlphaFold's recipe), the product's step (`af2flax.train.step`:
random-recycling model, every loss, backward, per-example clipping, Adam, EMA) jitted over a
('data', 'fsdp') mesh exactly as the train loop does (`sharding.infer_sharding` with the
preset's rules, `sharding.jit_train_step`), at initial-training shapes (256, 128, 1024, 4),
gradient pass with `--recycles` (default 0) recycling iterations before it.
`--global_batch B --steps 20` instead trains the same B examples on every device count: the
last column is then the loss after 20 steps, to compare 1 device against N. Modes:
  dp    mesh (N, 1): parameters and optimizer state replicated, gradients all-reduced;
  fsdp  mesh (1, N): the batch still split over all N devices, parameters, optimizer state and
        EMA sharded over them (reduce-scatter of gradients, all-gather of parameters).
Per row: step time (median of --steps after warm-up), examples/s, scaling efficiency
(examples/s per device against 1 device of the same mode: t_1 / t_N for weak scaling), peak memory per device, bytes of parameter +
optimizer + EMA state per device, gradient bytes that cross devices per step (ring all-reduce:
2 (N-1)/N x gradient bytes; reduce-scatter: (N-1)/N), and the loss of the last step on the
same global batch (to compare 1 against N devices). Each device count runs in its own
subprocess (its own device set and peak memory). Needs jax, flax, optax, numpy and
ml_collections (no TensorFlow).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import subprocess
import sys
import time

BENCH = pathlib.Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(BENCH))


def run_one(num_devices: int, mode: str, variant: str, recycles: int, steps: int,
            smoke: bool, global_batch: int = 0) -> dict:
  import jax
  import numpy as np

  from af2flax.model.alphafold import AlphaFold
  from af2flax.train import optimizer as optimizer_lib
  from af2flax.train import sharding as sharding_lib
  from af2flax.train import state as state_lib
  from af2flax.train import step as step_lib
  from model_step import SHAPES, _training_example
  from train_step import _train_config

  devices = jax.devices()[:num_devices]
  if len(devices) < num_devices:
    raise RuntimeError(f"{num_devices} devices asked, {len(jax.devices())} present")
  config = _train_config(variant, smoke, "initial_training")
  config.mesh.data, config.mesh.fsdp = (num_devices, 1) if mode == "dp" else (1, num_devices)
  batch_size = global_batch or num_devices
  if batch_size % num_devices:
    raise ValueError(f"--global_batch {batch_size} is not a multiple of {num_devices} devices")
  config.batch_size = batch_size
  shapes = SHAPES["smoke" if smoke else "initial"]
  num_slices = config.model.num_recycle + 1
  # The same global batch whatever N: example i is the same for every device count.
  examples = [_training_example(shapes, num_slices, recycles, seed=i)
              for i in range(batch_size)]
  batch_host = jax.tree.map(lambda *x: np.stack(x), *examples)
  mesh = sharding_lib.make_mesh(config.mesh, devices)
  model = AlphaFold(config.model)
  optimizer = optimizer_lib.make_optimizer(config.optimizer)
  example0 = jax.tree.map(lambda x: x[0], batch_host)

  def init_state(rng):
    params = model.init({"params": rng, "dropout": rng}, example0, deterministic=True)["params"]
    return state_lib.create_train_state(params, optimizer, jax.random.PRNGKey(1))

  rules = [tuple(rule) for rule in config.sharding.rules]
  shape_tree = jax.eval_shape(init_state, jax.random.PRNGKey(0))
  shardings = sharding_lib.infer_sharding(shape_tree, mesh, rules,
                                          config.sharding.min_size_to_shard_mb)
  state = jax.jit(init_state, out_shardings=shardings)(jax.random.PRNGKey(0))
  param_specs = jax.tree.map(lambda s: s.spec, shardings.params)
  step_fn = sharding_lib.jit_train_step(
      step_lib.make_train_step(step_lib.alphafold_objective(model, config.model), optimizer,
                               config, mesh, param_specs), shardings, mesh)
  batch = sharding_lib.global_batch(batch_host, sharding_lib.batch_sharding(mesh))
  start = time.perf_counter()
  state, metrics = step_fn(state, batch)  # compile + first step
  jax.block_until_ready(metrics)
  first_s = time.perf_counter() - start
  times = []
  for _ in range(steps):
    start = time.perf_counter()
    state, metrics = step_fn(state, batch)
    jax.block_until_ready(metrics)
    times.append(time.perf_counter() - start)

  def bytes_on_device0(tree):
    total = 0
    for leaf in jax.tree.leaves(tree):
      for shard in leaf.addressable_shards:
        if shard.device == devices[0]:
          total += shard.data.nbytes
    return total

  grad_bytes = sum(x.size * 4 for x in jax.tree.leaves(state.params))  # float32 gradients
  n = num_devices
  comm = 0.0 if n == 1 else grad_bytes * (2 * (n - 1) / n if mode == "dp" else (n - 1) / n)
  peaks = [(d.memory_stats() or {}).get("peak_bytes_in_use", 0) for d in devices]
  return {
      "devices": n, "mode": mode, "variant": variant, "device": devices[0].device_kind,
      "jax": jax.__version__, "step_s": statistics.median(times), "first_s": first_s,
      "examples_per_s": batch_size / statistics.median(times), "global_batch": batch_size,
      "peak_gib": max(peaks) / 2**30 if any(peaks) else None,
      "state_gib_per_device": bytes_on_device0(state) / 2**30,
      "grad_comm_gib": comm / 2**30, "loss": float(metrics["loss"]),
  }


def _format(rows: list[dict]) -> str:
  base = {}
  for row in rows:
    if row.get("ok") and row["devices"] == 1:
      base[row["mode"]] = row["examples_per_s"]
  lines = [f"{'mode':5s} {'GPUs':>4s} {'batch':>5s} {'step s':>7s} {'ex/s':>7s} {'eff':>6s} {'peak GiB':>8s} "
           f"{'state GiB/dev':>13s} {'grad comm GiB':>13s} {'loss':>10s}  device"]
  for row in rows:
    if not row.get("ok"):
      lines.append(f"{row['mode']:5s} {row['devices']:4d} FAILED: {row.get('error', '')[:150]}")
      continue
    eff = base.get(row["mode"])
    # Throughput per device relative to one device (weak scaling: t_1 / t_N).
    eff_text = (f"{row['examples_per_s'] / row['devices'] / eff:6.1%}" if eff
                else f"{'-':>6s}")
    peak = row["peak_gib"]
    lines.append(f"{row['mode']:5s} {row['devices']:4d} {row['global_batch']:5d} "
                 f"{row['step_s']:7.3f} "
                 f"{row['examples_per_s']:7.2f} {eff_text} "
                 f"{peak if peak is not None else float('nan'):8.2f} "
                 f"{row['state_gib_per_device']:13.3f} {row['grad_comm_gib']:13.3f} "
                 f"{row['loss']:10.5f}  {row['device']}, jax {row['jax']}")
  return "\n".join(lines)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--devices", default="1,2,4,8", help="device counts (those present run)")
  parser.add_argument("--modes", default="dp,fsdp")
  parser.add_argument("--variant", default="bf16-cudnn")
  parser.add_argument("--recycles", type=int, default=0)
  parser.add_argument("--steps", type=int, default=10)
  parser.add_argument("--global_batch", type=int, default=0,
                      help="0: one example per device (weak scaling); B: the same B examples "
                      "for every device count (loss agreement after --steps steps)")
  parser.add_argument("--smoke", action="store_true", help="tiny model and shapes (CPU)")
  parser.add_argument("--timeout", type=int, default=1200, help="seconds per row")
  parser.add_argument("--json", help="also write the rows to this file")
  parser.add_argument("--one", help=argparse.SUPPRESS)
  args = parser.parse_args(argv)

  if args.one:
    count, mode = args.one.split(":")
    row = run_one(int(count), mode, args.variant, args.recycles, args.steps, args.smoke,
                  args.global_batch)
    print("ROW " + json.dumps(row))
    return 0

  import jax  # only to count the devices; each row runs in its own process
  present = jax.device_count()
  counts = [n for n in (int(x) for x in args.devices.split(",")) if n <= present]
  rows = []
  for mode in args.modes.split(","):
    for count in counts:
      if mode == "fsdp" and count == 1 and "dp" in args.modes.split(","):
        rows.append(dict(next(r for r in rows if r.get("devices") == 1 and r["mode"] == "dp"),
                         mode="fsdp"))
        continue
      command = [sys.executable, __file__, "--one", f"{count}:{mode}", "--variant",
                 args.variant, "--recycles", str(args.recycles), "--steps", str(args.steps),
                 "--global_batch", str(args.global_batch)]
      if args.smoke:
        command.append("--smoke")
      try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=args.timeout,
                                check=False, env=dict(os.environ))
        line = [l for l in result.stdout.splitlines() if l.startswith("ROW ")]
        if line:
          rows.append(dict(json.loads(line[-1][4:]), ok=True))
        else:
          rows.append({"devices": count, "mode": mode, "ok": False,
                       "error": result.stderr.strip().splitlines()[-1:] or ["no output"]})
          rows[-1]["error"] = rows[-1]["error"][0]
      except subprocess.TimeoutExpired:
        rows.append({"devices": count, "mode": mode, "ok": False,
                     "error": f"timeout {args.timeout} s"})
      print(_format(rows).splitlines()[-1], flush=True)
  print()
  print(_format(rows))
  if args.json:
    pathlib.Path(args.json).write_text(json.dumps(rows, indent=1))
  return 0 if all(row.get("ok") for row in rows) else 1


if __name__ == "__main__":
  sys.exit(main())
