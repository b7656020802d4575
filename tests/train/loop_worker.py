"""Runs `loop.train_and_evaluate` on the MLP in its own process (kill, preemption, multi-host).

argv: workdir [--kill_before_batch N] [--sigterm_before_batch N] [--steps N]
      [--nan_batches I,J] [--step_programs one|split]
      [--compile_beside_state 0|1]
      [--process_id I --num_processes P --coordinator ADDR] .
Prints a JSON line with the final step, the checkpointed steps and a parameter digest.
"""

import argparse
import json
import os
import signal
import sys
import time

import jax
import numpy as np


def main() -> None:
  parser = argparse.ArgumentParser()
  parser.add_argument("workdir")
  parser.add_argument("--kill_before_batch", type=int, default=None)
  parser.add_argument("--sigterm_before_batch", type=int, default=None)
  parser.add_argument("--steps", type=int, default=12)
  parser.add_argument("--nan_batches", type=str, default="")
  parser.add_argument("--step_programs", type=str, default="one")
  parser.add_argument("--compile_beside_state", type=int, default=1)
  parser.add_argument("--process_id", type=int, default=None)
  parser.add_argument("--num_processes", type=int, default=None)
  parser.add_argument("--coordinator", type=str, default=None)
  args = parser.parse_args()

  if args.coordinator:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=args.coordinator,
                               num_processes=args.num_processes, process_id=args.process_id)

  from af2flax.train import loop  # pylint: disable=g-import-not-at-top
  from tests.train import mlp  # pylint: disable=g-import-not-at-top

  def on_batch(index):
    if index == args.kill_before_batch:
      # Batches 0..N-1 fed steps 1..N; the loop has just started the save of step N.
      print(json.dumps({"waiting_for_kill_at_batch": index}), flush=True)
      while True:
        time.sleep(1)
    if index == args.sigterm_before_batch:
      os.kill(os.getpid(), signal.SIGTERM)

  # The loop logs the step's lowering and the split step's compile (tests read them).
  from absl import logging  # pylint: disable=g-import-not-at-top
  logging.set_verbosity(logging.INFO)
  nan_batches = tuple(int(b) for b in args.nan_batches.split(",") if b)
  mlp.patch_loop(loop, on_batch=on_batch, nan_batches=nan_batches)
  config = mlp.loop_config(num_train_steps=args.steps, step_programs=args.step_programs,
                           compile_beside_state=bool(args.compile_beside_state))
  try:
    metrics = loop.train_and_evaluate(config, args.workdir)
  except loop.NonFiniteTrainingError as e:
    print(json.dumps({"non_finite_error": str(e)}), flush=True)
    sys.exit(3)

  if jax.process_count() > 1:
    print(json.dumps({"process_index": jax.process_index(), "loss": metrics["train/loss"],
                      "val_mse": metrics["val/mse"]}), flush=True)
    return

  from af2flax.train import checkpoint as checkpoint_lib  # pylint: disable=g-import-not-at-top
  checkpointer = checkpoint_lib.Checkpointer(os.path.join(args.workdir, "checkpoints"),
                                             config.checkpoint)
  steps = sorted(checkpointer.manager.all_steps())
  latest = checkpointer.latest_step()
  restored = checkpointer.manager.restore(latest)  # without a target: numpy arrays
  params = restored["state"]["params"]
  leaves = [np.asarray(x).astype(np.float64) for x in jax.tree.leaves(params)]
  checkpointer.close()
  print(json.dumps({"latest": latest, "steps": steps, "loss": metrics["train/loss"],
                    "params": [x.ravel().tolist() for x in leaves],
                    "input": restored["input"]}), flush=True)


if __name__ == "__main__":
  main()
