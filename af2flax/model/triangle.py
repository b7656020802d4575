"""Triangle updates of the pair representation (Jumper et al. 2021, Suppl. 1.6.5-1.6.6).

Used by the Evoformer, the extra-MSA stack and the template pair stack. Parameter names are
AlphaFold's (`layer_norm_input`, `left_projection`, ..., `feat_2d_weights`, `attention/...`).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from af2flax.model import pallas_triangle
from af2flax.model.primitives import (LAYER_NORM_EPSILON, Attention, LayerNorm,
                                      LayerNormParams, Linear, LinearParams, add_bias,
                                      attention_settings, chunked_apply, compute_dtype,
                                      final_init, fused_linear, kernel_path, module_param)


def subbatch_size(global_config: Any, extra_msa: bool = False) -> int | None:
  """Chunk size of attention and transitions: `global_config.subbatch_size` when
  `global_config.low_memory` is on (AlphaFold subbatches at inference only), else None.

  `extra_msa`: the chunk size of the extra-MSA rows (row attention, transition), which
  `global_config.extra_msa_subbatch_size` sets on its own when given: in training, cuDNN's
  backward pass of the pair-biased row attention needs scratch memory in proportion to the
  rows it takes at once (13.5 GiB for 5,120 rows at crop 384, 5.3 GiB in chunks of 1,024;
  docs/benchmarks.md), the largest single term of fine-tuning's peak.
  """
  if extra_msa and global_config.get("extra_msa_subbatch_size"):
    return int(global_config.extra_msa_subbatch_size)
  if global_config.get("low_memory", False):
    return int(global_config.subbatch_size)
  return None


class TriangleMultiplication(nn.Module):
  """Triangular multiplicative update ("outgoing" or "incoming" edges).

  Jumper et al. (2021) Suppl. Alg. 11 "TriangleMultiplicationOutgoing" and Alg. 12
  "TriangleMultiplicationIncoming"; the direction is the einsum `config.equation`
  ('ikc,jkc->ijc' outgoing, 'kjc,kic->ijc' incoming). Projections are masked and gated,
  their product is layer-normed, projected and gated by the normalised input.
  Input pair_act [N_res, N_res, c_z], pair_mask [N_res, N_res]; returns the update.
  """

  config: Any
  global_config: Any

  @nn.compact
  def __call__(self, pair_act: jax.Array, pair_mask: jax.Array) -> jax.Array:
    c, gc = self.config, self.global_config
    if c.get("fuse_projection_weights", False):
      raise ValueError("fuse_projection_weights=True is AlphaFold-Multimer's parameter layout; "
                       "af2flax implements the monomer network (set it to False)")
    dtype = compute_dtype(gc)
    channels = c.num_intermediate_channel
    gate_init = final_init(gc.zero_init)

    output_channel = pair_act.shape[-1]
    if gc.get("triangle_channels_first", False) and kernel_path(
        gc, "triangle_projection_impl", pair_act, dtype,
        pallas_triangle.unsupported_reason(output_channel, channels) is None) == "pallas":
      return self._edge_kernel(pair_act, pair_mask, output_channel, dtype, gate_init)
    act = LayerNorm(name="layer_norm_input")(pair_act)
    if gc.get("triangle_channels_first", False):
      return self._channels_first(act, pair_mask, output_channel, dtype, gate_init)
    mask = pair_mask[..., None].astype(dtype)
    if gc.get("fuse_projections", False):  # the five projections of `act` as one product
      left, right, left_gate, right_gate, gate = fused_linear(act, self._edge_projections(
          gate_init) + [LinearParams(output_channel, initializer=gate_init, bias_init=1.0,
                                     name="gating_linear")], dtype)
    else:
      left = Linear(channels, dtype=dtype, name="left_projection")(act)
      right = Linear(channels, dtype=dtype, name="right_projection")(act)
      left_gate = Linear(channels, initializer=gate_init, bias_init=1.0, dtype=dtype,
                         name="left_gate")(act)
      right_gate = Linear(channels, initializer=gate_init, bias_init=1.0, dtype=dtype,
                          name="right_gate")(act)
      gate = Linear(output_channel, initializer=gate_init, bias_init=1.0, dtype=dtype,
                    name="gating_linear")(act)
    left_proj = mask * left * jax.nn.sigmoid(left_gate)
    right_proj = mask * right * jax.nn.sigmoid(right_gate)

    # For "incoming" edges the equation swaps the roles: a = right_proj, b = left_proj.
    act = jnp.einsum(c.equation, left_proj, right_proj)
    act = LayerNorm(name="center_layer_norm")(act)
    act = Linear(output_channel, initializer=gate_init, dtype=dtype, name="output_projection")(act)
    return act * jax.nn.sigmoid(gate)

  def _edge_projections(self, gate_init: str) -> list[LinearParams]:
    """The parameters of the left and right edge projections and their gates."""
    channels = self.config.num_intermediate_channel
    return [LinearParams(channels, name="left_projection"),
            LinearParams(channels, name="right_projection"),
            LinearParams(channels, initializer=gate_init, bias_init=1.0, name="left_gate"),
            LinearParams(channels, initializer=gate_init, bias_init=1.0, name="right_gate")]

  def _channels_first(self, act, pair_mask, output_channel, dtype, gate_init):
    """The same update with the projected edges laid out [c, N_res, N_res]: the projections
    write that layout, the triangle product is a batched matrix product over channels with
    no transposes around it, the centre layer norm runs over axis 0, and the output
    projection reads it back to [N_res, N_res, c_z]. The four edge projections are always
    one fused product here (`fuse_projections` or not)."""
    left, right, left_gate, right_gate = fused_linear(act, self._edge_projections(gate_init),
                                                      dtype, channels_first=True)
    gate = Linear(output_channel, initializer=gate_init, bias_init=1.0, dtype=dtype,
                  name="gating_linear")(act)
    mask = pair_mask[None].astype(dtype)
    left_proj = mask * left * jax.nn.sigmoid(left_gate)
    right_proj = mask * right * jax.nn.sigmoid(right_gate)
    return self._product_and_output(left_proj, right_proj, gate, output_channel, dtype,
                                    gate_init)

  def _edge_kernel(self, pair_act, pair_mask, output_channel, dtype, gate_init):
    """`_channels_first` with its layer norm, edge projections, gates, mask and the output
    gate's projection as one Pallas kernel (`pallas_triangle`; same parameters)."""
    scale, offset = LayerNormParams(name="layer_norm_input")(pair_act.shape[-1])
    edges = [layer(pair_act.shape[-1]) for layer in self._edge_projections(gate_init)]
    w_gate, b_gate = LinearParams(output_channel, initializer=gate_init, bias_init=1.0,
                                  name="gating_linear")(pair_act.shape[-1])
    left_proj, right_proj, gate = pallas_triangle.edge_projections(
        pair_act, pair_mask, scale, offset, jnp.concatenate([w for w, _ in edges], axis=-1),
        jnp.concatenate([b for _, b in edges]), w_gate, b_gate, LAYER_NORM_EPSILON,
        tiling=pallas_triangle.tiling_from_text(
            self.global_config.get("triangle_projection_tiling", "") or ""),
        interpret=jax.default_backend() != "gpu")
    return self._product_and_output(left_proj, right_proj, gate, output_channel, dtype,
                                    gate_init)

  def _product_and_output(self, left_proj, right_proj, gate, output_channel, dtype, gate_init):
    """The channels-first triangle product, its layer norm, output projection and gate."""
    act = jnp.einsum(channels_first_equation(self.config.equation), left_proj, right_proj)
    act = LayerNorm(axis=0, name="center_layer_norm")(act)
    weights, bias = LinearParams(output_channel, initializer=gate_init,
                                 name="output_projection")(act.shape[0])
    act = add_bias(jnp.einsum("cij,cd->ijd", act, weights.astype(dtype)), bias)
    return act * jax.nn.sigmoid(gate)


def channels_first_equation(equation: str) -> str:
  """'ikc,jkc->ijc' -> 'cik,cjk->cij': the channel letter (the last of the output) first."""
  inputs, output = equation.split("->")
  terms = inputs.split(",") + [output]
  channel = output[-1]
  if len(terms) != 3 or any(not t.endswith(channel) or t.count(channel) != 1 for t in terms):
    raise ValueError(f"triangle multiplication equation {equation!r}: expected two inputs "
                     "and an output that end with the same channel letter")
  first = [channel + t[:-1] for t in terms]
  return f"{first[0]},{first[1]}->{first[2]}"


class TriangleAttention(nn.Module):
  """Triangle self-attention around the starting or ending node.

  Jumper et al. (2021) Suppl. Alg. 13 "TriangleAttentionStartingNode" (orientation
  'per_row') and Alg. 14 "TriangleAttentionEndingNode" ('per_column': the same computation
  on the transposed pair). Each row attends over its entries with a bias projected from the
  normalised pair (`feat_2d_weights` [c_z, H]).
  Input pair_act [N_res, N_res, c_z], pair_mask [N_res, N_res]; returns the update.
  """

  config: Any
  global_config: Any

  @nn.compact
  def __call__(self, pair_act: jax.Array, pair_mask: jax.Array) -> jax.Array:
    c, gc = self.config, self.global_config
    if c.orientation not in ("per_row", "per_column"):
      raise ValueError(f"orientation={c.orientation!r}; expected 'per_row' or 'per_column'")
    dtype = compute_dtype(gc)
    if c.orientation == "per_column":
      pair_act = jnp.swapaxes(pair_act, -2, -3)
      pair_mask = jnp.swapaxes(pair_mask, -1, -2)
    mask = pair_mask[:, None, None, :]  # [N_res, 1, 1, N_res]

    pair_act = LayerNorm(name="query_norm")(pair_act)
    channels = pair_act.shape[-1]
    feat_2d_weights = module_param(self, "feat_2d_weights",
                                   nn.initializers.normal(stddev=channels ** -0.5),
                                   (channels, c.num_head), jnp.float32)
    nonbatched_bias = jnp.einsum("qkc,ch->hqk", pair_act.astype(dtype),
                                 feat_2d_weights.astype(dtype))

    attention = Attention(num_head=c.num_head, output_dim=channels, key_dim=c.get("key_dim"),
                          value_dim=c.get("value_dim"), gating=c.gating, zero_init=gc.zero_init,
                          dtype=dtype, name="attention",
                          **attention_settings(gc, "triangle_attention_impl"))
    pair_act = chunked_apply(attention, subbatch_size(gc), [pair_act, pair_act, mask],
                             [nonbatched_bias])
    if c.orientation == "per_column":
      pair_act = jnp.swapaxes(pair_act, -2, -3)
    return pair_act
