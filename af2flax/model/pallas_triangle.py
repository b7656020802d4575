"""The triangle multiplication's input side as one Pallas kernel for the GPU: layer norm, the
four edge projections with their gates and mask, and the output gate's projection.

Jumper et al. (2021) Suppl. Alg. 11 "TriangleMultiplicationOutgoing" / Alg. 12
"TriangleMultiplicationIncoming", lines 1-4: `z = LayerNorm(z)`, `a = sigmoid(Linear(z)) *
Linear(z) * mask`, the same for `b`, and `g = Linear(z)` (the output gate, its sigmoid
taken after the triangle product). In XLA's channels-first layout
(`TriangleMultiplication._channels_first`) these are a layer-norm fusion, a matrix product
that writes the four projections `[4c, N, N]` (64 MiB in bf16 at crop 256), a fusion that
reads them back for the gates and the mask, and the gate's product. Here one program per
block of rows of the pair normalises its rows in float32 and computes the edges as
`W^T z^T` tiles, so that it writes `a` and `b` channels-first `[c, N, N]` and the gate's
logits `[N, N, c_z]`, and nothing else.

The backward pass (`jax.custom_vjp`) is JAX's differentiation of
`edge_projections_reference`, the same layers as the XLA path (`primitives.layer_norm`,
`add_bias`), which recomputes them. `interpret=True` runs the kernel through Pallas's
interpreter (tests on the CPU).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from af2flax.model import pallas_transition, primitives

_F32 = jnp.float32
Tiling = pallas_transition.Tiling
# 64 rows and 4 warps: five [rows, c] float32 products per program, two of them live at once.
DEFAULT_TILING = Tiling(block_rows=64, warps=4, stages=1)


def tiling_from_text(text: str) -> Tiling:
  """`DEFAULT_TILING` with the fields `text` sets (`pallas_transition.tiling_from_text`)."""
  return pallas_transition.tiling_from_text(text, DEFAULT_TILING)


def unsupported_reason(pair_channels: int, edge_channels: int) -> str | None:
  """Why the kernel cannot take these widths (None when it can): powers of two >= 16."""
  return pallas_transition.unsupported_reason(pair_channels, edge_channels)


def edge_projections_reference(x, mask, scale, offset, w_edges, b_edges, w_gate, b_gate,
                               eps: float):
  """The XLA layers: x [..., c_z] in the compute dtype, mask [...], scale and offset [c_z],
  w_edges [c_z, 4c] (left, right, left gate, right gate) and w_gate [c_z, c_z] in the compute
  dtype, b_edges [4c] and b_gate [c_z]. Returns (left_proj, right_proj) [c, ...] and the
  gate's logits [..., c_z], as `TriangleMultiplication._channels_first` computes them."""
  dtype = x.dtype
  normed = primitives.layer_norm(x, scale, offset, x.ndim - 1, eps, dtype)
  edges = primitives.add_bias(jnp.einsum("ah,...a->h...", w_edges, normed),
                              b_edges.reshape(b_edges.shape + (1,) * (x.ndim - 1)))
  left, right, left_gate, right_gate = jnp.split(edges, 4, axis=0)
  mask = mask[None].astype(dtype)
  gate = primitives.add_bias(jnp.einsum("...a,ah->...h", normed, w_gate), b_gate)
  return (mask * left * jax.nn.sigmoid(left_gate), mask * right * jax.nn.sigmoid(right_gate),
          gate)


def _kernel(x_ref, mask_ref, scale_ref, offset_ref, w_ref, b_ref, wg_ref, bg_ref,
            left_ref, right_ref, gate_ref, *, eps: float, edge_channels: int):
  normed = pallas_transition.normalise_rows(x_ref, scale_ref, offset_ref, eps,
                                            w_ref.dtype)                 # [rows, c_z]
  mask = mask_ref[...].astype(_F32)[None, :]                      # [1, rows]

  def edge(index):
    """Edge projection `index` (0 left, 1 right, 2 left gate, 3 right gate), [c, rows]."""
    cols = pl.ds(index * edge_channels, edge_channels)
    product = jax.lax.dot_general(w_ref[:, cols], normed, (((0,), (1,)), ((), ())),
                                  preferred_element_type=_F32)
    return product + b_ref[cols].astype(_F32)[:, None]

  left_ref[...] = (mask * edge(0) * jax.nn.sigmoid(edge(2))).astype(left_ref.dtype)
  right_ref[...] = (mask * edge(1) * jax.nn.sigmoid(edge(3))).astype(right_ref.dtype)
  gate = jax.lax.dot_general(normed, wg_ref[...], (((1,), (0,)), ((), ())),
                             preferred_element_type=_F32)
  gate_ref[...] = (gate + bg_ref[...].astype(_F32)[None, :]).astype(gate_ref.dtype)


def _kernel_call(x2d, mask1d, scale, offset, w_edges, b_edges, w_gate, b_gate, eps, tiling,
                 interpret):
  rows, pair_channels = x2d.shape
  edge_channels = w_edges.shape[1] // 4
  block_rows, padding = pallas_transition.row_blocks(rows, tiling.block_rows)
  if padding:
    x2d = jnp.pad(x2d, ((0, padding), (0, 0)))
    mask1d = jnp.pad(mask1d, (0, padding))
  padded = x2d.shape[0]
  whole = pallas_transition.whole
  dtype = x2d.dtype
  left, right, gate = pl.pallas_call(
      functools.partial(_kernel, eps=eps, edge_channels=edge_channels),
      grid=(padded // block_rows,),
      in_specs=[pl.BlockSpec((block_rows, pair_channels), lambda i: (i, 0)),
                pl.BlockSpec((block_rows,), lambda i: (i,)),
                whole(pair_channels), whole(pair_channels),
                whole(pair_channels, 4 * edge_channels), whole(4 * edge_channels),
                whole(pair_channels, pair_channels), whole(pair_channels)],
      out_specs=[pl.BlockSpec((edge_channels, block_rows), lambda i: (0, i)),
                 pl.BlockSpec((edge_channels, block_rows), lambda i: (0, i)),
                 pl.BlockSpec((block_rows, pair_channels), lambda i: (i, 0))],
      out_shape=[jax.ShapeDtypeStruct((edge_channels, padded), dtype),
                 jax.ShapeDtypeStruct((edge_channels, padded), dtype),
                 jax.ShapeDtypeStruct((padded, pair_channels), dtype)],
      compiler_params=pallas_transition.compiler_params(tiling),
      interpret=interpret,
      name="af2_triangle_edges",
  )(x2d, mask1d, scale, offset, w_edges, b_edges, w_gate, b_gate)
  if padding:
    left, right, gate = left[:, :rows], right[:, :rows], gate[:rows]
  return left, right, gate


@functools.partial(jax.custom_vjp, nondiff_argnums=(8, 9, 10))
def _edge_projections(x, mask, scale, offset, w_edges, b_edges, w_gate, b_gate, eps, tiling,
                      interpret):
  lead = x.shape[:-1]
  left, right, gate = _kernel_call(
      x.reshape(-1, x.shape[-1]), mask.reshape(-1).astype(x.dtype), scale, offset, w_edges,
      b_edges, w_gate, b_gate, eps, tiling, interpret)
  return (left.reshape((-1,) + lead), right.reshape((-1,) + lead),
          gate.reshape(lead + (-1,)))


def _forward(x, mask, scale, offset, w_edges, b_edges, w_gate, b_gate, eps, tiling, interpret):
  return (_edge_projections(x, mask, scale, offset, w_edges, b_edges, w_gate, b_gate, eps,
                            tiling, interpret),
          (x, mask, scale, offset, w_edges, b_edges, w_gate, b_gate))


def _backward(eps, tiling, interpret, residuals, d_out):
  del tiling, interpret
  _, pullback = jax.vjp(functools.partial(edge_projections_reference, eps=eps), *residuals)
  return pullback(d_out)


_edge_projections.defvjp(_forward, _backward)


def edge_projections(x: jax.Array, mask: jax.Array, scale: jax.Array, offset: jax.Array,
                     w_edges: jax.Array, b_edges: jax.Array, w_gate: jax.Array,
                     b_gate: jax.Array, eps: float, tiling: Tiling = DEFAULT_TILING,
                     interpret: bool = False):
  """`edge_projections_reference(...)` with the forward pass in one Pallas kernel (see the
  module docstring); differentiable. x [..., c_z] in the compute dtype (the weights are cast
  to it), mask [...]; returns (left_proj [c, ...], right_proj [c, ...], gate logits
  [..., c_z]). The widths must pass `unsupported_reason`."""
  pair_channels, four_c = w_edges.shape
  reason = (unsupported_reason(pair_channels, four_c // 4) if four_c % 4 == 0
            else f"{four_c} edge channels are not four projections")
  if reason is not None:
    raise ValueError(f"pallas triangle edges {pair_channels} -> {four_c}: {reason}")
  if x.shape[-1] != pair_channels or w_gate.shape != (pair_channels, pair_channels):
    raise ValueError(f"pallas triangle edges: x {x.shape}, w_edges {w_edges.shape}, w_gate "
                     f"{w_gate.shape} do not fit [..., c_z], [c_z, 4c], [c_z, c_z]")
  # The mask enters the kernel in the compute dtype; it is data, so it takes no gradient.
  mask = jax.lax.stop_gradient(mask)
  return _edge_projections(x, mask, scale, offset, w_edges.astype(x.dtype), b_edges,
                           w_gate.astype(x.dtype), b_gate, float(eps), tiling, interpret)
