"""Losses of the auxiliary heads: distogram, masked MSA, pLDDT, experimentally resolved, pAE.

Jumper et al. (2021) Suppl. 1.9.6-1.9.10. The confidence heads (pLDDT, experimentally resolved,
pAE) are trained only on structures whose resolution lies in [min_resolution, max_resolution]
(their configs' `filter_by_resolution`): NMR and distillation examples carry resolution 0.
Every loss casts its logits to float32.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections

from af2flax.common import residue_constants as rc
from af2flax.geometry.rigid import Rigid
from af2flax.losses.lddt import lddt

Array = jax.Array


def softmax_cross_entropy(logits: Array, labels: Array) -> Array:
  """-sum(labels * log_softmax(logits)) over the last axis."""
  return -jnp.sum(labels * jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1), axis=-1)


def sigmoid_cross_entropy(logits: Array, labels: Array) -> Array:
  """Elementwise binary cross entropy of sigmoid(logits) with targets in [0, 1]."""
  logits = logits.astype(jnp.float32)
  return -labels * jax.nn.log_sigmoid(logits) - (1.0 - labels) * jax.nn.log_sigmoid(-logits)


def resolution_weight(resolution: Array, config: ml_collections.ConfigDict) -> Array:
  """1.0 if the head is trained on this example's resolution, else 0.0 (Suppl. 1.9.6, 1.9.10)."""
  if not config.get("filter_by_resolution", False):
    return jnp.asarray(1.0, jnp.float32)
  resolution = jnp.asarray(resolution, jnp.float32)
  return ((resolution >= config.min_resolution)
          & (resolution <= config.max_resolution)).astype(jnp.float32)


def distogram_loss(logits: Array, bin_edges: Array, pseudo_beta: Array, pseudo_beta_mask: Array,
                   num_bins: int) -> dict[str, Array]:
  """Cross entropy of the binned Cβ-Cβ distance (Cα for glycine).

  Jumper et al. (2021) Suppl. 1.9.8 "Distogram prediction" (eq. 41): bin b counts distances above
  the first b edges; the last bin holds everything beyond the last edge.

  Args:
    logits: [N, N, num_bins]; bin_edges: [num_bins - 1] (Å).
    pseudo_beta: [N, 3]; pseudo_beta_mask: [N].

  Returns:
    {'loss', 'true_dist' [N, N] (Å)}.
  """
  positions = pseudo_beta.astype(jnp.float32)
  mask = pseudo_beta_mask.astype(jnp.float32)
  dist2 = jnp.sum(jnp.square(positions[:, None, :] - positions[None, :, :]), axis=-1)
  true_bins = jnp.sum(dist2[..., None] > jnp.square(bin_edges), axis=-1)
  errors = softmax_cross_entropy(logits, jax.nn.one_hot(true_bins, num_bins))
  square_mask = mask[:, None] * mask[None, :]
  loss = jnp.sum(errors * square_mask) / (1e-6 + jnp.sum(square_mask))
  return {"loss": loss, "true_dist": jnp.sqrt(1e-6 + dist2)}


def masked_msa_loss(logits: Array, true_msa: Array, bert_mask: Array,
                    num_output: int) -> dict[str, Array]:
  """Cross entropy of the masked MSA entries (BERT objective).

  Jumper et al. (2021) Suppl. 1.9.9 "Masked MSA prediction" (eq. 42).

  Args:
    logits: [N_seq, N_res, num_output]; true_msa: [N_seq, N_res] int; bert_mask: [N_seq, N_res].
  """
  errors = softmax_cross_entropy(logits, jax.nn.one_hot(true_msa, num_output))
  bert_mask = bert_mask.astype(jnp.float32)
  return {"loss": jnp.sum(errors * bert_mask) / (1e-8 + jnp.sum(bert_mask))}


def predicted_lddt_loss(logits: Array, final_atom_positions: Array, all_atom_positions: Array,
                        all_atom_mask: Array, resolution: Array,
                        config: ml_collections.ConfigDict) -> dict[str, Array]:
  """Cross entropy of the binned per-residue lDDT-Cα of the final structure.

  Jumper et al. (2021) Suppl. 1.9.6 and Alg. 29 "predictPerResidueLDDT_Ca": the target lDDT-Cα
  (15 Å inclusion radius, no gradient into the structure) is binned into `num_bins` equal bins
  of [0, 1].

  Args:
    logits: [N, num_bins]; final_atom_positions: [N, 37, 3] predicted;
    all_atom_positions: [N, 37, 3] true; all_atom_mask: [N, 37]; resolution: scalar (Å).
    config: `heads.predicted_lddt`.
  """
  ca = rc.atom_order["CA"]
  mask_ca = all_atom_mask[:, ca].astype(jnp.float32)
  lddt_ca = jax.lax.stop_gradient(lddt(final_atom_positions[:, ca], all_atom_positions[:, ca],
                                       mask_ca, cutoff=15.0, per_residue=True))
  num_bins = config.num_bins
  bin_index = jnp.minimum(jnp.floor(lddt_ca * num_bins).astype(jnp.int32), num_bins - 1)
  errors = softmax_cross_entropy(logits, jax.nn.one_hot(bin_index, num_bins))
  loss = jnp.sum(errors * mask_ca) / (jnp.sum(mask_ca) + 1e-8)
  return {"loss": loss * resolution_weight(resolution, config)}


def experimentally_resolved_loss(logits: Array, atom37_atom_exists: Array, all_atom_mask: Array,
                                 resolution: Array,
                                 config: ml_collections.ConfigDict) -> dict[str, Array]:
  """Binary cross entropy of "is this atom resolved in the experiment", over existing atoms.

  Jumper et al. (2021) Suppl. 1.9.10 '"Experimentally resolved" prediction' (eq. 43).

  Args:
    logits: [N, 37]; atom37_atom_exists: [N, 37]; all_atom_mask: [N, 37]; resolution: scalar.
    config: `heads.experimentally_resolved`.
  """
  exists = atom37_atom_exists.astype(jnp.float32)
  xent = sigmoid_cross_entropy(logits, all_atom_mask.astype(jnp.float32))
  loss = jnp.sum(xent * exists) / (1e-8 + jnp.sum(exists))
  return {"loss": loss * resolution_weight(resolution, config)}


def predicted_aligned_error_loss(logits: Array, breaks: Array, final_affines: Array,
                                 backbone_affine_tensor: Array, backbone_affine_mask: Array,
                                 resolution: Array,
                                 config: ml_collections.ConfigDict) -> dict[str, Array]:
  """Cross entropy of the binned aligned error of every residue in every backbone frame.

  Jumper et al. (2021) Suppl. 1.9.7 "TM-score prediction" (eq. 38-40): e_ij = |T_i^-1 x_j -
  T_i^true^-1 x_j^true| with x_j the Cα (frame origin), binned by `breaks`; no gradient into the
  structure.

  Args:
    logits: [N, N, num_bins]; breaks: [num_bins - 1] (Å).
    final_affines: [N, 7] predicted frames; backbone_affine_tensor: [N, 7]; mask: [N].
    resolution: scalar. config: `heads.predicted_aligned_error`.
  """
  def local_points(affine):  # [N_frames, N_points, 3]
    frames = Rigid.from_tensor_7(affine.astype(jnp.float32), normalize=False)
    return frames[:, None].apply_inverse(frames.trans[None, :, :])

  error_dist2 = jnp.sum(jnp.square(local_points(final_affines)
                                   - local_points(backbone_affine_tensor)), axis=-1)
  error_dist2 = jax.lax.stop_gradient(error_dist2)
  true_bins = jnp.sum(error_dist2[..., None] > jnp.square(breaks), axis=-1)
  errors = softmax_cross_entropy(logits, jax.nn.one_hot(true_bins, config.num_bins))
  mask = backbone_affine_mask.astype(jnp.float32)
  square_mask = mask[:, None] * mask[None, :]
  loss = jnp.sum(errors * square_mask) / (1e-8 + jnp.sum(square_mask))
  return {"loss": loss * resolution_weight(resolution, config)}
