"""Attention, global attention, transition, chunking and shared dropout."""

from typing import Any

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from af2flax.model import primitives
from af2flax.tools import low_precision_sums
from tests.model.helpers import perturb_params

def _jit_apply(module):
  return jax.jit(module.apply)


GLOBAL = ml_collections.ConfigDict({"deterministic": False, "eval_dropout": False,
                                    "zero_init": True,
                                    "dtype": "float32", "subbatch_size": 4})


def _attention_inputs(seed=0, batch=3, queries=5, keys=7, channels=6):
  rng = np.random.default_rng(seed)
  q = rng.normal(size=(batch, queries, channels)).astype(np.float32)
  m = rng.normal(size=(batch, keys, channels)).astype(np.float32)
  mask = (rng.uniform(size=(batch, 1, 1, keys)) > 0.3).astype(np.float32)
  mask[..., 0] = 1.0
  bias = rng.normal(size=(2, queries, keys)).astype(np.float32)
  return q, m, mask, bias


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_attention_parameters_shapes_and_dtypes(dtype):
  q, m, mask, bias = _attention_inputs()
  module = primitives.Attention(num_head=2, output_dim=9, key_dim=4, value_dim=6, dtype=dtype)
  params = module.init(jax.random.PRNGKey(0), q, m, mask, bias)
  shapes = jax.tree.map(jnp.shape, params["params"])
  assert shapes == {"query_w": (6, 2, 2), "key_w": (6, 2, 2), "value_w": (6, 2, 3),
                    "gating_w": (6, 2, 3), "gating_b": (2, 3), "output_w": (2, 3, 9),
                    "output_b": (9,)}
  chex.assert_trees_all_equal_dtypes(params, jax.tree.map(lambda x: x.astype(jnp.float32), params))
  out = _jit_apply(module)(perturb_params(params), q, m, mask, bias)
  chex.assert_shape(out, (3, 5, 9))
  assert out.dtype == dtype
  assert np.all(np.isfinite(np.asarray(out, np.float32)))


def test_attention_ignores_masked_keys():
  q, m, mask, bias = _attention_inputs()
  module = primitives.Attention(num_head=2, output_dim=6)
  params = perturb_params(module.init(jax.random.PRNGKey(0), q, m, mask, bias))
  changed = np.where(mask[:, 0, 0, :, None] > 0, m, m + 100.0)
  np.testing.assert_allclose(_jit_apply(module)(params, q, m, mask, bias),
                             _jit_apply(module)(params, q, changed, mask, bias), atol=1e-5)
  # ... but not unmasked ones.
  assert not np.allclose(_jit_apply(module)(params, q, m + 1.0, mask, bias),
                         _jit_apply(module)(params, q, m, mask, bias), atol=1e-3)


def test_global_attention_ignores_masked_rows():
  rng = np.random.default_rng(1)
  act = rng.normal(size=(4, 6, 8)).astype(np.float32)
  mask = (rng.uniform(size=(4, 6, 1)) > 0.4).astype(np.float32)
  mask[:, 0] = 1.0
  module = primitives.GlobalAttention(num_head=2, output_dim=8)
  params = perturb_params(module.init(jax.random.PRNGKey(0), act, act, mask))
  out = _jit_apply(module)(params, act, act, mask)
  chex.assert_shape(out, (4, 6, 8))
  changed = np.where(mask > 0, act, act - 50.0)
  # Masked rows neither contribute to the mean query nor are attended; their own output
  # differs only through their own gate.
  out_changed = _jit_apply(module)(params, changed, changed, mask)
  np.testing.assert_allclose(np.asarray(out)[mask[..., 0] > 0],
                             np.asarray(out_changed)[mask[..., 0] > 0], atol=1e-4)


class _RowSum(nn.Module):
  @nn.compact
  def __call__(self, x, scale):
    return primitives.Linear(3, name="proj")(x) * scale


@pytest.mark.parametrize("axis", [0, 1])
def test_chunked_apply_equals_unchunked(axis):
  x = jax.random.normal(jax.random.PRNGKey(0), (7, 10, 4))

  class Wrapper(nn.Module):
    chunk: int | None

    @nn.compact
    def __call__(self, x):
      return primitives.chunked_apply(_RowSum(name="inner"), self.chunk, [x], [2.0], axis=axis)

  params = perturb_params(Wrapper(None).init(jax.random.PRNGKey(1), x))
  assert jax.tree.map(jnp.shape, params) == jax.tree.map(
      jnp.shape, Wrapper(3).init(jax.random.PRNGKey(1), x))
  full = jax.jit(Wrapper(None).apply)(params, x)
  for chunk in (1, 3, 4, 7, 20):
    np.testing.assert_allclose(jax.jit(Wrapper(chunk).apply)(params, x), full, atol=1e-6)


def test_transition_chunked_equals_unchunked():
  config = ml_collections.ConfigDict({"num_intermediate_factor": 4})
  act = jax.random.normal(jax.random.PRNGKey(0), (9, 5, 6))
  full = primitives.Transition(config, GLOBAL)
  params = perturb_params(full.init(jax.random.PRNGKey(1), act))
  assert set(params["params"]) == {"input_layer_norm", "transition1", "transition2"}
  chex.assert_shape(params["params"]["transition1"]["weights"], (6, 24))
  chunked = primitives.Transition(config, GLOBAL, chunk_size=4)
  np.testing.assert_allclose(jax.jit(chunked.apply)(params, act), jax.jit(full.apply)(params, act),
                             atol=1e-6)


@pytest.mark.parametrize("orientation,shared_axis", [("per_row", 0), ("per_column", 1)])
def test_residual_dropout_shares_mask(orientation, shared_axis):
  config = ml_collections.ConfigDict({"dropout_rate": 0.5, "shared_dropout": True,
                                      "orientation": orientation})
  update = jnp.ones((6, 8, 3))
  module = primitives.ResidualDropout(config, GLOBAL)
  out = module.apply({}, jnp.zeros_like(update), update, False,
                     rngs={"dropout": jax.random.PRNGKey(3)})
  out = np.asarray(out)
  assert set(np.unique(out)) <= {0.0, 2.0}
  assert 0 < np.count_nonzero(out) < out.size
  # The same mask along the shared axis.
  np.testing.assert_array_equal(out, np.broadcast_to(np.take(out, [0], axis=shared_axis),
                                                     out.shape))
  # Deterministic, or globally deterministic: no dropout.
  np.testing.assert_array_equal(module.apply({}, jnp.zeros_like(update), update, True), update)
  strict = ml_collections.ConfigDict({**GLOBAL.to_dict(), "deterministic": True})
  np.testing.assert_array_equal(
      primitives.ResidualDropout(config, strict).apply(
          {}, jnp.zeros_like(update), update, False, rngs={"dropout": jax.random.PRNGKey(3)}),
      update)


def test_softmax_fp32_is_accurate_in_bf16():
  logits = jnp.asarray([[0.0, -30.0, -1e9]], jnp.bfloat16)
  weights = primitives.softmax_fp32(logits)
  assert weights.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(weights, np.float32), [[1.0, 0.0, 0.0]], atol=1e-6)


def test_fused_attention_masking_equals_materialised_softmax():
  """The flash-attention path passes padding masks as key lengths: on every row with a valid
  key it equals AlphaFold's masked softmax with pair bias (run through XLA on the CPU)."""
  rng = np.random.default_rng(3)
  batch, length, heads, dim = 6, 10, 4, 8
  q, k, v = (jnp.asarray(rng.normal(size=(batch, length, heads, dim)), jnp.float32)
             for _ in range(3))
  bias = jnp.asarray(rng.normal(size=(heads, length, length)), jnp.float32)
  lengths = np.array([10, 7, 3, 10, 1, 0])
  mask = (np.arange(length)[None] < lengths[:, None]).astype(np.float32)[:, None, None, :]
  logits = jnp.einsum("bqhc,bkhc->bhqk", q, k) + bias[None]
  logits = jnp.where(mask != 0, logits, primitives.SOFTMAX_MASK_VALUE)
  expected = jnp.einsum("bhqk,bkhc->bqhc", jax.nn.softmax(logits, -1), v)
  fused = primitives.fused_attention(q, k, v, mask, bias, implementation="xla")
  valid = lengths > 0
  np.testing.assert_allclose(fused[valid], expected[valid], atol=1e-5)
  assert np.all(np.isfinite(fused))  # A padding row with no valid key stays finite.


def test_attention_impl_choice():
  """'auto' takes cuDNN only on a GPU with 16-bit activations and shapes cuDNN accepts."""
  q16 = jnp.zeros((2, 8, 4, 32), jnp.bfloat16)
  assert not primitives.use_fused_attention("xla", q16, q16, True)
  assert primitives.use_fused_attention("cudnn", q16, q16, True)
  on_gpu = jax.default_backend() == "gpu"
  assert primitives.use_fused_attention("auto", q16, q16, True) == on_gpu
  assert not primitives.use_fused_attention("auto", q16.astype(jnp.float32), q16, True)
  odd = jnp.zeros((2, 7, 4, 32), jnp.bfloat16)
  assert not primitives.use_fused_attention("auto", odd, odd, True)  # cuDNN bwd needs even.
  # 'auto_cudnn': cuDNN where 'auto' allows it, never our kernels, XLA elsewhere.
  mask = jnp.ones((2, 1, 1, 16))
  q16x16 = jnp.zeros((2, 16, 4, 32), jnp.bfloat16)
  assert primitives.attention_path("auto_cudnn", q16x16, q16x16, mask, True) == (
      "fused" if on_gpu else "xla")
  assert primitives.attention_path("auto_cudnn", q16x16.astype(jnp.float32),
                                   q16x16.astype(jnp.float32), mask, True) == "xla"
  assert primitives.attention_impl(
      ml_collections.ConfigDict({"attention_impl": "auto_cudnn"})) == "auto_cudnn"
  with pytest.raises(ValueError, match="attention_impl"):
    primitives.attention_impl(ml_collections.ConfigDict({"attention_impl": "flash"}))
  gc = ml_collections.ConfigDict({"attention_impl": "cudnn", "triangle_attention_impl": ""})
  assert primitives.attention_impl(gc, "triangle_attention_impl") == "cudnn"
  gc.triangle_attention_impl = "xla"
  assert primitives.attention_impl(gc, "triangle_attention_impl") == "xla"
  assert primitives.attention_impl(gc) == "cudnn"
  gc.triangle_attention_impl = "flash"
  with pytest.raises(ValueError, match="triangle_attention_impl='flash'"):
    primitives.attention_impl(gc, "triangle_attention_impl")


def test_vmapped_examples_keep_biased_attention_off_cudnn(monkeypatch):
  """With `examples_vmapped` (the train step vmaps examples), 'auto' and 'auto_cudnn' hand
  an attention with a bias to XLA, not cuDNN (jax cannot batch cuDNN's shared bias under
  vmap); without a bias cuDNN still runs. The backend is taken to be a GPU: only the
  choice is tested, nothing runs."""
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  mask = jnp.ones((2, 1, 1, 132))
  q = jnp.zeros((2, 132, 8, 32), jnp.bfloat16)   # 132 keys: not our kernels' (unpadded)
  for impl in ("auto", "auto_cudnn", "pallas"):
    assert primitives.attention_path(impl, q, q, mask, True) == "fused", impl
    assert primitives.attention_path(impl, q, q, mask, True, examples_vmapped=True) == "xla"
    assert primitives.attention_path(impl, q, q, mask, False, examples_vmapped=True) == "fused"
  q16 = jnp.zeros((2, 128, 8, 32), jnp.bfloat16)  # our kernels batch under vmap: unchanged
  mask16 = jnp.ones((2, 1, 1, 128))
  assert primitives.attention_path("auto", q16, q16, mask16, True, examples_vmapped=True) == (
      "pallas")
  gc = ml_collections.ConfigDict({"attention_impl": "auto", "examples_vmapped": True})
  assert primitives.attention_settings(gc)["examples_vmapped"] is True


def _layer_norm_case(dtype, axis, seed=0):
  rng = np.random.default_rng(seed)
  x = jnp.asarray(rng.normal(loc=0.5, scale=2.0, size=(6, 5, 8)), dtype)
  channels = x.shape[axis]
  scale = jnp.asarray(rng.normal(1.0, 0.3, size=channels), jnp.float32)
  offset = jnp.asarray(rng.normal(0.0, 0.3, size=channels), jnp.float32)
  dy = jnp.asarray(rng.normal(size=x.shape), dtype)
  return x, scale, offset, dy


@pytest.mark.parametrize("dtype,axis,with_params", [
    (jnp.float32, 2, True), (jnp.float32, 0, True), (jnp.float32, 2, False),
    (jnp.bfloat16, 2, True), (jnp.bfloat16, 0, True)])
def test_layer_norm_gradient_equals_autodiff(dtype, axis, with_params):
  """`layer_norm` (its own backward pass, recomputing the normalised input) gives the
  values and the gradients of JAX's autodiff of the same function."""
  x, scale, offset, dy = _layer_norm_case(dtype, axis)
  if not with_params:
    scale = offset = None

  def vjp(norm):
    y, pullback = jax.vjp(lambda *a: norm(*a, axis, 1e-5, jnp.dtype(dtype)), x, scale, offset)
    return (y,) + pullback(dy)

  ours, reference = vjp(primitives.layer_norm), vjp(primitives.layer_norm_autodiff)
  assert jax.tree.structure(ours) == jax.tree.structure(reference)
  tolerance = 1e-5 if dtype == jnp.float32 else 2e-2
  for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(reference)):
    assert a.dtype == b.dtype and a.shape == b.shape
    np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32),
                               rtol=tolerance, atol=tolerance)


def test_layer_norm_under_vmap_and_checkpoint():
  x, scale, offset, _ = _layer_norm_case(jnp.float32, 2)

  def loss(norm, x, scale, offset):
    f = jax.checkpoint(lambda x: norm(x, scale, offset, 1, 1e-5, jnp.dtype(jnp.float32)))
    return jnp.sum(jnp.sin(jax.vmap(f)(x)))

  ours = jax.grad(lambda *a: loss(primitives.layer_norm, *a), argnums=(0, 1, 2))(
      x, scale, offset)
  reference = jax.grad(lambda *a: loss(primitives.layer_norm_autodiff, *a), argnums=(0, 1, 2))(
      x, scale, offset)
  chex.assert_trees_all_close(ours, reference, rtol=1e-5, atol=1e-5)


def test_layer_norm_keeps_no_float32_copy_of_a_bf16_input():
  """What the backward pass keeps: x in bf16 and per-row statistics, not the float32
  normalised input that autodiff keeps (a full-size float32 array)."""
  x, scale, offset, _ = _layer_norm_case(jnp.bfloat16, 2)

  def float32_full_size(norm):
    # The pullback's leaves are the residuals the backward pass reads.
    _, pullback = jax.vjp(lambda x: norm(x, scale, offset, 2, 1e-5, jnp.dtype(jnp.bfloat16)),
                          x)
    return [leaf for leaf in jax.tree.leaves(pullback)
            if leaf.shape == x.shape and leaf.dtype == jnp.float32]

  assert float32_full_size(primitives.layer_norm_autodiff)  # the check can fail
  assert not float32_full_size(primitives.layer_norm)


def test_layer_norm_module_uses_recompute_unless_told():
  x, _, _, _ = _layer_norm_case(jnp.float32, 2)
  module = primitives.LayerNorm()
  params = module.init(jax.random.PRNGKey(0), x)

  def primitive_names():
    jaxpr = jax.make_jaxpr(lambda p: module.apply(p, x))(params)
    return {str(eqn.primitive) for eqn in jaxpr.jaxpr.eqns}

  assert any("custom_vjp" in name for name in primitive_names())
  with primitives.layer_norm_recompute(False):
    assert not any("custom_vjp" in name for name in primitive_names())
  assert jax.tree.map(jnp.shape, params["params"]) == {"scale": (8,), "offset": (8,)}


def test_add_bias_sums_its_gradient_in_float32():
  """`add_bias`: the same values as `x + bias.astype(x.dtype)`; the bias gradient of a
  bfloat16 x is the float32 sum of the cotangent over every broadcast axis (leading axes and
  size-1 axes), in the bias's dtype, unrounded (JAX's own transpose sums in bfloat16: on the
  CPU 52% off over 33,792 rows)."""
  rng = np.random.default_rng(3)
  x = jnp.asarray(rng.normal(size=(4000, 3, 6)), jnp.bfloat16)
  cotangent = jnp.asarray(rng.normal(size=x.shape) + 0.5, jnp.bfloat16)
  for bias in (jnp.asarray(rng.normal(size=(6,)), jnp.float32),
               jnp.asarray(rng.normal(size=(3, 1)), jnp.float32)):
    out, vjp = jax.vjp(primitives.add_bias, x, bias)
    np.testing.assert_array_equal(out, x + bias.astype(x.dtype))
    d_x, d_bias = vjp(cotangent)
    np.testing.assert_array_equal(d_x, cotangent)
    assert d_bias.shape == bias.shape and d_bias.dtype == jnp.float32
    axes = (0, 2) if bias.shape == (3, 1) else (0, 1)
    expected = np.sum(np.asarray(cotangent, np.float64), axis=axes).reshape(bias.shape)
    np.testing.assert_allclose(d_bias, expected, rtol=1e-5)


def test_linear_bias_gradient_in_bf16_is_the_float32_sum():
  """A bfloat16 `Linear`'s bias gradient over many rows is the float32 sum of its output's
  cotangent (rounded to bfloat16 as the activations are)."""
  rng = np.random.default_rng(4)
  x = jnp.asarray(rng.normal(size=(20000, 8)), jnp.float32)
  cotangent = jnp.asarray(rng.normal(size=(20000, 4)) + 0.5, jnp.float32)
  module = primitives.Linear(4, dtype=jnp.bfloat16)
  params = module.init(jax.random.PRNGKey(0), x)
  grad = jax.grad(lambda p: jnp.sum(module.apply(p, x).astype(jnp.float32) * cotangent))(
      params)["params"]["bias"]
  expected = np.sum(np.asarray(cotangent.astype(jnp.bfloat16), np.float64), axis=0)
  np.testing.assert_allclose(grad, expected, rtol=1e-5)


def test_expand_sums_its_gradient_in_float32():
  """`expand`: the values of `jnp.broadcast_to`; a bfloat16 input's gradient is the float32
  sum of the cotangent over the broadcast axes (leading and size-1), rounded once to
  bfloat16. JAX's own transpose of the broadcast is a bfloat16 `reduce_sum`, whose accuracy
  is then the backend's (XLA:CPU gets this one right to 0.6%; a bias gradient inside a fused
  program came out 52% off, `test_linear_bias_gradient_in_bf16_is_the_float32_sum`)."""
  rng = np.random.default_rng(5)
  cotangent = jnp.asarray(rng.normal(size=(4000, 3, 6)) * 0.1 + 0.5, jnp.bfloat16)
  for x in (jnp.asarray(rng.normal(size=(3, 6)), jnp.bfloat16),
            jnp.asarray(rng.normal(size=(1, 3, 1)), jnp.bfloat16)):
    out, vjp = jax.vjp(lambda a: primitives.expand(a, cotangent.shape), x)
    np.testing.assert_array_equal(out, jnp.broadcast_to(x, cotangent.shape))
    (d_x,) = vjp(cotangent)
    assert d_x.shape == x.shape and d_x.dtype == jnp.bfloat16
    axes = (0,) if x.ndim == 2 else (0, 2)
    expected = np.sum(np.asarray(cotangent, np.float64), axis=axes).reshape(x.shape)
    np.testing.assert_allclose(np.asarray(d_x, np.float64), expected, rtol=2 ** -8)
    def sums_in_16_bits(broadcast, x=x):
      return low_precision_sums.low_precision_sums(jax.make_jaxpr(
          lambda c: jax.vjp(lambda a: broadcast(a, c.shape), x)[1](c))(cotangent))
    assert not sums_in_16_bits(primitives.expand)
    assert [s.terms for s in sums_in_16_bits(jnp.broadcast_to)] == [4000 if x.ndim == 2
                                                                   else 24000]


class _Calls:
  def __init__(self):
    self.shapes = []


class _CountedParam(nn.Module):
  """A module with one parameter whose initialiser counts its calls."""

  calls: Any  # a _Calls
  features: int = 3

  @nn.compact
  def __call__(self, x):
    def init(key, shape, dtype):
      self.calls.shapes.append(shape)
      return jax.random.normal(key, shape, dtype)
    return x @ primitives.module_param(self, "w", init, (x.shape[-1], self.features),
                                       jnp.float32)


def test_module_param_reads_without_tracing_the_initialiser_again():
  """`primitives.module_param`: the parameter as `nn.Module.param` gives it, created once
  while initialising; past that its initialiser is not traced again (flax's `param` traces
  it on every read to check the shape), and a shape that the config does not give is still
  an error naming the parameter."""
  calls = _Calls()
  x = jnp.ones((2, 4))
  variables = _CountedParam(calls).init(jax.random.PRNGKey(0), x)
  assert calls.shapes == [(4, 3)]
  out = jax.jit(_CountedParam(calls).apply)(variables, x)
  np.testing.assert_allclose(out, x @ variables["params"]["w"], rtol=1e-6)
  assert calls.shapes == [(4, 3)]
  with pytest.raises(ValueError, match=r"parameter 'w' .* has shape \(4, 3\), but the module's "
                                       r"config asks for \(4, 5\)"):
    _CountedParam(calls, features=5).apply(variables, x)
