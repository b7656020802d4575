"""The transition's Pallas kernel (Pallas's interpreter on the CPU) against its XLA layers."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from af2flax.model import pallas_transition, primitives

_EPS = primitives.LAYER_NORM_EPSILON


def _inputs(shape, channels, hidden, dtype, seed=0):
  rng = np.random.default_rng(seed)
  x = jnp.asarray(rng.normal(size=shape + (channels,)), dtype)
  scale = jnp.asarray(1 + 0.2 * rng.normal(size=channels), jnp.float32)
  offset = jnp.asarray(0.2 * rng.normal(size=channels), jnp.float32)
  w1 = jnp.asarray(rng.normal(size=(channels, hidden)) / np.sqrt(channels), dtype)
  b1 = jnp.asarray(0.2 * rng.normal(size=hidden), jnp.float32)
  w2 = jnp.asarray(rng.normal(size=(hidden, channels)) / np.sqrt(hidden), dtype)
  b2 = jnp.asarray(0.2 * rng.normal(size=channels), jnp.float32)
  return x, scale, offset, w1, b1, w2, b2


def _kernel(tiling=pallas_transition.Tiling(block_rows=32, block_hidden=32)):
  return lambda *args: pallas_transition.transition(*args, _EPS, tiling=tiling, interpret=True)


def _reference(*args):
  return pallas_transition.transition_reference(*args, eps=_EPS)


# (leading shape, channels, hidden): rows in several blocks, rows with no power-of-two
# factor >= 16 (35: padded to 48 inside), the hidden layer in one chunk and in several.
_CASES = [((3, 40), 32, 128), ((64,), 16, 64), ((5, 7), 32, 32)]


@pytest.mark.parametrize("shape,channels,hidden", _CASES)
def test_kernel_matches_the_xla_layers_in_float32(shape, channels, hidden):
  args = _inputs(shape, channels, hidden, jnp.float32)
  out, expected = _kernel()(*args), _reference(*args)
  assert out.shape == expected.shape and out.dtype == jnp.float32
  np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)


def test_kernel_in_bfloat16_within_rounding():
  args = _inputs((4, 48), 32, 128, jnp.bfloat16)
  out, expected = _kernel()(*args), _reference(*args)
  assert out.dtype == jnp.bfloat16
  exact = _reference(*(a.astype(jnp.float32) for a in args))
  # The kernel rounds the hidden layer once (XLA's layers twice): no further from the
  # float32 result than XLA's bfloat16 layers are, up to one bfloat16 step of the output.
  err_kernel = np.abs(np.asarray(out, np.float32) - exact).max()
  err_xla = np.abs(np.asarray(expected, np.float32) - exact).max()
  assert err_kernel <= err_xla + 2 ** -7 * np.abs(exact).max()


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_gradients_are_those_of_the_xla_layers(dtype):
  args = _inputs((2, 24), 16, 64, dtype, seed=1)
  cotangent = jnp.asarray(np.random.default_rng(2).normal(size=args[0].shape), jnp.float32)

  def loss(fn):
    return lambda *a: jnp.sum(fn(*a).astype(jnp.float32) * cotangent)

  grads = jax.grad(loss(_kernel()), argnums=tuple(range(7)))(*args)
  expected = jax.grad(loss(_reference), argnums=tuple(range(7)))(*args)
  for name, got, want in zip(("x", "scale", "offset", "w1", "b1", "w2", "b2"), grads,
                             expected):
    assert got.dtype == want.dtype, name
    # The backward pass is the XLA layers' own: the same operations on the same inputs.
    np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32),
                                  err_msg=name)


def test_kernel_under_vmap_and_remat():
  args = _inputs((3, 2, 16), 16, 32, jnp.float32, seed=3)
  batched = jax.vmap(jax.checkpoint(_kernel()), in_axes=(0,) + (None,) * 6)
  np.testing.assert_allclose(batched(*args), _reference(*args), rtol=1e-5, atol=1e-5)
  grad = jax.grad(lambda x: jnp.sum(batched(x, *args[1:]) ** 2))(args[0])
  want = jax.grad(lambda x: jnp.sum(_reference(x, *args[1:]) ** 2))(args[0])
  np.testing.assert_allclose(grad, want, rtol=1e-5, atol=1e-5)


def _module(impl: str, factor: int = 4, backward: str = "xla"):
  global_config = ml_collections.ConfigDict({
      "dtype": "float32", "zero_init": False, "transition_impl": impl,
      "transition_tiling": "block_rows=16,block_hidden=16", "transition_backward": backward})
  config = ml_collections.ConfigDict({"num_intermediate_factor": factor})
  return primitives.Transition(config, global_config)


def test_module_has_the_same_parameters_and_values_with_the_kernel():
  act = jnp.asarray(np.random.default_rng(4).normal(size=(3, 20, 16)), jnp.float32)
  params = _module("xla").init(jax.random.PRNGKey(0), act)
  kernel_params = _module("pallas").init(jax.random.PRNGKey(0), act)
  assert jax.tree.structure(params) == jax.tree.structure(kernel_params)
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(kernel_params)):
    np.testing.assert_array_equal(a, b)
  np.testing.assert_allclose(_module("pallas").apply(params, act),
                             _module("xla").apply(params, act), rtol=1e-5, atol=1e-5)


def test_module_in_chunks_runs_xla_chunks(monkeypatch):
  """A transition given chunks keeps XLA's chunked layers (the kernel's backward pass would
  write the hidden layer of every row at once)."""
  calls = []
  monkeypatch.setattr(pallas_transition, "transition",
                      lambda *a, **k: calls.append(1) or _reference(*a[:7]))
  act = jnp.asarray(np.random.default_rng(5).normal(size=(8, 4, 16)), jnp.float32)
  module = _module("pallas")
  chunked = primitives.Transition(module.config, module.global_config, chunk_size=2)
  params = chunked.init(jax.random.PRNGKey(0), act)
  np.testing.assert_allclose(chunked.apply(params, act), _module("xla").apply(params, act),
                             rtol=1e-5, atol=1e-5)
  assert not calls
  module.apply(params, act)
  assert calls


def test_transition_path():
  gc = lambda impl: ml_collections.ConfigDict({"transition_impl": impl})  # noqa: E731
  act16 = jnp.zeros((4, 32), jnp.bfloat16)
  assert primitives.transition_path(gc("xla"), act16, jnp.bfloat16, 128) == "xla"
  # 'auto' takes the kernel only on a GPU (this test runs on the CPU).
  expected_auto = "pallas" if jax.default_backend() == "gpu" else "xla"
  assert primitives.transition_path(gc("auto"), act16, jnp.bfloat16, 128) == expected_auto
  assert primitives.transition_path(gc("auto"), act16.astype(jnp.float32), jnp.float32,
                                    128) == "xla"
  assert primitives.transition_path(gc("pallas"), act16, jnp.bfloat16, 128) == "pallas"
  # Widths Triton's tiles cannot take fall back to XLA.
  assert primitives.transition_path(gc("pallas"), jnp.zeros((4, 24)), jnp.float32, 96) == "xla"
  with pytest.raises(ValueError, match="transition_impl='triton'"):
    primitives.transition_path(gc("triton"), act16, jnp.bfloat16, 128)


def test_tiling_from_text_and_checks():
  tiling = pallas_transition.tiling_from_text("block_rows=128, warps=8")
  assert (tiling.block_rows, tiling.warps) == (128, 8)
  assert tiling.block_hidden == pallas_transition.DEFAULT_TILING.block_hidden
  assert pallas_transition.tiling_from_text("") == pallas_transition.DEFAULT_TILING
  with pytest.raises(ValueError, match="rows=2"):
    pallas_transition.tiling_from_text("rows=2")
  with pytest.raises(ValueError, match="not a positive integer"):
    pallas_transition.tiling_from_text("warps=0")
  assert "power of two" in pallas_transition.unsupported_reason(48, 192)
  assert pallas_transition.unsupported_reason(64, 256) is None
  with pytest.raises(ValueError, match="48 -> 192"):
    pallas_transition.transition(*_inputs((4,), 48, 192, jnp.float32), _EPS, interpret=True)


@pytest.mark.parametrize("shape,channels,hidden", _CASES)
def test_backward_kernel_gives_the_xla_layers_gradients_in_float32(shape, channels, hidden):
  """`backward='pallas'`: the same gradients as JAX's differentiation of the layers, to
  float32 rounding (rows padded inside for the 35-row case)."""
  args = _inputs(shape, channels, hidden, jnp.float32, seed=6)
  cotangent = jnp.asarray(np.random.default_rng(7).normal(size=args[0].shape), jnp.float32)
  kernel = lambda *a: pallas_transition.transition(  # noqa: E731
      *a, _EPS, tiling=pallas_transition.Tiling(block_rows=32, block_hidden=32),
      interpret=True, backward="pallas")
  loss = lambda fn: lambda *a: jnp.sum(fn(*a) * cotangent)  # noqa: E731
  got = jax.grad(loss(kernel), argnums=tuple(range(7)))(*args)
  want = jax.grad(loss(_reference), argnums=tuple(range(7)))(*args)
  for name, a, b in zip(("x", "scale", "offset", "w1", "b1", "w2", "b2"), got, want):
    assert a.dtype == b.dtype and a.shape == b.shape, name
    np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-5, err_msg=name)


def test_backward_kernel_in_bfloat16_within_rounding():
  args = _inputs((4, 48), 32, 128, jnp.bfloat16, seed=8)
  cotangent = jnp.asarray(np.random.default_rng(9).normal(size=args[0].shape), jnp.float32)
  kernel = lambda *a: pallas_transition.transition(  # noqa: E731
      *a, _EPS, tiling=pallas_transition.Tiling(block_rows=32, block_hidden=32),
      interpret=True, backward="pallas")
  loss = lambda fn: lambda *a: jnp.sum(fn(*a).astype(jnp.float32) * cotangent)  # noqa: E731
  got = jax.grad(loss(kernel), argnums=tuple(range(7)))(*args)
  xla = jax.grad(loss(_reference), argnums=tuple(range(7)))(*args)
  exact = jax.grad(loss(_reference), argnums=tuple(range(7)))(
      *(a.astype(jnp.float32) for a in args))
  for name, a, b, c in zip(("x", "scale", "offset", "w1", "b1", "w2", "b2"), got, xla, exact):
    assert a.dtype == b.dtype, name
    err_kernel = np.abs(np.asarray(a, np.float32) - c).max()
    err_xla = np.abs(np.asarray(b, np.float32) - c).max()
    assert err_kernel <= 2 * err_xla + 2 ** -7 * np.abs(c).max(), name
  with pytest.raises(ValueError, match="backward='triton'"):
    pallas_transition.transition(*args, _EPS, interpret=True, backward="triton")


def test_module_gradients_with_the_backward_kernel():
  act = jnp.asarray(np.random.default_rng(10).normal(size=(3, 20, 16)), jnp.float32)
  params = _module("xla").init(jax.random.PRNGKey(1), act)
  grads = [jax.grad(lambda p, x, m=m: jnp.sum(jnp.sin(m.apply(p, x))), argnums=(0, 1))(
      params, act) for m in (_module("xla"), _module("pallas", backward="pallas"))]
  for a, b in zip(jax.tree.leaves(grads[1]), jax.tree.leaves(grads[0])):
    np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-5)
