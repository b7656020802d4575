"""Input embedders of the trunk (Jumper et al. 2021, Suppl. 1.5-1.7).

In AlphaFold's parameter files these layers sit directly under `evoformer/`
(`evoformer/preprocess_1d`, `evoformer/prev_pair_norm`, ...). Each embedder here is its own
class, and `EmbeddingsAndEvoformer` shares its parameter scope with them
(`nn.share_scope`), so that the parameter paths stay AlphaFold's.
"""

from __future__ import annotations

from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from af2flax.model.primitives import LayerNorm, Linear, compute_dtype, expand
from af2flax.model.template_features import (atom37_to_torsion_angles, dgram_from_positions,
                                             pseudo_beta)

# Extra-MSA feature: one-hot over 20 amino acids + unknown + gap + mask token.
NUM_EXTRA_MSA_CLASSES = 23
# Template aatype one-hot: 20 amino acids + unknown + gap.
NUM_TEMPLATE_AATYPE_CLASSES = 22


class InputEmbedder(nn.Module):
  """Initial MSA and pair representations from the target and MSA features.

  Jumper et al. (2021) Suppl. Alg. 3 "InputEmbedder" lines 1-4 (relpos is
  `RelativePositionEncoding`). target_feat [N_res, 22], msa_feat [N_seq, N_res, 49];
  returns msa_act [N_seq, N_res, c_m] and pair_act [N_res, N_res, c_z].
  """

  config: Any   # embeddings_and_evoformer
  global_config: Any

  @nn.compact
  def __call__(self, target_feat: jax.Array, msa_feat: jax.Array) -> tuple[jax.Array, jax.Array]:
    c = self.config
    dtype = compute_dtype(self.global_config)
    preprocess_1d = Linear(c.msa_channel, dtype=dtype, name="preprocess_1d")(target_feat)
    preprocess_msa = Linear(c.msa_channel, dtype=dtype, name="preprocess_msa")(msa_feat)
    # Broadcast with float32 gradient sums (`expand`): in bf16 JAX's would sum in 16 bits.
    msa_act = expand(preprocess_1d[None], preprocess_msa.shape) + preprocess_msa
    left_single = Linear(c.pair_channel, dtype=dtype, name="left_single")(target_feat)
    right_single = Linear(c.pair_channel, dtype=dtype, name="right_single")(target_feat)
    pair_shape = left_single.shape[:1] + right_single.shape
    pair_act = expand(left_single[:, None], pair_shape) + expand(right_single[None], pair_shape)
    return msa_act, pair_act


class RelativePositionEncoding(nn.Module):
  """Linear embedding of the clipped, one-hot residue index offset.

  Jumper et al. (2021) Suppl. Alg. 4 "relpos" and Alg. 5 "one_hot": offsets i - j clipped
  to [-max_relative_feature, max_relative_feature] give 2 * max + 1 classes.
  residue_index [N_res]; returns [N_res, N_res, c_z].
  """

  config: Any
  global_config: Any

  @nn.compact
  def __call__(self, residue_index: jax.Array) -> jax.Array:
    max_rel = self.config.max_relative_feature
    offset = residue_index[:, None] - residue_index[None, :]
    rel_pos = jax.nn.one_hot(jnp.clip(offset + max_rel, 0, 2 * max_rel), 2 * max_rel + 1)
    # 'pair_activiations' (sic) is AlphaFold's parameter name.
    return Linear(self.config.pair_channel, dtype=compute_dtype(self.global_config),
                  name="pair_activiations")(rel_pos)


class RecyclingEmbedder(nn.Module):
  """Adds the previous iteration's outputs to the MSA and pair representations.

  Jumper et al. (2021) Suppl. Alg. 32 "RecyclingEmbedder": a distogram of the previous
  pseudo-β positions (`config.prev_pos` bins) through a Linear (when `recycle_pos`), and
  the layer-normed previous first MSA row and pair (when `recycle_features`).
  msa_act [N_seq, N_res, c_m], pair_act [N_res, N_res, c_z], prev_pos [N_res, 37, 3];
  returns the updated (msa_act, pair_act).
  """

  config: Any
  global_config: Any

  @nn.compact
  def __call__(self, msa_act: jax.Array, pair_act: jax.Array, aatype: jax.Array,
               prev: Mapping[str, jax.Array]) -> tuple[jax.Array, jax.Array]:
    c = self.config
    dtype = compute_dtype(self.global_config)
    if c.recycle_pos:
      dgram = dgram_from_positions(pseudo_beta(aatype, prev["prev_pos"]), **c.prev_pos)
      pair_act = pair_act + Linear(c.pair_channel, dtype=dtype, name="prev_pos_linear")(dgram)
    if c.recycle_features:
      first_row = LayerNorm(dtype=dtype, name="prev_msa_first_row_norm")(
          prev["prev_msa_first_row"])
      msa_act = msa_act.at[0].add(first_row)
      pair_act = pair_act + LayerNorm(dtype=dtype, name="prev_pair_norm")(prev["prev_pair"])
    return msa_act, pair_act


class ExtraMsaEmbedder(nn.Module):
  """Embeds the extra (unclustered) MSA.

  Jumper et al. (2021) Suppl. Alg. 2 line 14 and Table 1: one-hot extra_msa (23 classes),
  has_deletion and deletion_value through a Linear to c_e. Returns [N_extra, N_res, c_e].
  """

  config: Any
  global_config: Any

  @nn.compact
  def __call__(self, extra_msa: jax.Array, extra_has_deletion: jax.Array,
               extra_deletion_value: jax.Array) -> jax.Array:
    # The one-hot is built here, as late as possible: it is the largest input array.
    features = jnp.concatenate([
        jax.nn.one_hot(extra_msa, NUM_EXTRA_MSA_CLASSES),
        extra_has_deletion[..., None].astype(jnp.float32),
        extra_deletion_value[..., None].astype(jnp.float32)], axis=-1)
    return Linear(self.config.extra_msa_channel, dtype=compute_dtype(self.global_config),
                  name="extra_msa_activations")(features)


class TemplateTorsionEmbedder(nn.Module):
  """Template torsion-angle features as extra MSA rows.

  Jumper et al. (2021) Suppl. 1.7.1 and Alg. 2 lines 7-8: one-hot template aatype, sin/cos
  of the 7 torsions and their π-shifted alternatives, and the torsion mask (57 features)
  through Linear-ReLU-Linear to c_m. The rows' mask is the ψ mask (it depends on the
  residue's own backbone atoms only).
  Returns rows [N_templ, N_res, c_m] and their mask [N_templ, N_res].
  """

  config: Any   # embeddings_and_evoformer
  global_config: Any

  @nn.compact
  def __call__(self, batch: Mapping[str, jax.Array]) -> tuple[jax.Array, jax.Array]:
    c, gc = self.config, self.global_config
    dtype = compute_dtype(gc)
    template_aatype = batch["template_aatype"]
    num_templ, num_res = template_aatype.shape
    torsions = atom37_to_torsion_angles(template_aatype, batch["template_all_atom_positions"],
                                        batch["template_all_atom_masks"],
                                        placeholder_for_undefined=not gc.zero_init)
    features = jnp.concatenate([
        jax.nn.one_hot(template_aatype, NUM_TEMPLATE_AATYPE_CLASSES),
        jnp.reshape(torsions["torsion_angles_sin_cos"], [num_templ, num_res, 14]),
        jnp.reshape(torsions["alt_torsion_angles_sin_cos"], [num_templ, num_res, 14]),
        torsions["torsion_angles_mask"]], axis=-1)
    act = Linear(c.msa_channel, initializer="relu", dtype=dtype,
                 name="template_single_embedding")(features)
    act = Linear(c.msa_channel, initializer="relu", dtype=dtype,
                 name="template_projection")(jax.nn.relu(act))
    psi_mask = torsions["torsion_angles_mask"][:, :, 2]
    return act, psi_mask
