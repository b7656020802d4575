"""Frame aligned point error (FAPE): backbone and side-chain losses of the structure module.

Jumper et al. (2021) Suppl. 1.9.2-1.9.3: Alg. 28 "computeFAPE", the backbone FAPE of Alg. 20
line 17 (averaged over the structure-module layers, clamped in a fraction of the batches,
Suppl. 1.11.5) and the all-atom FAPE on the renamed ground truth of Alg. 26
"renameSymmetricGroundTruthAtoms".
"""

from __future__ import annotations

from typing import Mapping, Optional

import jax
import jax.numpy as jnp
import ml_collections

from af2flax.geometry.rigid import Rigid, rot_vec

Array = jax.Array


def frame_aligned_point_error(pred_frames: Rigid, target_frames: Rigid, frames_mask: Array,
                              pred_positions: Array, target_positions: Array,
                              positions_mask: Array, *, length_scale: float,
                              l1_clamp_distance: Optional[float] = None,
                              epsilon: float = 1e-4) -> Array:
  """Masked mean distance between points seen from every pair of aligned frames.

  Jumper et al. (2021) Suppl. Alg. 28 "computeFAPE".

  Args:
    pred_frames, target_frames: frames [F].
    frames_mask: [F] which frame pairs count.
    pred_positions, target_positions: points [P, 3] (Å).
    positions_mask: [P] which points count.
    length_scale: Z of Alg. 28 (Å); the result is in units of it.
    l1_clamp_distance: d_clamp (Å), or None (or 0) for the unclamped loss.
    epsilon: regulariser of the distance and of the masked mean (AlphaFold's 1e-4).

  Returns:
    Scalar FAPE. All-zero masks give 0 (and finite gradients).
  """
  pred_inv = pred_frames.inverse()
  target_inv = target_frames.inverse()
  # [F, P, 3]: every point in every frame.
  local_pred = (rot_vec(pred_inv.rot[:, None], pred_positions[None, :])
                + pred_inv.trans[:, None])
  local_target = (rot_vec(target_inv.rot[:, None], target_positions[None, :])
                  + target_inv.trans[:, None])
  error_dist = jnp.sqrt(jnp.sum(jnp.square(local_pred - local_target), axis=-1) + epsilon)
  if l1_clamp_distance:
    error_dist = jnp.clip(error_dist, 0.0, l1_clamp_distance)
  normed_error = error_dist / length_scale
  normed_error = normed_error * frames_mask[:, None] * positions_mask[None, :]
  normalization = jnp.sum(frames_mask) * jnp.sum(positions_mask)
  return jnp.sum(normed_error) / (epsilon + normalization)


def backbone_fape_loss(traj: Array, backbone_affine_tensor: Array, backbone_affine_mask: Array,
                       fape_config: ml_collections.ConfigDict,
                       use_clamped_fape: Optional[Array] = None) -> dict[str, Array]:
  """Backbone FAPE of every structure-module layer, averaged over layers.

  Jumper et al. (2021) Suppl. Alg. 20 "StructureModule" line 17 and Suppl. 1.11.5 "Loss
  clamping details": clamped at `fape_config.clamp_distance` when `use_clamped_fape` is 1,
  unclamped when 0 (a fraction of the batches, chosen by the data pipeline; absent = clamped).
  Frames and points are the backbone frames and their origins (the Cα atoms).

  Args:
    traj: [L, N, 7] frames of every layer, (quaternion w, x, y, z, translation Å).
    backbone_affine_tensor: [N, 7] true backbone frames, same layout.
    backbone_affine_mask: [N] which true frames exist.
    fape_config: `heads.structure_module.fape` (`clamp_distance`, `loss_unit_distance`).
    use_clamped_fape: scalar in [0, 1], or None.

  Returns:
    {'loss': mean over layers, 'fape': the final layer's FAPE, 'per_layer': [L]}.
  """
  # As AlphaFold, the rotation is read from the quaternion without renormalising it: the
  # structure module emits unit quaternions, and an all-zero padding row stays finite.
  pred_frames = Rigid.from_tensor_7(traj.astype(jnp.float32), normalize=False)
  gt_frames = Rigid.from_tensor_7(backbone_affine_tensor.astype(jnp.float32), normalize=False)
  mask = backbone_affine_mask.astype(jnp.float32)

  def per_layer(clamp_distance):
    def one_layer(frames_rot, frames_trans):
      frames = Rigid(rot=frames_rot, trans=frames_trans)
      return frame_aligned_point_error(
          frames, gt_frames, mask, frames.trans, gt_frames.trans, mask,
          length_scale=fape_config.loss_unit_distance, l1_clamp_distance=clamp_distance)
    return jax.vmap(one_layer)(pred_frames.rot, pred_frames.trans)

  fape = per_layer(fape_config.clamp_distance)
  if use_clamped_fape is not None:
    use_clamped = jnp.asarray(use_clamped_fape, jnp.float32)
    fape = fape * use_clamped + per_layer(None) * (1.0 - use_clamped)
  return {"loss": jnp.mean(fape), "fape": fape[-1], "per_layer": fape}


def find_optimal_renaming(atom14_gt_positions: Array, atom14_alt_gt_positions: Array,
                          atom14_atom_is_ambiguous: Array, atom14_gt_exists: Array,
                          atom14_pred_positions: Array) -> Array:
  """Per residue, 1.0 where the swapped naming of symmetric atoms fits the prediction better.

  Jumper et al. (2021) Suppl. Alg. 26 "renameSymmetricGroundTruthAtoms" lines 1-5: compare the
  distances from each ambiguous atom to all non-ambiguous atoms of the structure under both
  namings (sum of absolute distance differences).

  Shapes: positions [N, 14, 3], masks [N, 14]; returns [N] float32 (no gradient).
  """
  def dists(points):  # [N, N, 14, 14]
    diff = points[:, None, :, None, :] - points[None, :, None, :, :]
    return jnp.sqrt(1e-10 + jnp.sum(jnp.square(diff), axis=-1))

  pred_dists = dists(atom14_pred_positions.astype(jnp.float32))
  gt_dists = dists(atom14_gt_positions.astype(jnp.float32))
  alt_gt_dists = dists(atom14_alt_gt_positions.astype(jnp.float32))
  error = jnp.sqrt(1e-10 + jnp.square(pred_dists - gt_dists))
  alt_error = jnp.sqrt(1e-10 + jnp.square(pred_dists - alt_gt_dists))
  exists = atom14_gt_exists.astype(jnp.float32)
  ambiguous = atom14_atom_is_ambiguous.astype(jnp.float32)
  mask = ((exists * ambiguous)[:, None, :, None]
          * (exists * (1.0 - ambiguous))[None, :, None, :])
  per_res = jnp.sum(mask * error, axis=(1, 2, 3))
  alt_per_res = jnp.sum(mask * alt_error, axis=(1, 2, 3))
  return jax.lax.stop_gradient((alt_per_res < per_res).astype(jnp.float32))


def compute_renamed_ground_truth(batch: Mapping[str, Array],
                                 atom14_pred_positions: Array) -> dict[str, Array]:
  """Ground truth atoms with each residue's symmetric atoms named as the prediction fits best.

  Jumper et al. (2021) Suppl. Alg. 26 "renameSymmetricGroundTruthAtoms".

  Args:
    batch: `atom14_gt_positions`, `atom14_alt_gt_positions`, `atom14_atom_is_ambiguous`,
      `atom14_gt_exists`, `atom14_alt_gt_exists`.
    atom14_pred_positions: [N, 14, 3] final predicted atoms.

  Returns:
    `alt_naming_is_better` [N], `renamed_atom14_gt_positions` [N, 14, 3],
    `renamed_atom14_gt_exists` [N, 14].
  """
  alt_naming_is_better = find_optimal_renaming(
      batch["atom14_gt_positions"], batch["atom14_alt_gt_positions"],
      batch["atom14_atom_is_ambiguous"], batch["atom14_gt_exists"], atom14_pred_positions)
  alt = alt_naming_is_better
  positions = ((1.0 - alt[:, None, None]) * batch["atom14_gt_positions"]
               + alt[:, None, None] * batch["atom14_alt_gt_positions"])
  exists = ((1.0 - alt[:, None]) * batch["atom14_gt_exists"]
            + alt[:, None] * batch["atom14_alt_gt_exists"])
  return {"alt_naming_is_better": alt_naming_is_better,
          "renamed_atom14_gt_positions": positions.astype(jnp.float32),
          "renamed_atom14_gt_exists": exists.astype(jnp.float32)}


def sidechain_fape_loss(pred_frames: Array, pred_atom14_positions: Array,
                        rigidgroups_gt_frames: Array, rigidgroups_alt_gt_frames: Array,
                        rigidgroups_gt_exists: Array, renamed_atom14_gt_positions: Array,
                        renamed_atom14_gt_exists: Array, alt_naming_is_better: Array,
                        sidechain_config: ml_collections.ConfigDict) -> dict[str, Array]:
  """All-atom FAPE of the final layer against the renamed ground truth.

  Jumper et al. (2021) Suppl. Alg. 20 line 28 and Alg. 26 line 7 (the renamed frames): all 8
  rigid-group frames of every residue against all 14 atoms of every residue, clamped at
  `atom_clamp_distance` and scaled by `length_scale`.

  Args:
    pred_frames: [N, 8, 12] predicted rigid-group frames of the final layer (row-major rotation
      + translation in Å).
    pred_atom14_positions: [N, 14, 3] predicted atoms of the final layer.
    rigidgroups_gt_frames, rigidgroups_alt_gt_frames: [N, 8, 12]; rigidgroups_gt_exists: [N, 8].
    renamed_atom14_gt_positions: [N, 14, 3]; renamed_atom14_gt_exists: [N, 14].
    alt_naming_is_better: [N] (Alg. 26).
    sidechain_config: `heads.structure_module.sidechain`.

  Returns:
    {'loss', 'fape'} (the same scalar).
  """
  alt = alt_naming_is_better[:, None, None]
  renamed_gt_frames = (1.0 - alt) * rigidgroups_gt_frames + alt * rigidgroups_alt_gt_frames
  fape = frame_aligned_point_error(
      Rigid.from_tensor_12(pred_frames.reshape(-1, 12).astype(jnp.float32)),
      Rigid.from_tensor_12(renamed_gt_frames.reshape(-1, 12).astype(jnp.float32)),
      rigidgroups_gt_exists.reshape(-1).astype(jnp.float32),
      pred_atom14_positions.reshape(-1, 3).astype(jnp.float32),
      renamed_atom14_gt_positions.reshape(-1, 3).astype(jnp.float32),
      renamed_atom14_gt_exists.reshape(-1).astype(jnp.float32),
      length_scale=sidechain_config.length_scale,
      l1_clamp_distance=sidechain_config.atom_clamp_distance)
  return {"loss": fape, "fape": fape}
