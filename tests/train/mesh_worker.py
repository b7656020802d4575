"""Runs two train steps of the MLP on given meshes and prints losses and parameters as JSON.

Run in a subprocess with XLA_FLAGS=--xla_force_host_platform_device_count=8 by
test_sharding.py; argv: meshes as data,fsdp pairs (1,1 = a single device), e.g. 1,1 8,1 4,2.
Prints one JSON object {"data,fsdp": result}.
"""

import json
import sys

import jax
import numpy as np

from af2flax.train import optimizer as optimizer_lib
from af2flax.train import sharding as sharding_lib
from af2flax.train import state as state_lib
from af2flax.train import step as step_lib
from tests.train import mlp

RULES = (("rng", "replicate"), (".*Dense_1/.*", "replicate"), (".*", "fsdp"))


def run(data: int, fsdp: int) -> dict:
  devices = jax.devices()[:data * fsdp]
  mesh = sharding_lib.make_mesh({"data": data, "fsdp": fsdp}, devices=devices)
  config = mlp.train_config()
  model = mlp.MLP()
  tx = optimizer_lib.make_optimizer(config.optimizer)

  def init(rng):
    return state_lib.create_train_state(mlp.init_params(model), tx, rng)

  state, shardings = sharding_lib.init_sharded(init, jax.random.PRNGKey(1), mesh=mesh,
                                               rules=RULES)
  param_specs = jax.tree.map(lambda s: s.spec, shardings.params)
  train_step = sharding_lib.jit_train_step(
      step_lib.make_train_step(mlp.objective(model), tx, config, mesh, param_specs),
      shardings, mesh)
  losses = []
  for i in range(2):
    batch = sharding_lib.global_batch(mlp.make_batch(i, 8), sharding_lib.batch_sharding(mesh))
    state, metrics = train_step(state, batch)
    losses.append(float(metrics["loss"]))
  specs = {sharding_lib.path_name(p): str(s.spec)
           for p, s in jax.tree_util.tree_leaves_with_path(shardings)}
  params = {sharding_lib.path_name(p): np.asarray(x).tolist()
            for p, x in jax.tree_util.tree_leaves_with_path(state.params)}
  ema = {sharding_lib.path_name(p): np.asarray(x).tolist()
         for p, x in jax.tree_util.tree_leaves_with_path(state.ema_params)}
  return {"losses": losses, "params": params, "ema": ema, "specs": specs,
          "devices": len(devices)}


if __name__ == "__main__":
  print(json.dumps({shape: run(*map(int, shape.split(","))) for shape in sys.argv[1:]}))
