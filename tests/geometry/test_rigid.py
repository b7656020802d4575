"""Properties of `af2flax.geometry.rigid` on random rigid transforms (Suppl. 1.8, Alg. 21, 23)."""

import chex
import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from af2flax.geometry import rigid as rigid_lib
from af2flax.geometry.rigid import Rigid
from tests.conftest import REFERENCE

jax.config.update("jax_enable_x64", False)

BATCH = 256
TOL = dict(atol=2e-5, rtol=2e-5)


def random_quaternions(seed: int, shape=(BATCH,), scale_range=(1e-2, 1e2)) -> np.ndarray:
  """Unnormalised quaternions with isotropic direction and log-uniform length."""
  rng = np.random.default_rng(seed)
  quat = rng.normal(size=shape + (4,))
  quat /= np.linalg.norm(quat, axis=-1, keepdims=True)
  scale = np.exp(rng.uniform(*np.log(scale_range), size=shape + (1,)))
  return (quat * scale).astype(np.float32)


def random_rigid(seed: int, shape=(BATCH,)) -> Rigid:
  trans = np.random.default_rng(seed + 1000).normal(scale=10.0, size=shape + (3,))
  return Rigid.from_quaternion(jnp.asarray(random_quaternions(seed, shape)),
                               jnp.asarray(trans, jnp.float32))


def random_points(seed: int, shape=(BATCH,)) -> jnp.ndarray:
  return jnp.asarray(np.random.default_rng(seed + 2000).normal(scale=10.0, size=shape + (3,)),
                     jnp.float32)


def assert_rigid_close(actual: Rigid, expected: Rigid, atol=2e-5):
  np.testing.assert_allclose(actual.rot, expected.rot, atol=atol, rtol=0)
  np.testing.assert_allclose(actual.trans, expected.trans, atol=atol * 10, rtol=1e-5)


def assert_is_rotation(rot: jnp.ndarray, atol=2e-5):
  rot = np.asarray(rot, np.float64)
  eye = np.broadcast_to(np.eye(3), rot.shape)
  np.testing.assert_allclose(rot @ np.swapaxes(rot, -1, -2), eye, atol=atol)
  np.testing.assert_allclose(np.linalg.det(rot), 1.0, atol=atol)


# --- Rotations and quaternions ------------------------------------------------------------

def test_quaternion_rotations_are_orthonormal_with_det_one():
  rot = rigid_lib.quat_to_rot(jnp.asarray(random_quaternions(0)))
  chex.assert_shape(rot, (BATCH, 3, 3))
  assert_is_rotation(rot)


def test_unnormalised_quaternion_gives_same_rotation_as_normalised():
  quat = random_quaternions(1)
  unit = quat / np.linalg.norm(quat, axis=-1, keepdims=True)
  np.testing.assert_allclose(rigid_lib.quat_to_rot(jnp.asarray(quat)),
                             rigid_lib.quat_to_rot(jnp.asarray(unit), normalize=False), **TOL)


@hypothesis.settings(max_examples=60, deadline=None)
@hypothesis.given(st.lists(st.floats(-10, 10, allow_nan=False), min_size=4, max_size=4)
                  .filter(lambda q: np.linalg.norm(q) > 1e-2))
def test_quaternion_rotation_round_trip(quat):
  """rot -> quat -> rot is the identity; quat -> rot -> quat gives ±q/|q|."""
  quat = np.asarray(quat, np.float32)
  rot = rigid_lib.quat_to_rot(jnp.asarray(quat))
  back = np.asarray(rigid_lib.rot_to_quat(rot))
  unit = quat / np.linalg.norm(quat)
  sign = np.sign(np.dot(back, unit))
  np.testing.assert_allclose(sign * back, unit, atol=1e-4)
  np.testing.assert_allclose(rigid_lib.quat_to_rot(jnp.asarray(back)), rot, atol=1e-5)


def test_quaternion_product_is_rotation_product():
  q1, q2 = jnp.asarray(random_quaternions(2)), jnp.asarray(random_quaternions(3))
  np.testing.assert_allclose(
      rigid_lib.quat_to_rot(rigid_lib.quat_multiply(q1, q2)),
      rigid_lib.rot_matmul(rigid_lib.quat_to_rot(q1), rigid_lib.quat_to_rot(q2)), **TOL)


def test_rot_matmul_and_rot_vec_match_numpy():
  rot1 = np.asarray(random_rigid(4).rot, np.float64)
  rot2 = np.asarray(random_rigid(5).rot, np.float64)
  vec = np.asarray(random_points(6), np.float64)
  np.testing.assert_allclose(rigid_lib.rot_matmul(jnp.asarray(rot1, jnp.float32), jnp.asarray(rot2, jnp.float32)),
                             rot1 @ rot2, atol=1e-5)
  np.testing.assert_allclose(rigid_lib.rot_vec(jnp.asarray(rot1, jnp.float32), jnp.asarray(vec, jnp.float32)),
                             np.einsum("bij,bj->bi", rot1, vec), atol=1e-4)


# --- Group structure ----------------------------------------------------------------------

def test_compose_with_inverse_is_identity():
  frames = random_rigid(10)
  identity = Rigid.identity((BATCH,))
  assert_rigid_close(frames @ frames.inverse(), identity)
  assert_rigid_close(frames.inverse() @ frames, identity)
  assert_rigid_close(identity @ frames, frames)
  assert_rigid_close(frames @ identity, frames)


def test_compose_is_associative_and_inverse_reverses_order():
  a, b, c = random_rigid(11), random_rigid(12), random_rigid(13)
  assert_rigid_close((a @ b) @ c, a @ (b @ c), atol=5e-5)
  assert_rigid_close((a @ b).inverse(), b.inverse() @ a.inverse(), atol=5e-5)


def test_apply_matches_composition_and_inverse():
  a, b = random_rigid(14), random_rigid(15)
  points = random_points(16)
  np.testing.assert_allclose((a @ b).apply(points), a.apply(b.apply(points)), atol=2e-4)
  np.testing.assert_allclose(a.apply_inverse(a.apply(points)), points, atol=2e-4)
  np.testing.assert_allclose(a.inverse().apply(points), a.apply_inverse(points), atol=2e-4)


def test_apply_preserves_distances():
  frames = random_rigid(17, shape=(1,))
  points = random_points(18, shape=(64,))
  moved = frames.apply(points)
  dist = lambda x: np.linalg.norm(np.asarray(x)[:, None] - np.asarray(x)[None], axis=-1)
  np.testing.assert_allclose(dist(moved), dist(points), atol=1e-4)


def test_apply_broadcasts_frames_over_points():
  frames = random_rigid(19, shape=(5,))
  points = random_points(20, shape=(5, 7))
  expected = np.stack([[frames[i].apply(points[i, j]) for j in range(7)] for i in range(5)])
  np.testing.assert_allclose(frames[:, None].apply(points), expected, atol=1e-4)


# --- Tensor layouts -----------------------------------------------------------------------

def test_tensor_7_round_trip():
  frames = random_rigid(21)
  tensor = frames.to_tensor_7()
  chex.assert_shape(tensor, (BATCH, 7))
  np.testing.assert_allclose(jnp.linalg.norm(tensor[:, :4], axis=-1), 1.0, atol=1e-5)
  assert_rigid_close(Rigid.from_tensor_7(tensor), frames, atol=5e-5)


def test_tensor_7_normalises_unnormalised_quaternion():
  quat = random_quaternions(22)
  trans = np.asarray(random_points(23))
  frames = Rigid.from_tensor_7(jnp.concatenate([quat, trans], axis=-1))
  assert_is_rotation(frames.rot)
  np.testing.assert_allclose(frames.trans, trans)


def test_tensor_12_and_4x4_round_trips():
  frames = random_rigid(24)
  tensor_12 = frames.to_tensor_12()
  chex.assert_shape(tensor_12, (BATCH, 12))
  assert_rigid_close(Rigid.from_tensor_12(tensor_12), frames, atol=0)
  tensor_4x4 = frames.to_tensor_4x4()
  np.testing.assert_array_equal(tensor_4x4[:, 3], np.broadcast_to([0, 0, 0, 1], (BATCH, 4)))
  assert_rigid_close(Rigid.from_tensor_4x4(tensor_4x4), frames, atol=0)
  other = random_rigid(25)
  np.testing.assert_allclose(tensor_4x4 @ other.to_tensor_4x4(), (frames @ other).to_tensor_4x4(),
                             atol=1e-4)


# --- Alg. 23 quaternion update --------------------------------------------------------------

def test_compose_quaternion_update_equals_composing_normalised_quaternion():
  """Suppl. Alg. 23: T ∘ (normalise(1, b, c, d), t), and AlphaFold's quaternion form
  q_new = normalise(q + q ⊗ (0, b, c, d)), t_new = t + R(q) t_update."""
  frames = random_rigid(26)
  update = jnp.asarray(np.random.default_rng(27).normal(size=(BATCH, 6)), jnp.float32)
  updated = frames.compose_quaternion_update(update)
  delta_quat = jnp.concatenate([jnp.ones((BATCH, 1)), update[:, :3]], axis=-1)
  delta = Rigid.from_quaternion(delta_quat, update[:, 3:])
  assert_rigid_close(updated, frames @ delta, atol=5e-5)
  quat = frames.to_quaternion()
  pure = jnp.concatenate([jnp.zeros((BATCH, 1)), update[:, :3]], axis=-1)
  new_quat = quat + rigid_lib.quat_multiply(quat, pure)
  np.testing.assert_allclose(updated.rot, rigid_lib.quat_to_rot(new_quat), atol=5e-5)
  np.testing.assert_allclose(updated.trans, frames.trans + rigid_lib.rot_vec(frames.rot, update[:, 3:]),
                             atol=1e-4)


def test_zero_quaternion_update_is_identity():
  frames = random_rigid(28)
  assert_rigid_close(frames.compose_quaternion_update(jnp.zeros((BATCH, 6))), frames, atol=1e-6)


# --- Alg. 21 frames from three points ---------------------------------------------------------

def test_from_three_points_geometry():
  """The frame is a rotation at `origin`; `x_axis` lands on +x, `xy_plane` in the xy plane
  with y > 0."""
  x1, x2, x3 = random_points(30), random_points(31), random_points(32)
  frames = Rigid.from_three_points(x1, x2, x3)
  assert_is_rotation(frames.rot)
  np.testing.assert_array_equal(frames.trans, x2)
  local_x3 = np.asarray(frames.apply_inverse(x3))
  np.testing.assert_allclose(local_x3[:, 1:], 0.0, atol=2e-4)
  assert (local_x3[:, 0] > 0).all()
  local_x1 = np.asarray(frames.apply_inverse(x1))
  np.testing.assert_allclose(local_x1[:, 2], 0.0, atol=2e-4)
  assert (local_x1[:, 1] > 0).all()


def test_from_three_points_is_equivariant():
  x1, x2, x3 = random_points(33), random_points(34), random_points(35)
  motion = random_rigid(36)
  moved = Rigid.from_three_points(motion.apply(x1), motion.apply(x2), motion.apply(x3))
  assert_rigid_close(moved, motion @ Rigid.from_three_points(x1, x2, x3), atol=1e-4)


def test_from_three_points_matches_alphafold_backbone_affine(shared_dir):
  """Backbone frames (N, CA, C) equal AlphaFold's `backbone_affine_tensor` of the reference batch."""
  batch = np.load(REFERENCE / "af2_tiny" / "batch.npz", allow_pickle=False)
  positions = batch["all_atom_positions"]  # [R, N, 37, 3]; atom37 N, CA, C = 0, 1, 2.
  mask = batch["backbone_affine_mask"] > 0
  assert mask.sum() > 10
  frames = Rigid.from_three_points(positions[..., 0, :], positions[..., 1, :], positions[..., 2, :])
  reference = Rigid.from_tensor_7(jnp.asarray(batch["backbone_affine_tensor"]))
  np.testing.assert_allclose(np.asarray(frames.rot)[mask], np.asarray(reference.rot)[mask], atol=1e-5)
  np.testing.assert_allclose(np.asarray(frames.trans)[mask], np.asarray(reference.trans)[mask], atol=1e-5)
  tensor_7 = np.asarray(frames.to_tensor_7())[mask]
  expected = batch["backbone_affine_tensor"][mask]
  sign = np.sign(np.sum(tensor_7[:, :4] * expected[:, :4], axis=-1, keepdims=True))
  np.testing.assert_allclose(tensor_7[:, :4] * sign, expected[:, :4], atol=1e-5)


@pytest.mark.parametrize("case", ["collinear", "coincident_origin", "all_coincident"])
def test_from_three_points_gradients_finite_at_degenerate_points(case):
  origin = jnp.asarray([1.0, 2.0, 3.0])
  direction = jnp.asarray([0.3, -0.4, 0.5])
  points = {
      "collinear": (origin - 2 * direction, origin, origin + direction),
      "coincident_origin": (origin + direction, origin, origin),
      "all_coincident": (origin, origin, origin),
  }[case]

  def loss(x1, x2, x3):
    frames = Rigid.from_three_points(x1, x2, x3)
    probe = jnp.asarray([0.7, -1.1, 2.3])
    return jnp.sum(frames.rot) + jnp.sum(frames.apply_inverse(probe)) + jnp.sum(frames.apply(probe))

  value = loss(*points)
  grads = jax.grad(loss, argnums=(0, 1, 2))(*points)
  assert np.isfinite(value)
  for grad in grads:
    assert np.isfinite(np.asarray(grad)).all(), grad


def test_robust_norm_gradient_finite_at_zero():
  grad = jax.grad(lambda v: rigid_lib.robust_norm(v))(jnp.zeros(3))
  assert np.isfinite(np.asarray(grad)).all()
  np.testing.assert_allclose(rigid_lib.robust_norm(jnp.asarray([3.0, 4.0, 0.0])), 5.0, rtol=1e-6)


# --- Precision ------------------------------------------------------------------------------

def test_bf16_points_with_float32_geometry():
  x1, x2, x3 = (p.astype(jnp.bfloat16) for p in (random_points(40), random_points(41), random_points(42)))
  frames = Rigid.from_three_points(x1, x2, x3, dtype=jnp.float32)
  assert frames.rot.dtype == jnp.float32 and frames.trans.dtype == jnp.float32
  as_f32 = Rigid.from_three_points(*(p.astype(jnp.float32) for p in (x1, x2, x3)))
  assert_rigid_close(frames, as_f32, atol=0)
  assert_is_rotation(frames.rot, atol=1e-5)
  # Without `dtype` the points' precision is kept: bf16 arithmetic, errors of ~1e-2.
  frames_bf16 = Rigid.from_three_points(x1, x2, x3)
  assert frames_bf16.rot.dtype == jnp.bfloat16
  bf16_error = np.abs(np.asarray(frames_bf16.rot.astype(jnp.float32) - frames.rot))
  assert 1e-4 < bf16_error.mean() < 2e-2
  # bf16 activations acting on float32 frames keep float32.
  update = jnp.asarray(np.random.default_rng(43).normal(size=(BATCH, 6)), jnp.bfloat16)
  updated = frames.compose_quaternion_update(update)
  assert updated.rot.dtype == jnp.float32
  assert frames.apply(x1).dtype == jnp.float32
  quat = Rigid.from_quaternion(jnp.asarray(random_quaternions(44), jnp.bfloat16),
                               x2, dtype=jnp.float32)
  assert quat.rot.dtype == jnp.float32
  assert_is_rotation(quat.rot, atol=1e-5)


# --- Plumbing -------------------------------------------------------------------------------

def test_indexing_keeps_component_axes():
  frames = random_rigid(50, shape=(4, 5))
  for index, shape in (((0,), (5,)), ((slice(1, 3),), (2, 5)), ((Ellipsis, 0), (4,)),
                       ((Ellipsis, slice(0, 2)), (4, 2)), ((None,), (1, 4, 5)), ((1, 2), ())):
    sub = frames[index if len(index) > 1 else index[0]]
    chex.assert_shape(sub.rot, shape + (3, 3))
    chex.assert_shape(sub.trans, shape + (3,))
  np.testing.assert_array_equal(frames[..., 2].rot, frames.rot[:, 2])
  np.testing.assert_array_equal(frames[..., 2].trans, frames.trans[:, 2])
  np.testing.assert_array_equal(frames[3].trans, frames.trans[3])


def test_map_applies_to_frame_axes():
  frames = random_rigid(51, shape=(4, 5))
  mapped = frames.map(lambda x: jnp.flip(x, axis=0))
  np.testing.assert_array_equal(mapped.rot, jnp.flip(frames.rot, axis=0))
  np.testing.assert_array_equal(mapped.trans, jnp.flip(frames.trans, axis=0))


def test_stop_rot_gradient_blocks_rotation_only():
  frames = random_rigid(52, shape=(3,))
  points = random_points(53, shape=(3,))
  grads = jax.grad(lambda f: jnp.sum(f.stop_rot_gradient().apply(points)))(frames)
  np.testing.assert_array_equal(grads.rot, 0.0)
  np.testing.assert_allclose(grads.trans, 1.0)


def test_rigid_is_a_pytree_through_jit():
  frames = random_rigid(54, shape=(3,))
  points = random_points(55, shape=(3,))
  jitted = jax.jit(lambda f, x: f.scale_translation(2.0).apply(x))(frames, points)
  np.testing.assert_allclose(jitted, rigid_lib.rot_vec(frames.rot, points) + 2 * frames.trans, atol=1e-5)
