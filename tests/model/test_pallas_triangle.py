"""The triangle multiplication's input kernel (Pallas's interpreter on the CPU) against XLA."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from af2flax.model import pallas_transition, pallas_triangle, primitives
from af2flax.model.triangle import TriangleMultiplication
from tests.model.helpers import tiny_config

_EPS = primitives.LAYER_NORM_EPSILON
_TILING = pallas_transition.Tiling(block_rows=16, warps=4, stages=1)


def _inputs(num_res, pair_channels, edge_channels, dtype, seed=0):
  rng = np.random.default_rng(seed)
  x = jnp.asarray(rng.normal(size=(num_res, num_res, pair_channels)), dtype)
  mask = jnp.asarray(rng.random((num_res, num_res)) > 0.2, jnp.float32)
  scale = jnp.asarray(1 + 0.2 * rng.normal(size=pair_channels), jnp.float32)
  offset = jnp.asarray(0.2 * rng.normal(size=pair_channels), jnp.float32)
  w_edges = jnp.asarray(rng.normal(size=(pair_channels, 4 * edge_channels))
                        / np.sqrt(pair_channels), dtype)
  b_edges = jnp.asarray(0.2 * rng.normal(size=4 * edge_channels), jnp.float32)
  w_gate = jnp.asarray(rng.normal(size=(pair_channels, pair_channels)) / np.sqrt(pair_channels),
                       dtype)
  b_gate = jnp.asarray(0.2 * rng.normal(size=pair_channels), jnp.float32)
  return x, mask, scale, offset, w_edges, b_edges, w_gate, b_gate


def _kernel(*args):
  return pallas_triangle.edge_projections(*args, _EPS, tiling=_TILING, interpret=True)


def _reference(*args):
  return pallas_triangle.edge_projections_reference(*args, eps=_EPS)


@pytest.mark.parametrize("num_res,pair_channels,edge_channels", [(8, 32, 16), (7, 16, 16)])
def test_kernel_matches_the_xla_layers_in_float32(num_res, pair_channels, edge_channels):
  """Rows in several blocks (64), and rows with no power-of-two factor >= 16 (49: padded)."""
  args = _inputs(num_res, pair_channels, edge_channels, jnp.float32)
  got, want = _kernel(*args), _reference(*args)
  assert [a.shape for a in got] == [(edge_channels, num_res, num_res)] * 2 + [
      (num_res, num_res, pair_channels)]
  for a, b in zip(got, want):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_kernel_in_bfloat16_within_rounding():
  args = _inputs(8, 32, 16, jnp.bfloat16)
  exact = _reference(*(a.astype(jnp.float32) for a in args))
  for got, xla, want in zip(_kernel(*args), _reference(*args), exact):
    assert got.dtype == jnp.bfloat16
    err_kernel = np.abs(np.asarray(got, np.float32) - want).max()
    err_xla = np.abs(np.asarray(xla, np.float32) - want).max()
    assert err_kernel <= err_xla + 2 ** -7 * np.abs(want).max()


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_gradients_are_those_of_the_xla_layers(dtype):
  args = _inputs(4, 16, 16, dtype, seed=1)
  rng = np.random.default_rng(2)
  cotangents = [jnp.asarray(rng.normal(size=a.shape), jnp.float32) for a in _reference(*args)]

  def loss(fn):
    return lambda *a: sum(jnp.sum(o.astype(jnp.float32) * c)
                          for o, c in zip(fn(*a), cotangents))

  argnums = (0, 2, 3, 4, 5, 6, 7)
  got = jax.grad(loss(_kernel), argnums=argnums)(*args)
  want = jax.grad(loss(_reference), argnums=argnums)(*args)
  for a, b in zip(got, want):
    assert a.dtype == b.dtype
    np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))


def _module(direction: str, impl: str):
  config = tiny_config(triangle_channels_first=True, triangle_projection_impl=impl,
                       triangle_projection_tiling="block_rows=16")
  sub = config.embeddings_and_evoformer.evoformer[f"triangle_multiplication_{direction}"]
  sub.num_intermediate_channel = 16
  return TriangleMultiplication(sub, config.global_config)


@pytest.mark.parametrize("direction", ["outgoing", "incoming"])
def test_module_with_the_kernel_is_the_same_update(direction):
  rng = np.random.default_rng(3)
  pair = jnp.asarray(rng.normal(size=(6, 6, 16)), jnp.float32)
  pair_mask = jnp.ones((6, 6), jnp.float32).at[5].set(0.0)
  xla, kernel = _module(direction, "xla"), _module(direction, "pallas")
  params = xla.init(jax.random.PRNGKey(0), pair, pair_mask)
  # Random biases and gains too (zero-initialised gates would hide the gating).
  leaves, tree = jax.tree.flatten(params)
  params = jax.tree.unflatten(tree, [jnp.asarray(rng.normal(size=p.shape) * 0.3, p.dtype)
                                     for p in leaves])
  kernel_params = kernel.init(jax.random.PRNGKey(0), pair, pair_mask)
  assert jax.tree.structure(kernel_params) == tree
  np.testing.assert_allclose(kernel.apply(params, pair, pair_mask),
                             xla.apply(params, pair, pair_mask), rtol=1e-5, atol=1e-5)
  grads = [jax.grad(lambda p, x, m=module: jnp.sum(jnp.sin(m.apply(p, x, pair_mask))),
                    argnums=(0, 1))(params, pair) for module in (xla, kernel)]
  chex.assert_trees_all_close(grads[1], grads[0], rtol=1e-5, atol=1e-6)


def test_narrow_widths_keep_the_xla_layers():
  """The tiny config's 8 channels are under Triton's 16: 'pallas' falls back to XLA."""
  gc = tiny_config(triangle_projection_impl="pallas").global_config
  pair = jnp.zeros((4, 4, 8), jnp.float32)
  assert primitives.kernel_path(gc, "triangle_projection_impl", pair, jnp.float32,
                                pallas_triangle.unsupported_reason(8, 8) is None) == "xla"
  assert primitives.kernel_path(gc, "triangle_projection_impl", pair, jnp.float32,
                                pallas_triangle.unsupported_reason(16, 16) is None) == "pallas"
  with pytest.raises(ValueError, match="not four projections"):
    pallas_triangle.edge_projections(*_inputs(4, 16, 16, jnp.float32)[:4],
                                     jnp.zeros((16, 30)), jnp.zeros(30), jnp.zeros((16, 16)),
                                     jnp.zeros(16), _EPS, interpret=True)
