"""The train step's AlphaFold objective equals AlphaFold's own training loss on af2_tiny.

`step.alphafold_objective` = the model with dropout + `alphafold_loss` on the final recycling
iteration's features, in float32 (MODEL_CONTRACT sections 3-6). The reference was computed by
DeepMind's code with every dropout rate 0, so dropout randomness does not change the value.
"""

import copy
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from af2flax.model import config as model_config_lib
from af2flax.model import import_af2
from af2flax.model.alphafold import AlphaFold
from af2flax.train import step as step_lib
from tests.conftest import REFERENCE


@pytest.fixture(scope="module")
def reference(shared_dir):
  del shared_dir
  directory = REFERENCE / "af2_tiny"
  config = model_config_lib.from_alphafold_dict(
      json.loads((directory / "config.json").read_text())["model_config"])
  params = import_af2.haiku_to_flax(dict(np.load(directory / "params.npz")))
  batch = dict(np.load(directory / "batch.npz"))
  outputs = dict(np.load(directory / "outputs.npz"))
  return config, params, batch, outputs


def test_objective_equals_alphafold_training_loss(reference):
  config, params, batch, outputs = reference
  objective = jax.jit(step_lib.alphafold_objective(AlphaFold(config), config))
  loss, aux = objective(params, batch, jax.random.PRNGKey(7))
  np.testing.assert_allclose(loss, outputs["total_loss"], rtol=1e-4)
  for key in ("distogram/loss", "masked_msa/loss", "structure_module/fape",
              "structure_module/sidechain_fape", "predicted_lddt/loss",
              "predicted_aligned_error/loss", "experimentally_resolved/loss"):
    # The glue (recycle slice, float32, weights) is what this test pins; the per-term numerics
    # are the parity tool's (a wiring error shows as O(1), not 1e-4).
    np.testing.assert_allclose(aux[key], outputs[key], rtol=1e-3, err_msg=key)


@pytest.mark.slow
def test_separate_recycling_program_gives_the_one_program_step(reference):
  """`separate_recycling`: the recycling iterations as a program of their own, then the
  gradient step from their output (`SplitTrainStep`), give the update of the one-program step
  (af2_tiny has every dropout rate 0, so neither draws anything; the batch's two examples
  have 1 and 0 recycling iterations; the network cut to one block and the structure module).
  Slow (4.5 min on 2 cores: two compilations of the whole step); the default suite checks the
  model's two parts (tests/model/test_alphafold.py) and the two programs' plumbing
  (tests/train/test_step.py) apart."""
  from af2flax.train import optimizer as optimizer_lib
  from af2flax.train import sharding as sharding_lib
  from af2flax.train import state as state_lib
  from tests.model.helpers import perturb_params
  from tests.train import mlp

  config, _, example, _ = reference
  config = copy.deepcopy(config)   # cut further (as tests.model.test_alphafold's recycling
  emb = config.embeddings_and_evoformer   # test): the two programs' split is what is tested
  emb.evoformer_num_block = 1
  emb.template.template_pair_stack.num_block = 0
  for head in ("masked_msa", "distogram", "predicted_lddt", "predicted_aligned_error",
               "experimentally_resolved"):
    config.heads[head].weight = 0.0
  config.heads.structure_module.num_layer = 1
  model = AlphaFold(config)
  params = perturb_params(model.init(jax.random.PRNGKey(0), example)["params"], scale=0.3)
  batch = jax.tree.map(lambda x: np.stack([x, x]), example)
  batch["num_iter_recycling"][1] = 0
  train_config = mlp.train_config()
  tx = optimizer_lib.make_optimizer(train_config.optimizer)
  mesh = sharding_lib.make_mesh({"data": 1, "fsdp": 1})
  state = state_lib.create_train_state(params, tx, jax.random.PRNGKey(1))
  shardings = jax.tree.map(lambda _: sharding_lib.replicated(mesh), state)
  train_step = step_lib.make_train_step(step_lib.alphafold_objective(model, config), tx,
                                        train_config, mesh)
  one = sharding_lib.jit_train_step(train_step, shardings, mesh)
  split = sharding_lib.jit_train_step(
      train_step, shardings, mesh,
      step_lib.make_recycle_step(step_lib.alphafold_recycler(model), train_config, mesh))
  assert isinstance(split, step_lib.SplitTrainStep)

  fresh = lambda tree: jax.tree.map(jnp.array, tree)  # the steps donate their state
  state_one, metrics_one = one(fresh(state), batch)
  state_split, metrics_split = split(fresh(state), batch)
  assert metrics_one["loss"] > 0
  for key in ("loss", "grad_norm", "update_grad_norm", "param_norm"):
    np.testing.assert_allclose(metrics_split[key], metrics_one[key], rtol=1e-5, err_msg=key)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
               state_split.params, state_one.params)
  # The recycled inputs: the first example's from one iteration, the second's still zero.
  prev = split.recycle(state, batch)
  assert np.abs(np.asarray(prev["prev_pair"][0])).max() > 0
  assert np.all(np.asarray(prev["prev_pair"][1]) == 0)
