"""Geometric input features computed inside the network (pure functions of arrays).

* `pseudo_beta`: Cβ (Cα for glycine) positions, used for recycled and template distograms.
* `dgram_from_positions`: one-hot distance bins (Suppl. Alg. 32 line 1, Suppl. 1.7.1).
* `atom37_to_torsion_angles`: the 7 torsions (ω, φ, ψ, χ1-4) as (sin, cos), their
  π-shifted alternatives and masks (Suppl. 1.7.1 template torsion features, Alg. 24 angle
  convention).

The torsion features are fed to the network unmasked, so where atoms are missing
(e.g. ω of the first residue, whose predecessor is zero padding) the value is whatever the
degenerate frame construction yields. To stay numerically identical to AlphaFold there, the
frame arithmetic follows AlphaFold's component-wise order of operations
(Suppl. Alg. 21 with a 1e-8 norm floor) rather than `geometry.rigid.Rigid`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from af2flax.common import residue_constants as rc

TORSION_NORM_EPSILON = 1e-8
# Distogram upper edge of the last bin, squared Å (catches everything above max_bin).
_DGRAM_LAST_UPPER = 1e8


def pseudo_beta(aatype: jax.Array, all_atom_positions: jax.Array) -> jax.Array:
  """Cβ position, or Cα for glycine. aatype [...], positions [..., 37, 3] -> [..., 3]."""
  is_gly = aatype == rc.restype_order["G"]
  ca = all_atom_positions[..., rc.atom_order["CA"], :]
  cb = all_atom_positions[..., rc.atom_order["CB"], :]
  return jnp.where(is_gly[..., None], ca, cb)


def pseudo_beta_mask(aatype: jax.Array, all_atom_mask: jax.Array) -> jax.Array:
  """Mask of `pseudo_beta`: the Cβ mask, or the Cα mask for glycine."""
  is_gly = aatype == rc.restype_order["G"]
  return jnp.where(is_gly, all_atom_mask[..., rc.atom_order["CA"]],
                   all_atom_mask[..., rc.atom_order["CB"]]).astype(jnp.float32)


def dgram_from_positions(positions: jax.Array, num_bins: int, min_bin: float,
                         max_bin: float) -> jax.Array:
  """One-hot distogram of pairwise distances. positions [N, 3] -> [N, N, num_bins].

  Bin k covers (lower_k, lower_{k+1}) with lower = linspace(min_bin, max_bin, num_bins);
  the last bin is open-ended. Distances below min_bin (e.g. all-zero positions) give an
  all-zero row. Comparisons are on squared distances, as in AlphaFold.
  """
  lower_breaks = jnp.square(jnp.linspace(min_bin, max_bin, num_bins))
  upper_breaks = jnp.concatenate(
      [lower_breaks[1:], jnp.array([_DGRAM_LAST_UPPER], dtype=jnp.float32)], axis=-1)
  dist2 = jnp.sum(jnp.square(positions[..., :, None, :] - positions[..., None, :, :]),
                  axis=-1, keepdims=True)
  return ((dist2 > lower_breaks).astype(jnp.float32)
          * (dist2 < upper_breaks).astype(jnp.float32))


def _chi_atom_indices() -> np.ndarray:
  """[21, 4, 4] atom37 indices of the four atoms of each chi (zeros where undefined)."""
  indices = np.zeros((21, 4, 4), dtype=np.int32)
  for restype_index, one_letter in enumerate(rc.restypes):
    for chi_index, atoms in enumerate(rc.chi_angles_atoms[rc.restype_1to3[one_letter]]):
      indices[restype_index, chi_index] = [rc.atom_order[atom] for atom in atoms]
  return indices


def _norm(x, y, z):
  return jnp.sqrt(jnp.square(x) + jnp.square(y) + jnp.square(z) + TORSION_NORM_EPSILON)


def _fourth_atom_in_frame(points: jax.Array) -> tuple[jax.Array, jax.Array]:
  """y and z of point 3 in the frame of points (0: xy-plane, 1: -x axis, 2: origin).

  points [..., 4, 3]. Suppl. Alg. 21 Gram-Schmidt, then the inverse transform applied as
  R^T p - R^T t, component by component in AlphaFold's order.
  """
  xy_plane, neg_x, origin, fourth = [points[..., i, :] for i in range(4)]
  ox, oy, oz = origin[..., 0], origin[..., 1], origin[..., 2]
  e0x, e0y, e0z = ox - neg_x[..., 0], oy - neg_x[..., 1], oz - neg_x[..., 2]
  norm0 = _norm(e0x, e0y, e0z)
  e0x, e0y, e0z = e0x / norm0, e0y / norm0, e0z / norm0
  u1x, u1y, u1z = xy_plane[..., 0] - ox, xy_plane[..., 1] - oy, xy_plane[..., 2] - oz
  dot = u1x * e0x + u1y * e0y + u1z * e0z
  e1x, e1y, e1z = u1x - dot * e0x, u1y - dot * e0y, u1z - dot * e0z
  norm1 = _norm(e1x, e1y, e1z)
  e1x, e1y, e1z = e1x / norm1, e1y / norm1, e1z / norm1
  e2x = e0y * e1z - e0z * e1y
  e2y = e0z * e1x - e0x * e1z
  e2z = e0x * e1y - e0y * e1x
  px, py, pz = fourth[..., 0], fourth[..., 1], fourth[..., 2]
  # Inverse translation -R^T t, then R^T p + (-R^T t).
  t1 = e1x * ox + e1y * oy + e1z * oz
  t2 = e2x * ox + e2y * oy + e2z * oz
  rel_y = (e1x * px + e1y * py + e1z * pz) + (-t1)
  rel_z = (e2x * px + e2y * py + e2z * pz) + (-t2)
  return rel_y, rel_z


def atom37_to_torsion_angles(aatype: jax.Array, all_atom_pos: jax.Array,
                             all_atom_mask: jax.Array,
                             placeholder_for_undefined: bool = False) -> dict[str, jax.Array]:
  """The 7 torsion angles of each residue as (sin, cos), with masks.

  Jumper et al. (2021) Suppl. 1.7.1 (template torsion features) and Alg. 24 conventions:
  torsions are [pre-ω, φ, ψ, χ1, χ2, χ3, χ4]; ψ is measured through O and mirrored.
  aatype [B, N] (values > 20 count as unknown), all_atom_pos [B, N, 37, 3],
  all_atom_mask [B, N, 37]. Returns 'torsion_angles_sin_cos' [B, N, 7, 2],
  'alt_torsion_angles_sin_cos' (χ shifted by π where the side chain is symmetric) and
  'torsion_angles_mask' [B, N, 7]. With `placeholder_for_undefined`, masked torsions are
  replaced by (sin, cos) = (1, 0) (AlphaFold does so when `zero_init` is off).
  """
  aatype = jnp.minimum(aatype, 20)
  all_atom_pos = all_atom_pos.astype(jnp.float32)
  all_atom_mask = all_atom_mask.astype(jnp.float32)
  prev_pos = jnp.concatenate([jnp.zeros_like(all_atom_pos[:, :1]), all_atom_pos[:, :-1]], axis=1)
  prev_mask = jnp.concatenate([jnp.zeros_like(all_atom_mask[:, :1]), all_atom_mask[:, :-1]],
                              axis=1)

  # Atom quadruples [B, N, 4, 3] of the backbone torsions (atom37: N=0, CA=1, C=2, O=4).
  pre_omega_pos = jnp.concatenate([prev_pos[:, :, 1:3], all_atom_pos[:, :, 0:2]], axis=-2)
  phi_pos = jnp.concatenate([prev_pos[:, :, 2:3], all_atom_pos[:, :, 0:3]], axis=-2)
  psi_pos = jnp.concatenate([all_atom_pos[:, :, 0:3], all_atom_pos[:, :, 4:5]], axis=-2)
  pre_omega_mask = jnp.prod(prev_mask[:, :, 1:3], axis=-1) * jnp.prod(all_atom_mask[:, :, 0:2],
                                                                      axis=-1)
  phi_mask = prev_mask[:, :, 2] * jnp.prod(all_atom_mask[:, :, 0:3], axis=-1)
  psi_mask = jnp.prod(all_atom_mask[:, :, 0:3], axis=-1) * all_atom_mask[:, :, 4]

  atom_indices = jnp.asarray(_chi_atom_indices())[aatype]  # [B, N, 4, 4]
  chis_pos = jnp.take_along_axis(all_atom_pos[:, :, None, :, :],
                                 atom_indices[..., None], axis=-2)  # [B, N, 4, 4, 3]
  chi_angles_mask = jnp.asarray(list(rc.chi_angles_mask) + [[0.0, 0.0, 0.0, 0.0]],
                                dtype=jnp.float32)
  chis_mask = chi_angles_mask[aatype]
  chi_atoms_mask = jnp.take_along_axis(all_atom_mask[:, :, None, :], atom_indices, axis=-1)
  chis_mask = chis_mask * jnp.prod(chi_atoms_mask, axis=-1)

  torsions_pos = jnp.concatenate([pre_omega_pos[:, :, None], phi_pos[:, :, None],
                                  psi_pos[:, :, None], chis_pos], axis=2)  # [B, N, 7, 4, 3]
  torsion_mask = jnp.concatenate([pre_omega_mask[:, :, None], phi_mask[:, :, None],
                                  psi_mask[:, :, None], chis_mask], axis=2)

  rel_y, rel_z = _fourth_atom_in_frame(torsions_pos)
  sin_cos = jnp.stack([rel_z, rel_y], axis=-1)
  sin_cos = sin_cos / jnp.sqrt(jnp.sum(jnp.square(sin_cos), axis=-1, keepdims=True)
                               + TORSION_NORM_EPSILON)
  # ψ was measured through O, which sits opposite to the next N: mirror it.
  sin_cos = sin_cos * jnp.asarray([1.0, 1.0, -1.0, 1.0, 1.0, 1.0, 1.0])[None, None, :, None]

  chi_is_ambiguous = jnp.asarray(rc.chi_pi_periodic, dtype=jnp.float32)[aatype]
  mirror = jnp.concatenate([jnp.ones(aatype.shape + (3,), jnp.float32),
                            1.0 - 2.0 * chi_is_ambiguous], axis=-1)
  alt_sin_cos = sin_cos * mirror[..., None]

  if placeholder_for_undefined:
    placeholder = jnp.stack([jnp.ones(sin_cos.shape[:-1]), jnp.zeros(sin_cos.shape[:-1])],
                            axis=-1)
    keep = torsion_mask[..., None]
    sin_cos = sin_cos * keep + placeholder * (1 - keep)
    alt_sin_cos = alt_sin_cos * keep + placeholder * (1 - keep)

  return {"torsion_angles_sin_cos": sin_cos, "alt_torsion_angles_sin_cos": alt_sin_cos,
          "torsion_angles_mask": torsion_mask}
