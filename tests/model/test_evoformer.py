"""Evoformer blocks and the trunk: shapes, parameter layout, chunking, remat/scan, bf16,
dropout."""

import functools
import re
from typing import Any

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from af2flax.model.evoformer import EvoformerIteration, layer_stack, offloaded_layers
from af2flax.model.primitives import Transition
from af2flax.model.triangle import subbatch_size
from af2flax.model.trunk import EmbeddingsAndEvoformer
from tests.model.helpers import (TINY_SHAPES, random_params, relative_error, tiny_config,
                                 tiny_iteration_inputs)

N_RES = TINY_SHAPES["num_res"]


def _trunk(config):
  return EmbeddingsAndEvoformer(config.embeddings_and_evoformer, config.global_config)


def _init_trunk(config, seed=0):
  batch, prev = tiny_iteration_inputs(config, seed)
  return random_params(_trunk(config).init, batch, prev, seed=seed), batch, prev


def _run(config, params, batch, prev):
  return jax.jit(_trunk(config).apply)(params, batch, prev)


def _run_with_dropout(config, params, batch, prev, rngs):
  """One compilation, several dropout keys. The inputs are arguments, not constants: XLA's
  constant folding would round the degenerate torsion features of residue 0 differently."""
  apply = jax.jit(lambda p, b, pr, key: _trunk(config).apply(p, b, pr, False,
                                                             rngs={"dropout": key}))
  return [apply(params, batch, prev, key) for key in rngs]


@pytest.fixture(scope="module")
def trunk_fp32():
  config = tiny_config()
  params, batch, prev = _init_trunk(config)
  return config, params, batch, prev, _run(config, params, batch, prev)


def test_trunk_shapes_and_parameter_layout(trunk_fp32):
  config, params, batch, _, out = trunk_fp32
  emb = config.embeddings_and_evoformer
  chex.assert_shape(out["msa"], (TINY_SHAPES["num_msa"], N_RES, emb.msa_channel))
  chex.assert_shape(out["msa_first_row"], (N_RES, emb.msa_channel))
  chex.assert_shape(out["pair"], (N_RES, N_RES, emb.pair_channel))
  chex.assert_shape(out["single"], (N_RES, emb.seq_channel))
  chex.assert_tree_all_finite(out)
  p = params["params"]
  # AlphaFold's layout: embedders directly under evoformer/, stacked blocks with a layer axis.
  for name in ("preprocess_1d", "preprocess_msa", "left_single", "right_single", "prev_pos_linear",
               "prev_msa_first_row_norm", "prev_pair_norm", "pair_activiations",
               "extra_msa_activations", "template_single_embedding", "template_projection",
               "single_activations", "template_embedding", "extra_msa_stack",
               "evoformer_iteration"):
    assert name in p, name
  chex.assert_shape(p["evoformer_iteration"]["msa_transition"]["transition1"]["weights"],
                    (2, emb.msa_channel, 4 * emb.msa_channel))
  chex.assert_shape(p["extra_msa_stack"]["msa_column_global_attention"]["attention"]["key_w"],
                    (1, emb.extra_msa_channel, emb.extra_msa_channel // 8))
  stack = p["template_embedding"]["single_template_embedding"]["template_pair_stack"]
  chex.assert_shape(stack["__layer_stack_no_state"]["pair_transition"]["transition1"]["bias"],
                    (1, 16))
  chex.assert_shape(p["template_single_embedding"]["weights"], (57, emb.msa_channel))
  chex.assert_shape(p["template_embedding"]["single_template_embedding"]["embedding2d"]["weights"],
                    (88, 8))
  assert "gating_w" not in p["template_embedding"]["attention"]


def test_low_memory_chunking_equals_unchunked(trunk_fp32):
  config, params, batch, prev, reference = trunk_fp32
  chunked_config = tiny_config(low_memory=True, subbatch_size=3)
  chunked_config.embeddings_and_evoformer.template.subbatch_size = 7
  chunked = _run(chunked_config, params, batch, prev)
  for key in reference:
    assert relative_error(chunked[key], reference[key]) < 1e-5, key


def _stack_inputs(seed=0):
  rng = np.random.default_rng(seed)
  msa = rng.normal(size=(4, 6, 16)).astype(np.float32)
  pair = rng.normal(size=(6, 6, 8)).astype(np.float32)
  masks = (np.ones((4, 6), np.float32), np.ones((6, 6), np.float32))
  return (msa, pair), masks


class _TransitionBlock(nn.Module):
  """A cheap block (carry -> carry) to test the stacking machinery itself."""

  config: Any

  @nn.compact
  def __call__(self, activations, masks, deterministic):
    msa, pair = activations
    transition = Transition(self.config.embeddings_and_evoformer.evoformer.msa_transition,
                            self.config.global_config, name="msa_transition")
    return msa + transition(msa), pair * jnp.tanh(msa.mean())


class _Stack(nn.Module):
  config: Any
  block: str = "evoformer"
  num_layers: int = 2

  @nn.compact
  def __call__(self, activations, masks):
    if self.block in ("evoformer", "extra_msa"):
      block = EvoformerIteration(self.config.embeddings_and_evoformer.evoformer,
                                 self.config.global_config,
                                 is_extra_msa=self.block == "extra_msa",
                                 name="evoformer_iteration")
    else:
      block = _TransitionBlock(self.config, name="evoformer_iteration")
    return layer_stack(block, activations, self.num_layers, self.config.global_config, masks,
                       True)


def _stack_value_and_grad(module, params, activations, masks):
  def loss(p):
    msa, pair = module.apply(p, activations, masks)
    return jnp.sum(msa ** 2) + jnp.sum(pair ** 2)
  return jax.jit(jax.value_and_grad(loss))(params)


@functools.lru_cache(maxsize=None)
def _plain_stack(block, num_layers):
  """(parameters, loss, gradient) of the plain stack that `_check_stack_variant` compares
  variants with: the same for every variant of one block and depth, so computed once per
  test process (the tests do not change them)."""
  activations, masks = _stack_inputs()
  plain = _Stack(tiny_config(), block, num_layers)
  params = random_params(plain.init, activations, masks)
  return (params, *_stack_value_and_grad(plain, params, activations, masks))


def _check_stack_variant(block, overrides, num_layers=2):
  activations, masks = _stack_inputs()
  variant = _Stack(tiny_config(**overrides), block, num_layers)
  params, loss_plain, grads_plain = _plain_stack(block, num_layers)
  chex.assert_shape(params["params"]["evoformer_iteration"]["msa_transition"]["transition2"][
      "bias"], (num_layers, 16))
  assert jax.tree.map(jnp.shape, jax.eval_shape(variant.init, jax.random.PRNGKey(0), activations,
                                                masks)) == jax.tree.map(jnp.shape, params)
  loss_variant, grads_variant = _stack_value_and_grad(variant, params, activations, masks)
  assert relative_error(loss_variant, loss_plain) < 1e-6
  flat_plain = np.concatenate([np.ravel(g) for g in jax.tree.leaves(grads_plain)])
  flat_variant = np.concatenate([np.ravel(g) for g in jax.tree.leaves(grads_variant)])
  assert np.abs(flat_plain).max() > 0
  assert relative_error(flat_variant, flat_plain) < 1e-5
  np.testing.assert_allclose(flat_variant, flat_plain, atol=1e-5 * np.abs(flat_plain).max())


REMAT_UNROLLED = {"use_remat": True, "remat_policy": "dots_with_no_batch_dims_saveable",
                  "use_scan": False}


def test_remat_and_unrolled_stack_agree_with_scan():
  """Same parameters (stacked on a layer axis), values and gradients with remat + policy and
  with the scan unrolled."""
  _check_stack_variant("transition", REMAT_UNROLLED)


@pytest.mark.slow
@pytest.mark.parametrize("overrides", [REMAT_UNROLLED, {"use_remat": True}])
def test_remat_evoformer_stack_agrees_with_scan(overrides):
  _check_stack_variant("evoformer", overrides)


# Slow marker: remat_submodules is an option the presets leave off (22 s on the 2-core CI
# machine).
@pytest.mark.slow
def test_submodule_remat_agrees_with_block_remat():
  """Each module of the block rematerialised on its own inside the block's remat: the same
  parameters, values and gradients."""
  _check_stack_variant("evoformer", {"use_remat": True, "remat_submodules": "all"})


def test_extra_msa_chunks_in_training_agree_with_one_pass():
  """`extra_msa_subbatch_size` (fine-tuning's extra-MSA rows in chunks; 4 rows in chunks of 3,
  the last one padded) under remat: the same values and gradients as one pass."""
  overrides = {"use_remat": True, "extra_msa_subbatch_size": 3, "remat_submodules": "extra_msa"}
  _check_stack_variant("extra_msa", overrides)
  activations, masks = _stack_inputs()

  def scans(extra_msa_subbatch_size):
    module = _Stack(tiny_config(**{**overrides, "extra_msa_subbatch_size":
                                   extra_msa_subbatch_size}), "extra_msa")
    params = jax.eval_shape(module.init, jax.random.PRNGKey(0), activations, masks)
    return str(jax.make_jaxpr(module.apply)(params, activations, masks)).count(" scan[")

  assert scans(3) == scans(0) + 2  # row attention and transition each ran as a scan of chunks


def test_extra_msa_chunking_leaves_the_evoformer_alone():
  """The extra-MSA chunk size does not chunk the main Evoformer's rows."""
  config = tiny_config(extra_msa_subbatch_size=3)
  assert subbatch_size(config.global_config) is None
  assert subbatch_size(config.global_config, extra_msa=True) == 3
  low_memory = tiny_config(low_memory=True, subbatch_size=2, extra_msa_subbatch_size=3)
  assert subbatch_size(low_memory.global_config) == 2
  assert subbatch_size(low_memory.global_config, extra_msa=True) == 3


def test_unknown_submodule_remat_is_named():
  activations, masks = _stack_inputs()
  with pytest.raises(ValueError, match="remat_submodules='some'"):
    jax.eval_shape(_Stack(tiny_config(use_remat=True, remat_submodules="some")).init,
                   jax.random.PRNGKey(0), activations, masks)


def test_grouped_remat_agrees_with_scan():
  """Two-level checkpointing (6 layers as 3 groups of 2): the [6, ...] parameter layout, the
  same values and gradients; each layer gets its own slice of the parameters."""
  _check_stack_variant("transition", {"use_remat": True, "remat_group_size": 2}, num_layers=6)


@pytest.mark.slow
def test_grouped_remat_evoformer_agrees_with_scan():
  _check_stack_variant("evoformer", {"use_remat": True, "remat_group_size": 2}, num_layers=4)


class _TwiceStacked(nn.Module):
  """One stack called twice, as AlphaFold's recycling calls its iteration during init."""

  config: Any

  @nn.compact
  def __call__(self, activations, masks):
    stack = _Stack(self.config, "transition", 6, name="stack")
    return stack(stack(activations, masks), masks)


@pytest.mark.parametrize("block,overrides,num_layers", [
    ("evoformer", {"use_remat": True}, 2),
    ("transition", {}, 3),                                   # no remat
    ("transition", {"use_remat": True, "use_scan": False}, 3),
    ("transition", {"use_remat": True, "remat_offload": True,
                    "remat_offload_fraction": 0.5}, 4),    # two slices of the stack
    ("transition", {"use_remat": True, "remat_policy": "dots_saveable"}, 3)])
def test_flat_parameter_scan_agrees_with_scan(block, overrides, num_layers):
  """`scan_flat_params`: the stack's parameters scanned as one [num_layers, P] array give the
  same parameter layout, values and gradients, with or without remat, unrolled, and in the
  two slices of a partly offloaded stack."""
  _check_stack_variant(block, {**overrides, "scan_flat_params": True}, num_layers=num_layers)


def test_flat_parameter_scan_writes_one_gradient_row_per_layer():
  """The point of `scan_flat_params`: in the compiled gradient the scan's backward pass
  updates the stacked parameter gradient once per layer (one [P] row) instead of once per
  parameter array, and each layer's arrays are split inside the checkpoint (recomputed),
  not saved for the backward pass."""
  activations, masks = _stack_inputs()
  params = random_params(_Stack(tiny_config(), "transition", 3).init, activations, masks)

  def updates(**overrides):
    module = _Stack(tiny_config(use_remat=True, **overrides), "transition", 3)
    loss = lambda p: sum(jnp.sum(x) for x in module.apply(p, activations, masks))
    text = jax.jit(jax.grad(loss)).lower(params).compile().as_text()
    return re.findall(r"= f32\[3,([0-9,]+)\]\{[0-9,]+\} dynamic-update-slice\(", text)

  arrays = len(jax.tree.leaves(params["params"]["evoformer_iteration"]))
  size = sum(int(np.prod(x.shape[1:])) for x in
             jax.tree.leaves(params["params"]["evoformer_iteration"]))
  plain, flat = updates(), updates(scan_flat_params=True)
  assert len(plain) >= arrays          # one per parameter array (and the carried inputs)
  assert str(size) in flat and len(flat) == len(plain) - arrays + 1, (plain, flat)


@pytest.mark.parametrize("overrides", [
    {}, {"remat_offload": True}, {"remat_offload": True, "remat_offload_fraction": 0.5},
    {"remat_policy": "dots_saveable"}])
def test_flat_parameter_scan_keeps_no_copy_of_the_parameters(overrides):
  """The backward pass of a flat-parameter scan keeps the block inputs (and what the blocks'
  policy saves), not the [num_layers, P] concatenation of the parameters: it concatenates
  them again (the Evoformer's, 335 MiB in float32, were a residual of their own)."""
  activations, masks = _stack_inputs()
  layers = 4
  params = random_params(_Stack(tiny_config(), "transition", layers).init, activations, masks)
  size = sum(int(np.prod(x.shape[1:])) for x in
             jax.tree.leaves(params["params"]["evoformer_iteration"]))

  def residuals(**config):
    """The shapes that the gradient's backward pass keeps (the vjp's leaves)."""
    module = _Stack(tiny_config(use_remat=True, **{**overrides, **config}), "transition", layers)
    loss = lambda p: sum(jnp.sum(x) for x in module.apply(p, activations, masks))
    return sorted(tuple(x.shape) for x in jax.tree.leaves(jax.vjp(loss, params)[1]))

  copies = lambda saved: [shape for shape in saved if len(shape) == 2 and shape[1] == size]
  plain, flat = residuals(), residuals(scan_flat_params=True)
  assert copies(flat) == [] and copies(residuals(scan_flat_params=True, remat_policy=None)) == []
  assert copies(residuals(scan_flat_params=True, scan_flat_params_keep_copy=True)) != []
  # the blocks' inputs are kept as before: [layers, ...] (or two slices) of the activations
  block_inputs = lambda saved: [shape for shape in saved
                                if shape[1:] in (activations[0].shape, activations[1].shape)]
  assert block_inputs(flat) == block_inputs(plain) != []


def test_flat_parameter_scan_refuses_groups():
  activations, masks = _stack_inputs()
  module = _Stack(tiny_config(use_remat=True, remat_group_size=2, scan_flat_params=True),
                  "transition", 4)
  with pytest.raises(ValueError, match="scan_flat_params and remat_group_size=2"):
    module.init(jax.random.PRNGKey(0), activations, masks)


def test_grouped_remat_stack_can_be_called_twice():
  activations, masks = _stack_inputs()
  grouped = _TwiceStacked(tiny_config(use_remat=True, remat_group_size=3))
  variables = grouped.init(jax.random.PRNGKey(0), activations, masks)
  chex.assert_shape(variables["params"]["stack"]["evoformer_iteration"]["msa_transition"][
      "transition2"]["weights"], (6, 64, 16))
  params = random_params(grouped.init, activations, masks)
  plain = _TwiceStacked(tiny_config()).apply(params, activations, masks)
  ours = grouped.apply(params, activations, masks)
  for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(plain)):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)


def test_offloaded_block_inputs_agree_with_scan():
  """`remat_offload`: the same values and gradients, and the backward pass's saved block
  inputs live in the host's memory (the jaxpr types them `<host>`), nothing on the device."""
  offload = {"use_remat": True, "remat_offload": True}
  _check_stack_variant("transition", offload, num_layers=3)
  activations, masks = _stack_inputs()
  params = random_params(_Stack(tiny_config(), "transition", 3).init, activations, masks)

  def saved(overrides):
    module = _Stack(tiny_config(**overrides), "transition", 3)
    loss = lambda p: sum(jnp.sum(x) for x in module.apply(p, activations, masks))
    text = str(jax.make_jaxpr(jax.grad(loss))(params))
    return re.findall(r"f32<host>\[3,[0-9,]+\]", text)

  # the stacked inputs of the 3 layers: msa [3, 4, 6, 16] and pair [3, 6, 6, 8]
  assert sorted(set(saved(offload))) == ["f32<host>[3,4,6,16]", "f32<host>[3,6,6,8]"]
  assert saved({"use_remat": True}) == []


def test_partly_offloaded_stack_agrees_with_scan():
  """`remat_offload_fraction`: of 4 layers at 0.5 the first 2 keep their inputs in the host's
  memory and the last 2 on the device; the same parameter layout, values and gradients."""
  partly = {"use_remat": True, "remat_offload": True, "remat_offload_fraction": 0.5}
  _check_stack_variant("transition", partly, num_layers=4)
  activations, masks = _stack_inputs()
  params = random_params(_Stack(tiny_config(), "transition", 4).init, activations, masks)
  module = _Stack(tiny_config(**partly), "transition", 4)
  loss = lambda p: sum(jnp.sum(x) for x in module.apply(p, activations, masks))
  text = str(jax.make_jaxpr(jax.grad(loss))(params))
  # the stacked inputs of the offloaded layers only: [2, ...], not [4, ...]
  assert sorted(set(re.findall(r"f32<host>\[[0-9]+,(?:4,6,16|6,6,8)\]", text))) == [
      "f32<host>[2,4,6,16]", "f32<host>[2,6,6,8]"]


@pytest.mark.parametrize("num_layers,fraction,offloaded", [
    (6, 0.0, 0), (6, 0.5, 3), (6, 0.6, 4), (6, 1.0, 6),
    (6, 0.01, 2),   # one layer would be offloaded alone: two are
    (6, 0.8, 6),    # one layer would stay on the device alone: it is offloaded too
    (3, 0.5, 3), (2, 0.5, 2), (48, 0.55, 27), (4, 0.55, 4)])
def test_offloaded_layers_never_split_off_one_layer(num_layers, fraction, offloaded):
  config = tiny_config(remat_offload_fraction=fraction).global_config
  assert offloaded_layers(config, num_layers) == offloaded


def test_offload_fraction_out_of_range_is_named():
  with pytest.raises(ValueError, match="remat_offload_fraction=1.5 is not in"):
    offloaded_layers(tiny_config(remat_offload_fraction=1.5).global_config, 3)


@pytest.mark.parametrize("num_layers,overrides,barriers", [
    (1, {}, True),                      # a one-layer stack
    (3, {"use_scan": False}, True),     # all layers unrolled: no loop left
    (3, {}, False), (4, {"remat_offload": True, "remat_offload_fraction": 0.5}, False)])
def test_one_iteration_loops_keep_their_recomputation(num_layers, overrides, barriers):
  """A loop of one iteration is inlined by XLA, which could then merge a block's
  recomputation with its forward pass (and keep every activation): such stacks put an
  optimisation barrier around the block (`prevent_cse`); longer loops need none."""
  activations, masks = _stack_inputs()
  params = random_params(_Stack(tiny_config(), "transition", num_layers).init, activations,
                         masks)
  module = _Stack(tiny_config(use_remat=True, **overrides), "transition", num_layers)
  loss = lambda p: sum(jnp.sum(x) for x in module.apply(p, activations, masks))
  assert ("prevent_cse=True" in str(jax.make_jaxpr(jax.grad(loss))(params))) == barriers


class _DrawBlock(nn.Module):
  """Returns a fresh random draw as its MSA, and keeps a * pair + b * (its input MSA) in the
  pair (a, b: per-layer parameters), so chosen layers' draws can be read at the end."""

  @nn.compact
  def __call__(self, activations, masks, deterministic):
    msa, pair = activations
    a = self.param("a", nn.initializers.ones, ())
    b = self.param("b", nn.initializers.zeros, ())
    draw = jax.random.normal(self.make_rng("dropout"), msa.shape)
    return draw, pair.at[:4].set(a * pair[:4] + b * msa[..., :8])


class _DrawStack(nn.Module):
  config: Any

  @nn.compact
  def __call__(self, activations, masks):
    return layer_stack(_DrawBlock(name="draw"), activations, 4, self.config.global_config,
                       masks, True)


def test_partly_offloaded_stack_draws_new_randomness_per_layer():
  """The two scans of a partly offloaded stack (layers 0-1 and 2-3) draw different
  randomness: the second scan does not replay the first's keys. Layer 2 copies layer 1's
  draw into the pair (a=0, b=1), layer 3 keeps it; the MSA ends as layer 3's draw."""
  activations, masks = _stack_inputs()
  config = tiny_config(use_remat=True, remat_offload=True, remat_offload_fraction=0.5)
  assert offloaded_layers(config.global_config, 4) == 2
  stack = _DrawStack(config)
  initial = stack.init({"params": jax.random.PRNGKey(0), "dropout": jax.random.PRNGKey(1)},
                       activations, masks)
  assert jax.tree.map(jnp.shape, initial) == {"params": {"draw": {"a": (4,), "b": (4,)}}}
  params = {"params": {"draw": {"a": jnp.array([1.0, 1.0, 0.0, 1.0]),
                                "b": jnp.array([0.0, 0.0, 1.0, 0.0])}}}
  msa, pair = stack.apply(params, activations, masks, rngs={"dropout": jax.random.PRNGKey(2)})
  layer1, layer3 = np.asarray(pair[:4]), np.asarray(msa[..., :8])  # index 1 of each scan
  assert np.std(layer1) > 0.5 and np.std(layer3) > 0.5
  assert np.abs(layer1 - layer3).max() > 0.1


class _Traces:
  count = 0


class _CountingBlock(nn.Module):
  """`_DrawBlock` that counts how often Python traces it (`traces.count`)."""
  traces: Any

  @nn.compact
  def __call__(self, activations, masks, deterministic):
    self.traces.count += 1
    return _DrawBlock(name="draw")(activations, masks, deterministic)


class _CountingStack(nn.Module):
  config: Any
  traces: Any

  @nn.compact
  def __call__(self, activations, masks):
    return layer_stack(_CountingBlock(self.traces, name="block"), activations, 4,
                       self.config.global_config, masks, True)


@pytest.mark.parametrize("overrides", [{}, {"scan_flat_params": True}])
def test_stack_body_is_traced_once_past_initialisation(overrides):
  """Flax traces a scan's body once more to check its invariants
  (`primitives.scan_trace_options`): only while initialising, where that trace collects
  the new parameters; applying the stack traces its block once."""
  activations, masks = _stack_inputs()
  traces = _Traces()
  stack = _CountingStack(tiny_config(use_remat=True, **overrides), traces)
  variables = stack.init({"params": jax.random.PRNGKey(0), "dropout": jax.random.PRNGKey(1)},
                         activations, masks)
  assert traces.count == 2
  traces.count = 0
  jax.make_jaxpr(lambda v: stack.apply(v, activations, masks,
                                       rngs={"dropout": jax.random.PRNGKey(2)}))(variables)
  assert traces.count == 1


def test_offloaded_block_inputs_refuse_groups_and_other_policies():
  activations, masks = _stack_inputs()
  for overrides, message in (({"remat_group_size": 2}, "set remat_group_size=1"),
                             ({"remat_policy": "dots_saveable"}, "needs remat_policy")):
    config = tiny_config(use_remat=True, remat_offload=True, **overrides)
    with pytest.raises(ValueError, match=message):
      jax.eval_shape(_Stack(config, "transition", 6).init, jax.random.PRNGKey(0),
                     activations, masks)


def test_grouped_remat_needs_a_divisor():
  activations, masks = _stack_inputs()
  with pytest.raises(ValueError, match="remat_group_size=4 does not divide the 6 layers"):
    jax.eval_shape(_Stack(tiny_config(use_remat=True, remat_group_size=4), "transition", 6).init,
                   jax.random.PRNGKey(0), activations, masks)


def test_unknown_remat_policy_is_named():
  activations, masks = _stack_inputs()
  with pytest.raises(ValueError, match="no_such_policy"):
    jax.eval_shape(_Stack(tiny_config(use_remat=True, remat_policy="no_such_policy")).init,
                   jax.random.PRNGKey(0), activations, masks)


def test_bfloat16_runs_and_stays_close(trunk_fp32):
  _, params, batch, prev, reference = trunk_fp32
  out = _run(tiny_config(dtype="bfloat16"), params, batch, prev)
  for key in reference:
    assert out[key].dtype == jnp.bfloat16, key
    assert relative_error(np.asarray(out[key], np.float32), reference[key]) < 5e-2, key


def test_dropout_is_random_and_reproducible(trunk_fp32):
  config, params, batch, prev, reference = trunk_fp32
  keys = [jax.random.PRNGKey(1), jax.random.PRNGKey(1), jax.random.PRNGKey(2)]
  first, again, other = _run_with_dropout(config, params, batch, prev, keys)
  np.testing.assert_array_equal(first["pair"], again["pair"])
  assert relative_error(first["pair"], other["pair"]) > 1e-3
  assert relative_error(first["pair"], reference["pair"]) > 1e-3


def test_outer_product_mean_first_changes_the_order():
  config = tiny_config()
  evo = config.embeddings_and_evoformer.evoformer
  rng = np.random.default_rng(0)
  msa = rng.normal(size=(4, 6, 8)).astype(np.float32)
  pair = rng.normal(size=(6, 6, 8)).astype(np.float32)
  masks = (np.ones((4, 6), np.float32), np.ones((6, 6), np.float32))
  block = EvoformerIteration(evo, config.global_config)
  params = random_params(block.init, (msa, pair), masks)
  msa_out, pair_out = jax.jit(block.apply)(params, (msa, pair), masks)
  chex.assert_shape([msa_out, pair_out], [msa.shape, pair.shape])
  evo.outer_product_mean.first = True
  first = EvoformerIteration(evo, config.global_config)
  msa_first, pair_first = jax.jit(first.apply)(params, (msa, pair), masks)
  # The MSA row attention then sees the pair already updated by the outer product mean.
  assert relative_error(msa_first, msa_out) > 1e-5
  assert relative_error(pair_first, pair_out) > 1e-4


@pytest.mark.skipif(jax.default_backend() == "gpu", reason="reads cuDNN's absence on a CPU")
def test_triangle_attention_impl_overrides_only_the_triangle_attention():
  """`triangle_attention_impl='cudnn'` reaches the triangle attention (cuDNN is missing here,
  so tracing it fails) and nothing else; "" follows `attention_impl`."""
  from af2flax.model.triangle import TriangleAttention  # pylint: disable=g-import-not-at-top
  pair = jnp.zeros((6, 6, 8), jnp.bfloat16)
  pair_mask = jnp.ones((6, 6), jnp.float32)

  def trace(**overrides):
    config = tiny_config(dtype="bfloat16", **overrides)
    module = TriangleAttention(
        config.embeddings_and_evoformer.evoformer.triangle_attention_starting_node,
        config.global_config)
    return jax.eval_shape(module.init, jax.random.PRNGKey(0), pair, pair_mask)

  trace(attention_impl="xla", triangle_attention_impl="")
  with pytest.raises(RuntimeError, match="cuDNN"):
    trace(attention_impl="xla", triangle_attention_impl="cudnn")
  with pytest.raises(RuntimeError, match="cuDNN"):
    trace(attention_impl="cudnn", triangle_attention_impl="")
  trace(attention_impl="cudnn", triangle_attention_impl="xla")
  activations, masks = _stack_inputs()  # the MSA modules still follow attention_impl
  with pytest.raises(RuntimeError, match="cuDNN"):
    jax.eval_shape(_Stack(tiny_config(dtype="bfloat16", attention_impl="cudnn",
                                      triangle_attention_impl="xla")).init,
                   jax.random.PRNGKey(0), activations, masks)


# Slow marker: the separate projections are the option the presets leave off; the parity
# test runs the fused ones against AlphaFold (40 s on the 2-core CI machine).
@pytest.mark.slow
def test_fused_projections_equal_separate_ones(trunk_fp32):
  """`fuse_projections`: the same parameter tree and values, fewer matrix products."""
  config, params, batch, prev, reference = trunk_fp32
  assert config.global_config.fuse_projections  # the presets' choices
  assert config.global_config.triangle_channels_first
  separate_config = tiny_config(fuse_projections=False, triangle_channels_first=False)
  separate = _run(separate_config, params, batch, prev)
  for key in reference:
    assert relative_error(reference[key], separate[key]) < 1e-5, key
  # The same parameter tree, and training from scratch starts from the same initialisation.
  key = jax.random.PRNGKey(3)
  chex.assert_trees_all_equal(jax.jit(_trunk(config).init)(key, batch, prev),
                              jax.jit(_trunk(separate_config).init)(key, batch, prev))

  def dots(cfg):
    jaxpr = jax.make_jaxpr(_trunk(cfg).apply)(params, batch, prev)
    return str(jaxpr).count("dot_general")
  # Per block: 4 fewer in each triangle multiplication, 1 in the outer product mean, 3 in
  # each self-attention (MSA row and column, two triangle attentions).
  assert dots(config) < dots(separate_config)


def test_fused_projections_have_the_same_gradients():
  from af2flax.model.triangle import TriangleAttention, TriangleMultiplication  # pylint: disable=g-import-not-at-top
  pair = jnp.asarray(np.random.default_rng(0).normal(size=(6, 6, 8)), jnp.float32)
  pair_mask = jnp.ones((6, 6), jnp.float32).at[5].set(0.0)
  evo = tiny_config().embeddings_and_evoformer.evoformer
  for cls, sub in ((TriangleMultiplication, evo.triangle_multiplication_incoming),
                   (TriangleAttention, evo.triangle_attention_ending_node)):
    grads = []
    for fuse in (False, True):
      module = cls(sub, tiny_config(fuse_projections=fuse,
                                    triangle_channels_first=False).global_config)
      params = random_params(module.init, pair, pair_mask, seed=1)
      loss = lambda p: jnp.sum(jnp.sin(module.apply(p, pair, pair_mask)))  # pylint: disable=cell-var-from-loop
      grads.append(jax.grad(loss)(params))
    chex.assert_trees_all_close(grads[0], grads[1], rtol=1e-5, atol=1e-6)


def test_channels_first_triangle_multiplication_is_the_same_update():
  """`triangle_channels_first`: the same values and gradients in both directions."""
  from af2flax.model.triangle import TriangleMultiplication, channels_first_equation  # pylint: disable=g-import-not-at-top
  assert channels_first_equation("ikc,jkc->ijc") == "cik,cjk->cij"
  assert channels_first_equation("kjc,kic->ijc") == "ckj,cki->cij"
  with pytest.raises(ValueError, match="same channel letter"):
    channels_first_equation("ick,jkc->ijc")
  pair = jnp.asarray(np.random.default_rng(0).normal(size=(6, 6, 8)), jnp.float32)
  pair_mask = jnp.ones((6, 6), jnp.float32).at[5].set(0.0)
  evo = tiny_config().embeddings_and_evoformer.evoformer
  for sub in (evo.triangle_multiplication_outgoing, evo.triangle_multiplication_incoming):
    outputs, grads = [], []
    for first in (False, True):
      module = TriangleMultiplication(sub, tiny_config(triangle_channels_first=first,
                                                       fuse_projections=True).global_config)
      params = random_params(module.init, pair, pair_mask, seed=1)
      outputs.append(module.apply(params, pair, pair_mask))
      grads.append(jax.grad(lambda p, m=module: jnp.sum(jnp.sin(m.apply(p, pair, pair_mask))))(
          params))
    assert relative_error(outputs[1], outputs[0]) < 1e-6
    chex.assert_trees_all_close(grads[0], grads[1], rtol=1e-5, atol=1e-6)


def test_outer_product_mean_in_one_piece_agrees_with_chunks():
  """`outer_product_mean_chunking`: 'always' (AlphaFold: chunks of `chunk_size` rows; tiny
  config: 6 residues, chunks of 4) and 'low_memory' (the presets: one piece unless
  `low_memory`) give the same values and gradients."""
  overrides = {"use_remat": True, "outer_product_mean_chunking": "always"}
  _check_stack_variant("evoformer", overrides)
  activations, masks = _stack_inputs()

  def scans(**settings):
    module = _Stack(tiny_config(use_remat=True, **settings))
    params = jax.eval_shape(module.init, jax.random.PRNGKey(0), activations, masks)
    return str(jax.make_jaxpr(module.apply)(params, activations, masks)).count(" scan[")

  assert scans(outer_product_mean_chunking="always") == scans() + 1
  assert scans(low_memory=True) == scans(outer_product_mean_chunking="always", low_memory=True)
  with pytest.raises(ValueError, match="outer_product_mean_chunking='never'"):
    scans(outer_product_mean_chunking="never")


@pytest.mark.parametrize("chunking,layout", [
    ("low_memory", "alphafold"), ("always", "alphafold"), ("low_memory", "rows_batched"),
    # the chunked loop around either layout is the same code: slow marker (CI skips it)
    pytest.param("always", "rows_batched", marks=pytest.mark.slow)])
def test_outer_product_mean_layouts_agree(chunking, layout):
  """`outer_product_mean_layout`: 'alphafold' (AlphaFold's einsums) and 'rows_batched' (the
  projection batched over rows) give the values and gradients of 'rows_first' (the
  presets), in one piece and in chunks."""
  assert tiny_config().global_config.outer_product_mean_layout == "rows_first"
  _check_stack_variant("evoformer", {"outer_product_mean_layout": layout,
                                     "outer_product_mean_chunking": chunking})
  from af2flax.model.evoformer import outer_product_mean_layout  # pylint: disable=g-import-not-at-top
  with pytest.raises(ValueError, match="outer_product_mean_layout='columns'"):
    outer_product_mean_layout(tiny_config(outer_product_mean_layout="columns").global_config)
