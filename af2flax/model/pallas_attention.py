"""Softmax attention with a bias shared over the batch, as Pallas kernels for the GPU.

Jumper et al. (2021) Suppl. Alg. 7 / 8 / 13 / 14: the attention core of the MSA row and
column attentions and the triangle attentions, `softmax(q k^T + bias, masked keys) v`, where
the pair bias [H, Q, K] is shared by every row of the batch (every MSA row, every row of the
pair representation). Its gradient is the sum over the batch of the logits' gradients.

Kernels (Pallas on the Triton backend), flash-attention style (no float32 [B, H, Q, K]
logits or probabilities in memory):
- forward: one program per (row, head, block of queries) walks the keys with an online
  softmax and writes the output and each query's logit maximum and exponential sum;
- key/value gradient (`Tiling.backward`, default 'logit_grads_xla_dq'): one program per
  (row, head, block of keys) walks the row's queries in blocks, recomputes the probabilities
  from those two statistics, accumulates dK and dV and, with a bias, writes the logits'
  gradient dS [B, H, Q, K] in q's dtype; XLA sums dS over the rows (the bias gradient) and
  multiplies it with k (dQ). 'grouped' instead sums the bias gradient of a group of rows in
  registers (one program per head, block of keys and group of rows; at most
  `BACKWARD_MAX_QUERIES` queries): no dS in memory, but 1.7x slower at crop 256;
- query gradient (without a bias, or with `Tiling.backward` other than the default): one
  program per (row, head, block of queries) walks the keys again.

Masking is AlphaFold's: a masked key's logit is replaced by -1e9 (a row with no valid key
attends uniformly to all), any key mask [B, K], not only padding. `interpret=True` runs the
same kernels through Pallas's interpreter (the tests on CPU).

`attention` takes q, k and v as separate arrays; `fused_self_attention` reads them in place
from one fused projection [B, N, G*H, d] of the input (and scales q as it loads it), so that
no slice of that projection is copied out first.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

# AlphaFold's logit for a masked key (`primitives.SOFTMAX_MASK_VALUE`; a test pins them equal).
MASK_VALUE = -1e9
# Up to this many queries the presets differentiate through our kernels; longer crops
# (fine-tuning's 384) run cuDNN unless `global_config.pallas_attention_max_queries` says more.
# The 'grouped' key/value/bias kernel keeps the bias gradient of all Q queries x block_k keys
# in float32 registers (256 x 32: 32 per thread of 8 warps), plus one query block's tiles.
BACKWARD_MAX_QUERIES = 256
# The key/value/bias kernel unrolls its loop over query blocks (`Tiling.kv_block_q`).
MAX_QUERY_BLOCKS = 4
# Triton's matrix product takes tiles of at least 16 along every axis.
MIN_BLOCK = 16
# The key-mask value of a padding key that `attention(..., pad_lengths=True)` adds (logit
# -inf: no share of the softmax), beside 0 (masked: AlphaFold's -1e9) and 1 (attends).
ABSENT_KEY = -1
# Head dims are padded with zeros to a power of two >= MIN_BLOCK (the extra MSA's 8 channels
# to 16), up to this many channels.
MAX_HEAD_DIM = 128
_F32 = jnp.float32


@dataclasses.dataclass(frozen=True)
class Tiling:
  """Block sizes (each shrinks to the largest power of two dividing its axis), Triton warps
  and pipeline stages of the three kernels. `bench/pallas_attention.py` times choices."""

  forward_block_q: int = 64
  forward_block_k: int = 64
  forward_warps: int = 4
  # Three software-pipeline stages in the forward and logits'-gradient kernels (two before
  # 2026-12-03's eighth session): interleaved A/B on an H200, forward 4-9% and gradient
  # 3-6% faster at every attention shape of initial training and at fine-tuning's triangle
  # and MSA row shapes; the presets' expected step 0.622 s against 0.636 s
  # (docs/benchmarks.md).
  forward_stages: int = 3
  kv_block_q: int = 256
  kv_block_k: int = 32
  kv_warps: int = 8
  kv_stages: int = 1
  # Programs of the key/value/bias kernel to aim for (an H100 has 132 multiprocessors); more
  # row groups mean more partial bias gradients (float32 [groups, H, Q, K]) for XLA to sum.
  kv_target_programs: int = 512
  query_block_q: int = 64
  query_block_k: int = 64
  query_warps: int = 4
  query_stages: int = 2
  # How the backward pass gets dK, dV and the bias gradient (`BACKWARDS`):
  #   'grouped'      the key/value/bias kernel above: the bias gradient summed over each
  #                  group's rows in registers (kv_* fields);
  #   'logit_grads'  one program per (row, head, block of keys) walks the queries in blocks,
  #                  writes dK, dV and the logits' gradient [B, H, Q, K] (q's dtype), which
  #                  XLA sums over the rows (lg_* fields); dQ from the query kernel;
  #   'logit_grads_xla_dq'  the same, and with a bias (whose gradient needs dS written
  #                  anyway) dQ = dS k as XLA's batched matrix product instead of the query
  #                  kernel; without one, as 'logit_grads' (nothing written).
  # H200, 2026-12-03 (docs/benchmarks.md): 'logit_grads_xla_dq' takes 0.60 ms per triangle
  # attention gradient against 'grouped''s 1.02 ms, and the column attention (no bias) 0.35
  # against 0.79 ms.
  backward: str = "logit_grads_xla_dq"
  # Queries in blocks of 128 (64 before 2026-12-04's fifteenth session): on an H200, each
  # module alone at initial shapes (`bench/module_step.py`, one call), gradient pass 6% faster
  # for the triangle attention (0.682 against 0.726 ms) and the MSA row attention (0.783
  # against 0.834 ms), 11% for the extra MSA's (3.138 against 3.544 ms); the forward pass
  # does not use it (docs/benchmarks.md).
  lg_block_q: int = 128
  lg_block_k: int = 64
  lg_warps: int = 4
  lg_stages: int = 3
  # The logits' gradient is written for at most this many bytes of rows at a time (chunks of
  # rows run one after the other in a scan; 0: all rows at once). At once, the extra MSA's
  # row attention at crop 256 writes 1 GiB, fine-tuning's MSA row attention 1.2 GB; in
  # chunks of 256 MiB (H200, 2026-12-03) the peak fell by only 0.06 GiB (initial shapes) and
  # 0.11 GiB (fine-tuning, our kernels up to 512 queries), and the fine-tuning step took 5%
  # longer: not the default.
  lg_max_chunk_bytes: int = 0


DEFAULT_TILING = Tiling()
BACKWARDS = ("grouped", "logit_grads", "logit_grads_xla_dq")


def tiling_from_text(text: str, base: Tiling = DEFAULT_TILING) -> Tiling:
  """`base` with the integer fields that `text` sets, 'field=value' comma-separated
  (`global_config.pallas_tiling`, e.g. 'forward_stages=2,lg_block_q=64'; "" is `base`).
  Raises ValueError naming an unknown field, a value that is not a positive integer, or
  `backward` (chosen by `global_config.pallas_backward`)."""
  return replace_from_text(text, base, "pallas tiling", excluded=("backward",),
                           zero_allowed=("lg_max_chunk_bytes",))


def replace_from_text(text: str, base, what: str, excluded=(), zero_allowed=()):
  """The dataclass `base` with the integer fields that `text` sets ('field=value',
  comma-separated; "" is `base`), for the kernels' tilings. Raises ValueError (naming `what`)
  for a field not in `base` or in `excluded`, or a value that is not a positive integer (0
  allowed for the fields in `zero_allowed`)."""
  fields = {f.name for f in dataclasses.fields(base) if f.name not in excluded}
  kind = type(base).__name__
  changes = {}
  for item in filter(None, (part.strip() for part in text.split(","))):
    name, sep, value = item.partition("=")
    name = name.strip()
    if not sep or name not in fields:
      raise ValueError(f"{what} {text!r}: {item!r} is not FIELD=VALUE with a field of "
                       f"{kind} ({', '.join(sorted(fields))})")
    try:
      number = int(value)
    except ValueError:
      number = None
    if number is None or number < (0 if name in zero_allowed else 1):
      raise ValueError(f"{what} {text!r}: {name}={value.strip()!r} is not a "
                       "positive integer")
    changes[name] = number
  return dataclasses.replace(base, **changes) if changes else base


@dataclasses.dataclass(frozen=True)
class _Layout:
  """Where the kernels find q, k and v along the head axis of the arrays they are given, and
  the query scale they apply on loading q.

  Separate arrays [B, N, H, d]: offsets 0, scale 1 (q already scaled). One fused projection
  [B, N, G*H, d] (q, k, v, ... in head groups of H; `fused_self_attention`): offsets 0, H, 2H,
  and the scale AlphaFold applies to q after its projection, so that nothing is sliced out
  of the fused array or scaled in memory before the kernels run.
  """
  heads: int
  offsets: tuple[int, int, int] = (0, 0, 0)
  scale: float = 1.0
  # The key mask may hold `ABSENT_KEY` (padding added by `attention`): those logits are -inf.
  absent_keys: bool = False


def _at(head, offset: int):
  """A block index on the head axis: `head` moved by `offset` (no operation when 0, so the
  separate arrays' kernels are those measured before the fused layout existed)."""
  return head + offset if offset else head


def _scaled(q: jax.Array, scale: float) -> jax.Array:
  """q * scale rounded to q's dtype, as XLA computes `q * scale` for a 16-bit q."""
  return q if scale == 1.0 else (q.astype(_F32) * scale).astype(q.dtype)


def block_size(n: int, preferred: int) -> int | None:
  """The largest power of two <= `preferred` dividing `n`, or None if under `MIN_BLOCK`."""
  size = preferred
  while size >= MIN_BLOCK:
    if n % size == 0:
      return size
    size //= 2
  return None


def padded_head_dim(head_dim: int) -> int:
  """The head dim the kernels run at: the next power of two, at least `MIN_BLOCK`.

  Zero channels are exact: they add nothing to q k^T, and the output's padded channels
  (zero) are sliced off, so no gradient reaches them."""
  return max(MIN_BLOCK, 1 << (head_dim - 1).bit_length())


def padded_length(length: int) -> int:
  """The query or key length the kernels run at with `pad_lengths`: the next multiple of
  `MIN_BLOCK`."""
  return -(-length // MIN_BLOCK) * MIN_BLOCK


def unsupported_reason(q_shape: tuple[int, ...], k_shape: tuple[int, ...],
                       differentiable: bool = True,
                       max_queries: int = BACKWARD_MAX_QUERIES,
                       tiling: Tiling = DEFAULT_TILING,
                       pad_lengths: bool = False) -> str | None:
  """Why these shapes cannot run (None when they can).

  q [B, Q, H, d], k [B, K, H, d]. The head dim must be at most `MAX_HEAD_DIM` (it is padded
  to `padded_head_dim`) and Q and K multiples of 16, unless `pad_lengths` (they are padded to
  `padded_length`); the backward pass also needs Q (padded) <= `max_queries`, and the
  'grouped' backward at most `MAX_QUERY_BLOCKS` blocks of `Tiling.kv_block_q`.
  """
  _, q_len, _, head_dim = q_shape
  k_len = k_shape[1]
  if not 1 <= head_dim <= MAX_HEAD_DIM:
    return f"head dim {head_dim} is not between 1 and {MAX_HEAD_DIM}"
  if pad_lengths:
    q_len, k_len = padded_length(q_len), padded_length(k_len)
  if block_size(q_len, 64) is None or block_size(k_len, 64) is None:
    return f"query length {q_len} or key length {k_len} is not a multiple of {MIN_BLOCK}"
  if differentiable:
    if q_len > max_queries:
      return f"the backward pass takes at most {max_queries} queries, not {q_len}"
    if tiling.backward == "grouped":
      return _query_blocks_reason(q_len, tiling.kv_block_q)
  return None


def _query_blocks_reason(q_len: int, preferred_block: int) -> str | None:
  """Why the key/value/bias kernel cannot unroll `q_len` queries in blocks of (up to)
  `preferred_block` (None when it can)."""
  block_q = block_size(q_len, preferred_block)
  if q_len // block_q > MAX_QUERY_BLOCKS:
    return (f"the backward pass takes {q_len} queries in {q_len // block_q} blocks of "
            f"{block_q}, more than {MAX_QUERY_BLOCKS}")
  return None


def _mm(a: jax.Array, b: jax.Array, trans_a: bool = False, trans_b: bool = False) -> jax.Array:
  """a @ b (either transposed) with float32 accumulation, inside a kernel."""
  dims = (((0 if trans_a else 1,), (1 if trans_b else 0,)), ((), ()))
  return jax.lax.dot_general(a, b, dims, preferred_element_type=_F32)


def _key_flags(key_state, absent_keys):
  """(valid, absent) of a key mask's values [k] int32: non-zero attends, 0 is masked (logit
  `MASK_VALUE`); with `absent_keys`, a negative value is a padding key the caller added
  (`ABSENT_KEY`, logit -inf: no share of the softmax, even in a row whose keys are all
  masked, which AlphaFold attends uniformly over its real keys). absent is None without."""
  return key_state != 0, (key_state < 0 if absent_keys else None)


def _logits(q, k, bias, key_valid, key_absent=None):
  """q k^T + bias with masked keys at `MASK_VALUE` (absent ones at -inf), float32 [q, k]."""
  logits = _mm(q, k, trans_b=True)
  if bias is not None:
    logits = logits + bias.astype(_F32)
  logits = jnp.where(key_valid[None, :], logits, MASK_VALUE)
  if key_absent is not None:
    logits = jnp.where(key_absent[None, :], -jnp.inf, logits)
  return logits


def _compiler_params(num_warps: int, num_stages: int):
  return plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages)


def _query_block_specs(q, k, v, bias, key_mask, block_q, layout):
  """Operands and block specs shared by the kernels on the grid (row, head, query block):
  q's block of queries, all of k and v, the bias rows of those queries, the row's key mask.

  Returns (operands, in_specs, query_tile, query_stat): `query_tile` fits [B, Q, H, d]
  outputs and d_out, `query_stat` the [B, H, Q] per-query statistics.
  """
  head_dim, k_len = q.shape[-1], k.shape[1]
  q_at, k_at, v_at = layout.offsets
  query_tile = pl.BlockSpec((None, block_q, None, head_dim), lambda b, h, i: (b, i, h, 0))
  q_tile = pl.BlockSpec((None, block_q, None, head_dim), lambda b, h, i: (b, i, _at(h, q_at), 0))
  k_all = pl.BlockSpec((None, k_len, None, head_dim), lambda b, h, i: (b, 0, _at(h, k_at), 0))
  v_all = pl.BlockSpec((None, k_len, None, head_dim), lambda b, h, i: (b, 0, _at(h, v_at), 0))
  operands, in_specs = [q, k, v], [q_tile, k_all, v_all]
  if bias is not None:
    operands.append(bias)
    in_specs.append(pl.BlockSpec((None, block_q, k_len), lambda b, h, i: (h, i, 0)))
  operands.append(key_mask)
  in_specs.append(pl.BlockSpec((None, k_len), lambda b, h, i: (b, 0)))
  query_stat = pl.BlockSpec((None, None, block_q), lambda b, h, i: (b, h, i))
  return operands, in_specs, query_tile, query_stat


# --- Forward ------------------------------------------------------------------------------

def _forward_kernel(*refs, has_bias: bool, block_k: int, scale: float, absent_keys: bool):
  if has_bias:
    q_ref, k_ref, v_ref, bias_ref, mask_ref, out_ref, max_ref, sum_ref = refs
  else:
    q_ref, k_ref, v_ref, mask_ref, out_ref, max_ref, sum_ref = refs
    bias_ref = None
  q = _scaled(q_ref[...], scale)                                   # [bq, d]
  block_q, head_dim = q.shape

  def body(index, carry):
    acc, row_max, row_sum = carry
    keys = pl.ds(index * block_k, block_k)
    bias = bias_ref[:, keys] if bias_ref is not None else None
    logits = _logits(q, k_ref[keys, :], bias,
                     *_key_flags(mask_ref[keys], absent_keys))    # [bq, bk]
    new_max = jnp.maximum(row_max, jnp.max(logits, axis=1))
    correction = jnp.exp(row_max - new_max)
    probs = jnp.exp(logits - new_max[:, None])
    row_sum = row_sum * correction + jnp.sum(probs, axis=1)
    v = v_ref[keys, :]
    acc = acc * correction[:, None] + _mm(probs.astype(v.dtype), v)
    return acc, new_max, row_sum

  init = (jnp.zeros((block_q, head_dim), _F32), jnp.full((block_q,), -jnp.inf, _F32),
          jnp.zeros((block_q,), _F32))
  num_blocks = k_ref.shape[0] // block_k
  acc, row_max, row_sum = jax.lax.fori_loop(0, num_blocks, body, init)
  out_ref[...] = (acc / row_sum[:, None]).astype(out_ref.dtype)
  # The maximum and the sum, not their log-sum-exp: a row with no valid key has maximum
  # -1e9, and -1e9 + log(K) rounds back to -1e9 in float32.
  max_ref[...] = row_max
  sum_ref[...] = row_sum


def _forward(q, k, v, bias, key_mask, tiling, interpret, layout):
  batch, q_len, _, head_dim = q.shape
  k_len, heads = k.shape[1], layout.heads
  block_q = block_size(q_len, tiling.forward_block_q)
  block_k = block_size(k_len, tiling.forward_block_k)
  operands, in_specs, query_tile, query_stat = _query_block_specs(q, k, v, bias, key_mask,
                                                                  block_q, layout)
  stat_shape = jax.ShapeDtypeStruct((batch, heads, q_len), _F32)
  out, row_max, row_sum = pl.pallas_call(
      functools.partial(_forward_kernel, has_bias=bias is not None, block_k=block_k,
                        scale=layout.scale, absent_keys=layout.absent_keys),
      grid=(batch, heads, q_len // block_q),
      in_specs=in_specs,
      out_specs=[query_tile, query_stat, query_stat],
      out_shape=[jax.ShapeDtypeStruct((batch, q_len, heads, head_dim), q.dtype), stat_shape,
                 stat_shape],
      compiler_params=_compiler_params(tiling.forward_warps, tiling.forward_stages),
      interpret=interpret,
      name="af2_attention_forward",
  )(*operands)
  return out, (row_max, row_sum)


# --- Backward -----------------------------------------------------------------------------

def _probs_and_logit_grads(q, k, v, bias, key_flags, d_out, row_max, inv_sum, delta):
  """Recomputed probabilities and the logits' gradient (zero at masked keys), [q, k] float32.

  key_flags: `_key_flags`. row_max, inv_sum, delta: [q, 1], the forward pass's
  row maximum and 1 / row sum and rowsum(dO * O). dP = dO V^T; dS = P (dP - delta).
  """
  probs = jnp.exp(_logits(q, k, bias, *key_flags) - row_max) * inv_sum
  d_logits = probs * (_mm(d_out, v, trans_b=True) - delta)
  # A masked key's logit is a constant: no gradient reaches q, k or the bias through it (an
  # absent key's probability is 0, so its dS is too).
  return probs, jnp.where(key_flags[0][None, :], d_logits, 0.0)


def _key_value_bias_kernel(*refs, has_bias: bool, rows: int, block_q: int, scale: float,
                           absent_keys: bool):
  if has_bias:
    (q_ref, k_ref, v_ref, bias_ref, mask_ref, d_out_ref, max_ref, inv_sum_ref, delta_ref,
     d_k_ref, d_v_ref, d_bias_ref) = refs
  else:
    (q_ref, k_ref, v_ref, mask_ref, d_out_ref, max_ref, inv_sum_ref, delta_ref,
     d_k_ref, d_v_ref) = refs
    bias_ref = d_bias_ref = None
  # The queries in a few blocks, unrolled: each block's bias tile and bias-gradient
  # accumulator stay in registers across the rows.
  query_blocks = [pl.ds(start, block_q) for start in range(0, q_ref.shape[1], block_q)]
  biases = ([bias_ref[queries, :] for queries in query_blocks] if has_bias   # [bq, bk] each
            else [None] * len(query_blocks))

  def body(row, d_bias):
    k, v = k_ref[row], v_ref[row]                                  # [bk, d]
    key_flags = _key_flags(mask_ref[row], absent_keys)             # [bk]
    d_k = d_v = jnp.zeros(k.shape, _F32)
    new_d_bias = []
    for index, queries in enumerate(query_blocks):
      q, d_out = _scaled(q_ref[row, queries, :], scale), d_out_ref[row, queries, :]  # [bq, d]
      probs, d_logits = _probs_and_logit_grads(
          q, k, v, biases[index], key_flags, d_out, max_ref[row, queries][:, None],
          inv_sum_ref[row, queries][:, None], delta_ref[row, queries][:, None])
      d_v = d_v + _mm(probs.astype(d_out.dtype), d_out, trans_a=True)
      d_k = d_k + _mm(d_logits.astype(q.dtype), q, trans_a=True)
      if has_bias:
        new_d_bias.append(d_bias[index] + d_logits)
    d_v_ref[row] = d_v.astype(d_v_ref.dtype)
    d_k_ref[row] = d_k.astype(d_k_ref.dtype)
    return tuple(new_d_bias)

  init = tuple(jnp.zeros(bias.shape, _F32) for bias in biases) if has_bias else ()
  d_bias = jax.lax.fori_loop(0, rows, body, init)
  for queries, tile in zip(query_blocks, d_bias):
    d_bias_ref[queries, :] = tile


def _key_value_logit_grads_kernel(*refs, has_bias: bool, writes_logit_grads: bool,
                                  block_q: int, scale: float, absent_keys: bool):
  """dK and dV of one row's block of keys, walking its queries in blocks, and the logits'
  gradient of that row (when `writes_logit_grads`) for XLA to sum over rows."""
  refs = list(refs)
  q_ref, k_ref, v_ref = refs[:3]
  bias_ref = refs.pop(3) if has_bias else None
  mask_ref, d_out_ref, max_ref, inv_sum_ref, delta_ref, d_k_ref, d_v_ref = refs[3:10]
  d_logits_ref = refs[10] if writes_logit_grads else None
  k, v = k_ref[...], v_ref[...]                                    # [bk, d]
  key_flags = _key_flags(mask_ref[...], absent_keys)               # [bk]

  def body(index, carry):
    d_k, d_v = carry
    queries = pl.ds(index * block_q, block_q)
    q, d_out = _scaled(q_ref[queries, :], scale), d_out_ref[queries, :]   # [bq, d]
    bias = bias_ref[queries, :] if bias_ref is not None else None
    probs, d_logits = _probs_and_logit_grads(
        q, k, v, bias, key_flags, d_out, max_ref[queries][:, None],
        inv_sum_ref[queries][:, None], delta_ref[queries][:, None])
    if d_logits_ref is not None:
      d_logits_ref[queries, :] = d_logits.astype(d_logits_ref.dtype)
    d_v = d_v + _mm(probs.astype(d_out.dtype), d_out, trans_a=True)
    d_k = d_k + _mm(d_logits.astype(q.dtype), q, trans_a=True)
    return d_k, d_v

  zeros = jnp.zeros(k.shape, _F32)
  d_k, d_v = jax.lax.fori_loop(0, q_ref.shape[0] // block_q, body, (zeros, zeros))
  d_k_ref[...] = d_k.astype(d_k_ref.dtype)
  d_v_ref[...] = d_v.astype(d_v_ref.dtype)


def _query_kernel(*refs, has_bias: bool, block_k: int, scale: float, absent_keys: bool):
  if has_bias:
    (q_ref, k_ref, v_ref, bias_ref, mask_ref, d_out_ref, max_ref, inv_sum_ref, delta_ref,
     d_q_ref) = refs
  else:
    q_ref, k_ref, v_ref, mask_ref, d_out_ref, max_ref, inv_sum_ref, delta_ref, d_q_ref = refs
    bias_ref = None
  q, d_out = _scaled(q_ref[...], scale), d_out_ref[...]            # [bq, d]
  stats = (max_ref[...][:, None], inv_sum_ref[...][:, None], delta_ref[...][:, None])

  def body(index, d_q):
    keys = pl.ds(index * block_k, block_k)
    k = k_ref[keys, :]
    bias = bias_ref[:, keys] if bias_ref is not None else None
    _, d_logits = _probs_and_logit_grads(q, k, v_ref[keys, :], bias,
                                         _key_flags(mask_ref[keys], absent_keys), d_out,
                                         *stats)
    return d_q + _mm(d_logits.astype(k.dtype), k)

  num_blocks = k_ref.shape[0] // block_k
  d_q = jax.lax.fori_loop(0, num_blocks, body, jnp.zeros(q.shape, _F32))
  # The gradient of the unscaled q (the scale is 1 when q comes scaled).
  d_q_ref[...] = (d_q * scale if scale != 1.0 else d_q).astype(d_q_ref.dtype)


def _row_groups(batch: int, heads: int, key_blocks: int, has_bias: bool,
                target_programs: int) -> int:
  """How many groups of rows the key/value/bias kernel splits the batch into."""
  if not has_bias:
    return batch               # nothing to sum over rows: one row per program
  groups = 1
  while (groups * 2 <= batch and batch % (groups * 2) == 0
         and heads * key_blocks * groups < target_programs):
    groups *= 2
  return groups


def _backward(q, k, v, bias, key_mask, out, stats, d_out, tiling, interpret, layout):
  """dq, dk, dv [B, N, H, d] each (of the unscaled q when `layout.scale` is not 1) and the
  bias gradient."""
  if tiling.backward not in BACKWARDS:
    raise ValueError(f"pallas attention: Tiling.backward={tiling.backward!r}; expected one of "
                     f"{BACKWARDS}")
  d_out = d_out.astype(q.dtype)
  row_max, row_sum = stats
  delta = jnp.einsum("bqhc,bqhc->bhq", d_out.astype(_F32), out.astype(_F32))
  query_stats = [row_max, 1.0 / row_sum, delta]                     # [B, H, Q] each
  if tiling.backward == "grouped":
    d_k, d_v, d_bias = _grouped_key_value_grads(q, k, v, bias, key_mask, d_out, query_stats,
                                                tiling, interpret, layout)
    d_q = None
  else:
    xla_dq = tiling.backward == "logit_grads_xla_dq" and bias is not None
    d_k, d_v, d_bias, d_q = _logit_grad_backward(q, k, v, bias, key_mask, d_out, query_stats,
                                                 tiling, interpret, layout, xla_dq)
  if d_q is None:
    d_q = _query_grads(q, k, v, bias, key_mask, d_out, query_stats, tiling, interpret, layout)
  return d_q, d_k, d_v, d_bias


def _query_grads(q, k, v, bias, key_mask, d_out, query_stats, tiling, interpret, layout):
  """dQ [B, Q, H, d] (of the unscaled q) from the query kernel: grid (row, head, query
  block)."""
  q_len, k_len = q.shape[1], k.shape[1]
  batch, head_dim, heads = q.shape[0], q.shape[-1], layout.heads
  block_q = block_size(q_len, tiling.query_block_q)
  block_k = block_size(k_len, tiling.query_block_k)
  operands, in_specs, query_tile, query_stat = _query_block_specs(q, k, v, bias, key_mask,
                                                                  block_q, layout)
  operands += [d_out] + query_stats
  in_specs += [query_tile] + [query_stat] * 3
  return pl.pallas_call(
      functools.partial(_query_kernel, has_bias=bias is not None, block_k=block_k,
                        scale=layout.scale, absent_keys=layout.absent_keys),
      grid=(batch, heads, q_len // block_q),
      in_specs=in_specs, out_specs=query_tile,
      out_shape=jax.ShapeDtypeStruct((batch, q_len, heads, head_dim), q.dtype),
      compiler_params=_compiler_params(tiling.query_warps, tiling.query_stages),
      interpret=interpret,
      name="af2_attention_backward_q",
  )(*operands)


def _rows_per_chunk(batch: int, row_bytes: int, max_bytes: int) -> int:
  """The most rows (a divisor of `batch`, at least 1) whose logits' gradient takes at most
  `max_bytes` (all of them when `max_bytes` is 0)."""
  if max_bytes <= 0 or batch * row_bytes <= max_bytes:
    return batch
  return max([rows for rows in range(1, batch + 1)
              if batch % rows == 0 and rows * row_bytes <= max_bytes] or [1])


def _logit_grad_backward(q, k, v, bias, key_mask, d_out, query_stats, tiling, interpret,
                         layout, xla_dq):
  """(dK, dV, bias gradient, dQ or None) of the 'logit_grads' backward passes: dS written
  (with a bias) in chunks of rows of at most `Tiling.lg_max_chunk_bytes`, run one after the
  other (a scan) so that only one chunk's dS is in memory; each chunk's dS is summed into the
  bias gradient and, with `xla_dq`, multiplied with the chunk's keys."""

  def chunk_grads(q, k, v, key_mask, d_out, query_stats):
    d_k, d_v, d_logits = _key_value_logit_grads(q, k, v, bias, key_mask, d_out, query_stats,
                                                tiling, interpret, layout,
                                                writes_logit_grads=bias is not None)
    if bias is None:
      return d_k, d_v, None, None
    d_bias = jnp.sum(d_logits, axis=0, dtype=_F32)
    d_q = None
    if xla_dq:
      # dS [B, H, Q, K] times the keys (as the kernels read them, q's dtype), float32 sums;
      # the gradient of the unscaled q.
      keys = k[:, :, layout.offsets[1]:layout.offsets[1] + layout.heads]
      d_q = jnp.einsum("bhqk,bkhc->bqhc", d_logits, keys, preferred_element_type=_F32)
      d_q = (d_q * layout.scale if layout.scale != 1.0 else d_q).astype(q.dtype)
    return d_k, d_v, d_bias, d_q

  batch, q_len = q.shape[:2]
  row_bytes = layout.heads * q_len * k.shape[1] * jnp.dtype(q.dtype).itemsize
  rows = (_rows_per_chunk(batch, row_bytes, tiling.lg_max_chunk_bytes) if bias is not None
          else batch)
  if rows == batch:
    d_k, d_v, d_bias, d_q = chunk_grads(q, k, v, key_mask, d_out, query_stats)
  else:
    chunks = batch // rows

    def split(x):
      return x.reshape((chunks, rows) + x.shape[1:])

    # The fused layout passes one projection as q, k and v: scan over it once.
    distinct = [q] if (k is q and v is q) else [q, k, v]

    def body(d_bias, xs):
      arrays, key_mask, d_out, query_stats = xs
      q_c, k_c, v_c = arrays * 3 if len(arrays) == 1 else arrays
      d_k, d_v, d_bias_c, d_q = chunk_grads(q_c, k_c, v_c, key_mask, d_out, query_stats)
      return d_bias + d_bias_c, (d_k, d_v, d_q)

    xs = ([split(x) for x in distinct], split(key_mask), split(d_out),
          [split(x) for x in query_stats])
    d_bias, (d_k, d_v, d_q) = jax.lax.scan(body, jnp.zeros(bias.shape, _F32), xs)
    d_k, d_v = (x.reshape((batch,) + x.shape[2:]) for x in (d_k, d_v))
    if d_q is not None:
      d_q = d_q.reshape((batch,) + d_q.shape[2:])
  return d_k, d_v, d_bias.astype(bias.dtype) if bias is not None else None, d_q


def _key_block_operands(q, k, v, bias, key_mask, d_out, query_stats, layout, rows, block_k,
                        program_to):
  """Operands, their block specs, and dK and dV's specs and shapes, of the two key/value
  kernels, whose programs each take `rows` rows (None: one, its axis squeezed) of one head
  and one block of keys: all of those rows' queries, d_out and per-query statistics
  [B, H, Q], their keys and values of the block, the bias columns of the block, the key
  mask. `program_to` maps the program ids to (row block, head, key block)."""
  q_len, head_dim = q.shape[1], q.shape[-1]
  q_at, k_at, v_at = layout.offsets

  def spec(shape, index):
    return pl.BlockSpec(shape, lambda *ids: index(*program_to(*ids)))

  def head_tile(length, at):
    # rows' [length, d] tiles of one head (moved by `at` in the fused layout).
    block = q_len if length is None else length
    return spec((rows, block, None, head_dim),
                lambda r, h, j: (r, 0 if length is None else j, _at(h, at), 0))

  operands = [q, k, v]
  in_specs = [head_tile(None, q_at), head_tile(block_k, k_at), head_tile(block_k, v_at)]
  if bias is not None:
    operands.append(bias)
    in_specs.append(spec((None, q_len, block_k), lambda r, h, j: (h, 0, j)))
  operands += [key_mask, d_out] + list(query_stats)
  in_specs += [spec((rows, block_k), lambda r, h, j: (r, j)), head_tile(None, 0)]
  in_specs += [spec((rows, None, q_len), lambda r, h, j: (r, h, 0))] * 3
  d_kv_shape = jax.ShapeDtypeStruct((q.shape[0], k.shape[1], layout.heads, head_dim), k.dtype)
  return operands, in_specs, [head_tile(block_k, 0)] * 2, [d_kv_shape] * 2


def _grouped_key_value_grads(q, k, v, bias, key_mask, d_out, query_stats, tiling, interpret,
                             layout):
  """dK, dV and the bias gradient from the key/value/bias kernel: grid (head, key block,
  row group)."""
  batch, q_len = q.shape[:2]
  k_len, heads = k.shape[1], layout.heads
  has_bias = bias is not None
  reason = _query_blocks_reason(q_len, tiling.kv_block_q)
  if reason is not None:
    raise ValueError(f"pallas attention: {reason} (Tiling.kv_block_q)")
  block_q = block_size(q_len, tiling.kv_block_q)
  block_k = block_size(k_len, tiling.kv_block_k)
  key_blocks = k_len // block_k
  groups = _row_groups(batch, heads, key_blocks, has_bias, tiling.kv_target_programs)
  rows = batch // groups
  # Programs (head, key block, row group).
  operands, in_specs, out_specs, out_shape = _key_block_operands(
      q, k, v, bias, key_mask, d_out, query_stats, layout, rows, block_k,
      lambda h, j, g: (g, h, j))
  if has_bias:
    out_specs.append(pl.BlockSpec((None, None, q_len, block_k), lambda h, j, g: (g, h, 0, j)))
    out_shape.append(jax.ShapeDtypeStruct((groups, heads, q_len, k_len), _F32))
  results = pl.pallas_call(
      functools.partial(_key_value_bias_kernel, has_bias=has_bias, rows=rows,
                        block_q=block_q, scale=layout.scale, absent_keys=layout.absent_keys),
      grid=(heads, key_blocks, groups),
      in_specs=in_specs, out_specs=out_specs, out_shape=out_shape,
      compiler_params=_compiler_params(tiling.kv_warps, tiling.kv_stages),
      interpret=interpret,
      name="af2_attention_backward_kv",
  )(*operands)
  d_bias = jnp.sum(results[2], axis=0).astype(bias.dtype) if has_bias else None
  return results[0], results[1], d_bias


def _key_value_logit_grads(q, k, v, bias, key_mask, d_out, query_stats, tiling, interpret,
                           layout, writes_logit_grads):
  """dK, dV and (when `writes_logit_grads`) the logits' gradient [B, H, Q, K] in q's dtype:
  grid (row, head, key block)."""
  batch, q_len = q.shape[:2]
  k_len, heads = k.shape[1], layout.heads
  block_q = block_size(q_len, tiling.lg_block_q)
  block_k = block_size(k_len, tiling.lg_block_k)
  operands, in_specs, out_specs, out_shape = _key_block_operands(
      q, k, v, bias, key_mask, d_out, query_stats, layout, None, block_k,
      lambda b, h, j: (b, h, j))
  if writes_logit_grads:
    out_specs.append(pl.BlockSpec((None, None, q_len, block_k), lambda b, h, j: (b, h, 0, j)))
    out_shape.append(jax.ShapeDtypeStruct((batch, heads, q_len, k_len), q.dtype))
  results = pl.pallas_call(
      functools.partial(_key_value_logit_grads_kernel, has_bias=bias is not None,
                        writes_logit_grads=writes_logit_grads, block_q=block_q,
                        scale=layout.scale, absent_keys=layout.absent_keys),
      grid=(batch, heads, k_len // block_k),
      in_specs=in_specs, out_specs=out_specs, out_shape=out_shape,
      compiler_params=_compiler_params(tiling.lg_warps, tiling.lg_stages),
      interpret=interpret,
      name="af2_attention_backward_kv_logit_grads",
  )(*operands)
  return results[0], results[1], results[2] if writes_logit_grads else None


# --- The differentiable function ----------------------------------------------------------

@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7))
def _attention(q, k, v, bias, key_mask, tiling, interpret, absent_keys):
  return _attention_fwd(q, k, v, bias, key_mask, tiling, interpret, absent_keys)[0]


def _attention_fwd(q, k, v, bias, key_mask, tiling, interpret, absent_keys):
  out, stats = _forward(q, k, v, bias, key_mask, tiling, interpret,
                        _Layout(q.shape[2], absent_keys=absent_keys))
  return out, (q, k, v, bias, key_mask, out, stats)


def _attention_bwd(tiling, interpret, absent_keys, residuals, d_out):
  q, k, v, bias, key_mask, out, stats = residuals
  d_q, d_k, d_v, d_bias = _backward(q, k, v, bias, key_mask, out, stats, d_out, tiling,
                                    interpret, _Layout(q.shape[2], absent_keys=absent_keys))
  return d_q, d_k, d_v, d_bias, None


_attention.defvjp(_attention_fwd, _attention_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _fused_attention(projection, bias, key_mask, layout, tiling, interpret):
  return _fused_attention_fwd(projection, bias, key_mask, layout, tiling, interpret)[0]


def _fused_attention_fwd(projection, bias, key_mask, layout, tiling, interpret):
  out, stats = _forward(projection, projection, projection, bias, key_mask, tiling, interpret,
                        layout)
  return (out, projection[:, :, 3 * layout.heads:]), (projection, bias, key_mask, out, stats)


def _fused_attention_bwd(layout, tiling, interpret, residuals, cotangents):
  projection, bias, key_mask, out, stats = residuals
  d_out, d_rest = cotangents
  d_q, d_k, d_v, d_bias = _backward(projection, projection, projection, bias, key_mask, out,
                                    stats, d_out, tiling, interpret, layout)
  # One concatenation writes the projection's whole gradient (the gate's group included).
  d_projection = jnp.concatenate([d_q, d_k, d_v, d_rest.astype(d_q.dtype)], axis=2)
  return d_projection.astype(projection.dtype), d_bias, None


_fused_attention.defvjp(_fused_attention_fwd, _fused_attention_bwd)


def attention(q: jax.Array, k: jax.Array, v: jax.Array, bias: jax.Array | None,
              key_mask: jax.Array, interpret: bool = False,
              tiling: Tiling = DEFAULT_TILING,
              max_queries: int = BACKWARD_MAX_QUERIES,
              pad_lengths: bool = False) -> jax.Array:
  """softmax(q k^T + bias, masked keys at -1e9) v, differentiable, in Pallas kernels.

  q [B, Q, H, d] (already scaled), k, v [B, K, H, d], bias [H, Q, K] shared over the batch
  or None, key_mask [B, K] (non-zero = attend). Returns [B, Q, H, d] in q's dtype. The
  shapes must pass `unsupported_reason`. A head dim that is not a power of two >= 16 runs
  padded with zero channels (`padded_head_dim`). With `pad_lengths`, query and key lengths
  that are not multiples of 16 (the MSA column attention's 128 sequences + 4 template rows)
  run padded to `padded_length`: zero queries whose outputs are sliced off (so no gradient
  comes back through them), and zero keys marked `ABSENT_KEY`, whose logit is -inf. The
  values are those of the unpadded attention, a row with every key masked included.
  """
  reason = unsupported_reason(q.shape, k.shape, max_queries=max_queries, tiling=tiling,
                              pad_lengths=pad_lengths)
  if reason is not None:
    raise ValueError(f"pallas attention: q {q.shape}, k {k.shape}: {reason}")
  if bias is not None:
    bias = bias.astype(q.dtype)
  key_mask = jnp.broadcast_to(key_mask != 0, (q.shape[0], k.shape[1])).astype(jnp.int32)
  q_len, head_dim = q.shape[1], q.shape[-1]
  k, v = k.astype(q.dtype), v.astype(q.dtype)
  pad_q = padded_length(q_len) - q_len if pad_lengths else 0
  pad_k = padded_length(k.shape[1]) - k.shape[1] if pad_lengths else 0
  pad_d = padded_head_dim(head_dim) - head_dim
  if pad_q or pad_d:
    q = jnp.pad(q, ((0, 0), (0, pad_q), (0, 0), (0, pad_d)))
  if pad_k or pad_d:
    k, v = (jnp.pad(x, ((0, 0), (0, pad_k), (0, 0), (0, pad_d))) for x in (k, v))
  if pad_k:
    key_mask = jnp.pad(key_mask, ((0, 0), (0, pad_k)), constant_values=ABSENT_KEY)
  if bias is not None and (pad_q or pad_k):
    bias = jnp.pad(bias, ((0, 0), (0, pad_q), (0, pad_k)))
  out = _attention(q, k, v, bias, key_mask, tiling, interpret, bool(pad_k))
  return out[:, :q_len, :, :head_dim] if (pad_q or pad_d) else out


def fused_projection_reason(projection_shape: tuple[int, ...], heads: int,
                            max_queries: int = BACKWARD_MAX_QUERIES) -> str | None:
  """Why `fused_self_attention` cannot take this projection (None when it can): it needs
  at least three head groups (q, k, v) and a head dim the kernels run unpadded (a power of
  two from `MIN_BLOCK` to `MAX_HEAD_DIM`), besides the shapes `unsupported_reason` accepts."""
  batch, length, groups_heads, head_dim = projection_shape
  if groups_heads < 3 * heads or groups_heads % heads:
    return f"{groups_heads} projected heads are not whole groups of {heads} for q, k and v"
  if padded_head_dim(head_dim) != head_dim:
    return f"head dim {head_dim} would need padding"
  shape = (batch, length, heads, head_dim)
  return unsupported_reason(shape, shape, max_queries=max_queries)


def fused_self_attention(projection: jax.Array, heads: int, scale: float,
                         bias: jax.Array | None, key_mask: jax.Array, interpret: bool = False,
                         tiling: Tiling = DEFAULT_TILING,
                         max_queries: int = BACKWARD_MAX_QUERIES
                         ) -> tuple[jax.Array, jax.Array]:
  """Self-attention read straight from one fused projection of the input.

  `projection` [B, N, G*H, d] holds q, k and v (unscaled) as its first three groups of
  `heads` heads, then the rest (AlphaFold's gated attention: the gate). Returns the same as
  `attention(projection[:, :, :H] * scale, projection[:, :, H:2H], projection[:, :, 2H:3H],
  bias, key_mask)` [B, N, H, d], and `projection[:, :, 3H:]`. The kernels read the three
  groups where they are and scale q as they load it, so nothing is copied out of the
  projection, and the backward pass writes the projection's whole gradient (the rest's
  included) in one concatenation. The shapes must pass `fused_projection_reason`.
  """
  reason = fused_projection_reason(projection.shape, heads, max_queries)
  if reason is not None:
    raise ValueError(f"pallas attention: fused projection {projection.shape}: {reason}")
  if bias is not None:
    bias = bias.astype(projection.dtype)
  batch, length = projection.shape[:2]
  key_mask = jnp.broadcast_to(key_mask != 0, (batch, length)).astype(jnp.int32)
  # The scale rounded to the projection's dtype first (on the host: a static kernel
  # argument), as XLA rounds the constant of `q * scale` for a 16-bit q: the same scaled
  # queries as the sliced path.
  layout = _Layout(heads, (0, heads, 2 * heads), float(np.asarray(scale, projection.dtype)))
  return _fused_attention(projection, bias, key_mask, layout, tiling, interpret)
