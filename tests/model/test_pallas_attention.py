"""The Pallas attention kernels (run by Pallas's interpreter on the CPU) against XLA."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from af2flax.model import pallas_attention, primitives


def _reference(q, k, v, bias, key_mask):
  """AlphaFold's attention core with the logits materialised (float32 softmax)."""
  logits = jnp.einsum("bqhc,bkhc->bhqk", q, k, preferred_element_type=jnp.float32)
  if bias is not None:
    logits = logits + bias.astype(jnp.float32)[None]
  logits = jnp.where(key_mask[:, None, None, :] != 0, logits, primitives.SOFTMAX_MASK_VALUE)
  probs = jax.nn.softmax(logits, axis=-1)
  return jnp.einsum("bhqk,bkhc->bqhc", probs.astype(v.dtype), v,
                    preferred_element_type=jnp.float32).astype(q.dtype)


def _inputs(dtype, batch=4, q_len=32, k_len=48, heads=2, dim=16, seed=0):
  rng = np.random.default_rng(seed)
  q = jnp.asarray(rng.normal(size=(batch, q_len, heads, dim)) * 0.5, dtype)
  k, v = (jnp.asarray(rng.normal(size=(batch, k_len, heads, dim)), dtype) for _ in range(2))
  bias = jnp.asarray(rng.normal(size=(heads, q_len, k_len)), dtype)
  # Keys masked anywhere in a row (not only padding at the end); the last row has none valid.
  key_mask = (rng.random((batch, k_len)) > 0.3).astype(np.int32)
  key_mask[-1] = 0
  return q, k, v, bias, jnp.asarray(key_mask)


def _values_and_grads(attention, q, k, v, bias, key_mask):
  cotangent = jax.random.normal(jax.random.PRNGKey(1), q.shape, jnp.float32)
  argnums = (0, 1, 2, 3) if bias is not None else (0, 1, 2)

  def loss(q, k, v, bias):
    out = attention(q, k, v, bias, key_mask)
    return jnp.sum(out.astype(jnp.float32) * cotangent), out

  (_, out), grads = jax.value_and_grad(loss, argnums=argnums, has_aux=True)(q, k, v, bias)
  return out, grads


def _interpreted(tiling=pallas_attention.DEFAULT_TILING):
  return lambda q, k, v, bias, key_mask: pallas_attention.attention(
      q, k, v, bias, key_mask, interpret=True, tiling=tiling)


def _assert_close(actual, expected, tol, name):
  actual, expected = np.asarray(actual, np.float32), np.asarray(expected, np.float32)
  scale = max(float(np.max(np.abs(expected))), 1e-6)
  np.testing.assert_allclose(actual / scale, expected / scale, atol=tol, err_msg=name)


def _assert_matches(results, expected_results, tol, label=""):
  """Output and gradients (q, k, v and the bias when there is one) of `_values_and_grads`
  against the expected ones: the same shapes and dtypes, close to `tol` of the largest."""
  (out, grads), (expected_out, expected_grads) = results, expected_results
  assert out.shape == expected_out.shape and out.dtype == expected_out.dtype, label
  _assert_close(out, expected_out, tol, f"out {label}")
  assert len(grads) == len(expected_grads), label
  for name, grad, expected in zip("qkvb", grads, expected_grads):
    assert grad.shape == expected.shape and grad.dtype == expected.dtype, f"{name} {label}"
    _assert_close(grad, expected, tol, f"{name} {label}")


@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 1e-5), (jnp.bfloat16, 2e-2)])
def test_values_and_gradients_match_xla(with_bias, dtype, tol):
  """Output and the gradients of q, k, v and the shared bias equal differentiating the
  materialised attention: masked keys inside rows, a row with no valid key (uniform
  attention, AlphaFold's -1e9), a key length (48) that is not a power of two."""
  q, k, v, bias, key_mask = _inputs(dtype)
  bias = bias if with_bias else None
  results = _values_and_grads(_interpreted(), q, k, v, bias, key_mask)
  assert results[0].dtype == dtype
  _assert_matches(results, _values_and_grads(_reference, q, k, v, bias, key_mask), tol)


def test_default_tiling_walks_queries_in_blocks_of_128():
  """The presets' tiling: the backward pass walks 256 queries as two blocks of 128
  (`Tiling.lg_block_q`) and gives the materialised attention's gradients, bias included."""
  assert pallas_attention.DEFAULT_TILING.lg_block_q == 128
  q, k, v, bias, key_mask = _inputs(jnp.float32, batch=2, q_len=256, k_len=32, heads=1,
                                    seed=13)
  _assert_matches(_values_and_grads(_interpreted(), q, k, v, bias, key_mask),
                  _values_and_grads(_reference, q, k, v, bias, key_mask), 1e-5)


# Slow (CI skips it): tilings and the 'grouped' backward, which no preset uses; run with
# `-m slow`.
@pytest.mark.slow
def test_tilings_give_the_same_results():
  """Other block sizes, several row groups per bias gradient (partials summed) or one (the
  'grouped' backward), one program per key block of 32 or per 16 keys."""
  q, k, v, bias, key_mask = _inputs(jnp.float32, batch=8, q_len=32, k_len=32)
  expected = _values_and_grads(_reference, q, k, v, bias, key_mask)
  for change in ({"forward_block_q": 16, "forward_block_k": 16, "query_block_k": 16},
                 {"kv_block_k": 16, "kv_target_programs": 1, "kv_block_q": 16,
                  "backward": "grouped"},
                 {"kv_target_programs": 10 ** 6, "query_block_q": 16, "backward": "grouped"},
                 {"lg_block_q": 32, "lg_block_k": 32}):
    tiling = dataclasses.replace(pallas_attention.DEFAULT_TILING, **change)
    _assert_matches(_values_and_grads(_interpreted(tiling), q, k, v, bias, key_mask),
                    expected, 1e-5, str(change))


# The 'grouped' backward (no preset uses it) is slow (CI skips it; run with `-m slow`).
@pytest.mark.parametrize("backward", [
    pytest.param(b, marks=pytest.mark.slow) if b == "grouped" else b
    for b in pallas_attention.BACKWARDS])
@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 1e-5),
                                       pytest.param(jnp.bfloat16, 2e-2, marks=pytest.mark.slow)])
def test_each_backward_matches_xla(backward, with_bias, dtype, tol):
  """Each backward pass: 'grouped' (bias gradient summed in registers), and those that write
  the logits' gradient [B, H, Q, K] (XLA sums it over the rows for the bias; dQ from our
  query kernel or from XLA's product of it with k) give the materialised attention's
  gradients, with 48 queries walked in three blocks of 16 and two blocks of 16 keys."""
  q, k, v, bias, key_mask = _inputs(dtype, batch=3, q_len=48, k_len=32, seed=7)
  bias = bias if with_bias else None
  tiling = dataclasses.replace(pallas_attention.DEFAULT_TILING, backward=backward,
                               lg_block_q=16, lg_block_k=16, kv_block_q=16, kv_block_k=16)
  _assert_matches(_values_and_grads(_interpreted(tiling), q, k, v, bias, key_mask),
                  _values_and_grads(_reference, q, k, v, bias, key_mask), tol)


@pytest.mark.parametrize("backward", [pytest.param("logit_grads", marks=pytest.mark.slow),
                                      "logit_grads_xla_dq"])
def test_logit_gradients_in_chunks_of_rows(backward):
  """With `lg_max_chunk_bytes` under one row group's dS, the rows run in chunks (a scan):
  the same gradients as all rows at once, and as the materialised attention."""
  q, k, v, bias, key_mask = _inputs(jnp.float32, batch=6, q_len=32, k_len=16, seed=9)
  row_bytes = 2 * 32 * 16 * 4          # heads x Q x K float32
  rows_per_chunk = pallas_attention._rows_per_chunk  # pylint: disable=protected-access
  assert rows_per_chunk(6, row_bytes, 2 * row_bytes + 1) == 2
  assert rows_per_chunk(6, row_bytes, 0) == 6
  assert rows_per_chunk(6, row_bytes, 1) == 1
  results = []
  for max_bytes in (0, 2 * row_bytes + 1):
    tiling = dataclasses.replace(pallas_attention.DEFAULT_TILING, backward=backward,
                                 lg_max_chunk_bytes=max_bytes)
    attention = jax.jit(_interpreted(tiling))
    results.append(_values_and_grads(attention, q, k, v, bias, key_mask))
  _, expected_grads = _values_and_grads(_reference, q, k, v, bias, key_mask)
  for name, whole, chunked, expected in zip("qkvb", results[0][1], results[1][1],
                                            expected_grads):
    _assert_close(chunked, whole, 1e-6, name)
    _assert_close(chunked, expected, 1e-5, name)


# Slow (CI skips it): `pad_lengths`, which no preset uses; run with `-m slow`.
@pytest.mark.slow
@pytest.mark.parametrize("with_bias", [True, False])
def test_padded_lengths_match_xla(with_bias):
  """`pad_lengths`: 36 queries and 20 keys (not multiples of 16) run padded to 48 and 32, with
  the default backward pass (dQ from XLA with a bias, from the query kernel without) and the
  'grouped' one: the unpadded attention's values and gradients, in the inputs' shapes, the
  row whose keys are all masked included (uniform over its 20 real keys, not the 32)."""
  q, k, v, bias, key_mask = _inputs(jnp.float32, batch=3, q_len=36, k_len=20, seed=11)
  bias = bias if with_bias else None
  expected = _values_and_grads(_reference, q, k, v, bias, key_mask)
  for backward in ("logit_grads_xla_dq", "grouped"):
    tiling = dataclasses.replace(pallas_attention.DEFAULT_TILING, backward=backward,
                                 kv_block_q=16)
    attention = functools.partial(pallas_attention.attention, interpret=True, tiling=tiling,
                                  pad_lengths=True)
    results = _values_and_grads(attention, q, k, v, bias, key_mask)
    assert results[0].shape == q.shape
    _assert_matches(results, expected, 1e-5, backward)


def test_unknown_backward_is_named():
  q, k, v, bias, key_mask = _inputs(jnp.float32, batch=2, q_len=16, k_len=16)
  tiling = dataclasses.replace(pallas_attention.DEFAULT_TILING, backward="atomics")
  with pytest.raises(ValueError, match="Tiling.backward='atomics'"):
    _values_and_grads(_interpreted(tiling), q, k, v, bias, key_mask)


def test_query_length_in_several_blocks():
  """48 queries (not a power of two, as fine-tuning's 384): the 'grouped' key/value/bias
  kernel walks them in three blocks of 16, accumulating dK, dV and three bias-gradient
  tiles."""
  q, k, v, bias, key_mask = _inputs(jnp.float32, batch=3, q_len=48, k_len=32, seed=5)
  tiling = dataclasses.replace(pallas_attention.DEFAULT_TILING, backward="grouped")
  _assert_matches(_values_and_grads(_interpreted(tiling), q, k, v, bias, key_mask),
                  _values_and_grads(_reference, q, k, v, bias, key_mask), 1e-5)


@pytest.mark.parametrize("dim", [8, 24])
def test_head_dims_are_padded_exactly(dim):
  """A head dim that Triton's products cannot take (the extra MSA's 8; 24) runs padded with
  zero channels to 16 / 32: the same values and gradients, in q's own shape."""
  assert pallas_attention.padded_head_dim(dim) == {8: 16, 24: 32}[dim]
  q, k, v, bias, key_mask = _inputs(jnp.float32, batch=3, q_len=16, k_len=32, dim=dim, seed=3)
  results = _values_and_grads(_interpreted(), q, k, v, bias, key_mask)
  assert results[0].shape == q.shape
  _assert_matches(results, _values_and_grads(_reference, q, k, v, bias, key_mask), 1e-5)


def test_row_groups():
  """One row per program without a bias; with one, groups until the target is reached."""
  row_groups = pallas_attention._row_groups  # pylint: disable=protected-access
  assert row_groups(256, 4, 8, False, 512) == 256
  assert row_groups(256, 4, 8, True, 512) == 16
  assert row_groups(6, 4, 8, True, 512) == 2


def test_unsupported_shapes_are_named():
  """Shapes the kernels cannot take get a reason; `attention` raises it, naming the shapes."""
  assert pallas_attention.unsupported_reason((4, 256, 4, 32), (4, 256, 4, 32)) is None
  assert pallas_attention.unsupported_reason((4, 256, 8, 8), (4, 256, 8, 8)) is None  # padded
  assert "head dim 256" in pallas_attention.unsupported_reason((4, 64, 2, 256), (4, 64, 2, 256))
  assert "multiple of 16" in pallas_attention.unsupported_reason((4, 24, 4, 32), (4, 24, 4, 32))
  crop_384 = (4, 384, 4, 32)
  assert "at most 256 queries" in pallas_attention.unsupported_reason(crop_384, crop_384)
  assert pallas_attention.unsupported_reason(crop_384, crop_384, differentiable=False) is None
  assert pallas_attention.unsupported_reason(crop_384, crop_384, max_queries=384) is None
  many_blocks = (4, 400, 4, 32)   # 25 blocks of 16 queries: only the 'grouped' backward
  grouped = dataclasses.replace(pallas_attention.DEFAULT_TILING, backward="grouped")
  assert "blocks" in pallas_attention.unsupported_reason(many_blocks, many_blocks,
                                                         max_queries=512, tiling=grouped)
  assert pallas_attention.unsupported_reason(many_blocks, many_blocks, max_queries=512) is None
  # Lengths that are not multiples of 16 run padded with `pad_lengths` (132 -> 144).
  msa_column = (256, 132, 8, 32)
  assert "multiple of 16" in pallas_attention.unsupported_reason(msa_column, msa_column)
  assert pallas_attention.unsupported_reason(msa_column, msa_column, pad_lengths=True) is None
  assert pallas_attention.padded_length(132) == 144
  assert pallas_attention.padded_length(144) == 144
  assert pallas_attention.unsupported_reason((4, 250, 4, 32), (4, 250, 4, 32),
                                            pad_lengths=True) is None   # 256 queries
  assert "at most 256 queries, not 272" in pallas_attention.unsupported_reason(
      (4, 260, 4, 32), (4, 260, 4, 32), pad_lengths=True)

  q = jnp.zeros((2, 24, 2, 16))
  with pytest.raises(ValueError, match=r"q \(2, 24, 2, 16\)"):
    pallas_attention.attention(q, q, q, None, jnp.ones((2, 24)), interpret=True)
  assert pallas_attention.MASK_VALUE == primitives.SOFTMAX_MASK_VALUE


def _module_inputs(seed, channels, heads):
  """An attention module's input [3, 16, channels], a bias [heads, 16, 16] and a key mask
  [3, 1, 1, 16] padded at the end of each row (16, 11 and 5 valid keys)."""
  rng = np.random.default_rng(seed)
  rows, length = 3, 16
  q_data = jnp.asarray(rng.normal(size=(rows, length, channels)), jnp.float32)
  bias = jnp.asarray(rng.normal(size=(heads, length, length)), jnp.float32)
  mask = (np.arange(length)[None] < np.array([16, 11, 5])[:, None]).astype(np.float32)
  return q_data, bias, jnp.asarray(mask[:, None, None, :])


def test_attention_module_with_pallas_matches_xla():
  """`Attention(impl='pallas')` (projections, gating, bias, key mask) has the XLA module's
  values and gradients; a query/key mask it cannot take, or a head dim over 128, falls back."""
  rows, length, channels = 3, 16, 32
  q_data, bias, mask = _module_inputs(2, channels, heads=2)
  results = {}
  for impl in ("xla", "pallas"):
    module = primitives.Attention(num_head=2, output_dim=channels, impl=impl, zero_init=False,
                                  fuse_projections=True)
    params = module.init(jax.random.PRNGKey(0), q_data, q_data, mask, bias)

    def loss(params, q_data, bias, module=module):
      out = module.apply(params, q_data, q_data, mask, bias)
      return jnp.sum(jnp.square(out)), out

    results[impl] = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(
        params, q_data, bias)
  (_, out), grads = results["pallas"]
  (_, expected_out), expected_grads = results["xla"]
  _assert_close(out, expected_out, 1e-5, "out")
  for grad, expected in zip(jax.tree.leaves(grads), jax.tree.leaves(expected_grads)):
    _assert_close(grad, expected, 1e-5, "grad")
  q = jnp.zeros((rows, length, 2, 16))
  assert primitives.attention_path("pallas", q, q, mask, True) == "pallas"
  full_mask = jnp.ones((rows, 1, length, length))
  assert primitives.attention_path("pallas", q, q, full_mask, True) == "xla"  # on the CPU
  small_heads = jnp.zeros((rows, length, 8, 4))   # padded to 16 channels
  assert primitives.attention_path("pallas", small_heads, small_heads, mask, True) == "pallas"
  large_heads = jnp.zeros((rows, length, 1, 256))
  assert primitives.attention_path("pallas", large_heads, large_heads, mask, True) == "xla"
  # 'auto' (the presets) takes our kernels only on a GPU with 16-bit activations.
  q16 = q.astype(jnp.bfloat16)
  on_gpu = jax.default_backend() == "gpu"
  assert primitives.attention_path("auto", q16, q16, mask, True) == ("pallas" if on_gpu else "xla")
  assert primitives.attention_path("auto", q, q, mask, True) == "xla"  # float32
  crop_384 = jnp.zeros((rows, 384, 2, 16), jnp.bfloat16)  # fine-tuning: cuDNN on a GPU
  assert primitives.attention_path("auto", crop_384, crop_384, mask, True) == (
      "fused" if on_gpu else "xla")
  assert primitives.attention_path("auto", crop_384, crop_384, mask, True, 384) == (
      "pallas" if on_gpu else "xla")
  assert primitives.attention_path("pallas", crop_384, crop_384, mask, True, 384) == "pallas"


@pytest.mark.parametrize("backward", [pytest.param("grouped", marks=pytest.mark.slow),
                                      "logit_grads_xla_dq"])
@pytest.mark.parametrize("with_bias", [True, pytest.param(False, marks=pytest.mark.slow)])
@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 0.0), (jnp.bfloat16, 1e-2)])
def test_fused_self_attention_reads_the_projection_in_place(with_bias, dtype, tol, backward):
  """q, k, v read from the fused projection [B, N, 4H, d] (q scaled on loading) give the
  sliced path's values (exactly: the scale is rounded as XLA rounds it) and gradients; the
  gate's group gets a zero gradient; the dQ differs in bf16 only by where it is rounded.
  With `logit_grads_xla_dq` (in chunks of one row), XLA's dQ takes k from the projection's
  second group."""
  rng = np.random.default_rng(5)
  batch, length, heads, dim = 3, 32, 2, 32
  projection = jnp.asarray(rng.normal(size=(batch, length, 4 * heads, dim)), dtype)
  bias = jnp.asarray(rng.normal(size=(heads, length, length)), dtype) if with_bias else None
  key_mask = (np.arange(length)[None] < np.array([32, 27, 16])[:, None]).astype(np.int32)
  scale = dim ** -0.5
  cotangent = jax.random.normal(jax.random.PRNGKey(3), (batch, length, heads, dim))
  # The default backward in chunks of one row (the fused projection scanned once).
  tiling = dataclasses.replace(pallas_attention.DEFAULT_TILING, backward=backward,
                               lg_max_chunk_bytes=1)

  def sliced(projection, bias):
    q, k, v, _ = jnp.split(projection, 4, axis=2)
    return pallas_attention.attention(q * scale, k, v, bias, key_mask, interpret=True,
                                      tiling=tiling)

  def fused(projection, bias):
    out, gate = pallas_attention.fused_self_attention(projection, heads, scale, bias, key_mask,
                                                      interpret=True, tiling=tiling)
    np.testing.assert_array_equal(gate.shape, (batch, length, heads, dim))
    return out

  results = {}
  for name, function in (("sliced", sliced), ("fused", fused)):
    def loss(projection, bias, function=function):
      out = function(projection, bias)
      return jnp.sum(out.astype(jnp.float32) * cotangent), out
    argnums = (0, 1) if with_bias else (0,)
    results[name] = jax.jit(jax.value_and_grad(loss, argnums=argnums, has_aux=True))(
        projection, bias)
  (_, out), grads = results["fused"]
  (_, expected_out), expected_grads = results["sliced"]
  np.testing.assert_array_equal(np.asarray(out, np.float32),
                                np.asarray(expected_out, np.float32))
  for grad, expected, name in zip(grads, expected_grads, ("projection", "bias")):
    _assert_close(grad, expected, tol, name)
  np.testing.assert_array_equal(np.asarray(grads[0][:, :, 3 * heads:], np.float32), 0.0)


def test_fused_projection_shapes_it_cannot_take_are_named():
  """Too few head groups, or a head dim that needs padding, are named; the module then takes
  the sliced path."""
  assert pallas_attention.fused_projection_reason((2, 32, 8, 32), 2) is None
  assert "whole groups" in pallas_attention.fused_projection_reason((2, 32, 5, 32), 2)
  assert "padding" in pallas_attention.fused_projection_reason((2, 32, 8, 8), 2)
  assert "multiple" in pallas_attention.fused_projection_reason((2, 24, 8, 32), 2)
  with pytest.raises(ValueError, match="fused projection"):
    pallas_attention.fused_self_attention(jnp.zeros((2, 32, 8, 8)), 2, 1.0, None,
                                          jnp.ones((2, 32)), interpret=True)


# Slow (CI skips it): `pallas_reads_projection`, which no preset uses; run with `-m slow`.
@pytest.mark.slow
def test_attention_module_reading_the_projection_matches_the_sliced_path(monkeypatch):
  """`Attention(pallas_reads_projection=True)`: the same parameters, values and gradients as
  slicing the fused projection (float32, Pallas interpreted); off (the default) or where our
  kernels do not run ('xla'), the module does not read the projection in place."""
  channels = 64
  q_data, bias, mask = _module_inputs(6, channels, heads=4)
  calls = []
  real = pallas_attention.fused_self_attention

  def counting(*args, **kwargs):
    calls.append(args[0].shape)
    return real(*args, **kwargs)

  monkeypatch.setattr(pallas_attention, "fused_self_attention", counting)

  def run(impl, reads):
    calls.clear()
    module = primitives.Attention(num_head=4, output_dim=channels, impl=impl,
                                  zero_init=False, fuse_projections=True,
                                  pallas_reads_projection=reads)
    params = module.init(jax.random.PRNGKey(0), q_data, q_data, mask, bias)

    def loss(params, q_data, bias):
      out = module.apply(params, q_data, q_data, mask, bias)
      return jnp.sum(jnp.square(out)), out

    result = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(
        params, q_data, bias)
    return result, bool(calls)

  ((_, expected_out), expected_grads), read = run("pallas", False)
  assert not read
  ((_, out), grads), read = run("pallas", True)
  assert read
  _assert_close(out, expected_out, 1e-6, "out")
  assert jax.tree.structure(grads) == jax.tree.structure(expected_grads)
  for grad, expected in zip(jax.tree.leaves(grads), jax.tree.leaves(expected_grads)):
    _assert_close(grad, expected, 1e-5, "grad")
  assert not run("xla", True)[1]


def test_pallas_max_queries_setting():
  """0 or unset: the measured 256; a value under one block is refused, naming the key."""
  config = ml_collections.ConfigDict({"pallas_attention_max_queries": 0})
  assert primitives.pallas_max_queries(config) == pallas_attention.BACKWARD_MAX_QUERIES == 256
  assert primitives.pallas_max_queries(ml_collections.ConfigDict()) == 256
  config.pallas_attention_max_queries = 384
  assert primitives.pallas_max_queries(config) == 384
  config.pallas_attention_max_queries = 8
  with pytest.raises(ValueError, match="pallas_attention_max_queries=8"):
    primitives.pallas_max_queries(config)


# The row attention and the starting node (slow marker) share their code with the extra MSA's
# row attention and the ending node, which CI runs.
@pytest.mark.parametrize("module_name,reads_projection", [
    pytest.param("msa_row_attention_with_pair_bias", False, marks=pytest.mark.slow),
    ("msa_column_attention", False),
    pytest.param("triangle_attention_starting_node", False, marks=pytest.mark.slow),
    ("triangle_attention_ending_node", False),
    ("extra_msa_row_attention", False),
    pytest.param("msa_row_attention_with_pair_bias", True, marks=pytest.mark.slow),
    ("triangle_attention_ending_node", True)])
def test_evoformer_attentions_with_pallas_match_xla(module_name, reads_projection,
                                                    monkeypatch):
  """model_1's attention modules (its head sizes: 8 x 32, 4 x 32, and the extra MSA's 8 x 8,
  padded to 16) at 16 residues and 16 sequences, padded at the end: our kernels give the XLA
  path's values and gradients in float32, the MSA transposes and the ending node's
  per-column orientation included. `extra_msa_attention_impl` overrides the extra MSA's.
  With `pallas_reads_projection` the kernels read q, k, v from the fused projection."""
  from af2flax.model import evoformer, triangle  # pylint: disable=g-import-not-at-top
  from af2flax.model.config import model_config  # pylint: disable=g-import-not-at-top
  config = model_config("model_1")
  is_extra = module_name == "extra_msa_row_attention"
  module_config = config.embeddings_and_evoformer.evoformer[
      "msa_row_attention_with_pair_bias" if is_extra else module_name]
  rng = np.random.default_rng(7)
  num_seq = num_res = 16
  msa = jnp.asarray(rng.normal(size=(num_seq, num_res, 64 if is_extra else 256)), jnp.float32)
  pair = jnp.asarray(rng.normal(size=(num_res, num_res, 128)), jnp.float32)
  msa_mask = jnp.asarray(np.ones((num_seq, num_res)) * (np.arange(num_res) < 13), jnp.float32)
  msa_mask = msa_mask * (np.arange(num_seq) < 11)[:, None]
  pair_mask = msa_mask[0][:, None] * msa_mask[0][None, :]
  cls, inputs = {
      "msa_row_attention_with_pair_bias": (evoformer.MSARowAttentionWithPairBias,
                                           (msa, msa_mask, pair)),
      "msa_column_attention": (evoformer.MSAColumnAttention, (msa, msa_mask)),
      "triangle_attention_starting_node": (triangle.TriangleAttention, (pair, pair_mask)),
      "triangle_attention_ending_node": (triangle.TriangleAttention, (pair, pair_mask)),
      "extra_msa_row_attention": (
          functools.partial(evoformer.MSARowAttentionWithPairBias, is_extra_msa=True),
          (msa, msa_mask, pair)),
  }[module_name]
  calls = []
  for name in ("attention", "fused_self_attention"):
    def counted(*args, kernel=getattr(pallas_attention, name), name=name, **kwargs):
      calls.append((name, args[0].shape))
      return kernel(*args, **kwargs)
    monkeypatch.setattr(pallas_attention, name, counted)
  results = {}
  for impl in ("xla", "pallas"):
    gc = ml_collections.ConfigDict({**config.global_config.to_dict(), "dtype": "float32",
                                    "zero_init": False, "attention_impl": impl,
                                    "pallas_reads_projection": reads_projection})
    module = cls(module_config, gc)
    params = module.init(jax.random.PRNGKey(0), *inputs)

    def loss(params, act, module=module):
      out = module.apply(params, act, *inputs[1:])
      return jnp.sum(jnp.square(out)), out

    results[impl] = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(params, inputs[0])
  head_dim = 8 if is_extra else 32
  assert calls and all(shape[1] == 16 and shape[-1] == head_dim for _, shape in calls), calls
  assert {name for name, _ in calls} == {
      "fused_self_attention" if reads_projection else "attention"}
  if is_extra:   # the per-module override sends the extra MSA to XLA
    calls.clear()
    gc.extra_msa_attention_impl = "xla"
    jax.eval_shape(cls(module_config, gc).init, jax.random.PRNGKey(0), *inputs)
    assert not calls
  (_, out), grads = results["pallas"]
  (_, expected_out), expected_grads = results["xla"]
  _assert_close(out, expected_out, 1e-5, "out")
  flat = np.concatenate([np.ravel(g) for g in jax.tree.leaves(grads)])
  expected_flat = np.concatenate([np.ravel(g) for g in jax.tree.leaves(expected_grads)])
  assert np.linalg.norm(flat - expected_flat) < 1e-5 * np.linalg.norm(expected_flat)


# Slow (CI skips it): `pallas_pad_lengths`, which no preset uses; run with `-m slow`.
@pytest.mark.slow
def test_msa_column_attention_with_padded_lengths_matches_xla(monkeypatch):
  """`global_config.pallas_pad_lengths`: the MSA column attention over 20 sequences (as 132 =
  128 + 4 template rows in training: not a multiple of 16) runs our kernels, padded, and
  gives the XLA path's values and gradients in float32; without it the module takes XLA."""
  from af2flax.model import evoformer  # pylint: disable=g-import-not-at-top
  from af2flax.model.config import model_config  # pylint: disable=g-import-not-at-top
  config = model_config("model_1")
  module_config = config.embeddings_and_evoformer.evoformer["msa_column_attention"]
  rng = np.random.default_rng(8)
  num_seq, num_res = 20, 16
  msa = jnp.asarray(rng.normal(size=(num_seq, num_res, 256)), jnp.float32)
  msa_mask = np.ones((num_seq, num_res), np.float32) * (np.arange(num_seq) < 17)[:, None]
  msa_mask[:, 14:] = 0.0      # two padding residues: columns whose keys are all masked
  msa_mask = jnp.asarray(msa_mask)
  calls = []

  def counted(*args, kernel=pallas_attention.attention, **kwargs):
    calls.append((args[0].shape, kwargs.get("pad_lengths")))
    return kernel(*args, **kwargs)

  monkeypatch.setattr(pallas_attention, "attention", counted)
  results = {}
  for impl, pad in (("xla", False), ("pallas", False), ("pallas", True)):
    gc = ml_collections.ConfigDict({**config.global_config.to_dict(), "dtype": "float32",
                                    "zero_init": False, "attention_impl": impl,
                                    "pallas_pad_lengths": pad})
    module = evoformer.MSAColumnAttention(module_config, gc)
    params = module.init(jax.random.PRNGKey(0), msa, msa_mask)

    def loss(params, act, module=module):
      out = module.apply(params, act, msa_mask)
      return jnp.sum(jnp.square(out)), out

    calls.clear()
    results[(impl, pad)] = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(params, msa)
    assert bool(calls) == pad, (impl, pad, calls)
  assert all(shape[1] == num_seq and pad for shape, pad in calls), calls
  (_, out), grads = results[("pallas", True)]
  (_, expected_out), expected_grads = results[("xla", False)]
  _assert_close(out, expected_out, 1e-5, "out")
  for grad, expected in zip(jax.tree_util.tree_leaves(grads),
                            jax.tree_util.tree_leaves(expected_grads)):
    _assert_close(grad, expected, 1e-5, "grad")


def test_tiling_from_text():
  """`global_config.pallas_tiling` sets Tiling fields over the defaults and names what it
  cannot take."""
  base = pallas_attention.DEFAULT_TILING
  assert pallas_attention.tiling_from_text("") is base
  tiling = pallas_attention.tiling_from_text(" forward_stages=2, lg_block_q=64 ")
  assert tiling == dataclasses.replace(base, forward_stages=2, lg_block_q=64)
  for text, named in [("forward_stage=2", "forward_stage"), ("forward_stages", "forward_stages"),
                      ("lg_warps=0", "lg_warps"), ("kv_warps=x", "kv_warps"),
                      ("backward=grouped", "backward")]:
    with pytest.raises(ValueError, match=named):
      pallas_attention.tiling_from_text(text)
  gc = ml_collections.ConfigDict({"pallas_tiling": "query_stages=1"})
  assert primitives.attention_settings(gc)["pallas_tiling"] == "query_stages=1"
  gc.pallas_tiling = "query_stage=1"
  with pytest.raises(ValueError, match="query_stage"):
    primitives.attention_settings(gc)


def test_kernels_batch_under_vmap():
  """Under `jax.vmap` over examples (the train step's `vmap_batch_size` > 1) every input
  carries the example axis, the bias included; pallas_call's batching rule adds a grid axis.
  Values and gradients equal each example's own."""
  examples = [_inputs(jnp.float32, batch=2, seed=seed) for seed in (0, 1)]
  stacked = [jnp.stack(parts) for parts in zip(*examples)]
  out, grads = jax.vmap(
      lambda *args: _values_and_grads(_interpreted(), *args))(*stacked)
  for index, example in enumerate(examples):
    expected = _values_and_grads(_reference, *example)
    _assert_matches((out[index], [g[index] for g in grads]), expected, 1e-5, f"example {index}")
