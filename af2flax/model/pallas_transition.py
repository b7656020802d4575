"""The transition layer as one Pallas kernel for the GPU: layer norm, Linear + ReLU, Linear,
with the hidden layer kept on chip.

Jumper et al. (2021) Suppl. Alg. 9 "MSATransition" / Alg. 15 "PairTransition":
`y = Linear_2(relu(Linear_1(LayerNorm(x))))`, hidden width n*c (n = 4 in the Evoformer). In
XLA these are a layer-norm fusion, a matrix product that writes the [rows, n*c] hidden layer,
a fusion that adds its bias and applies the ReLU (cuBLAS's product takes neither), and a
second product that reads it back: at crop 256 the MSA transition's hidden layer is
`bf16[33792, 1024]`, 66 MiB written and read twice in every forward pass.

Here one program per block of rows (Triton backend) normalises its rows in float32, then
walks the hidden layer in chunks: `h = relu(x̂ W1[:, chunk] + b1[chunk])` in float32,
rounded to the compute dtype, and `acc += h W2[chunk, :]` with float32 accumulation, so the
hidden layer never reaches memory. Each program reads all of W1 and W2 (from L2).

The backward pass (`jax.custom_vjp`) is by default JAX's differentiation of
`transition_reference`, the same layers as `primitives.Transition`'s XLA path
(`primitives.layer_norm`, `add_bias`): it recomputes the layer norm and the first layer in
XLA and writes the hidden layer's gradient as before. `transition(..., backward='pallas')`
(`global_config.transition_backward`) runs a second kernel there instead (see `transition`).
Under the blocks' rematerialisation the recomputed forward pass is this kernel (its output
feeds the next module), and the backward rule recomputes what it needs.

Values: the kernel adds the first bias to the float32 product before rounding (XLA's path
rounds the product to the compute dtype, then adds the bias in it), so in bfloat16 the
outputs differ by bfloat16 rounding; in float32 they agree to float32 rounding.
`interpret=True` runs the kernel through Pallas's interpreter (tests on the CPU).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from af2flax.model import pallas_attention, primitives

_F32 = jnp.float32
# Triton's matrix product takes tiles of at least 16 along every axis.
MIN_BLOCK = pallas_attention.MIN_BLOCK
# The largest power of two <= `preferred` dividing `n`, or None if under `MIN_BLOCK`.
block_size = pallas_attention.block_size
# The hidden chunk shrinks until the kernel's shared memory (`_tiles`) fits in
# this (an H100 or H200 multiprocessor offers 227 KiB to one program).
SHARED_MEMORY_BYTES = 200 * 1024


@dataclasses.dataclass(frozen=True)
class Tiling:
  """Rows per program, hidden channels per step of its loop, Triton warps and pipeline
  stages. Each block shrinks to the largest power of two dividing its axis (the hidden
  chunk also to fit `SHARED_MEMORY_BYTES`).

  H100, 2026-12-06 (docs/benchmarks.md, twenty-seventh session): 128 rows and 8 warps made
  the MSA transition's forward pass 0.109-0.116 ms against 0.168-0.174 ms at 64 rows and 4
  warps (XLA's layers: 0.185 ms), and the expected training step 0.669 s against 0.678 s
  (XLA's: 0.685 s). The pair and extra-MSA transitions time within noise of each other at
  either tiling.
  """

  block_rows: int = 128
  block_hidden: int = 64
  warps: int = 8
  stages: int = 2


DEFAULT_TILING = Tiling()


def tiling_from_text(text: str, base: Tiling = DEFAULT_TILING) -> Tiling:
  """`base` with the fields `text` sets ('block_rows=128,warps=8'; "" is `base`).
  Raises ValueError naming an unknown field or a value that is not a positive integer."""
  return pallas_attention.replace_from_text(text, base, "transition tiling")


def unsupported_reason(channels: int, hidden: int) -> str | None:
  """Why a transition of `channels` -> `hidden` -> `channels` cannot run here (None when it
  can): Triton's tiles need power-of-two widths of at least 16 along both."""
  for name, width in (("channels", channels), ("hidden channels", hidden)):
    if width < MIN_BLOCK or width & (width - 1):
      return f"{name} {width} is not a power of two >= {MIN_BLOCK}"
  return None


def transition_reference(x, scale, offset, w1, b1, w2, b2, eps: float) -> jax.Array:
  """The transition in XLA, as `primitives.Transition` computes it without chunking: x [..., c]
  in the compute dtype, scale and offset [c], w1 [c, h] and w2 [h, c] in the compute dtype,
  b1 [h] and b2 [c] (any float dtype; their gradients are summed in float32)."""
  dtype = x.dtype
  normed = primitives.layer_norm(x, scale, offset, x.ndim - 1, eps, dtype)
  hidden = jax.nn.relu(primitives.add_bias(jnp.einsum("...a,ah->...h", normed, w1), b1))
  return primitives.add_bias(jnp.einsum("...h,hc->...c", hidden, w2), b2)


def normalise_rows(x_ref, scale_ref, offset_ref, eps: float, dtype) -> jax.Array:
  """Inside a kernel: the layer norm of a block of rows [rows, c] over its channels,
  statistics in float32, `* scale + offset`, rounded to `dtype`."""
  x = x_ref[...].astype(_F32)
  mean = jnp.mean(x, axis=1, keepdims=True)
  centred = x - mean
  rstd = jax.lax.rsqrt(jnp.mean(centred * centred, axis=1, keepdims=True) + eps)
  return (centred * rstd * scale_ref[...].astype(_F32)[None, :]
          + offset_ref[...].astype(_F32)[None, :]).astype(dtype)


def _kernel(x_ref, scale_ref, offset_ref, w1_ref, b1_ref, w2_ref, b2_ref, out_ref, *,
            eps: float, block_hidden: int):
  normed = normalise_rows(x_ref, scale_ref, offset_ref, eps, w1_ref.dtype)  # [rows, c]
  rows, channels = normed.shape

  def body(index, acc):
    chunk = pl.ds(index * block_hidden, block_hidden)
    hidden = jax.lax.dot_general(normed, w1_ref[:, chunk], (((1,), (0,)), ((), ())),
                                 preferred_element_type=_F32)
    hidden = jnp.maximum(hidden + b1_ref[chunk].astype(_F32)[None, :], 0.0)
    return acc + jax.lax.dot_general(hidden.astype(w2_ref.dtype), w2_ref[chunk, :],
                                     (((1,), (0,)), ((), ())), preferred_element_type=_F32)

  acc = jax.lax.fori_loop(0, w1_ref.shape[1] // block_hidden, body,
                          jnp.zeros((rows, channels), _F32))
  out_ref[...] = (acc + b2_ref[...].astype(_F32)[None, :]).astype(out_ref.dtype)


def _forward_kernel_call(x2d, scale, offset, w1, b1, w2, b2, eps, tiling, interpret):
  rows, channels = x2d.shape
  hidden = w1.shape[1]
  # Each pipeline stage holds a chunk of W1 and one of W2, plus the block of rows: at 64
  # rows, 128 hidden, 256 channels and 2 stages in bfloat16 this is the 294,912 bytes Triton
  # asked for, more than an H100's 232,448.
  block_rows, padding, block_hidden = _tiles(rows, channels, hidden,
                                             jnp.dtype(w1.dtype).itemsize, tiling, 2)
  if padding:
    x2d = jnp.pad(x2d, ((0, padding), (0, 0)))
  out = pl.pallas_call(
      functools.partial(_kernel, eps=eps, block_hidden=block_hidden),
      grid=(x2d.shape[0] // block_rows,),
      in_specs=[pl.BlockSpec((block_rows, channels), lambda i: (i, 0)),
                whole(channels), whole(channels), whole(channels, hidden), whole(hidden),
                whole(hidden, channels), whole(channels)],
      out_specs=pl.BlockSpec((block_rows, channels), lambda i: (i, 0)),
      out_shape=jax.ShapeDtypeStruct(x2d.shape, x2d.dtype),
      compiler_params=compiler_params(tiling),
      interpret=interpret,
      name="af2_transition_forward",
  )(x2d, scale, offset, w1, b1, w2, b2)
  return out[:rows] if padding else out


def _backward_kernel(x_ref, scale_ref, offset_ref, w1_ref, b1_ref, w2_ref, dy_ref,
                     normed_ref, hidden_ref, d_hidden_ref, d_normed_ref, *, eps: float,
                     block_hidden: int):
  normed = normalise_rows(x_ref, scale_ref, offset_ref, eps, w1_ref.dtype)  # [rows, c]
  normed_ref[...] = normed
  d_out = dy_ref[...]
  rows, channels = normed.shape

  def body(index, acc):
    chunk = pl.ds(index * block_hidden, block_hidden)
    w1 = w1_ref[:, chunk]                                         # [c, bh]
    pre = jax.lax.dot_general(normed, w1, (((1,), (0,)), ((), ())),
                              preferred_element_type=_F32) + b1_ref[chunk].astype(_F32)[None, :]
    hidden_ref[:, chunk] = jnp.maximum(pre, 0.0).astype(hidden_ref.dtype)
    grad = jax.lax.dot_general(d_out, w2_ref[chunk, :], (((1,), (1,)), ((), ())),
                               preferred_element_type=_F32)      # [rows, bh]
    d_hidden = jnp.where(pre > 0, grad, 0.0).astype(d_hidden_ref.dtype)
    d_hidden_ref[:, chunk] = d_hidden
    return acc + jax.lax.dot_general(d_hidden, w1, (((1,), (1,)), ((), ())),
                                     preferred_element_type=_F32)

  acc = jax.lax.fori_loop(0, w1_ref.shape[1] // block_hidden, body,
                          jnp.zeros((rows, channels), _F32))
  d_normed_ref[...] = acc.astype(d_normed_ref.dtype)


def row_blocks(rows: int, preferred: int) -> tuple[int, int]:
  """(rows per program, padding rows to add) for a kernel over blocks of rows: the largest
  power of two <= `preferred` dividing `rows`; with none >= `MIN_BLOCK`, blocks of
  `MIN_BLOCK` over the rows padded to a multiple of it."""
  block_rows = block_size(rows, preferred)
  if block_rows is None:
    return MIN_BLOCK, -rows % MIN_BLOCK
  return block_rows, 0


def whole(*shape: int) -> pl.BlockSpec:
  """The block spec of an operand every program of a 1-D grid reads whole (weights)."""
  return pl.BlockSpec(shape, lambda i: (0,) * len(shape))


def compiler_params(tiling: Tiling):
  """Triton's warps and pipeline stages of `tiling`."""
  return plgpu.CompilerParams(num_warps=tiling.warps, num_stages=tiling.stages)


def _tiles(rows, channels, hidden, itemsize, tiling, buffers, row_tiles=1):
  """(block_rows, row padding, block_hidden) for a kernel whose shared memory holds
  `buffers` [c, hidden chunk] chunks of the weights per pipeline stage and `row_tiles`
  [rows, c] blocks."""
  block_rows, padding = row_blocks(rows, tiling.block_rows)
  block_hidden = block_size(hidden, tiling.block_hidden)
  while (block_hidden > MIN_BLOCK
         and (tiling.stages * buffers * channels * block_hidden
              + row_tiles * block_rows * channels)
         * itemsize > SHARED_MEMORY_BYTES):
    block_hidden //= 2
  return block_rows, padding, block_hidden


def _backward_kernel_call(x2d, scale, offset, w1, b1, w2, dy2d, eps, tiling, interpret):
  """(normed, hidden, d_hidden, d_normed) of the rows (dy2d in x2d's dtype), in the compute
  dtype: the layer norm's
  output and the hidden layer recomputed, the hidden layer's gradient through the ReLU,
  and the normalised input's gradient (= d_hidden W1^T)."""
  rows, channels = x2d.shape
  hidden = w1.shape[1]
  block_rows, padding, block_hidden = _tiles(rows, channels, hidden,
                                             jnp.dtype(w1.dtype).itemsize, tiling, 2, 2)
  if padding:      # zero rows: a zero gradient adds nothing to the weights' sums
    x2d, dy2d = (jnp.pad(a, ((0, padding), (0, 0))) for a in (x2d, dy2d))
  padded = x2d.shape[0]
  row_tile = lambda width: pl.BlockSpec((block_rows, width), lambda i: (i, 0))  # noqa: E731
  dtype = x2d.dtype
  normed, hidden_act, d_hidden, d_normed = pl.pallas_call(
      functools.partial(_backward_kernel, eps=eps, block_hidden=block_hidden),
      grid=(padded // block_rows,),
      in_specs=[row_tile(channels), whole(channels), whole(channels), whole(channels, hidden),
                whole(hidden), whole(hidden, channels), row_tile(channels)],
      out_specs=[row_tile(channels), row_tile(hidden), row_tile(hidden), row_tile(channels)],
      out_shape=[jax.ShapeDtypeStruct((padded, channels), dtype),
                 jax.ShapeDtypeStruct((padded, hidden), dtype),
                 jax.ShapeDtypeStruct((padded, hidden), dtype),
                 jax.ShapeDtypeStruct((padded, channels), dtype)],
      compiler_params=compiler_params(tiling),
      interpret=interpret,
      name="af2_transition_backward",
  )(x2d, scale, offset, w1, b1, w2, dy2d)
  if padding:
    normed, hidden_act, d_hidden, d_normed = (
        a[:rows] for a in (normed, hidden_act, d_hidden, d_normed))
  return normed, hidden_act, d_hidden, d_normed


BACKWARDS = ("xla", "pallas")


@functools.partial(jax.custom_vjp, nondiff_argnums=(7, 8, 9, 10))
def _transition(x, scale, offset, w1, b1, w2, b2, eps, tiling, interpret, backward):
  del backward
  shape = x.shape
  out = _forward_kernel_call(x.reshape(-1, shape[-1]), scale, offset, w1, b1, w2, b2, eps,
                             tiling, interpret)
  return out.reshape(shape)


def _transition_forward(x, scale, offset, w1, b1, w2, b2, eps, tiling, interpret, backward):
  return (_transition(x, scale, offset, w1, b1, w2, b2, eps, tiling, interpret, backward),
          (x, scale, offset, w1, b1, w2, b2))


def _transition_backward(eps, tiling, interpret, backward, residuals, d_out):
  if backward == "xla":
    _, pullback = jax.vjp(functools.partial(transition_reference, eps=eps), *residuals)
    return pullback(d_out)
  x, scale, offset, w1, b1, w2, b2 = residuals
  channels = x.shape[-1]
  x2d, dy2d = x.reshape(-1, channels), d_out.reshape(-1, channels).astype(x.dtype)
  normed, hidden, d_hidden, d_normed = _backward_kernel_call(
      x2d, scale, offset, w1, b1, w2, dy2d, eps, tiling, interpret)
  # The weights' gradients as XLA's layers have them: products in the compute dtype, the
  # biases' sums in float32 (`primitives.add_bias`).
  d_w2 = jnp.einsum("mh,mc->hc", hidden, dy2d).astype(w2.dtype)
  d_w1 = jnp.einsum("mc,mh->ch", normed, d_hidden).astype(w1.dtype)
  d_b2 = jnp.sum(dy2d.astype(_F32), axis=0).astype(b2.dtype)
  d_b1 = jnp.sum(d_hidden.astype(_F32), axis=0).astype(b1.dtype)
  _, norm_pullback = jax.vjp(
      lambda a, s, o: primitives.layer_norm(a, s, o, 1, eps, x.dtype), x2d, scale, offset)
  d_x, d_scale, d_offset = norm_pullback(d_normed)
  return d_x.reshape(x.shape), d_scale, d_offset, d_w1, d_b1, d_w2, d_b2


_transition.defvjp(_transition_forward, _transition_backward)


def transition(x: jax.Array, scale: jax.Array, offset: jax.Array, w1: jax.Array,
               b1: jax.Array, w2: jax.Array, b2: jax.Array, eps: float,
               tiling: Tiling = DEFAULT_TILING, interpret: bool = False,
               backward: str = "xla") -> jax.Array:
  """`transition_reference(x, ...)` with the forward pass in one Pallas kernel (see the module
  docstring); differentiable. x [..., c] in the compute dtype (w1 and w2 are cast to it);
  scale, offset [c]; b1 [h], b2 [c]. The widths must pass `unsupported_reason`.

  `backward`: 'xla' (JAX's differentiation of `transition_reference`) or 'pallas': one
  kernel per block of rows recomputes the layer norm and the hidden layer, and writes the
  normalised input, the hidden layer, its gradient through the ReLU and the normalised
  input's gradient (`d_hidden W1^T`, accumulated on chip); XLA then takes the weights'
  products and sums and the layer norm's backward pass. That skips XLA's separate passes for
  the first layer's bias and ReLU and for the ReLU's gradient."""
  if backward not in BACKWARDS:
    raise ValueError(f"pallas transition: backward={backward!r}; expected one of {BACKWARDS}")
  channels, hidden = w1.shape
  reason = unsupported_reason(channels, hidden)
  if reason is not None:
    raise ValueError(f"pallas transition {channels} -> {hidden}: {reason}")
  if x.shape[-1] != channels or w2.shape != (hidden, channels):
    raise ValueError(f"pallas transition: x {x.shape}, w1 {w1.shape}, w2 {w2.shape} do not "
                     "fit [..., c], [c, h], [h, c]")
  return _transition(x, scale, offset, w1.astype(x.dtype), b1, w2.astype(x.dtype), b2,
                     float(eps), tiling, interpret, backward)
