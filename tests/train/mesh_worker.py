"""Runs two train steps on given meshes and prints losses and parameters as JSON.

Run in a subprocess with XLA_FLAGS=--xla_force_host_platform_device_count=8 by
test_sharding.py; argv: [--alphafold] [--split] meshes as data,fsdp pairs (1,1 = a single
device), e.g. 1,1 8,1 4,2. The model is the test MLP, or with --alphafold the af2_tiny AlphaFold
with its reference parameters on 8 perturbed copies of its reference batch. --split: the step
as separately compiled programs (`programs.SplitTrainStep`) instead of one;
--trunk_stages=SPEC: AlphaFold's trunk in those stages (`step.trunk_stages`);
--head_stages=SPEC: its heads (`step.head_stages`); --recycle_stages: its recycling
iterations in parts (`step.RecycleStages`); --mixed_recycling: every other example runs no
recycling iteration (the others the reference batch's one), so devices differ;
--recycle_through_forward: the split step runs them through its forward programs.
Prints one JSON object {"data,fsdp": result}.
"""

import json
import sys

import jax
import numpy as np

from af2flax.train import optimizer as optimizer_lib
from af2flax.train import programs
from af2flax.train import sharding as sharding_lib
from af2flax.train import state as state_lib
from af2flax.train import step as step_lib
from tests.train import mlp

MLP_RULES = (("rng", "replicate"), (".*Dense_1/.*", "replicate"), (".*", "fsdp"))
ALPHAFOLD_RULES = ((".*(evoformer_iteration|extra_msa_stack|__layer_stack_no_state)/.*",
                    "fsdp_stacked"), (".*", "fsdp"))


def mlp_setup():
  model = mlp.MLP()
  return (mlp.objective(model), mlp.init_params(model),
          lambda i: mlp.make_batch(i, 8), MLP_RULES, mlp.train_config())


def alphafold_setup(trunk: str = "trunk", heads: str = "heads", recycle: bool = False,
                    mixed_recycling: bool = False, through_forward: bool = False):
  from af2flax.model.alphafold import AlphaFold  # pylint: disable=g-import-not-at-top
  from tests.conftest import load_af2_tiny_training  # pylint: disable=g-import-not-at-top
  config, params, reference, _ = load_af2_tiny_training()

  def batch(i):
    rs = np.random.RandomState(i)
    out = {k: np.stack([v] * 8) for k, v in reference.items()}
    # Every example different: perturbed MSA features and true positions.
    out["msa_feat"] = out["msa_feat"] + 0.1 * rs.randn(*out["msa_feat"].shape).astype(np.float32)
    out["atom14_gt_positions"] = out["atom14_gt_positions"] + rs.randn(
        *out["atom14_gt_positions"].shape).astype(np.float32)
    if mixed_recycling:
      out["num_iter_recycling"] = out["num_iter_recycling"] * (np.arange(8) % 2)[:, None]
    return out

  objective = step_lib.alphafold_objective(AlphaFold(config), config, trunk, heads, recycle)
  # AlphaFold's learning rate (1e-3) with a 2-step warm-up, so both steps really move.
  train_config = mlp.train_config(recycle_through_forward=through_forward)
  train_config.optimizer.learning_rate = 1e-3
  return objective, params, batch, ALPHAFOLD_RULES, train_config


def run(setup, data: int, fsdp: int, split: bool = False) -> dict:
  objective, params, make_batch, rules, config = setup
  devices = jax.devices()[:data * fsdp]
  mesh = sharding_lib.make_mesh({"data": data, "fsdp": fsdp}, devices=devices)
  tx = optimizer_lib.make_optimizer(config.optimizer)

  def init(rng):
    return state_lib.create_train_state(params, tx, rng)

  state, shardings = sharding_lib.init_sharded(init, jax.random.PRNGKey(1), mesh=mesh,
                                               rules=rules)
  param_specs = jax.tree.map(lambda s: s.spec, shardings.params)
  if split:
    train_step = programs.SplitTrainStep(objective, tx, config, mesh, shardings, param_specs)
  else:
    train_step = sharding_lib.jit_train_step(
        step_lib.make_train_step(objective, tx, config, mesh, param_specs), shardings, mesh)
  losses = []
  for i in range(2):
    batch = sharding_lib.global_batch(make_batch(i), sharding_lib.batch_sharding(mesh))
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
  args = sys.argv[1:]
  trunk = next((a.split("=", 1)[1] for a in args if a.startswith("--trunk_stages=")), "trunk")
  heads = next((a.split("=", 1)[1] for a in args if a.startswith("--head_stages=")), "heads")
  setup = (alphafold_setup(trunk, heads, "--recycle_stages" in args,
                           "--mixed_recycling" in args, "--recycle_through_forward" in args)
           if "--alphafold" in args else mlp_setup())
  meshes = [a for a in args if not a.startswith("--")]
  print(json.dumps({shape: run(setup, *map(int, shape.split(",")), split="--split" in args)
                    for shape in meshes}))
