"""Ground-truth targets: parity with AlphaFold's derived features and geometric conventions."""

import numpy as np
import pytest

from af2flax.common import residue_constants as rc
from af2flax.data import targets
from tests.losses import af2_tiny
from tests.losses.structures import load_chain

# The mask (exists array) under which each derived array of batch.npz is defined.
_MASK_OF = {
    "atom14_gt_positions": "atom14_gt_exists",
    "atom14_alt_gt_positions": "atom14_alt_gt_exists",
    "rigidgroups_gt_frames": "rigidgroups_gt_exists",
    "rigidgroups_alt_gt_frames": "rigidgroups_gt_exists",
    "chi_angles": "chi_mask",
    "pseudo_beta": "pseudo_beta_mask",
    "backbone_affine_tensor": "backbone_affine_mask",
}


def _quat_to_rot(quat):
  w, x, y, z = np.moveaxis(quat.astype(np.float64), -1, 0)
  return np.stack([
      np.stack([w * w + x * x - y * y - z * z, 2 * (x * y - w * z), 2 * (x * z + w * y)], -1),
      np.stack([2 * (x * y + w * z), w * w - x * x + y * y - z * z, 2 * (y * z - w * x)], -1),
      np.stack([2 * (x * z - w * y), 2 * (y * z + w * x), w * w - x * x - y * y + z * z], -1),
  ], -2)


def _dihedral(p0, p1, p2, p3):
  """Standard IUPAC dihedral angle (float64)."""
  p0, p1, p2, p3 = (np.asarray(p, np.float64) for p in (p0, p1, p2, p3))
  b0, b1, b2 = p0 - p1, p2 - p1, p3 - p2
  b1 = b1 / np.maximum(np.linalg.norm(b1, axis=-1, keepdims=True), 1e-12)
  v = b0 - np.sum(b0 * b1, -1, keepdims=True) * b1
  w = b2 - np.sum(b2 * b1, -1, keepdims=True) * b1
  return np.arctan2(np.sum(np.cross(b1, v) * w, -1), np.sum(v * w, -1))


def test_targets_match_alphafold_derived_features():
  """make_targets on the raw arrays of af2_tiny reproduces every derived array of batch.npz."""
  batch = af2_tiny.raw_batch()
  ours = targets.make_targets(batch["aatype"], batch["all_atom_positions"], batch["all_atom_mask"])
  compared = 0
  for key, reference in batch.items():
    if key not in ours:
      continue
    compared += 1
    value = ours[key]
    assert value.shape == reference.shape and value.dtype == reference.dtype, key
    mask = batch[_MASK_OF[key]] if key in _MASK_OF else np.ones(reference.shape[:2])
    sel = mask > 0
    if key == "backbone_affine_tensor":  # q and -q are one rotation: compare matrices.
      np.testing.assert_allclose(_quat_to_rot(value[..., :4])[sel],
                                 _quat_to_rot(reference[..., :4])[sel], atol=2e-6)
      np.testing.assert_allclose(value[..., 4:][sel], reference[..., 4:][sel], atol=1e-5)
    elif key == "chi_angles":  # Equal modulo 2 pi.
      diff = np.angle(np.exp(1j * (value[sel] - reference[sel])))
      np.testing.assert_allclose(diff, 0.0, atol=2e-5)
    else:
      np.testing.assert_allclose(value[sel], reference[sel], atol=1e-5, rtol=0, err_msg=key)
  assert compared == 20


def test_torsions_are_the_standard_dihedrals():
  """chi1-4, phi and pre-omega are IUPAC dihedrals; psi is measured through O (+ pi)."""
  aatype, positions, mask = load_chain("1ahsA")
  t = targets.atom37_to_torsion_angles(aatype, positions, mask)
  angles = np.arctan2(t["torsion_angles_sin_cos"][..., 0], t["torsion_angles_sin_cos"][..., 1])
  n, ca, c, o = (rc.atom_order[a] for a in ("N", "CA", "C", "O"))
  expected = np.zeros_like(angles, dtype=np.float64)
  expected[1:, 0] = _dihedral(positions[:-1, ca], positions[:-1, c], positions[1:, n],
                              positions[1:, ca])
  expected[1:, 1] = _dihedral(positions[:-1, c], positions[1:, n], positions[1:, ca],
                              positions[1:, c])
  expected[:, 2] = _dihedral(positions[:, n], positions[:, ca], positions[:, c],
                             positions[:, o]) + np.pi
  chi_atoms = rc.chi_angles_atom_indices[np.minimum(aatype, 19)]  # [N, 4, 4]
  for k in range(4):
    idx = chi_atoms[:, k]
    pts = [positions[np.arange(len(aatype)), idx[:, a]] for a in range(4)]
    expected[:, 3 + k] = _dihedral(*pts)
  sel = t["torsion_angles_mask"] > 0
  assert sel[:, 3:].sum() > 100  # The chain has many side chains.
  diff = np.angle(np.exp(1j * (angles - expected)))[sel]
  np.testing.assert_allclose(diff, 0.0, atol=1e-3)
  # The first residue has no pre-omega/phi; chis of residues without them are masked.
  assert not sel[0, :2].any()
  assert (t["torsion_angles_mask"][:, 3:] <= np.asarray(rc.chi_angles_mask)[aatype]).all()
  # The alternative chi of pi-periodic chis is shifted by pi, others are unchanged.
  periodic = np.asarray(rc.chi_pi_periodic)[aatype][:, :, None] > 0
  alt, base = t["alt_torsion_angles_sin_cos"][:, 3:], t["torsion_angles_sin_cos"][:, 3:]
  np.testing.assert_allclose(np.where(periodic, -alt, alt), base, atol=1e-7)


def test_rigid_group_frames_place_literature_atoms():
  """Each resolved atom sits at its literature position in its rigid group's true frame
  (Alg. 24 conventions), and every frame is a proper rotation."""
  aatype, positions, mask = load_chain("1ahsA")
  out = targets.make_targets(aatype, positions, mask)
  frames = out["rigidgroups_gt_frames"]
  rot, trans = frames[..., :9].reshape(frames.shape[:-1] + (3, 3)), frames[..., 9:]
  exists = out["rigidgroups_gt_exists"] > 0
  gram = np.einsum("...ji,...jk->...ik", rot, rot)[exists]
  np.testing.assert_allclose(gram, np.broadcast_to(np.eye(3), gram.shape), atol=1e-5)
  np.testing.assert_allclose(np.linalg.det(rot[exists]), 1.0, atol=1e-5)
  group = rc.restype_atom14_to_rigid_group[aatype]                   # [N, 14]
  literature = rc.restype_atom14_rigid_group_positions[aatype]       # [N, 14, 3]
  res = np.arange(len(aatype))[:, None]
  atom_rot, atom_trans = rot[res, group], trans[res, group]
  local = np.einsum("...ji,...j->...i", atom_rot, out["atom14_gt_positions"] - atom_trans)
  sel = (out["atom14_gt_exists"] > 0) & exists[res, group]
  deviation = np.linalg.norm(local - literature, axis=-1)[sel]
  assert sel.sum() > 500
  assert np.median(deviation) < 0.05 and deviation.max() < 0.5, (np.median(deviation),
                                                                 deviation.max())
  # Alternative frames: the ambiguous group turned by 180 degrees about x, the others equal.
  alt = out["rigidgroups_alt_gt_frames"][..., :9].reshape(rot.shape)
  flip = np.where(out["rigidgroups_group_is_ambiguous"][..., None] > 0,
                  np.asarray([1.0, -1.0, -1.0]), 1.0)
  np.testing.assert_allclose(alt, rot * flip[..., None, :], atol=1e-7)


def test_atom14_layout_round_trips_and_swaps_symmetric_atoms():
  aatype, positions, mask = load_chain("1ahsA")
  out = targets.make_targets(aatype, positions, mask)
  res = np.arange(len(aatype))[:, None]
  back = out["atom14_gt_positions"][res, out["residx_atom37_to_atom14"]]
  keep = (out["atom37_atom_exists"] * mask)[..., None]
  np.testing.assert_array_equal(back * keep, positions * keep)
  assert out["residx_atom14_to_atom37"].dtype == np.int32
  # Swapped pairs: ASP OD1 <-> OD2.
  asp = np.nonzero(aatype == rc.restype_order["D"])[0]
  assert asp.size
  names = rc.restype_name_to_atom14_names["ASP"]
  od1, od2 = names.index("OD1"), names.index("OD2")
  np.testing.assert_array_equal(out["atom14_alt_gt_positions"][asp, od1],
                                out["atom14_gt_positions"][asp, od2])
  assert (out["atom14_atom_is_ambiguous"][asp][:, [od1, od2]] == 1).all()
  assert out["atom14_atom_is_ambiguous"][aatype == rc.restype_order["A"]].sum() == 0


def test_padding_missing_atoms_and_leading_axes():
  """Zero-padded residues and residues without coordinates give finite, masked-out targets;
  a leading batch axis gives the per-example results."""
  aatype, positions, mask = load_chain("1ahsA")
  aatype, positions, mask = aatype[:30].copy(), positions[:30].copy(), mask[:30].copy()
  positions[10], mask[10] = 0.0, 0.0               # A residue with no coordinates.
  mask[12, 5:] = 0.0                                # A residue without its side chain.
  pad = 6
  padded = (np.pad(aatype, (0, pad)), np.pad(positions, ((0, pad), (0, 0), (0, 0))),
            np.pad(mask, ((0, pad), (0, 0))))
  out = targets.make_targets(*padded)
  for key, value in out.items():
    assert np.isfinite(value).all(), key
  assert out["backbone_affine_mask"][10] == 0 and out["backbone_affine_mask"][-pad:].sum() == 0
  assert out["rigidgroups_gt_exists"][10].sum() == 0 and out["chi_mask"][12].sum() == 0
  assert out["pseudo_beta_mask"][-pad:].sum() == 0 and out["atom14_gt_exists"][-pad:].sum() == 0
  np.testing.assert_array_equal(out["backbone_affine_tensor"][10], [1, 0, 0, 0, 0, 0, 0])
  stacked = targets.make_targets(*(np.stack([a, a]) for a in padded))
  for key, value in out.items():
    np.testing.assert_array_equal(stacked[key][1], value, err_msg=key)


def test_bad_input_is_named():
  aatype, positions, mask = load_chain("1ahsA")
  with pytest.raises(ValueError, match="all_atom_positions"):
    targets.make_targets(aatype, positions[:-1], mask)
  with pytest.raises(ValueError, match="all_atom_mask"):
    targets.make_targets(aatype, positions, mask[:, :14])
  with pytest.raises(ValueError, match="aatype"):
    targets.make_targets(aatype.astype(np.float32), positions, mask)


def test_forward_all_atom_rebuilds_the_structure_from_the_targets():
  """Torsions + backbone frames of the truth, fed through Alg. 24 (geometry.all_atom), rebuild the
  true frames and atoms up to the ideal bond geometry: the two directions share conventions."""
  import jax
  from af2flax.geometry import all_atom
  from af2flax.geometry.rigid import Rigid
  aatype, positions, mask = load_chain("1ahsA")
  out = targets.make_targets(aatype, positions, mask)
  gt = out["rigidgroups_gt_frames"]
  backbone = Rigid(rot=gt[:, 0, :9].reshape(-1, 3, 3), trans=gt[:, 0, 9:])

  @jax.jit
  def rebuild(backbone, sin_cos):
    frames = all_atom.torsion_angles_to_frames(aatype, backbone, sin_cos)
    return frames.rot, all_atom.frames_and_literature_positions_to_atom14_pos(aatype, frames)

  rot, atoms = (np.asarray(x) for x in rebuild(backbone, out["torsion_angles_sin_cos"]))
  gt_rot = gt[..., :9].reshape(gt.shape[:-1] + (3, 3))
  exists = out["rigidgroups_gt_exists"] > 0
  exists[:, :3] = False  # Backbone: identical by construction; groups 1-2 have no atoms.
  cos_angle = (np.einsum("...ij,...ij->...", rot, gt_rot) - 1.0) / 2.0
  angle = np.degrees(np.arccos(np.clip(cos_angle, -1, 1)))[exists]
  assert exists.sum() > 300
  assert np.median(angle) < 5.0 and np.percentile(angle, 95) < 15.0, (np.median(angle),
                                                                      angle.max())
  atom_sel = out["atom14_gt_exists"] > 0
  error = np.linalg.norm(atoms - out["atom14_gt_positions"], axis=-1)[atom_sel]
  assert np.median(error) < 0.3 and np.percentile(error, 95) < 1.0, (np.median(error),
                                                                     error.max())
