"""FAPE (Suppl. Alg. 28), backbone / side-chain FAPE and the symmetric renaming (Alg. 26)."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from af2flax.data import targets
from af2flax.geometry.rigid import Rigid, quat_to_rot
from af2flax.losses import fape
from tests.losses.structures import load_chain

FAPE_CONFIG = ml_collections.ConfigDict(
    {"clamp_distance": 10.0, "clamp_type": "relu", "loss_unit_distance": 10.0})


def _random_rigid(rng, shape):
  quat = rng.normal(size=shape + (4,))
  rot = np.asarray(quat_to_rot(jnp.asarray(quat, jnp.float32)))
  return Rigid(rot=jnp.asarray(rot), trans=jnp.asarray(rng.normal(size=shape + (3,)) * 10,
                                                     jnp.float32))


def _fape64(pred_rot, pred_trans, true_rot, true_trans, frames_mask, pred_pos, true_pos,
            pos_mask, scale, clamp, eps=1e-4):
  """Alg. 28 written as plain float64 loops."""
  total, norm = 0.0, 0.0
  for i in range(len(frames_mask)):
    for j in range(len(pos_mask)):
      w = frames_mask[i] * pos_mask[j]
      if w == 0:
        continue
      local_pred = pred_rot[i].T @ (pred_pos[j] - pred_trans[i])
      local_true = true_rot[i].T @ (true_pos[j] - true_trans[i])
      d = np.sqrt(np.sum((local_pred - local_true) ** 2) + eps)
      total += w * (min(d, clamp) if clamp else d) / scale
  norm = np.sum(frames_mask) * np.sum(pos_mask)
  return total / (eps + norm)


@pytest.mark.parametrize("clamp", [None, 3.0])
def test_fape_matches_float64_definition(clamp):
  rng = np.random.default_rng(0)
  pred, true = _random_rigid(rng, (6,)), _random_rigid(rng, (6,))
  pred_pos = rng.normal(size=(9, 3)) * 5
  true_pos = pred_pos + rng.normal(size=(9, 3))
  frames_mask = np.asarray([1, 1, 0, 1, 1, 1], np.float32)
  pos_mask = np.asarray([1, 0, 1, 1, 1, 1, 1, 0, 1], np.float32)
  ours = jax.jit(fape.frame_aligned_point_error, static_argnames=(
      "length_scale", "l1_clamp_distance"))(
      pred, true, jnp.asarray(frames_mask), jnp.asarray(pred_pos, jnp.float32),
      jnp.asarray(true_pos, jnp.float32), jnp.asarray(pos_mask), length_scale=10.0,
      l1_clamp_distance=clamp)
  expected = _fape64(np.asarray(pred.rot, np.float64), np.asarray(pred.trans, np.float64),
                     np.asarray(true.rot, np.float64), np.asarray(true.trans, np.float64),
                     frames_mask, pred_pos, true_pos, pos_mask, 10.0, clamp)
  assert float(ours) == pytest.approx(expected, rel=1e-5)


def test_fape_is_invariant_to_global_motion_and_zero_at_truth():
  rng = np.random.default_rng(1)
  frames, motion = _random_rigid(rng, (8,)), _random_rigid(rng, ())
  points = jnp.asarray(rng.normal(size=(8, 3)) * 8, jnp.float32)
  ones = jnp.ones(8)
  fape_fn = jax.jit(lambda *a: fape.frame_aligned_point_error(
      *a, length_scale=10.0, l1_clamp_distance=10.0))
  moved = Rigid(rot=jnp.einsum("ij,njk->nik", motion.rot, frames.rot),
                trans=jnp.einsum("ij,nj->ni", motion.rot, frames.trans) + motion.trans)
  moved_points = jnp.einsum("ij,nj->ni", motion.rot, points) + motion.trans
  at_truth = fape_fn(moved, frames, ones, moved_points, points, ones)
  # sqrt(epsilon) / length_scale is the floor of the regularised distance.
  assert float(at_truth) == pytest.approx(np.sqrt(1e-4) / 10.0, rel=1e-3)
  noisy = points + jnp.asarray(rng.normal(size=(8, 3)), jnp.float32)
  base = fape_fn(frames, frames, ones, noisy, points, ones)
  moved_noisy = jnp.einsum("ij,nj->ni", motion.rot, noisy) + motion.trans
  after = fape_fn(moved, frames, ones, moved_noisy, points, ones)
  assert float(base) > 0.05
  assert float(after) == pytest.approx(float(base), rel=1e-5)


def _backbone_inputs(num_layers=3):
  aatype, positions, mask = load_chain("1ahsA")
  t = targets.make_targets(aatype[:40], positions[:40], mask[:40])
  rng = np.random.default_rng(2)
  traj = np.repeat(t["backbone_affine_tensor"][None], num_layers, 0).copy()
  noise_scale = np.asarray([1.0, 6.0, 30.0])[:num_layers, None, None]
  traj[..., 4:] += rng.normal(size=traj[..., 4:].shape) * noise_scale
  return traj.astype(np.float32), t


def test_backbone_fape_mixes_clamped_and_unclamped_and_averages_layers():
  traj, t = _backbone_inputs()
  fn = jax.jit(lambda traj, clamp: fape.backbone_fape_loss(
      traj, t["backbone_affine_tensor"], t["backbone_affine_mask"], FAPE_CONFIG, clamp))
  clamped, unclamped, half = fn(traj, 1.0), fn(traj, 0.0), fn(traj, 0.5)
  per_layer_c, per_layer_u = np.asarray(clamped["per_layer"]), np.asarray(unclamped["per_layer"])
  assert per_layer_c[0] < per_layer_c[1] < per_layer_c[2] <= 1.0  # Noise grows; clamp = 1.
  assert per_layer_u[2] > 2.0 > per_layer_c[2]                      # 30 Å noise is clamped.
  np.testing.assert_allclose(per_layer_c[:1], per_layer_u[:1], rtol=1e-6)  # 1 Å: unclamped.
  assert float(clamped["loss"]) == pytest.approx(per_layer_c.mean(), rel=1e-6)
  assert float(clamped["fape"]) == pytest.approx(per_layer_c[-1], rel=1e-6)
  assert float(half["loss"]) == pytest.approx(
      0.5 * (float(clamped["loss"]) + float(unclamped["loss"])), rel=1e-5)


def test_fape_with_empty_masks_is_zero_with_finite_gradients():
  traj, t = _backbone_inputs(1)
  zero = np.zeros_like(t["backbone_affine_mask"])
  padded_traj = traj.copy()
  padded_traj[:, 5:] = 0.0  # All-zero padding rows (zero quaternion).

  def loss(traj):
    return fape.backbone_fape_loss(traj, t["backbone_affine_tensor"], zero, FAPE_CONFIG, 0.0)[
        "loss"]

  value, grad = jax.jit(jax.value_and_grad(loss))(jnp.asarray(padded_traj))
  assert float(value) == 0.0
  assert np.isfinite(np.asarray(grad)).all()


def test_renaming_picks_the_naming_that_matches_the_prediction():
  """A prediction equal to the truth with the symmetric atoms of some residues swapped: Alg. 26
  renames exactly those residues, and the renamed truth equals the prediction."""
  aatype, positions, mask = load_chain("1ahsA")
  t = targets.make_targets(aatype, positions, mask)
  ambiguous = np.nonzero(t["atom14_atom_is_ambiguous"].sum(-1) > 0)[0]
  assert ambiguous.size >= 4
  swapped = ambiguous[::2]
  pred = t["atom14_gt_positions"].copy()
  pred[swapped] = t["atom14_alt_gt_positions"][swapped]
  out = jax.jit(fape.compute_renamed_ground_truth)(t, pred)
  expected = np.zeros(len(aatype), np.float32)
  expected[swapped] = 1.0
  np.testing.assert_array_equal(np.asarray(out["alt_naming_is_better"]), expected)
  exists = np.asarray(out["renamed_atom14_gt_exists"])[..., None]
  np.testing.assert_allclose(np.asarray(out["renamed_atom14_gt_positions"]) * exists,
                             pred * exists, atol=1e-6)


def test_sidechain_fape_is_small_at_the_truth():
  """Frames and atoms of the truth itself: only the distance regulariser remains."""
  aatype, positions, mask = load_chain("1ahsA")
  t = targets.make_targets(aatype[:30], positions[:30], mask[:30])
  config = ml_collections.ConfigDict({"atom_clamp_distance": 10.0, "length_scale": 10.0})
  zeros = np.zeros(30, np.float32)
  sidechain_fape = jax.jit(lambda *a: fape.sidechain_fape_loss(*a, sidechain_config=config))
  at_truth = sidechain_fape(
      t["rigidgroups_gt_frames"], t["atom14_gt_positions"], t["rigidgroups_gt_frames"],
      t["rigidgroups_alt_gt_frames"], t["rigidgroups_gt_exists"], t["atom14_gt_positions"],
      t["atom14_gt_exists"], zeros)["loss"]
  assert float(at_truth) == pytest.approx(1e-3, rel=1e-2)
  # With the alternative frames chosen for every residue the ambiguous groups no longer fit.
  renamed = sidechain_fape(
      t["rigidgroups_gt_frames"], t["atom14_gt_positions"], t["rigidgroups_gt_frames"],
      t["rigidgroups_alt_gt_frames"], t["rigidgroups_gt_exists"], t["atom14_gt_positions"],
      t["atom14_gt_exists"], zeros + 1.0)["loss"]
  has_ambiguous = t["rigidgroups_group_is_ambiguous"].sum() > 0
  assert has_ambiguous and float(renamed) > float(at_truth) + 1e-3
