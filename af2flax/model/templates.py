"""Template embedding: pair features, template pair stack, point-wise attention.

Jumper et al. (2021) Suppl. Alg. 2 lines 9-13, Alg. 16 "TemplatePairStack", Alg. 17
"TemplatePointwiseAttention" and the template pair features of Suppl. 1.7.1 / Table 1.
The torsion-angle template features that become extra MSA rows are in `embedders.py`.
"""

from __future__ import annotations

from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from af2flax.common import residue_constants as rc
from af2flax.geometry.rigid import Rigid, rot_vec
from af2flax.model.evoformer import layer_stack, pair_update_block
from af2flax.model.primitives import (Attention, LayerNorm, Linear, ResidualDropout,
                                      chunked_apply, compute_dtype, scan_trace_options)
from af2flax.model.template_features import dgram_from_positions
from af2flax.model.triangle import subbatch_size

# Added to squared distances before the inverse square root of the unit-vector feature.
UNIT_VECTOR_EPSILON = 1e-6
# The per-template features TemplateEmbedding reads (all with a leading template axis).
TEMPLATE_FEATURES = ("template_aatype", "template_all_atom_positions", "template_all_atom_masks",
                     "template_pseudo_beta", "template_pseudo_beta_mask")


class TemplatePairBlock(nn.Module):
  """One block of the template pair stack.

  Jumper et al. (2021) Suppl. Alg. 16 "TemplatePairStack" lines 2-6: triangle attention
  (starting, ending node), triangle multiplication (outgoing, incoming), pair transition.
  """

  config: Any
  global_config: Any

  @nn.compact
  def __call__(self, pair_act: jax.Array, pair_mask: jax.Array,
               deterministic: bool = True) -> jax.Array:
    gc = self.global_config

    def residual(act, update, module_config):
      return ResidualDropout(module_config, gc)(act, update, deterministic)

    return pair_update_block(pair_act, pair_mask, self.config, gc, residual, subbatch_size(gc),
                             order=("triangle_attention_starting_node",
                                    "triangle_attention_ending_node",
                                    "triangle_multiplication_outgoing",
                                    "triangle_multiplication_incoming", "pair_transition"))


class TemplatePairStack(nn.Module):
  """`config.num_block` template pair blocks with stacked parameters.

  Jumper et al. (2021) Suppl. Alg. 16 "TemplatePairStack". The blocks live under
  `__layer_stack_no_state` with a leading layer axis, as in AlphaFold's parameter files.
  """

  config: Any
  global_config: Any

  @nn.compact
  def __call__(self, pair_act: jax.Array, pair_mask: jax.Array,
               deterministic: bool = True) -> jax.Array:
    block = TemplatePairBlock(self.config, self.global_config, name="__layer_stack_no_state")
    # Run once per template (a loop): its block inputs stay on the device (`layer_stack`).
    return layer_stack(block, pair_act, self.config.num_block, self.global_config, pair_mask,
                       deterministic, offload=False)


def template_pair_features(template: Mapping[str, jax.Array], config: Any) -> jax.Array:
  """The 88 pair features of one template (Suppl. 1.7.1, Table 1), masked by its backbone.

  Distogram of the pseudo-β atoms (`config.dgram_features` bins), their pair mask, the
  one-hot aatype of residue j then i, the unit vector from residue i's backbone frame to
  residue j's Cα (zeros unless `config.use_template_unit_vector`), and the backbone pair
  mask (N, Cα and C present). Returns [N_res, N_res, 39 + 1 + 22 + 22 + 3 + 1] in float32.
  """
  num_res = template["template_aatype"].shape[0]
  pb_mask = template["template_pseudo_beta_mask"].astype(jnp.float32)
  pb_mask_2d = pb_mask[:, None] * pb_mask[None, :]
  dgram = dgram_from_positions(template["template_pseudo_beta"], **config.dgram_features)
  aatype = jax.nn.one_hot(template["template_aatype"], 22, dtype=jnp.float32)

  n, ca, c = (rc.atom_order[atom] for atom in ("N", "CA", "C"))
  positions = template["template_all_atom_positions"].astype(jnp.float32)
  atom_mask = template["template_all_atom_masks"].astype(jnp.float32)
  backbone_mask = atom_mask[:, n] * atom_mask[:, ca] * atom_mask[:, c]
  backbone_mask_2d = backbone_mask[:, None] * backbone_mask[None, :]
  if config.use_template_unit_vector:
    frames = Rigid.from_three_points(positions[:, n], positions[:, ca], positions[:, c])
    # Cα of residue j in the local frame of residue i.
    local = rot_vec(jnp.swapaxes(frames.rot, -1, -2)[:, None],
                    frames.trans[None, :, :] - frames.trans[:, None, :])
    inv_distance = jax.lax.rsqrt(UNIT_VECTOR_EPSILON + jnp.sum(jnp.square(local), axis=-1))
    unit_vector = local * (inv_distance * backbone_mask_2d)[..., None]
  else:
    unit_vector = jnp.zeros((num_res, num_res, 3), jnp.float32)

  features = jnp.concatenate([
      dgram, pb_mask_2d[..., None],
      jnp.tile(aatype[None, :, :], [num_res, 1, 1]),
      jnp.tile(aatype[:, None, :], [1, num_res, 1]),
      unit_vector, backbone_mask_2d[..., None]], axis=-1)
  return features * backbone_mask_2d[..., None]


class SingleTemplateEmbedding(nn.Module):
  """Embeds one template's pair features and runs the template pair stack on them.

  Jumper et al. (2021) Suppl. Alg. 2 "Inference" lines 9 and 11 (template pair features,
  Linear, TemplatePairStack, LayerNorm).
  """

  config: Any
  global_config: Any

  @nn.compact
  def __call__(self, template: Mapping[str, jax.Array], mask_2d: jax.Array,
               deterministic: bool = True) -> jax.Array:
    c, gc = self.config, self.global_config
    dtype = compute_dtype(gc)
    num_channels = c.template_pair_stack.triangle_attention_ending_node.value_dim
    act = template_pair_features(template, c).astype(dtype)
    act = Linear(num_channels, initializer="relu", dtype=dtype, name="embedding2d")(act)
    act = TemplatePairStack(c.template_pair_stack, gc, name="template_pair_stack")(
        act, mask_2d, deterministic)
    return LayerNorm(name="output_layer_norm")(act)


class TemplateEmbedding(nn.Module):
  """Embeds all templates and attends from the pair representation to them.

  Jumper et al. (2021) Suppl. Alg. 2 lines 9-12 and Alg. 17 "TemplatePointwiseAttention".
  Templates are embedded one after the other with shared weights (a scan, as AlphaFold's
  `sharded_map` with shard size 1), then each pair entry attends over the templates
  (masked by `template_mask`). With no template present the embedding is zero.
  query_embedding [N_res, N_res, c_z]; template features with a leading template axis;
  mask_2d [N_res, N_res]. Returns [N_res, N_res, c_z].
  """

  config: Any
  global_config: Any

  @nn.compact
  def __call__(self, query_embedding: jax.Array, template_batch: Mapping[str, jax.Array],
               mask_2d: jax.Array, deterministic: bool = True) -> jax.Array:
    c, gc = self.config, self.global_config
    dtype = compute_dtype(gc)
    num_res, _, query_channels = query_embedding.shape
    template_mask = template_batch["template_mask"].astype(dtype)
    num_templates = template_mask.shape[0]
    templates = {key: template_batch[key] for key in TEMPLATE_FEATURES}

    def embed_one(module, carry, template):
      return carry, module(template, mask_2d, deterministic)

    scan = nn.scan(embed_one, variable_broadcast="params",
                   split_rngs={"params": False, "dropout": True}, length=num_templates,
                   **scan_trace_options(self.is_initializing()))
    embedder = SingleTemplateEmbedding(c, gc, name="single_template_embedding")
    _, template_pair = scan(embedder, None, templates)  # [N_templ, N_res, N_res, c_t]

    num_channels = template_pair.shape[-1]
    flat_query = jnp.reshape(query_embedding.astype(dtype), [num_res * num_res, 1, query_channels])
    flat_templates = jnp.reshape(jnp.transpose(template_pair, [1, 2, 0, 3]),
                                 [num_res * num_res, num_templates, num_channels])
    mask = template_mask[None, None, None, :]
    attention = Attention(num_head=c.attention.num_head, output_dim=query_channels,
                          key_dim=c.attention.get("key_dim"),
                          value_dim=c.attention.get("value_dim"),
                          gating=c.attention.gating, zero_init=gc.zero_init, dtype=dtype,
                          name="attention")
    chunk = int(c.subbatch_size) if subbatch_size(gc) is not None else None
    embedding = chunked_apply(attention, chunk, [flat_query, flat_templates], [mask])
    embedding = jnp.reshape(embedding, [num_res, num_res, query_channels])
    # No template at all: no contribution and no gradient into the template modules.
    return embedding * (jnp.sum(template_mask) > 0.0).astype(embedding.dtype)
