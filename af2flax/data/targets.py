"""Ground-truth training targets from an atom37 structure (pure numpy, no TensorFlow).

From `aatype` [..., N], `all_atom_positions` [..., N, 37, 3] and `all_atom_mask` [..., N, 37]
this module derives every target the AlphaFold losses read (Jumper et al. 2021, Suppl. 1.8
and 1.9): the dense atom14 layout and its index maps, the symmetric alternatives of
Suppl. Table 3, the eight rigid-group frames of Suppl. Alg. 24 (with the alternative frames of
Alg. 26), the seven torsion angles of Alg. 24/25 (sin, cos), the pseudo-beta positions of the
distogram (Suppl. 1.9.8) and the backbone frames of the FAPE loss (Suppl. Alg. 20 line 17).

`make_targets` is the one entry point the input pipeline calls (numpy in, numpy out, float32
and int32 as in AlphaFold's batch). Every function accepts any number of leading axes; the
residue axis is the last axis of `aatype`. Residue types above 20 (gap) are treated as
unknown ('X', 20).

Conventions (those of AlphaFold's tables, so that frames built from torsions by the structure
module compare with these):
* a frame from three points (a, b, c) has its origin at b, its x axis along b - a (a lies on
  the negative x axis) and c in its xy plane with positive y (Suppl. Alg. 21);
* rigid group 0 is the backbone frame (N, CA, C) of Alg. 21, groups 1 and 2 (pre-omega, phi)
  hold no heavy atoms and have no ground truth, group 3 is psi (CA, C, O), 4-7 are chi 1-4;
* a frame is stored as 12 numbers: the row-major rotation followed by the translation;
* `backbone_affine_tensor` is (w, x, y, z, tx, ty, tz) with a unit quaternion.
"""

from __future__ import annotations

import functools

import numpy as np

from af2flax.common import residue_constants as rc

_NUM_RESTYPES = rc.restype_num + 1  # 20 amino acids + unknown.
_NORM_EPS = 1e-8  # Squared-norm regulariser of the Gram-Schmidt normalisation (Alg. 21).


# --- Tables (built once from residue_constants) -------------------------------------------

@functools.lru_cache(maxsize=None)
def _atom14_tables() -> dict[str, np.ndarray]:
  """Per-restype atom14 <-> atom37 index maps and existence masks; row 20 (UNK) is empty."""
  atom14_to_atom37 = np.zeros([_NUM_RESTYPES, 14], np.int32)
  atom37_to_atom14 = np.zeros([_NUM_RESTYPES, 37], np.int32)
  atom14_mask = np.zeros([_NUM_RESTYPES, 14], np.float32)
  atom37_mask = np.zeros([_NUM_RESTYPES, 37], np.float32)
  for restype, letter in enumerate(rc.restypes):
    resname = rc.restype_1to3[letter]
    names = rc.restype_name_to_atom14_names[resname]
    for index14, name in enumerate(names):
      if name:
        atom14_to_atom37[restype, index14] = rc.atom_order[name]
        atom37_to_atom14[restype, rc.atom_order[name]] = index14
        atom14_mask[restype, index14] = 1.0
    for name in rc.residue_atoms[resname]:
      atom37_mask[restype, rc.atom_order[name]] = 1.0
  return {"atom14_to_atom37": atom14_to_atom37, "atom37_to_atom14": atom37_to_atom14,
          "atom14_mask": atom14_mask, "atom37_mask": atom37_mask}


@functools.lru_cache(maxsize=None)
def _ambiguity_tables() -> dict[str, np.ndarray]:
  """Suppl. Table 3: atom14 permutations that swap the names of 180°-symmetric atoms."""
  permutation = np.tile(np.arange(14, dtype=np.int32), [_NUM_RESTYPES, 1])
  is_ambiguous = np.zeros([_NUM_RESTYPES, 14], np.float32)
  for resname, swaps in rc.residue_atom_renaming_swaps.items():
    restype = rc.restype_order[rc.restype_3to1[resname]]
    names = rc.restype_name_to_atom14_names[resname]
    for atom1, atom2 in swaps.items():
      index1, index2 = names.index(atom1), names.index(atom2)
      permutation[restype, index1], permutation[restype, index2] = index2, index1
      is_ambiguous[restype, index1] = is_ambiguous[restype, index2] = 1.0
  return {"permutation": permutation, "is_ambiguous": is_ambiguous}


@functools.lru_cache(maxsize=None)
def _rigid_group_tables() -> dict[str, np.ndarray]:
  """Base atoms (atom37 indices) of the 8 rigid groups, their existence and ambiguity."""
  base_atom_names = np.full([_NUM_RESTYPES, 8, 3], "", dtype=object)
  base_atom_names[:, 0, :] = ["C", "CA", "N"]   # Backbone (mirrored below to (N, CA, C)).
  base_atom_names[:, 3, :] = ["CA", "C", "O"]   # psi group.
  group_exists = np.zeros([_NUM_RESTYPES, 8], np.float32)
  group_exists[:, 0] = group_exists[:, 3] = 1.0
  for restype, letter in enumerate(rc.restypes):
    resname = rc.restype_1to3[letter]
    for chi_index in range(4):
      if rc.chi_angles_mask[restype][chi_index]:
        base_atom_names[restype, chi_index + 4, :] = rc.chi_angles_atoms[resname][chi_index][1:]
        group_exists[restype, chi_index + 4] = 1.0
  lookup = dict(rc.atom_order, **{"": 0})
  base_atom37 = np.vectorize(lambda name: lookup[name])(base_atom_names).astype(np.int32)

  # The ambiguous group of a residue with symmetric atoms is its last chi group; its
  # alternative frame is the frame rotated by 180° about its x axis.
  is_ambiguous = np.zeros([_NUM_RESTYPES, 8], np.float32)
  alt_rotation = np.tile(np.eye(3, dtype=np.float32), [_NUM_RESTYPES, 8, 1, 1])
  for resname in rc.residue_atom_renaming_swaps:
    restype = rc.restype_order[rc.restype_3to1[resname]]
    group = int(sum(rc.chi_angles_mask[restype])) - 1 + 4
    is_ambiguous[restype, group] = 1.0
    alt_rotation[restype, group] = np.diag([1.0, -1.0, -1.0])
  return {"base_atom37": base_atom37, "group_exists": group_exists,
          "is_ambiguous": is_ambiguous, "alt_rotation": alt_rotation}


@functools.lru_cache(maxsize=None)
def _chi_tables() -> dict[str, np.ndarray]:
  """atom37 indices of the four atoms of each chi angle, and which chis exist (UNK: none)."""
  atom_indices = np.zeros([_NUM_RESTYPES, 4, 4], np.int32)
  atom_indices[:rc.restype_num] = rc.chi_angles_atom_indices
  chi_exists = np.zeros([_NUM_RESTYPES, 4], np.float32)
  chi_exists[:rc.restype_num] = np.asarray(rc.chi_angles_mask, np.float32)
  pi_periodic = np.asarray(rc.chi_pi_periodic, np.float32)  # [21, 4]
  return {"atom_indices": atom_indices, "chi_exists": chi_exists, "pi_periodic": pi_periodic}


# --- Small numpy geometry -------------------------------------------------------------------

def _as_restype(aatype: np.ndarray) -> np.ndarray:
  return np.minimum(np.asarray(aatype, np.int32), rc.unk_restype_index)


def _take_atoms(values: np.ndarray, indices: np.ndarray, num_residue_dims: int) -> np.ndarray:
  """Gathers `values` [*R, A, *C] along its atom axis A with `indices` [*R, *K] -> [*R, *K, *C].

  `num_residue_dims` = len(R), the leading (batch + residue) axes both arrays share.
  """
  r = num_residue_dims
  residue_shape = values.shape[:r]
  component_shape = values.shape[r + 1:]
  key_shape = indices.shape[r:]
  flat_values = values.reshape((-1, values.shape[r]) + component_shape)
  flat_indices = indices.reshape((flat_values.shape[0], -1))
  gathered = np.take_along_axis(
      flat_values, flat_indices.reshape(flat_indices.shape + (1,) * len(component_shape)),
      axis=1)
  return gathered.reshape(residue_shape + key_shape + component_shape)


def _robust_normalize(vec: np.ndarray) -> np.ndarray:
  return vec / np.sqrt(np.sum(np.square(vec), axis=-1, keepdims=True) + _NORM_EPS)


def frames_from_three_points(point_on_neg_x_axis: np.ndarray, origin: np.ndarray,
                             point_on_xy_plane: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Suppl. Alg. 21 "rigidFrom3Points" by Gram-Schmidt: (rotation [..., 3, 3], translation).

  The x axis points from `point_on_neg_x_axis` to `origin`; `point_on_xy_plane` gets y > 0.
  Coincident points give finite (degenerate) frames, never NaN.
  """
  rotation = _gram_schmidt(origin - point_on_neg_x_axis, point_on_xy_plane - origin)
  return rotation, origin.astype(np.float32)


def _gram_schmidt(x_direction: np.ndarray, xy_direction: np.ndarray) -> np.ndarray:
  """Rotation [..., 3, 3] whose columns are the x axis along `x_direction`, the y axis in the
  plane of both vectors (positive side of `xy_direction`) and z = x × y."""
  e0 = _robust_normalize(x_direction)
  e1 = _robust_normalize(xy_direction - e0 * np.sum(xy_direction * e0, axis=-1, keepdims=True))
  e2 = np.cross(e0, e1)
  return np.stack([e0, e1, e2], axis=-1).astype(np.float32)


def rot_to_quat(rotation: np.ndarray) -> np.ndarray:
  """Unit quaternion (w, x, y, z) of rotations [..., 3, 3]: the top eigenvector of the
  symmetric 4x4 matrix of Bar-Itzhack's method (as AlphaFold's `rot_to_quat`), sign fixed
  so that w >= 0. Computed in float64."""
  r = rotation.astype(np.float64)
  xx, xy, xz = r[..., 0, 0], r[..., 0, 1], r[..., 0, 2]
  yx, yy, yz = r[..., 1, 0], r[..., 1, 1], r[..., 1, 2]
  zx, zy, zz = r[..., 2, 0], r[..., 2, 1], r[..., 2, 2]
  k = np.stack([
      np.stack([xx + yy + zz, zy - yz, xz - zx, yx - xy], axis=-1),
      np.stack([zy - yz, xx - yy - zz, xy + yx, xz + zx], axis=-1),
      np.stack([xz - zx, xy + yx, yy - xx - zz, yz + zy], axis=-1),
      np.stack([yx - xy, xz + zx, yz + zy, zz - xx - yy], axis=-1),
  ], axis=-2) / 3.0
  _, eigenvectors = np.linalg.eigh(k)
  quat = eigenvectors[..., -1]
  quat = np.where(quat[..., :1] < 0, -quat, quat)
  return quat.astype(np.float32)


def _check_inputs(aatype: np.ndarray, all_atom_positions: np.ndarray,
                  all_atom_mask: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  aatype = np.asarray(aatype)
  positions = np.asarray(all_atom_positions, np.float32)
  mask = np.asarray(all_atom_mask, np.float32)
  if positions.shape != aatype.shape + (rc.atom_type_num, 3):
    raise ValueError(f"all_atom_positions has shape {positions.shape}; expected "
                     f"{aatype.shape + (rc.atom_type_num, 3)} for aatype of shape {aatype.shape}")
  if mask.shape != aatype.shape + (rc.atom_type_num,):
    raise ValueError(f"all_atom_mask has shape {mask.shape}; expected "
                     f"{aatype.shape + (rc.atom_type_num,)} for aatype of shape {aatype.shape}")
  if not np.issubdtype(aatype.dtype, np.integer):
    raise ValueError(f"aatype must hold integers, got dtype {aatype.dtype}")
  if aatype.size and aatype.min() < 0:
    raise ValueError(f"aatype holds a negative residue type ({aatype.min()})")
  return _as_restype(aatype), positions, mask


# --- Targets ---------------------------------------------------------------------------------

def make_atom14_masks(aatype: np.ndarray) -> dict[str, np.ndarray]:
  """atom14 layout (Suppl. 1.2.1 "atom14"): which atom slots exist, and the index maps
  atom14 -> atom37 and atom37 -> atom14 (0 for absent atoms)."""
  restype = _as_restype(aatype)
  tables = _atom14_tables()
  return {
      "atom14_atom_exists": tables["atom14_mask"][restype],
      "residx_atom14_to_atom37": tables["atom14_to_atom37"][restype],
      "residx_atom37_to_atom14": tables["atom37_to_atom14"][restype],
      "atom37_atom_exists": tables["atom37_mask"][restype],
  }


def make_atom14_positions(aatype: np.ndarray, all_atom_positions: np.ndarray,
                          all_atom_mask: np.ndarray) -> dict[str, np.ndarray]:
  """Ground-truth atoms in the atom14 layout and their symmetric renaming.

  Jumper et al. (2021) Suppl. Table 3 "Ambiguous atom names due to 180 degree-rotation-symmetry":
  `atom14_alt_gt_positions` swaps the coordinates of each ambiguous pair (ASP OD1/OD2, GLU
  OE1/OE2, PHE and TYR CD1/CD2 and CE1/CE2), as Alg. 26 compares both namings.
  """
  restype, positions, mask = _check_inputs(aatype, all_atom_positions, all_atom_mask)
  masks = make_atom14_masks(restype)
  r = restype.ndim
  atom14_gt_exists = masks["atom14_atom_exists"] * _take_atoms(
      mask, masks["residx_atom14_to_atom37"], r)
  atom14_gt_positions = atom14_gt_exists[..., None] * _take_atoms(
      positions, masks["residx_atom14_to_atom37"], r)
  ambiguity = _ambiguity_tables()
  permutation = ambiguity["permutation"][restype]
  return {
      "atom14_gt_exists": atom14_gt_exists.astype(np.float32),
      "atom14_gt_positions": atom14_gt_positions.astype(np.float32),
      "atom14_alt_gt_exists": _take_atoms(atom14_gt_exists, permutation, r).astype(np.float32),
      "atom14_alt_gt_positions": _take_atoms(atom14_gt_positions, permutation, r).astype(np.float32),
      "atom14_atom_is_ambiguous": ambiguity["is_ambiguous"][restype],
  }


def atom37_to_frames(aatype: np.ndarray, all_atom_positions: np.ndarray,
                     all_atom_mask: np.ndarray) -> dict[str, np.ndarray]:
  """The 8 rigid-group frames of each residue (Suppl. 1.8, Table 2, Alg. 24 conventions).

  Group 0 is the backbone frame (N, CA, C) of Alg. 21; groups 3-7 (psi, chi1-4) are built from
  the last three of their defining atoms, so that rotating by the torsion about the x axis
  (Alg. 25 "makeRotX") maps the default frame onto them. `rigidgroups_gt_exists` needs all three
  base atoms resolved; `rigidgroups_alt_gt_frames` is the frame of the renamed residue (Alg. 26),
  i.e. the ambiguous last chi group rotated by 180° about x.
  """
  restype, positions, mask = _check_inputs(aatype, all_atom_positions, all_atom_mask)
  tables = _rigid_group_tables()
  r = restype.ndim
  base_atom37 = tables["base_atom37"][restype]                    # [..., N, 8, 3]
  base_positions = _take_atoms(positions, base_atom37, r)          # [..., N, 8, 3, 3]
  rotation, translation = frames_from_three_points(
      point_on_neg_x_axis=base_positions[..., 0, :], origin=base_positions[..., 1, :],
      point_on_xy_plane=base_positions[..., 2, :])
  # The backbone group's base atoms are (C, CA, N): mirror x and z to get the (N, CA, C) frame.
  mirror = np.ones([8, 3], np.float32)
  mirror[0] = [-1.0, 1.0, -1.0]
  rotation = rotation * mirror[:, None, :]
  group_exists = tables["group_exists"][restype]
  gt_exists = np.min(_take_atoms(mask, base_atom37, r), axis=-1) * group_exists
  alt_rotation = np.einsum("...ij,...jk->...ik", rotation, tables["alt_rotation"][restype])

  def flat12(rot: np.ndarray) -> np.ndarray:
    return np.concatenate([rot.reshape(rot.shape[:-2] + (9,)), translation], axis=-1)

  return {
      "rigidgroups_gt_frames": flat12(rotation).astype(np.float32),
      "rigidgroups_gt_exists": gt_exists.astype(np.float32),
      "rigidgroups_group_exists": group_exists,
      "rigidgroups_group_is_ambiguous": tables["is_ambiguous"][restype],
      "rigidgroups_alt_gt_frames": flat12(alt_rotation).astype(np.float32),
  }


def atom37_to_torsion_angles(aatype: np.ndarray, all_atom_positions: np.ndarray,
                             all_atom_mask: np.ndarray) -> dict[str, np.ndarray]:
  """The 7 torsions (pre-omega, phi, psi, chi1-4) as (sin, cos), Suppl. Alg. 24/25 convention.

  Each torsion is defined by four atoms (a, b, c, d): in the frame with origin c, x along c - b
  and a in the xy plane, d = (·, cos, sin) · r. psi is measured through O and mirrored (O sits
  opposite the next N). `alt_torsion_angles_sin_cos` adds pi to the pi-periodic chis (Alg. 27
  alternative). Pre-omega and phi read the previous residue along the residue axis (no gap
  check, as AlphaFold); the first residue has none.
  """
  restype, positions, mask = _check_inputs(aatype, all_atom_positions, all_atom_mask)
  prev_positions = np.concatenate([np.zeros_like(positions[..., :1, :, :]),
                                   positions[..., :-1, :, :]], axis=-3)
  prev_mask = np.concatenate([np.zeros_like(mask[..., :1, :]), mask[..., :-1, :]], axis=-2)
  n, ca, c, o = (rc.atom_order[name] for name in ("N", "CA", "C", "O"))

  pre_omega_pos = np.stack([prev_positions[..., ca, :], prev_positions[..., c, :],
                            positions[..., n, :], positions[..., ca, :]], axis=-2)
  phi_pos = np.stack([prev_positions[..., c, :], positions[..., n, :], positions[..., ca, :],
                      positions[..., c, :]], axis=-2)
  psi_pos = np.stack([positions[..., n, :], positions[..., ca, :], positions[..., c, :],
                      positions[..., o, :]], axis=-2)
  pre_omega_mask = prev_mask[..., ca] * prev_mask[..., c] * mask[..., n] * mask[..., ca]
  phi_mask = prev_mask[..., c] * mask[..., n] * mask[..., ca] * mask[..., c]
  psi_mask = mask[..., n] * mask[..., ca] * mask[..., c] * mask[..., o]

  chi_tables = _chi_tables()
  r = restype.ndim
  chi_atoms = chi_tables["atom_indices"][restype]                  # [..., N, 4, 4]
  chi_pos = _take_atoms(positions, chi_atoms, r)                   # [..., N, 4, 4, 3]
  chi_mask = chi_tables["chi_exists"][restype] * np.prod(_take_atoms(mask, chi_atoms, r), axis=-1)

  torsion_pos = np.concatenate([pre_omega_pos[..., None, :, :], phi_pos[..., None, :, :],
                                psi_pos[..., None, :, :], chi_pos], axis=-3)  # [..., N, 7, 4, 3]
  torsion_mask = np.concatenate([pre_omega_mask[..., None], phi_mask[..., None],
                                 psi_mask[..., None], chi_mask], axis=-1)
  rotation, translation = frames_from_three_points(
      point_on_neg_x_axis=torsion_pos[..., 1, :], origin=torsion_pos[..., 2, :],
      point_on_xy_plane=torsion_pos[..., 0, :])
  fourth_local = np.einsum("...ji,...j->...i", rotation, torsion_pos[..., 3, :] - translation)
  sin_cos = np.stack([fourth_local[..., 2], fourth_local[..., 1]], axis=-1)
  sin_cos = sin_cos / np.sqrt(np.sum(np.square(sin_cos), axis=-1, keepdims=True) + _NORM_EPS)
  sin_cos = sin_cos * np.asarray([1, 1, -1, 1, 1, 1, 1], np.float32)[:, None]
  mirror = np.concatenate([np.ones(restype.shape + (3,), np.float32),
                           1.0 - 2.0 * chi_tables["pi_periodic"][restype]], axis=-1)
  return {
      "torsion_angles_sin_cos": sin_cos.astype(np.float32),
      "alt_torsion_angles_sin_cos": (sin_cos * mirror[..., None]).astype(np.float32),
      "torsion_angles_mask": torsion_mask.astype(np.float32),
  }


def make_chi_angles(torsion_angles_sin_cos: np.ndarray,
                    torsion_angles_mask: np.ndarray) -> dict[str, np.ndarray]:
  """chi1-4 in radians (atan2 of the chi torsions, in (-pi, pi]) and their mask."""
  chi_sin_cos = torsion_angles_sin_cos[..., 3:, :]
  return {"chi_angles": np.arctan2(chi_sin_cos[..., 0], chi_sin_cos[..., 1]).astype(np.float32),
          "chi_mask": np.asarray(torsion_angles_mask[..., 3:], np.float32)}


def pseudo_beta(aatype: np.ndarray, all_atom_positions: np.ndarray,
                all_atom_mask: np.ndarray) -> dict[str, np.ndarray]:
  """CB position (CA for glycine) and its mask, the distogram's points (Suppl. 1.9.8)."""
  restype, positions, mask = _check_inputs(aatype, all_atom_positions, all_atom_mask)
  is_gly = restype == rc.restype_order["G"]
  ca, cb = rc.atom_order["CA"], rc.atom_order["CB"]
  return {
      "pseudo_beta": np.where(is_gly[..., None], positions[..., ca, :],
                              positions[..., cb, :]).astype(np.float32),
      "pseudo_beta_mask": np.where(is_gly, mask[..., ca], mask[..., cb]).astype(np.float32),
  }


def backbone_affine(aatype: np.ndarray, all_atom_positions: np.ndarray,
                    all_atom_mask: np.ndarray) -> dict[str, np.ndarray]:
  """Backbone frames (N, CA, C) of Suppl. Alg. 21 as (w, x, y, z, tx, ty, tz) and their mask.

  The translation is CA in Å; residues without N, CA and C get the identity (mask 0).
  """
  _, positions, mask = _check_inputs(aatype, all_atom_positions, all_atom_mask)
  n, ca, c = (rc.atom_order[name] for name in ("N", "CA", "C"))
  affine_mask = mask[..., n] * mask[..., ca] * mask[..., c]
  translation = positions[..., ca, :]
  rotation = _gram_schmidt(positions[..., c, :] - translation, positions[..., n, :] - translation)
  quat = rot_to_quat(rotation)
  identity = np.asarray([1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0], np.float32)
  tensor = np.where(affine_mask[..., None] > 0,
                    np.concatenate([quat, translation], axis=-1), identity)
  return {"backbone_affine_tensor": tensor.astype(np.float32),
          "backbone_affine_mask": affine_mask.astype(np.float32)}


def make_targets(aatype: np.ndarray, all_atom_positions: np.ndarray,
                 all_atom_mask: np.ndarray) -> dict[str, np.ndarray]:
  """Every ground-truth feature of the AlphaFold losses, from an atom37 structure.

  Args:
    aatype: [..., N] int residue types (AlphaFold order; 20 = unknown).
    all_atom_positions: [..., N, 37, 3] coordinates in Å.
    all_atom_mask: [..., N, 37] 1 where the atom was resolved.

  Returns:
    A dict of numpy arrays named as AlphaFold's features (float32; index maps int32).
  """
  restype, positions, mask = _check_inputs(aatype, all_atom_positions, all_atom_mask)
  targets: dict[str, np.ndarray] = {}
  targets.update(make_atom14_masks(restype))
  targets.update(make_atom14_positions(restype, positions, mask))
  targets.update(atom37_to_frames(restype, positions, mask))
  targets.update(atom37_to_torsion_angles(restype, positions, mask))
  targets.update(make_chi_angles(targets["torsion_angles_sin_cos"], targets["torsion_angles_mask"]))
  targets.update(pseudo_beta(restype, positions, mask))
  targets.update(backbone_affine(restype, positions, mask))
  return targets
