"""All-atom geometry: torsion angles -> rigid-group frames -> atom14 / atom37 coordinates.

Jumper et al. (2021) Suppl. 1.8 and Suppl. Alg. 24 "computeAllAtomCoordinates". Pure JAX
functions of arrays (no module state), valid for any number of leading residue axes
(`aatype` [...], frames [..., 8], positions [..., 14, 3]).

Conventions, all AlphaFold's:
* 7 torsions per residue, ordered (pre-omega, phi, psi, chi1, chi2, chi3, chi4), each as
  (sin, cos) in the last axis;
* 8 rigid groups per residue: 0 backbone, 1 pre-omega, 2 phi, 3 psi, 4..7 chi1..chi4;
  group g > 0 is the default (literature) frame of group g, rotated about its x axis by the
  torsion angle; chi2..chi4 hang off the previous chi group, the others off the backbone;
* atom14 is the dense per-residue layout of `residue_constants.restype_name_to_atom14_names`,
  atom37 the sparse one of `residue_constants.atom_types`.

The reverse direction (atoms -> frames / torsions, ground-truth targets) lives in
`af2flax/data/targets.py`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from af2flax.common import residue_constants as rc
from af2flax.geometry.rigid import Rigid

Array = jax.Array

NUM_TORSIONS = 7
NUM_RIGID_GROUPS = 8


def _restype_atom14_atom37_tables() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
  """Per-restype index maps and existence masks [21, ...] (last row: unknown residue).

  Returns (atom14_to_atom37 [21, 14] int32, atom37_to_atom14 [21, 37] int32,
  atom14_exists [21, 14] float32, atom37_exists [21, 37] float32). Absent atoms map to
  index 0, as in AlphaFold's `make_atom14_masks`; their masks are 0.
  """
  num_restypes = len(rc.restypes) + 1
  atom14_to_atom37 = np.zeros((num_restypes, 14), np.int32)
  atom37_to_atom14 = np.zeros((num_restypes, rc.atom_type_num), np.int32)
  atom14_exists = np.zeros((num_restypes, 14), np.float32)
  atom37_exists = np.zeros((num_restypes, rc.atom_type_num), np.float32)
  for restype, letter in enumerate(rc.restypes):
    resname = rc.restype_1to3[letter]
    for atom14_index, name in enumerate(rc.restype_name_to_atom14_names[resname]):
      if not name:
        continue
      atom37_index = rc.atom_order[name]
      atom14_to_atom37[restype, atom14_index] = atom37_index
      atom37_to_atom14[restype, atom37_index] = atom14_index
      atom14_exists[restype, atom14_index] = 1.0
    for name in rc.residue_atoms[resname]:
      atom37_exists[restype, rc.atom_order[name]] = 1.0
  return atom14_to_atom37, atom37_to_atom14, atom14_exists, atom37_exists


(RESTYPE_ATOM14_TO_ATOM37, RESTYPE_ATOM37_TO_ATOM14, RESTYPE_ATOM14_EXISTS,
 RESTYPE_ATOM37_EXISTS) = _restype_atom14_atom37_tables()


def make_atom14_masks(aatype: Array) -> dict[str, Array]:
  """atom14/atom37 index maps and existence masks for a sequence (AlphaFold's features).

  Args:
    aatype: residue types [...] in 0..20 (20 = unknown, which has no atoms).

  Returns:
    dict with `atom14_atom_exists` [..., 14] float32, `residx_atom14_to_atom37` [..., 14]
    int32, `residx_atom37_to_atom14` [..., 37] int32, `atom37_atom_exists` [..., 37] float32.
  """
  aatype = jnp.asarray(aatype)
  return {
      "atom14_atom_exists": jnp.asarray(RESTYPE_ATOM14_EXISTS)[aatype],
      "residx_atom14_to_atom37": jnp.asarray(RESTYPE_ATOM14_TO_ATOM37)[aatype],
      "residx_atom37_to_atom14": jnp.asarray(RESTYPE_ATOM37_TO_ATOM14)[aatype],
      "atom37_atom_exists": jnp.asarray(RESTYPE_ATOM37_EXISTS)[aatype],
  }


def _gather_atoms(data: Array, index: Array, mask: Array) -> Array:
  """data [..., A_in, *F] gathered along the atom axis by index [..., A_out], times mask."""
  num_feature_axes = data.ndim - index.ndim
  expanded = index.reshape(index.shape + (1,) * num_feature_axes)
  gathered = jnp.take_along_axis(data, expanded, axis=index.ndim - 1)
  return gathered * mask.reshape(mask.shape + (1,) * num_feature_axes).astype(gathered.dtype)


def atom14_to_atom37(atom14_data: Array, residx_atom37_to_atom14: Array,
                     atom37_atom_exists: Array) -> Array:
  """atom14 layout [..., 14, *F] -> atom37 layout [..., 37, *F], zero where no atom exists."""
  return _gather_atoms(atom14_data, residx_atom37_to_atom14, atom37_atom_exists)


def atom37_to_atom14(atom37_data: Array, residx_atom14_to_atom37: Array,
                     atom14_atom_exists: Array) -> Array:
  """atom37 layout [..., 37, *F] -> atom14 layout [..., 14, *F], zero where no atom exists."""
  return _gather_atoms(atom37_data, residx_atom14_to_atom37, atom14_atom_exists)


def _rot_x(sin_angles: Array, cos_angles: Array) -> Array:
  """Rotations about the x axis [..., 3, 3] (Suppl. Alg. 25 "makeRotX")."""
  zeros = jnp.zeros_like(sin_angles)
  ones = jnp.ones_like(sin_angles)
  rows = [[ones, zeros, zeros],
          [zeros, cos_angles, -sin_angles],
          [zeros, sin_angles, cos_angles]]
  return jnp.stack([jnp.stack(row, axis=-1) for row in rows], axis=-2)


def torsion_angles_to_frames(aatype: Array, backbone_to_global: Rigid,
                             torsion_angles_sin_cos: Array) -> Rigid:
  """The 8 rigid-group frames of every residue, in global coordinates.

  Jumper et al. (2021) Suppl. Alg. 24 "computeAllAtomCoordinates" lines 1-10.

  Args:
    aatype: residue types [...].
    backbone_to_global: backbone frames [...] (translation in the unit of the output).
    torsion_angles_sin_cos: [..., 7, 2] (sin, cos) of the 7 torsions; need not be normalised
      exactly (the rotation uses them as given, as AlphaFold does).

  Returns:
    Rigid [..., 8]: group-to-global frames.
  """
  aatype = jnp.asarray(aatype)
  dtype = backbone_to_global.dtype
  default_frames = Rigid.from_tensor_4x4(
      jnp.asarray(rc.restype_rigid_group_default_frame, dtype)[aatype])  # [..., 8]
  torsion_angles_sin_cos = torsion_angles_sin_cos.astype(dtype)
  # The backbone group has no torsion: prepend the identity rotation (sin 0, cos 1).
  sin_angles = jnp.concatenate(
      [jnp.zeros(aatype.shape + (1,), dtype), torsion_angles_sin_cos[..., 0]], axis=-1)
  cos_angles = jnp.concatenate(
      [jnp.ones(aatype.shape + (1,), dtype), torsion_angles_sin_cos[..., 1]], axis=-1)
  # Group-to-parent frames: default frame, then the torsion about the group's x axis.
  to_parent = default_frames @ Rigid(rot=_rot_x(sin_angles, cos_angles),
                                     trans=jnp.zeros(aatype.shape + (NUM_RIGID_GROUPS, 3), dtype))
  # chi2..chi4 hang off the previous chi group: chain them to get group-to-backbone frames.
  chi_to_backbone = [to_parent[..., 4]]
  for group in (5, 6, 7):
    chi_to_backbone.append(chi_to_backbone[-1] @ to_parent[..., group])
  to_backbone = Rigid(
      rot=jnp.concatenate([to_parent.rot[..., :4, :, :]]
                          + [frame.rot[..., None, :, :] for frame in chi_to_backbone], axis=-3),
      trans=jnp.concatenate([to_parent.trans[..., :4, :]]
                            + [frame.trans[..., None, :] for frame in chi_to_backbone], axis=-2))
  backbone = Rigid(rot=backbone_to_global.rot[..., None, :, :],
                   trans=backbone_to_global.trans[..., None, :])
  return backbone @ to_backbone


def frames_and_literature_positions_to_atom14_pos(aatype: Array, group_frames: Rigid) -> Array:
  """Atom positions [..., 14, 3]: each atom's literature position in its rigid group's frame.

  Jumper et al. (2021) Suppl. Alg. 24 "computeAllAtomCoordinates" line 11. Atoms that do not
  exist for the residue type are zero.

  Args:
    aatype: residue types [...].
    group_frames: Rigid [..., 8] group-to-global frames (`torsion_angles_to_frames`).
  """
  aatype = jnp.asarray(aatype)
  dtype = group_frames.dtype
  atom_group = jnp.asarray(rc.restype_atom14_to_rigid_group)[aatype]  # [..., 14]
  atom_rot = jnp.take_along_axis(group_frames.rot, atom_group[..., None, None], axis=-3)
  atom_trans = jnp.take_along_axis(group_frames.trans, atom_group[..., None], axis=-2)
  literature = jnp.asarray(rc.restype_atom14_rigid_group_positions, dtype)[aatype]  # [..., 14, 3]
  positions = Rigid(rot=atom_rot, trans=atom_trans).apply(literature)
  atom_exists = jnp.asarray(rc.restype_atom14_mask, dtype)[aatype]
  return positions * atom_exists[..., None]
