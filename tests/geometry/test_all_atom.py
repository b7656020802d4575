"""all_atom: torsions -> frames -> atom14 -> atom37 against AlphaFold's outputs and real structures."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from af2flax.common import residue_constants as rc
from af2flax.geometry import all_atom
from af2flax.geometry.rigid import Rigid
from tests.conftest import REFERENCE

TINY = REFERENCE / "af2_tiny"
FRAME_FIELDS = ["xx", "xy", "xz", "yx", "yy", "yz", "zx", "zy", "zz"]


def _load(name):
  path = TINY / name
  if not path.exists():
    pytest.skip(f"{path} missing")
  return dict(np.load(path, allow_pickle=False))


@pytest.fixture(scope="module")
def batch():
  full = _load("batch.npz")
  final = int(full["num_iter_recycling"][0])  # The final iteration reads this slice.
  return {key: value[final] for key, value in full.items()}


@pytest.fixture(scope="module")
def outputs():
  return _load("outputs.npz")


def _random_rigid(rng, shape):
  """Random frames (numpy quaternions and translations -> Rigid)."""
  quat = rng.normal(size=shape + (4,)).astype(np.float32)
  trans = (5.0 * rng.normal(size=shape + (3,))).astype(np.float32)
  return Rigid.from_quaternion(jnp.asarray(quat), jnp.asarray(trans))


@jax.jit
def _atoms_and_frames(aatype, backbone, angles):
  frames = all_atom.torsion_angles_to_frames(aatype, backbone, angles)
  return all_atom.frames_and_literature_positions_to_atom14_pos(aatype, frames), frames


def test_make_atom14_masks_equals_alphafold_features(batch):
  """Index maps and masks equal the ones AlphaFold's pipeline put in the batch, exactly."""
  masks = all_atom.make_atom14_masks(batch["aatype"])
  for key, value in masks.items():
    assert value.dtype == batch[key].dtype, key
    np.testing.assert_array_equal(np.asarray(value), batch[key], err_msg=key)
  # Unknown residues have no atoms at all.
  unknown = all_atom.make_atom14_masks(np.array([rc.unk_restype_index]))
  assert float(unknown["atom14_atom_exists"].sum()) == 0.0
  assert float(unknown["atom37_atom_exists"].sum()) == 0.0


def test_atom14_atom37_round_trip(batch):
  """atom37 -> atom14 gives atom14_gt_positions; atom14 -> atom37 gives the atom37 positions back."""
  masks = all_atom.make_atom14_masks(batch["aatype"])
  atom14 = all_atom.atom37_to_atom14(jnp.asarray(batch["all_atom_positions"]),
                                     masks["residx_atom14_to_atom37"], masks["atom14_atom_exists"])
  gt_exists = batch["atom14_gt_exists"][..., None]
  np.testing.assert_array_equal(np.asarray(atom14) * gt_exists,
                                batch["atom14_gt_positions"] * gt_exists)
  atom37 = all_atom.atom14_to_atom37(atom14, masks["residx_atom37_to_atom14"],
                                     masks["atom37_atom_exists"])
  expected = batch["all_atom_positions"] * batch["atom37_atom_exists"][..., None]
  np.testing.assert_array_equal(np.asarray(atom37), expected)
  # Masks (no trailing feature axis) go through the same maps.
  mask14 = all_atom.atom37_to_atom14(jnp.asarray(batch["all_atom_mask"]),
                                     masks["residx_atom14_to_atom37"], masks["atom14_atom_exists"])
  np.testing.assert_array_equal(np.asarray(mask14), batch["atom14_gt_exists"])


def _alphafold_frames(outputs, layer):
  rot = [outputs[f"structure_module/sidechains/frames/rot/{f}"][layer] for f in FRAME_FIELDS]
  trans = [outputs[f"structure_module/sidechains/frames/trans/{c}"][layer] for c in "xyz"]
  return np.stack(rot + trans, axis=-1)


def test_parity_with_alphafold_all_atom(batch, outputs):
  """AlphaFold's backbone trajectory and torsions give AlphaFold's group frames and atoms."""
  traj = outputs["structure_module/traj"]
  for layer in range(traj.shape[0]):
    backbone = Rigid.from_tensor_7(jnp.asarray(traj[layer]))
    angles = jnp.asarray(outputs["structure_module/sidechains/angles_sin_cos"][layer])
    frames = all_atom.torsion_angles_to_frames(batch["aatype"], backbone, angles)
    assert frames.shape == (batch["aatype"].shape[0], 8)
    np.testing.assert_allclose(np.asarray(frames.to_tensor_12()), _alphafold_frames(outputs, layer),
                               atol=1e-5, rtol=0)
    positions = all_atom.frames_and_literature_positions_to_atom14_pos(batch["aatype"], frames)
    expected = np.stack([outputs[f"structure_module/sidechains/atom_pos/{c}"][layer]
                         for c in "xyz"], axis=-1)
    np.testing.assert_allclose(np.asarray(positions), expected, atol=1e-5, rtol=0)
  atom37 = all_atom.atom14_to_atom37(positions, batch["residx_atom37_to_atom14"],
                                     batch["atom37_atom_exists"])
  np.testing.assert_allclose(np.asarray(atom37), outputs["structure_module/final_atom_positions"],
                             atol=1e-5, rtol=0)


def _torsion_from_frames(frames, default_frames, parent, group):
  """(sin, cos) of the x-rotation that takes parent ∘ default frame onto the group's frame."""
  relative = (parent @ default_frames[:, group]).inverse() @ frames[:, group]
  return jnp.stack([relative.rot[:, 2, 1], relative.rot[:, 1, 1]], axis=-1)


def test_rebuilds_real_structure_from_ground_truth_torsions(batch):
  """Backbone frames + true torsions rebuild the crystal atoms up to non-ideal geometry.

  The literature geometry is ideal, real chains are not (this fixture's N-CA-C angles span
  95-125°), so atoms deviate by tenths of an Ångström; a wrong torsion convention (sign or
  offset) moves side chains by Ångströms, which the control below shows.
  """
  aatype = batch["aatype"]
  gt_frames = Rigid.from_tensor_12(jnp.asarray(batch["rigidgroups_gt_frames"]))
  default = Rigid.from_tensor_4x4(jnp.asarray(rc.restype_rigid_group_default_frame)[aatype])
  # Backbone torsions (pre-omega, phi, psi) from the ground-truth group frames; chi angles from
  # AlphaFold's own atom37_to_torsion_angles (the batch's chi_angles).
  backbone_sin_cos = jnp.stack(
      [_torsion_from_frames(gt_frames, default, gt_frames[:, 0], g) for g in (1, 2, 3)], axis=1)
  backbone_sin_cos = np.where(batch["rigidgroups_gt_exists"][:, 1:4, None] > 0,
                              np.asarray(backbone_sin_cos), np.array([0.0, 1.0]))
  atom_exists = batch["atom14_gt_exists"]
  sidechain = atom_exists.copy()
  sidechain[:, :5] = 0.0  # N, CA, C, O, CB

  def rebuild_errors(chi):
    sin_cos = np.concatenate([backbone_sin_cos, np.stack([np.sin(chi), np.cos(chi)], -1)], 1)
    frames = all_atom.torsion_angles_to_frames(aatype, gt_frames[:, 0], jnp.asarray(sin_cos))
    atoms = np.asarray(all_atom.frames_and_literature_positions_to_atom14_pos(aatype, frames))
    errors = np.minimum(
        np.linalg.norm(atoms - batch["atom14_gt_positions"], axis=-1),
        np.linalg.norm(atoms - batch["atom14_alt_gt_positions"], axis=-1))
    return errors * atom_exists

  errors = rebuild_errors(batch["chi_angles"])
  assert errors[:, 1].max() < 1e-4  # CA is the backbone frame's origin.
  assert errors.max() < 1.5
  sidechain_rms = np.sqrt(np.sum(errors**2 * sidechain) / sidechain.sum())
  assert sidechain_rms < 0.5
  wrong_sign_rms = np.sqrt(np.sum(rebuild_errors(-batch["chi_angles"])**2 * sidechain)
                           / sidechain.sum())
  assert wrong_sign_rms > 4 * sidechain_rms


def test_global_motion_moves_all_atoms_rigidly():
  """Composing every backbone frame with one rigid motion moves every frame and atom with it."""
  rng = np.random.default_rng(0)
  aatype = np.arange(21)
  backbone = _random_rigid(rng, (21,))
  angles = rng.normal(size=(21, 7, 2)).astype(np.float32)
  motion = _random_rigid(rng, ())
  moved_backbone = Rigid(rot=jnp.broadcast_to(motion.rot, (21, 3, 3)),
                         trans=jnp.broadcast_to(motion.trans, (21, 3))) @ backbone
  atoms, frames = _atoms_and_frames(aatype, backbone, angles)
  moved_atoms, moved_frames = _atoms_and_frames(aatype, moved_backbone, angles)
  exists = all_atom.RESTYPE_ATOM14_EXISTS[aatype][..., None]
  np.testing.assert_allclose(np.asarray(moved_atoms), np.asarray(motion.apply(atoms)) * exists,
                             atol=1e-4)
  np.testing.assert_allclose(np.asarray(moved_frames.trans), np.asarray(motion.apply(frames.trans)),
                             atol=1e-4)


def test_torsions_rotate_groups_about_their_bond():
  """Changing chi1 keeps CB fixed and every side-chain bond length (rigid rotation)."""
  aatype = jnp.full((2,), rc.restype_order["R"])
  backbone = Rigid.identity((2,))
  angles = np.tile(np.array([0.0, 1.0]), (2, 7, 1))
  angles[1, 3] = [np.sin(1.0), np.cos(1.0)]  # chi1 of the second residue turned by 1 rad
  atoms, _ = _atoms_and_frames(aatype, backbone, jnp.asarray(angles))
  atoms = np.asarray(atoms)
  np.testing.assert_allclose(atoms[0, :5], atoms[1, :5], atol=1e-6)  # backbone and CB
  assert np.linalg.norm(atoms[0, 5] - atoms[1, 5]) > 0.5  # CG moved
  bonds0 = np.linalg.norm(np.diff(atoms[0, 4:11], axis=0), axis=-1)
  bonds1 = np.linalg.norm(np.diff(atoms[1, 4:11], axis=0), axis=-1)
  np.testing.assert_allclose(bonds0, bonds1, atol=1e-5)


def test_leading_axes_and_jit():
  """Extra leading axes give the per-example results; the functions jit."""
  rng = np.random.default_rng(1)
  aatype = rng.integers(0, 21, size=(2, 5))
  backbone = _random_rigid(rng, (2, 5))
  angles = rng.normal(size=(2, 5, 7, 2)).astype(np.float32)
  batched, _ = _atoms_and_frames(aatype, backbone, angles)
  assert batched.shape == (2, 5, 14, 3)
  single, _ = jax.jit(jax.vmap(_atoms_and_frames))(aatype, backbone, angles)
  np.testing.assert_allclose(np.asarray(batched), np.asarray(single), atol=1e-6)
