"""The Evoformer block and its MSA-side modules (Jumper et al. 2021, Suppl. 1.6).

`EvoformerIteration` is one block (Suppl. Alg. 6 lines 2-10); with `is_extra_msa` it is
the extra-MSA stack's block (Alg. 18), whose column attention is global (Alg. 19).
`layer_stack` runs N blocks with `nn.scan` (parameters stacked on a leading layer axis, as
Haiku's `layer_stack`) and `nn.remat` per block. Triangle modules live in `triangle.py`.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from af2flax.common.packing import Packing
from af2flax.model.primitives import (Attention, GlobalAttention, LayerNorm, Linear,
                                      LinearParams, ResidualDropout, Transition, add_bias,
                                      attention_settings, chunked_apply, compute_dtype,
                                      fused_linear, module_param, scan_trace_options)
from af2flax.model.triangle import TriangleAttention, TriangleMultiplication, subbatch_size

# Added to the number of sequences that see both residues before dividing (Suppl. Alg. 10).
OUTER_PRODUCT_MEAN_EPSILON = 1e-3


class MSARowAttentionWithPairBias(nn.Module):
  """Row-wise gated self-attention over the MSA, biased by the pair representation.

  Jumper et al. (2021) Suppl. Alg. 7 "MSARowAttentionWithPairBias".
  msa_act [N_seq, N_res, c_m], msa_mask [N_seq, N_res], pair_act [N_res, N_res, c_z];
  returns the MSA update.
  """

  config: Any
  global_config: Any
  is_extra_msa: bool = False   # rows of the extra MSA (their own chunk size, `subbatch_size`)

  @nn.compact
  def __call__(self, msa_act: jax.Array, msa_mask: jax.Array, pair_act: jax.Array) -> jax.Array:
    c, gc = self.config, self.global_config
    dtype = compute_dtype(gc)
    mask = msa_mask[:, None, None, :]  # [N_seq, 1, 1, N_res]
    msa_act = LayerNorm(name="query_norm")(msa_act)
    pair_act = LayerNorm(name="feat_2d_norm")(pair_act)
    pair_channels = pair_act.shape[-1]
    feat_2d_weights = module_param(self, "feat_2d_weights",
                                   nn.initializers.normal(stddev=pair_channels ** -0.5),
                                   (pair_channels, c.num_head), jnp.float32)
    nonbatched_bias = jnp.einsum("qkc,ch->hqk", pair_act.astype(dtype),
                                 feat_2d_weights.astype(dtype))
    attention = Attention(num_head=c.num_head, output_dim=msa_act.shape[-1],
                          key_dim=c.get("key_dim"), value_dim=c.get("value_dim"),
                          gating=c.gating, zero_init=gc.zero_init, dtype=dtype,
                          name="attention", **attention_settings(
                              gc, "extra_msa_attention_impl" if self.is_extra_msa else None))
    return chunked_apply(attention, subbatch_size(gc, extra_msa=self.is_extra_msa),
                         [msa_act, msa_act, mask], [nonbatched_bias])


class MSAColumnAttention(nn.Module):
  """Column-wise gated self-attention over the MSA.

  Jumper et al. (2021) Suppl. Alg. 8 "MSAColumnAttention".
  msa_act [N_seq, N_res, c_m], msa_mask [N_seq, N_res]; returns the MSA update.
  """

  config: Any
  global_config: Any

  @nn.compact
  def __call__(self, msa_act: jax.Array, msa_mask: jax.Array) -> jax.Array:
    c, gc = self.config, self.global_config
    msa_act = jnp.swapaxes(msa_act, -2, -3)   # [N_res, N_seq, c_m]
    msa_mask = jnp.swapaxes(msa_mask, -1, -2)
    mask = msa_mask[:, None, None, :]
    msa_act = LayerNorm(name="query_norm")(msa_act)
    attention = Attention(num_head=c.num_head, output_dim=msa_act.shape[-1],
                          key_dim=c.get("key_dim"), value_dim=c.get("value_dim"),
                          gating=c.gating, zero_init=gc.zero_init, dtype=compute_dtype(gc),
                          name="attention", **attention_settings(gc))
    msa_act = chunked_apply(attention, subbatch_size(gc), [msa_act, msa_act, mask])
    return jnp.swapaxes(msa_act, -2, -3)


class MSAColumnGlobalAttention(nn.Module):
  """Column-wise global attention over the extra MSA.

  Jumper et al. (2021) Suppl. Alg. 19 "MSAColumnGlobalAttention".
  msa_act [N_extra, N_res, c_e], msa_mask [N_extra, N_res]; returns the MSA update.
  """

  config: Any
  global_config: Any

  @nn.compact
  def __call__(self, msa_act: jax.Array, msa_mask: jax.Array) -> jax.Array:
    c, gc = self.config, self.global_config
    msa_act = jnp.swapaxes(msa_act, -2, -3)
    msa_mask = jnp.swapaxes(msa_mask, -1, -2)[..., None]  # [N_res, N_extra, 1]
    msa_act = LayerNorm(name="query_norm")(msa_act)
    attention = GlobalAttention(num_head=c.num_head, output_dim=msa_act.shape[-1],
                                key_dim=c.get("key_dim"), value_dim=c.get("value_dim"),
                                gating=c.gating, zero_init=gc.zero_init, dtype=compute_dtype(gc),
                                name="attention")
    msa_act = chunked_apply(attention, subbatch_size(gc), [msa_act, msa_act, msa_mask])
    return jnp.swapaxes(msa_act, -2, -3)


class OuterProductMean(nn.Module):
  """Outer product mean of the MSA, an update to the pair representation.

  Jumper et al. (2021) Suppl. Alg. 10 "OuterProductMean". As in AlphaFold the output bias
  is added before dividing by (number of sequences covering both residues + 1e-3); the
  product runs in chunks of `config.chunk_size` residues as AlphaFold's does, or in one piece
  (`outer_product_mean_chunked`: the presets' training; prediction keeps the chunks). The
  product over sequences is laid out as AlphaFold's einsums lay it out or rows first
  (`outer_product_mean_layout`), or rows first and projected by a product batched over rows.
  act [N_seq, N_res, c_m], mask [N_seq, N_res]; returns [N_res, N_res, num_output_channel].
  """

  config: Any
  global_config: Any
  num_output_channel: int

  @nn.compact
  def __call__(self, act: jax.Array, mask: jax.Array) -> jax.Array:
    c, gc = self.config, self.global_config
    dtype = compute_dtype(gc)
    mask = mask[..., None]
    act = LayerNorm(name="layer_norm_input")(act)
    mask_c = mask.astype(dtype)
    if gc.get("fuse_projections", False):
      left_act, right_act = fused_linear(act, [
          LinearParams(c.num_outer_channel, name="left_projection"),
          LinearParams(c.num_outer_channel, name="right_projection")], dtype)
    else:
      left_act = Linear(c.num_outer_channel, dtype=dtype, name="left_projection")(act)
      right_act = Linear(c.num_outer_channel, dtype=dtype, name="right_projection")(act)
    left_act, right_act = mask_c * left_act, mask_c * right_act

    output_init = (nn.initializers.zeros if gc.zero_init
                   else nn.initializers.variance_scaling(2.0, "fan_in", "truncated_normal"))
    output_w32 = module_param(self, "output_w", output_init,
                              (c.num_outer_channel, c.num_outer_channel, self.num_output_channel),
                              jnp.float32)
    output_w = output_w32.astype(dtype)
    output_b = module_param(self, "output_b", nn.initializers.zeros,
                            (self.num_output_channel,), jnp.float32)

    layout = outer_product_mean_layout(gc)
    # 'rows_first' and 'rows_batched' lay the product out [rows, c, c', N_res]: one matrix
    # product over sequences writes it as it is (rows and c from the left, c' and N_res from
    # the right, whose layout [N_seq, c', N_res] is a small transpose).
    right_t = jnp.swapaxes(right_act, 1, 2)

    def product_rows_first(left_rows: jax.Array) -> jax.Array:
      return jnp.einsum("aic,aed->iced", left_rows, right_t)

    if layout == "rows_batched":
      # Projected as a matrix product batched over rows with the weight broadcast along
      # them: each row's [c·c', N_res] slice is a (transposed) operand as it lies, so no
      # layout change of the product is needed in the forward pass, and the product's
      # gradient comes out in the same layout. The weight is broadcast in float32 and
      # converted after, so that its gradient, the sum over rows of each row's product, is
      # summed in float32.
      weights = output_w32.reshape(-1, output_w32.shape[-1])        # [c·c', c_z]

      def outer_rows(left_rows: jax.Array) -> jax.Array:
        # left_rows [N_seq, rows, c] -> [rows, N_res, c_z]
        outer = product_rows_first(left_rows)
        outer = outer.reshape(outer.shape[0], -1, outer.shape[-1])  # [rows, c·c', N_res]
        batched = jnp.broadcast_to(weights, (outer.shape[0],) + weights.shape).astype(dtype)
        out = jax.lax.dot_general(outer, batched, (((1,), (1,)), ((0,), (0,))))
        return add_bias(out, output_b)
    elif layout == "rows_first":
      # The projection contracts c and c' side by side into [rows, N_res, c_z]. (XLA's GPU
      # compiler still copies the product to [rows, N_res, c, c'] for it: 67 µs per block at
      # crop 256 on an H200, 2026-12-04 fifteenth session; 'rows_batched' is the formulation
      # that may not.)
      def outer_rows(left_rows: jax.Array) -> jax.Array:
        # left_rows [N_seq, rows, c] -> [rows, N_res, c_z]
        return add_bias(jnp.einsum("iced,cef->idf", product_rows_first(left_rows), output_w),
                        output_b)
    else:
      def outer_rows(left_rows: jax.Array) -> jax.Array:
        # left_rows [N_seq, rows, c] -> [rows, N_res, c_z]; AlphaFold's arithmetic: the
        # product laid out [N_res, c, c', rows], a transpose of the matrix product's output.
        left_rows = jnp.transpose(left_rows, [0, 2, 1])
        outer = jnp.einsum("acb,ade->dceb", left_rows, right_act)
        outer = add_bias(jnp.einsum("dceb,cef->dbf", outer, output_w), output_b)
        return jnp.transpose(outer, [1, 0, 2])

    num_res = left_act.shape[1]
    chunk = c.get("chunk_size") if outer_product_mean_chunked(gc) else None
    if chunk and num_res > chunk:
      num_chunks = -(-num_res // chunk)
      padded = jnp.pad(left_act, [(0, 0), (0, num_chunks * chunk - num_res), (0, 0)])
      chunks = jnp.moveaxis(padded.reshape(padded.shape[0], num_chunks, chunk, -1), 1, 0)
      out = jax.lax.map(outer_rows, chunks)  # [num_chunks, chunk, N_res, c_z]
      out = out.reshape((num_chunks * chunk,) + out.shape[2:])[:num_res]
    else:
      out = outer_rows(left_act)

    norm = jnp.einsum("abc,adc->bdc", mask.astype(jnp.float32), mask.astype(jnp.float32))
    return (out.astype(jnp.float32) / (OUTER_PRODUCT_MEAN_EPSILON + norm)).astype(dtype)


OUTER_PRODUCT_MEAN_CHUNKING = ("always", "low_memory")
OUTER_PRODUCT_MEAN_LAYOUTS = ("alphafold", "rows_first", "rows_batched")


def global_choice(global_config: Any, key: str, choices: tuple[str, ...], default: str) -> str:
  """`global_config.<key>` (`default` when unset or empty), one of `choices`; a ValueError
  naming the key and the choices otherwise."""
  value = global_config.get(key, default) or default
  if value not in choices:
    raise ValueError(f"global_config.{key}={value!r}; expected one of {', '.join(choices)}")
  return value


def outer_product_mean_layout(global_config: Any) -> str:
  """`global_config.outer_product_mean_layout`: 'alphafold' (AlphaFold's einsums, the product
  [N_res, c, c', rows]; unset: this), 'rows_first' (the product [rows, c, c', N_res]) or
  'rows_batched' (that product, projected by a matrix product batched over rows); same
  values."""
  return global_choice(global_config, "outer_product_mean_layout", OUTER_PRODUCT_MEAN_LAYOUTS,
                       "alphafold")


def outer_product_mean_chunked(global_config: Any) -> bool:
  """Whether the outer product mean runs in chunks of its `chunk_size` rows:
  `global_config.outer_product_mean_chunking` 'always' (AlphaFold, training too; unset: this)
  or 'low_memory' (only with `low_memory`, like the other chunking)."""
  mode = global_choice(global_config, "outer_product_mean_chunking",
                       OUTER_PRODUCT_MEAN_CHUNKING, "always")
  return mode == "always" or bool(global_config.get("low_memory", False))


class EvoformerIteration(nn.Module):
  """One Evoformer block, or one extra-MSA stack block when `is_extra_msa`.

  Jumper et al. (2021) Suppl. Alg. 6 "EvoformerStack" lines 2-10 (and Alg. 18
  "ExtraMsaStack", whose column attention is Alg. 19). Order (AlphaFold's
  `EvoformerIteration`): [outer product mean if `outer_product_mean.first`], MSA row
  attention with pair bias, MSA column (global) attention, MSA transition, [outer product
  mean], triangle multiplication outgoing, incoming, triangle attention starting node,
  ending node, pair transition; each a residual update with shared dropout.
  activations = (msa [N_seq, N_res, c_m], pair [N_res, N_res, c_z]); masks likewise.
  """

  config: Any
  global_config: Any
  is_extra_msa: bool = False

  @nn.compact
  def __call__(self, activations: tuple[jax.Array, jax.Array],
               masks: tuple[jax.Array, jax.Array], deterministic: bool = True
               ) -> tuple[jax.Array, jax.Array]:
    c, gc = self.config, self.global_config
    msa_act, pair_act = activations
    msa_mask, pair_mask = masks
    chunk = subbatch_size(gc)
    lift = submodule_remat(gc, self.is_extra_msa)

    def residual(act, update, module_config):
      return ResidualDropout(module_config, gc)(act, update, deterministic)

    outer_module = lift(OuterProductMean)(c.outer_product_mean, gc, pair_act.shape[-1],
                                          name="outer_product_mean")
    if c.outer_product_mean.first:
      pair_act = residual(pair_act, outer_module(msa_act, msa_mask), c.outer_product_mean)

    row_attention = lift(MSARowAttentionWithPairBias)(c.msa_row_attention_with_pair_bias, gc,
                                                      self.is_extra_msa,
                                                      name="msa_row_attention_with_pair_bias")
    msa_act = residual(msa_act, row_attention(msa_act, msa_mask, pair_act),
                       c.msa_row_attention_with_pair_bias)
    if self.is_extra_msa:
      column_attention = lift(MSAColumnGlobalAttention)(c.msa_column_attention, gc,
                                                  name="msa_column_global_attention")
    else:
      column_attention = lift(MSAColumnAttention)(c.msa_column_attention, gc,
                                            name="msa_column_attention")
    msa_act = residual(msa_act, column_attention(msa_act, msa_mask), c.msa_column_attention)
    msa_transition = lift(Transition)(c.msa_transition, gc,
                                      subbatch_size(gc, extra_msa=self.is_extra_msa),
                                      name="msa_transition")
    msa_act = residual(msa_act, msa_transition(msa_act, msa_mask), c.msa_transition)

    if not c.outer_product_mean.first:
      pair_act = residual(pair_act, outer_module(msa_act, msa_mask), c.outer_product_mean)

    pair_act = pair_update_block(pair_act, pair_mask, c, gc, residual, chunk,
                                 order=("triangle_multiplication_outgoing",
                                        "triangle_multiplication_incoming",
                                        "triangle_attention_starting_node",
                                        "triangle_attention_ending_node", "pair_transition"),
                                 lift=lift)
    return msa_act, pair_act


def pair_update_block(pair_act: jax.Array, pair_mask: jax.Array, config: Any,
                      global_config: Any, residual, chunk: int | None,
                      order: tuple[str, ...], lift=lambda module_class: module_class
                      ) -> jax.Array:
  """Applies the named pair modules of `config` in `order` as residual updates.

  Call it inside a module's compact method: the modules become that module's children,
  named as AlphaFold names them. The Evoformer runs multiplications before attention, the
  template pair stack (Suppl. Alg. 16) attention before multiplications. `lift` wraps each
  module class (`submodule_remat`).
  """
  for name in order:
    module_config = config[name]
    if name.startswith("triangle_multiplication"):
      module = lift(TriangleMultiplication)(module_config, global_config, name=name)
    elif name.startswith("triangle_attention"):
      module = lift(TriangleAttention)(module_config, global_config, name=name)
    elif name == "pair_transition":
      module = lift(Transition)(module_config, global_config, chunk, name=name)
    else:
      raise ValueError(f"unknown pair module {name!r}")
    pair_act = residual(pair_act, module(pair_act, pair_mask), module_config)
  return pair_act


REMAT_SUBMODULES = ("none", "extra_msa", "all")


def submodule_remat(global_config: Any, is_extra_msa: bool):
  """Module class -> class whose call is rematerialised on its own, when
  `global_config.remat_submodules` covers this stack ('extra_msa': the extra-MSA blocks only;
  'all': every Evoformer block); else the class unchanged.

  Inside a block that is already rematerialised (`use_remat`), the block's recomputation then
  keeps only each module's inputs, and each module recomputes its own intermediates in the
  backward pass: that part of the peak is one module's intermediates instead of a whole
  block's, at the cost of one more forward pass of the block. Parameters keep their paths.
  (Measured at fine-tuning shapes on the extra-MSA blocks: no gain, the peak lies elsewhere;
  docs/benchmarks.md.)
  """
  which = global_choice(global_config, "remat_submodules", REMAT_SUBMODULES, "none")
  if which == "all" or (which == "extra_msa" and is_extra_msa):
    return lambda module_class: nn.remat(module_class, prevent_cse=True)
  return lambda module_class: module_class


def remat_policy(name: str | None):
  """`jax.checkpoint_policies.<name>`; None or 'none' recomputes everything in the block."""
  if name in (None, "", "none"):
    return None
  policy = getattr(jax.checkpoint_policies, name, None)
  if policy is None:
    raise ValueError(f"global_config.remat_policy={name!r} is not a jax.checkpoint_policies name "
                     "(e.g. 'nothing_saveable', 'dots_saveable', 'everything_saveable')")
  return policy


# The name under which `layer_stack` tags each block's input for `remat_offload`.
BLOCK_INPUT = "block_input"


def remat_offload_policy(global_config: Any):
  """With `global_config.remat_offload`, the checkpoint policy that keeps each block's input
  in the host's pinned memory between the forward and the backward pass (and saves nothing
  else); None without. Needs `remat_policy` 'nothing_saveable' (or none): the block input is
  then the only thing a block keeps."""
  if not global_config.get("remat_offload", False):
    return None
  if remat_policy(global_config.get("remat_policy")) not in (
      None, jax.checkpoint_policies.nothing_saveable):
    raise ValueError(f"global_config.remat_offload needs remat_policy 'nothing_saveable', not "
                     f"{global_config.get('remat_policy')!r}")
  return jax.checkpoint_policies.save_and_offload_only_these_names(
      names_which_can_be_saved=[], names_which_can_be_offloaded=[BLOCK_INPUT],
      offload_src="device", offload_dst="pinned_host")


def layer_stack(block: nn.Module, carry: Any, num_layers: int, global_config: Any,
                *args: Any, offload: bool = True) -> Any:
  """Runs `num_layers` copies of `block` (carry -> carry) with separate parameters.

  The parameters get a leading layer axis, exactly like Haiku's `layer_stack`, through
  `nn.scan` (`global_config.use_scan`; off, the scan is fully unrolled, same layout).
  `global_config.use_remat` wraps each block in `nn.remat` with
  `global_config.remat_policy`. Each layer draws its own dropout randomness. `args` are
  passed unchanged to every block.

  `global_config.remat_group_size` = g > 1 (with `use_remat`, g dividing `num_layers`):
  two-level checkpointing (Chen et al. 2016, "Training deep nets with sublinear memory
  cost"). The layers run as num_layers/g groups of g, each group rematerialised as a whole
  and each layer inside it again: the backward pass keeps num_layers/g + g block inputs
  instead of num_layers (48 blocks, g=4: 16 instead of 48; 138 MB each in bf16 at
  fine-tuning shapes) for one more forward pass of the stack. Parameters keep the
  [num_layers, ...] layout.

  `global_config.remat_offload` (with `use_remat`, no groups): each block's input, the only
  thing a block keeps for its backward pass, is kept in the host's pinned memory instead of
  the accelerator's (`jax.checkpoint_policies.save_and_offload_only_these_names`), copied
  out during the forward pass and back during the backward pass. `offload=False` keeps them
  on the device regardless: a stack that runs inside another loop (the template stack, once
  per template) must, since XLA's GPU compiler (jax 0.11.2) fails on host-memory residuals of
  a nested loop ("Expected instruction to have shape equal to ...", after layout
  assignment). `global_config.remat_offload_fraction` f < 1 offloads only the first
  ~f * num_layers layers' inputs (`offloaded_layers`); the last layers keep theirs on the
  device (two scans, one after the other, over slices of the same [num_layers, ...]
  parameters): each kept input costs device memory and saves its two copies' time.
  """
  if num_layers == 0:
    return carry
  use_remat = global_config.get("use_remat", False)
  offload_policy = remat_offload_policy(global_config) if use_remat and offload else None
  offloaded = offloaded_layers(global_config, num_layers) if offload_policy else 0
  if not offloaded:
    offload_policy = None
  split = 0 < offloaded < num_layers   # offloaded layers first, then layers on the device

  def layer_body(tag_input: bool):
    def body(module, layer_carry, _):
      if tag_input:
        layer_carry = jax.tree.map(lambda x: checkpoint_name(x, BLOCK_INPUT), layer_carry)
      return module(layer_carry, *args), None
    return body

  # `scan_flat_params`: the parameters scanned as one [num_layers, P] array (`_FlatParams`),
  # each layer's row split back into arrays inside the checkpoint. Not while initialising
  # (the parameters are created in their own layout, which checkpoints keep).
  flat = (bool(global_config.get("scan_flat_params", False)) and not block.is_initializing())
  # With remat, the flat scan runs under a checkpoint of its own that keeps only the block
  # inputs (`_flat_stack_policy`; not with `scan_flat_params_keep_copy`, the behaviour
  # before): the block inputs are then tagged whatever the policy.
  recompute_copy = flat and use_remat and not global_config.get("scan_flat_params_keep_copy",
                                                                 False)
  body = layer_body(offload_policy is not None or recompute_copy)
  unroll = 1 if global_config.get("use_scan", True) else num_layers

  def checkpointed(fn, policy, length):
    # Inside a loop the recomputation cannot be merged with the forward pass (CSE), so no
    # optimisation barrier is needed; but XLA inlines a loop of one iteration (one layer, or
    # all unrolled), after which it could be. (H200, 2026-12-04: a one-layer slice of the
    # extra-MSA stack on the device peaked at 22.6 GiB without the barrier, 20.5 with it,
    # against ~15 for no such slice; `offloaded_layers` now avoids them.)
    return nn.remat(fn, policy=policy, prevent_cse=length <= unroll)

  flat_params = _FlatParams() if flat else None

  def prepared(fn, policy, length):
    if flat:
      fn = nn.map_variables(fn, "params", trans_in_fn=flat_params.unflatten, mutable=False)
    return checkpointed(fn, policy, length) if use_remat else fn

  policy = (offload_policy or remat_policy(global_config.get("remat_policy"))) if use_remat \
      else None
  group = int(global_config.get("remat_group_size", 1) or 1)
  if use_remat and 1 < group < num_layers:
    if offload_policy is not None:
      raise ValueError(f"global_config.remat_offload and remat_group_size={group} do not "
                       "combine: set remat_group_size=1")
    if global_config.get("scan_flat_params", False):
      raise ValueError(f"global_config.scan_flat_params and remat_group_size={group} do not "
                       "combine: set remat_group_size=1 or scan_flat_params=False (the "
                       "initial-training preset turns it on)")
    if num_layers % group:
      raise ValueError(f"global_config.remat_group_size={group} does not divide the "
                       f"{num_layers} layers of {block.name}")
    body = checkpointed(body, policy, num_layers)
    return _grouped_layer_stack(block, body, carry, num_layers, group, policy)
  body = prepared(body, policy, offloaded if split else num_layers)
  stack_policy = lambda policy: (_flat_stack_policy(policy, offload_policy) if recompute_copy
                                 else None)
  if split and not block.is_initializing():
    on_device_policy = remat_policy(global_config.get("remat_policy"))
    on_device = prepared(layer_body(recompute_copy), on_device_policy, num_layers - offloaded)
    carry = _layer_slice(block, body, carry, 0, offloaded, unroll, flat_params,
                         stack_policy=stack_policy(policy))
    return _layer_slice(block, on_device, carry, offloaded, num_layers, unroll, flat_params,
                        stack_policy=stack_policy(on_device_policy))
  return _layer_slice(block, body, carry, 0, num_layers, unroll, flat_params, whole=True,
                      stack_policy=stack_policy(policy))


def _flat_stack_policy(block_policy, offload_policy):
  """The policy of the checkpoint around a stack scanned over flat parameters
  (`scan_flat_params` with remat): what the blocks' own checkpoints keep (the tagged block
  inputs, offloaded under `offload_policy`; what `block_policy` saves), and nothing else.

  Without it the backward pass keeps the [num_layers, P] array that the forward pass
  concatenated, a copy of the parameters (the Evoformer's 87.8 M, 335 MiB in float32, live
  from the forward scan to the end of the backward scan; in the separately compiled step a
  residual of its own between programs); with it the backward pass concatenates them again
  from the parameters, ~0.1 ms."""
  if block_policy is offload_policy and offload_policy is not None:
    return offload_policy
  inputs = jax.checkpoint_policies.save_only_these_names(BLOCK_INPUT)
  if block_policy in (None, jax.checkpoint_policies.nothing_saveable):
    return inputs

  def policy(*args, **params):  # what the blocks' policy saves, and the block inputs
    saved = block_policy(*args, **params)
    return (saved or inputs(*args, **params)) if isinstance(saved, bool) else saved

  return policy


class _FlatParams:
  """A stack's parameters as one [num_layers, P] array while its scan runs
  (`global_config.scan_flat_params`), and each layer's row split back into the block's
  arrays inside the (rematerialised) body.

  The same values. What changes is the scan's backward pass: it writes each layer's
  parameter gradient into the stacked gradient once, one [P] row (the split's transpose
  concatenates it), instead of once per parameter array (an Evoformer block has 93): the
  fourteenth session's profile at crop 256 counted 3,588 small dynamic-update-slice kernels
  per step, 7 ms on an H200 (docs/benchmarks.md, 2026-12-04). The flattening is
  `trans_in_fn` of `nn.map_variables` (collections dict -> collections dict): `flatten`
  around the scan, `unflatten` in the body, inside the checkpoint so that the split is
  recomputed rather than each layer's arrays saved for the backward pass.
  """

  def __init__(self):
    self._packing: Packing | None = None  # set by `flatten`, read by `unflatten`

  def flatten(self, variables: dict) -> dict:
    dtypes = {leaf.dtype for leaf in jax.tree.leaves(variables["params"])}
    if len(dtypes) != 1:
      raise ValueError(f"global_config.scan_flat_params: a stack's parameters have several "
                       f"dtypes ({sorted(map(str, dtypes))}); it needs one")
    self._packing = Packing(variables["params"], batch_dims=1)
    return {**variables, "params": {"flat": self._packing.pack(variables["params"])}}

  def unflatten(self, variables: dict) -> dict:
    return {**variables, "params": self._packing.unpack(variables["params"]["flat"])}


def offloaded_layers(global_config: Any, num_layers: int) -> int:
  """How many of a stack's `num_layers` layers offload their inputs under `remat_offload`:
  ceil(`remat_offload_fraction` * num_layers), the first ones, except that neither part is
  a single layer: that layer is offloaded with the others (a one-layer loop is inlined by
  XLA; on an H200 the fine-tuning step with one extra-MSA block split off on the device
  peaked at 20.5 GiB against 16.0 with two, 2026-12-04)."""
  fraction = float(global_config.get("remat_offload_fraction", 1.0))
  if not 0.0 <= fraction <= 1.0:
    raise ValueError(f"global_config.remat_offload_fraction={fraction} is not in [0, 1]")
  offloaded = min(num_layers, math.ceil(fraction * num_layers - 1e-9))
  if 0 < offloaded < num_layers:
    offloaded = max(offloaded, 2)
    if num_layers - offloaded == 1:
      offloaded = num_layers
  return offloaded


def _layer_slice(block: nn.Module, body, carry: Any, start: int, stop: int, unroll: int,
                 flat_params: _FlatParams | None = None, whole: bool = False,
                 stack_policy=None) -> Any:
  """Layers start..stop-1 of a stack: `body` scanned over that slice of the stacked
  [num_layers, ...] parameters, or over all of them (`whole`: a plain scan, also while
  initialising). A slice only after initialisation (the parameters exist): the gradient
  flows back into the slice of the whole. `flat_params`: the parameters scanned as one
  [stop - start, P] array (`_FlatParams`; `body` splits each row); `stack_policy` (with
  them): the slice and the flattening under a checkpoint with that policy
  (`_flat_stack_policy`)."""
  scan = _scan_layers(body, stop - start, min(unroll, stop - start), block.is_initializing())
  if whole and flat_params is None:
    return scan(block, carry, None)[0]

  def trans_in(variables):
    if not whole:
      variables = jax.tree.map(lambda x: x[start:stop], variables)
    return flat_params.flatten(variables) if flat_params is not None else variables

  sliced = nn.map_variables(lambda module, c: scan(module, c, None)[0], "params",
                            trans_in_fn=trans_in, mutable=False)
  if flat_params is not None and stack_policy is not None:
    sliced = nn.remat(sliced, policy=stack_policy, prevent_cse=True)
  return sliced(block, carry)


def _scan_layers(body, length: int, unroll: int = 1, initializing: bool = True):
  """`nn.scan` of `body` over `length` layers, each with its own parameters (a leading layer
  axis) and its own parameter and dropout randomness. `initializing=False`: without the
  extra trace of the body (`primitives.scan_trace_options`)."""
  return nn.scan(body, variable_axes={"params": 0},
                 split_rngs={"params": True, "dropout": True}, length=length, unroll=unroll,
                 **scan_trace_options(initializing))


def _grouped_layer_stack(block: nn.Module, body, carry: Any, num_layers: int, group: int,
                         policy) -> Any:
  """`layer_stack` as num_layers/group rematerialised groups of `group` layers (see there)."""
  num_groups = num_layers // group
  inner = _scan_layers(body, group, initializing=block.is_initializing())

  def group_body(module, group_carry, _):
    return inner(module, group_carry, None)[0], None

  outer = _scan_layers(nn.remat(group_body, policy=policy, prevent_cse=False), num_groups,
                       initializing=block.is_initializing())

  def grouped(tree):  # [num_layers, ...] -> [num_groups, group, ...]
    return jax.tree.map(lambda x: x.reshape((num_groups, group) + x.shape[1:]), tree)

  def flat(tree):  # [num_groups, group, ...] -> [num_layers, ...]
    return jax.tree.map(lambda x: x.reshape((num_layers,) + x.shape[2:]), tree)

  mapped = nn.map_variables(lambda module, c: outer(module, c, None)[0], "params",
                            trans_in_fn=grouped, trans_out_fn=flat, mutable=True)
  return mapped(block, carry)
