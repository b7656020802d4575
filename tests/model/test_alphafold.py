"""The full model: parity with DeepMind's AlphaFold on af2_tiny, and recycling as trained."""

import re
import subprocess
import sys

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from af2flax.model import batch_spec
from af2flax.model.alphafold import AlphaFold
from af2flax.tools import parity
from tests.conftest import REFERENCE, REPO_ROOT
from tests.model.helpers import TINY_SHAPES, perturb_params, tiny_config

AF2_TINY = REFERENCE / "af2_tiny"


@pytest.fixture(scope="module")
def parity_rows():
  if not (AF2_TINY / "outputs.npz").exists():
    pytest.skip(f"{AF2_TINY} not present")
  return {row.key: row for row in parity.run(AF2_TINY)}


def test_parity_forward_and_losses(parity_rows):
  """Representations, logits, structure, losses: within the tool's tolerances."""
  rows = [row for key, row in parity_rows.items() if not key.startswith(parity.GRAD_NORM_PREFIX)]
  assert len(rows) == 66
  failed = {row.key: (row.max_abs, row.relative) for row in rows if not row.ok}
  assert not failed, failed
  for key in ("representations/pair", "representations/msa", "representations/single",
              "representations/msa_first_row", "distogram/logits", "masked_msa/logits"):
    assert parity_rows[key].relative < 1e-6, key
  assert parity_rows["structure_module/final_atom_positions"].max_abs < 1e-4


def test_parity_gradient_norms(parity_rows):
  rows = [row for key, row in parity_rows.items() if key.startswith(parity.GRAD_NORM_PREFIX)]
  assert len(rows) == 21
  failed = {row.key: row.relative for row in rows if not row.ok}
  assert not failed, failed


def test_parity_tool_reports_a_wrong_output():
  reference = {"representations/pair": np.ones((2, 2)), "nothing/like/this": np.ones(3)}
  ours = {"representations/pair": np.ones((2, 2)) * (1 + 2e-4)}
  rows = {row.key: row for row in parity.compare(reference, ours, {})}
  assert not rows["representations/pair"].ok
  assert rows["representations/pair"].relative == pytest.approx(2e-4)
  assert not rows["nothing/like/this"].ok
  assert "FAIL" in parity.format_table(list(rows.values()))


def _recycling_config():
  """The tiny model, cut further: recycling logic is what is tested here."""
  config = tiny_config()
  emb = config.embeddings_and_evoformer
  emb.evoformer_num_block = 1
  emb.template.template_pair_stack.num_block = 0
  for head in ("masked_msa", "distogram", "predicted_lddt", "predicted_aligned_error",
               "experimentally_resolved"):
    config.heads[head].weight = 0.0
  config.heads.structure_module.num_layer = 1
  return config


@pytest.mark.slow
def test_recycling_slices_the_batch_and_stops_gradients():
  """Iteration i reads slice i; only the final one (slice `num_iter_recycling`, capped at
  `num_recycle`) carries gradient: slices read by earlier iterations get exactly zero.
  (Slow; the default suite's parity test covers one recycle, whose gradient norms match
  AlphaFold's only because the first iteration is cut off.)"""
  config = _recycling_config()   # num_recycle = 1: two slices
  batch = batch_spec.random_features(0, num_slices=2, **TINY_SHAPES)
  model = AlphaFold(config)
  shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), batch)
  params = perturb_params(jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), shapes), scale=0.3)

  @jax.jit
  def single_and_grad(params, batch):
    def loss(msa_feat):
      outputs = model.apply(params, {**batch, "msa_feat": msa_feat})
      return jnp.sum(outputs["representations"]["single"] ** 2), outputs
    return jax.grad(loss, has_aux=True)(batch["msa_feat"])

  results = {}
  for num_iter in (0, 1, 5):
    batch["num_iter_recycling"] = np.full(2, num_iter, np.int32)
    grad, outputs = single_and_grad(params, batch)
    results[num_iter] = outputs
    final = min(num_iter, config.num_recycle)
    assert np.abs(np.asarray(grad[final])).max() > 0, num_iter
    assert np.all(np.asarray(grad[1 - final]) == 0), num_iter
  chex.assert_tree_all_finite(results)
  chex.assert_trees_all_close(results[1], results[5])   # capped at num_recycle
  # A different final slice after a different recycling history: different outputs.
  assert not np.allclose(results[0]["representations"]["pair"],
                         results[1]["representations"]["pair"], atol=1e-3)
  assert set(results[1]) == {"representations", "structure_module"}
  chex.assert_shape(results[1]["structure_module"]["final_atom_positions"],
                    (TINY_SHAPES["num_res"], 37, 3))


def test_model_imports_without_tensorflow():
  """The GPU machines have no TensorFlow: the model, losses, tools and bench must not need it."""
  code = ("import sys; import af2flax.model.alphafold, af2flax.model.import_af2, "
          "af2flax.losses.total, af2flax.tools.parity, af2flax.tools.convert_params; "
          "sys.path.insert(0, 'bench'); import model_step; "
          "assert 'tensorflow' not in sys.modules and 'clu' not in sys.modules, 'imported'")
  done = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True,
                        text=True, check=False)
  assert done.returncode == 0, done.stderr


def test_offloaded_block_inputs_of_the_full_model():
  """`remat_offload`: in the gradient of the whole model, the Evoformer's and the extra MSA's
  block inputs are the values kept in host memory, and the template stack's (a stack run
  once per template, inside a loop, which XLA's GPU compiler cannot offload) are not."""
  config = tiny_config(use_remat=True, remat_offload=True)
  # three template blocks: a stacked template input would show a leading 3
  config.embeddings_and_evoformer.template.template_pair_stack.num_block = 3
  batch = batch_spec.random_features(0, num_slices=2, **TINY_SHAPES)
  model = AlphaFold(config)
  params = jax.eval_shape(model.init, jax.random.PRNGKey(0), batch)

  def loss(params):
    return jnp.sum(model.apply(params, batch)["representations"]["single"] ** 2)

  text = str(jax.make_jaxpr(jax.grad(loss))(params))
  emb = config.embeddings_and_evoformer
  n_res, n_msa = TINY_SHAPES["num_res"], TINY_SHAPES["num_msa"] + TINY_SHAPES["num_templates"]
  evoformer, extra = emb.evoformer_num_block, emb.extra_msa_stack_num_block
  expected = {(evoformer, n_msa, n_res, emb.msa_channel),
              (evoformer, n_res, n_res, emb.pair_channel),
              (extra, TINY_SHAPES["num_extra_msa"], n_res, emb.extra_msa_channel),
              (extra, n_res, n_res, emb.pair_channel)}
  found = {tuple(int(n) for n in shape.split(","))
           for shape in re.findall(r"f32<host>\[([0-9,]+)\]", text)}
  # the stacked inputs [blocks, ...], and one block's inside the scans' bodies
  assert expected <= found <= expected | {shape[1:] for shape in expected}


# Slow (100 s on the 2-core CI machine: two compilations of the tiny model's gradient); the
# stack-level tests in tests/model/test_evoformer.py cover the mechanism in the default suite.
@pytest.mark.slow
def test_flat_parameter_scan_of_the_full_model():
  """`scan_flat_params` through the whole model (Evoformer, extra MSA, the template stack
  inside its loop over templates, recycling): the same outputs and parameter gradients."""
  batch = batch_spec.random_features(0, num_slices=2, **TINY_SHAPES)
  results = []
  for flat in (False, True):
    config = tiny_config(use_remat=True, scan_flat_params=flat)
    model = AlphaFold(config)
    params = model.init(jax.random.PRNGKey(0), batch)

    def loss(params, model=model):
      return jnp.sum(model.apply(params, batch)["representations"]["single"] ** 2)

    results.append(jax.jit(jax.value_and_grad(loss))(params))
  (plain_loss, plain_grads), (flat_loss, flat_grads) = results
  np.testing.assert_allclose(flat_loss, plain_loss, rtol=1e-6)
  assert jax.tree.structure(flat_grads) == jax.tree.structure(plain_grads)
  for a, b in zip(jax.tree.leaves(flat_grads), jax.tree.leaves(plain_grads)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6 * float(np.max(np.abs(b)) + 1e-30))
