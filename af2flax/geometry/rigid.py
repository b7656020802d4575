"""Rigid transforms (rotation + translation) in JAX, as AlphaFold's structure module uses them.

A `Rigid` maps local coordinates to global ones: x_global = rot @ x_local + trans.
Rotations are stored as 3x3 matrices (`rot[..., i, j]`, row i = output axis), translations as
3-vectors, both float32 by default whatever the activation dtype: AlphaFold's geometry
accumulates over 8 layers and 14 atoms per residue, where bf16's 8 mantissa bits lose
sub-Ångström detail.

Conventions (Jumper et al. 2021, Suppl. 1.8):
* `from_three_points` is Suppl. Alg. 21 "rigidFrom3Points" (Gram-Schmidt, x along
  origin->neg_x_axis reversed, y in the plane of the third point).
* quaternions are (w, x, y, z), not necessarily normalised on input; `from_quaternion`
  normalises (AlphaFold's `QuatAffine(normalize=True)`).
* the 7-vector `backbone_affine_tensor` layout is (w, x, y, z, tx, ty, tz).
* the 12-vector layout of `rigidgroups_gt_frames` is the row-major rotation followed by the
  translation.
"""

from __future__ import annotations

from typing import Callable, Sequence

import flax.struct
import jax
import jax.numpy as jnp

Array = jax.Array

# Squared-norm floor of the robust normalisation: gradients stay finite for collinear input.
_NORM_EPS = 1e-8


def robust_norm(vec: Array, axis: int = -1, keepdims: bool = False, eps: float = _NORM_EPS) -> Array:
  """Euclidean norm with a floor, so that its gradient at zero is finite."""
  return jnp.sqrt(jnp.maximum(jnp.sum(jnp.square(vec), axis=axis, keepdims=keepdims), eps))


def robust_normalize(vec: Array, axis: int = -1, eps: float = _NORM_EPS) -> Array:
  return vec / robust_norm(vec, axis=axis, keepdims=True, eps=eps)


def quat_to_rot(quat: Array, normalize: bool = True) -> Array:
  """Rotation matrices [..., 3, 3] from quaternions (w, x, y, z) [..., 4]."""
  if normalize:
    quat = quat / jnp.linalg.norm(quat, axis=-1, keepdims=True)
  w, x, y, z = jnp.moveaxis(quat, -1, 0)
  rows = [
      [w * w + x * x - y * y - z * z, 2 * (x * y - w * z), 2 * (x * z + w * y)],
      [2 * (x * y + w * z), w * w - x * x + y * y - z * z, 2 * (y * z - w * x)],
      [2 * (x * z - w * y), 2 * (y * z + w * x), w * w - x * x - y * y + z * z],
  ]
  return jnp.stack([jnp.stack(row, axis=-1) for row in rows], axis=-2)


def rot_to_quat(rot: Array) -> Array:
  """Unit quaternion (w, x, y, z) of rotation matrices, by the eigenvector of the largest
  eigenvalue of the symmetric 4x4 matrix (AlphaFold's `quat_affine.rot_to_quat`). Valid
  for any rotation; q and -q are the same rotation, so compare rotations, not quaternions."""
  xx, xy, xz = rot[..., 0, 0], rot[..., 0, 1], rot[..., 0, 2]
  yx, yy, yz = rot[..., 1, 0], rot[..., 1, 1], rot[..., 1, 2]
  zx, zy, zz = rot[..., 2, 0], rot[..., 2, 1], rot[..., 2, 2]
  k = [[xx + yy + zz, zy - yz, xz - zx, yx - xy],
       [zy - yz, xx - yy - zz, xy + yx, xz + zx],
       [xz - zx, xy + yx, yy - xx - zz, yz + zy],
       [yx - xy, xz + zx, yz + zy, zz - xx - yy]]
  k = (1.0 / 3.0) * jnp.stack([jnp.stack(row, axis=-1) for row in k], axis=-2)
  _, eigvecs = jnp.linalg.eigh(k)
  return eigvecs[..., -1]


def quat_multiply(quat1: Array, quat2: Array) -> Array:
  """Hamilton product of quaternions (w, x, y, z)."""
  w1, x1, y1, z1 = jnp.moveaxis(quat1, -1, 0)
  w2, x2, y2, z2 = jnp.moveaxis(quat2, -1, 0)
  return jnp.stack([
      w1 * w2 - x1 * x2 - y1 * y2 - z1 * z2,
      w1 * x2 + x1 * w2 + y1 * z2 - z1 * y2,
      w1 * y2 - x1 * z2 + y1 * w2 + z1 * x2,
      w1 * z2 + x1 * y2 - y1 * x2 + z1 * w2,
  ], axis=-1)


def rot_matmul(rot1: Array, rot2: Array) -> Array:
  """rot1 @ rot2 over the last two axes, written as sums so it runs in full float32 on every
  backend (a matmul may run in tf32 or bf16 passes on accelerators)."""
  return jnp.sum(rot1[..., :, :, None] * rot2[..., None, :, :], axis=-2)


def rot_vec(rot: Array, vec: Array) -> Array:
  """rot @ vec for rot [..., 3, 3] and vec [..., 3], in full float32."""
  return jnp.sum(rot * vec[..., None, :], axis=-1)


@flax.struct.dataclass
class Rigid:
  """A batch of rigid transforms: `rot` [..., 3, 3] and `trans` [..., 3]."""

  rot: Array
  trans: Array

  # --- Construction ---------------------------------------------------------------------
  @classmethod
  def identity(cls, shape: Sequence[int], dtype=jnp.float32) -> "Rigid":
    rot = jnp.broadcast_to(jnp.eye(3, dtype=dtype), tuple(shape) + (3, 3))
    return cls(rot=rot, trans=jnp.zeros(tuple(shape) + (3,), dtype))

  @classmethod
  def from_three_points(cls, xy_plane: Array, origin: Array, x_axis: Array,
                        eps: float = _NORM_EPS, dtype=None) -> "Rigid":
    """Suppl. Alg. 21 "rigidFrom3Points" (x1, x2, x3) = (xy_plane, origin, x_axis).

    The frame sits at `origin`, its x axis points to `x_axis` and `xy_plane` lies in its
    xy plane with positive y (Gram-Schmidt). For a backbone frame pass (N, CA, C). The
    normalisation has a floor, so collinear points give finite values and gradients.
    `dtype` (e.g. float32 for bf16 inputs) casts the points first; None keeps theirs.
    """
    if dtype is not None:
      xy_plane, origin, x_axis = (jnp.asarray(p, dtype) for p in (xy_plane, origin, x_axis))
    v1 = x_axis - origin
    v2 = xy_plane - origin
    e1 = robust_normalize(v1, eps=eps)
    u2 = v2 - e1 * jnp.sum(e1 * v2, axis=-1, keepdims=True)
    e2 = robust_normalize(u2, eps=eps)
    e3 = jnp.cross(e1, e2)
    rot = jnp.stack([e1, e2, e3], axis=-1)  # Columns are the frame's axes.
    return cls(rot=rot, trans=origin)

  @classmethod
  def from_quaternion(cls, quat: Array, trans: Array, normalize: bool = True,
                      dtype=None) -> "Rigid":
    """From quaternions (w, x, y, z) [..., 4], normalised unless `normalize=False`, and
    translations [..., 3]; `dtype` casts both first (None keeps theirs)."""
    if dtype is not None:
      quat, trans = jnp.asarray(quat, dtype), jnp.asarray(trans, dtype)
    return cls(rot=quat_to_rot(quat, normalize=normalize), trans=trans)

  @classmethod
  def from_tensor_7(cls, tensor: Array, normalize: bool = True) -> "Rigid":
    """From AlphaFold's (w, x, y, z, tx, ty, tz) `backbone_affine_tensor` layout."""
    return cls.from_quaternion(tensor[..., :4], tensor[..., 4:], normalize=normalize)

  @classmethod
  def from_tensor_12(cls, tensor: Array) -> "Rigid":
    """From the row-major rotation + translation layout of `rigidgroups_gt_frames`."""
    return cls(rot=tensor[..., :9].reshape(tensor.shape[:-1] + (3, 3)), trans=tensor[..., 9:])

  @classmethod
  def from_tensor_4x4(cls, tensor: Array) -> "Rigid":
    return cls(rot=tensor[..., :3, :3], trans=tensor[..., :3, 3])

  # --- Export ---------------------------------------------------------------------------
  def to_quaternion(self) -> Array:
    return rot_to_quat(self.rot)

  def to_tensor_7(self) -> Array:
    return jnp.concatenate([self.to_quaternion(), self.trans], axis=-1)

  def to_tensor_12(self) -> Array:
    return jnp.concatenate([self.rot.reshape(self.rot.shape[:-2] + (9,)), self.trans], axis=-1)

  def to_tensor_4x4(self) -> Array:
    top = jnp.concatenate([self.rot, self.trans[..., None]], axis=-1)
    bottom = jnp.broadcast_to(jnp.asarray([0.0, 0.0, 0.0, 1.0], self.rot.dtype),
                              self.shape + (1, 4))
    return jnp.concatenate([top, bottom], axis=-2)

  # --- Algebra --------------------------------------------------------------------------
  @property
  def shape(self) -> tuple[int, ...]:
    return self.trans.shape[:-1]

  @property
  def dtype(self):
    return self.trans.dtype

  def compose(self, other: "Rigid") -> "Rigid":
    """self ∘ other: apply `other` first, then `self`."""
    return Rigid(rot=rot_matmul(self.rot, other.rot),
                 trans=rot_vec(self.rot, other.trans) + self.trans)

  def __matmul__(self, other: "Rigid") -> "Rigid":
    return self.compose(other)

  def inverse(self) -> "Rigid":
    rot_t = jnp.swapaxes(self.rot, -1, -2)
    return Rigid(rot=rot_t, trans=-rot_vec(rot_t, self.trans))

  def apply(self, points: Array) -> Array:
    """Local -> global for points [..., 3] broadcasting against the frames' shape."""
    return rot_vec(self.rot, points) + self.trans

  def apply_inverse(self, points: Array) -> Array:
    """Global -> local."""
    return rot_vec(jnp.swapaxes(self.rot, -1, -2), points - self.trans)

  def compose_quaternion_update(self, update: Array) -> "Rigid":
    """Suppl. Alg. 23 lines 2-4: compose with (1, b, c, d)/|.| and translation t.

    `update` [..., 6] = (b, c, d, tx, ty, tz) in the local frame; the update is applied
    first (right-composition), as AlphaFold's `QuatAffine.pre_compose`.
    """
    update = update.astype(self.dtype)
    quat = jnp.concatenate([jnp.ones_like(update[..., :1]), update[..., :3]], axis=-1)
    delta = Rigid(rot=quat_to_rot(quat, normalize=True), trans=update[..., 3:])
    return self.compose(delta)

  def stop_rot_gradient(self) -> "Rigid":
    """Suppl. Alg. 20 line 20: no gradient through the rotation between layers."""
    return Rigid(rot=jax.lax.stop_gradient(self.rot), trans=self.trans)

  def scale_translation(self, factor: float) -> "Rigid":
    return Rigid(rot=self.rot, trans=self.trans * factor)

  def astype(self, dtype) -> "Rigid":
    return Rigid(rot=self.rot.astype(dtype), trans=self.trans.astype(dtype))

  def map(self, fn: Callable[[Array], Array]) -> "Rigid":
    """Applies an index/reshape function to the frame axes of both fields."""
    return Rigid(rot=_map_leading(fn, self.rot, 2), trans=_map_leading(fn, self.trans, 1))

  def __getitem__(self, index) -> "Rigid":
    """Indexes the frame axes; `rigid[..., 4]` selects along the last frame axis."""
    if not isinstance(index, tuple):
      index = (index,)
    if any(item is Ellipsis for item in index):
      # Keep the component axes after an explicit Ellipsis.
      return Rigid(rot=self.rot[index + (slice(None), slice(None))],
                   trans=self.trans[index + (slice(None),)])
    return Rigid(rot=self.rot[index + (Ellipsis, slice(None), slice(None))],
                 trans=self.trans[index + (Ellipsis, slice(None))])

  def __getattr__(self, name):  # pragma: no cover - clearer error for a common slip.
    raise AttributeError(f"Rigid has no attribute {name!r}")


def _map_leading(fn: Callable[[Array], Array], array: Array, num_trailing: int) -> Array:
  """Applies `fn` to the leading (frame) axes, keeping `num_trailing` component axes."""
  trailing = array.shape[-num_trailing:]
  flat = array.reshape(array.shape[:-num_trailing] + (-1,))
  moved = jnp.moveaxis(flat, -1, 0)
  mapped = jax.vmap(fn)(moved)
  return jnp.moveaxis(mapped, 0, -1).reshape(mapped.shape[1:] + trailing)
