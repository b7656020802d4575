"""The structure module: invariant point attention, backbone updates, side chains, all atoms.

Jumper et al. (2021) Suppl. 1.8, Alg. 20-24. Module and parameter names are AlphaFold's Haiku
names (`structure_module/fold_iteration/invariant_point_attention/q_scalar//weights`, ...), so
published parameters load by path (MODEL_CONTRACT section 1).

Units and dtypes. Inside the fold iterations the backbone translations are in units of
`position_scale` Å (nanometres for AlphaFold's 10 Å), as AlphaFold trains them; side chains,
`traj` and every output coordinate are in Å. Whatever the compute `dtype` (float32 or
bfloat16: linear layers, activations), the geometry is float32: frames, quaternions, IPA
points, attention logits and softmax, torsion normalisation and atom coordinates. Over 8 layers
and 14 atoms, bfloat16's 8 mantissa bits would cost tenths of an Ångström.
"""

from __future__ import annotations

from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from af2flax.geometry import all_atom
from af2flax.geometry.rigid import Rigid, quat_multiply, quat_to_rot, rot_vec
from af2flax.model.primitives import LayerNorm, Linear, module_param, scan_trace_options

Array = jax.Array
ConfigDict = ml_collections.ConfigDict

# Squared-norm floor when normalising the predicted (sin, cos) pairs (AlphaFold's l2_normalize).
_ANGLE_NORM_EPS = 1e-12
# Added under the square root of the IPA output point norms (AlphaFold's dist_epsilon).
_POINT_NORM_EPS = 1e-8
# Logit penalty for masked key residues.
_MASK_PENALTY = 1e5
# Geometry-facing contractions run in full float32 (no TF32/bf16 passes on accelerators).
_HIGHEST = jax.lax.Precision.HIGHEST


def compute_dtype(global_config: ConfigDict, dtype: Any = None) -> Any:
  """The activation dtype: `dtype` if given, else `global_config.dtype` (default float32)."""
  if dtype is not None:
    return jnp.dtype(dtype)
  return jnp.dtype(global_config.get("dtype", "float32"))


def final_initializer(global_config: ConfigDict) -> str:
  """Output layers start at zero when `zero_init` is on (Suppl. 1.11.4)."""
  return "zeros" if global_config.zero_init else "linear"


def _frames_over_points(frames: Rigid, num_point_axes: int) -> Rigid:
  """Frames [N] reshaped to broadcast over `num_point_axes` trailing point axes."""
  extra = (None,) * num_point_axes
  return Rigid(rot=frames.rot[(slice(None),) + extra], trans=frames.trans[(slice(None),) + extra])


class InvariantPointAttention(nn.Module):
  """Attention over residues from scalar features, pair bias and 3D points in residue frames.

  Jumper et al. (2021) Suppl. Alg. 22 "InvariantPointAttention". The output is invariant to a
  global rigid motion of the frames.
  """

  config: ConfigDict          # heads.structure_module
  global_config: ConfigDict
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, single_act: Array, pair_act: Array, seq_mask: Array,
               frames: Rigid) -> Array:
    """single_act [N, c_s], pair_act [N, N, c_z], seq_mask [N], frames Rigid [N] -> [N, c_s]."""
    c = self.config
    num_res = single_act.shape[0]
    num_head = c.num_head
    num_scalar_qk, num_scalar_v = c.num_scalar_qk, c.num_scalar_v
    num_point_qk, num_point_v = c.num_point_qk, c.num_point_v

    def linear(size, name, dtype=self.dtype, initializer="linear", precision=None):
      return Linear(size, initializer=initializer, dtype=dtype, precision=precision, name=name)

    q_scalar = linear(num_head * num_scalar_qk, "q_scalar")(single_act)
    q_scalar = q_scalar.reshape(num_res, num_head, num_scalar_qk)
    kv_scalar = linear(num_head * (num_scalar_v + num_scalar_qk), "kv_scalar")(single_act)
    kv_scalar = kv_scalar.reshape(num_res, num_head, num_scalar_qk + num_scalar_v)
    k_scalar, v_scalar = kv_scalar[..., :num_scalar_qk], kv_scalar[..., num_scalar_qk:]

    # Points are predicted in each residue's local frame and moved to the global frame. The
    # projection's output axis is laid out [xyz, head, point] (AlphaFold's parameter layout).
    frames = _frames_over_points(frames.astype(jnp.float32), 2)

    def global_points(num_points, name):
      local = linear(num_head * 3 * num_points, name, dtype=jnp.float32,
                     precision=_HIGHEST)(single_act)
      local = jnp.moveaxis(local.reshape(num_res, 3, num_head, num_points), 1, -1)
      return frames.apply(local)  # [N, H, P, 3]

    q_point = global_points(num_point_qk, "q_point_local")
    kv_point = global_points(num_point_qk + num_point_v, "kv_point_local")
    k_point, v_point = kv_point[:, :, :num_point_qk], kv_point[:, :, num_point_qk:]

    # Each of the three logit terms gets variance 1/3 for unit-variance inputs: a scalar q.k
    # term has variance num_scalar_qk, a point term 9/2 per point (Suppl. 1.8.2).
    scalar_weight = float(np.sqrt(1.0 / (3 * max(num_scalar_qk, 1))))
    point_weight = float(np.sqrt(1.0 / (3 * max(num_point_qk, 1) * 9.0 / 2)))
    pair_weight = float(np.sqrt(1.0 / 3))
    head_weights = module_param(self, "trainable_point_weights",
                                nn.initializers.constant(np.log(np.expm1(1.0))),  # softplus^-1(1)
                                (num_head,), jnp.float32)
    point_weights = point_weight * jax.nn.softplus(head_weights)  # [H]

    scalar_logits = jnp.einsum("qhc,khc->hqk", scalar_weight * q_scalar, k_scalar,
                               preferred_element_type=jnp.float32)
    dist2 = jnp.sum(jnp.square(q_point[:, None] - k_point[None, :]), axis=-1)  # [Nq, Nk, H, P]
    point_logits = -0.5 * jnp.einsum("qkhp,h->hqk", dist2, point_weights, precision=_HIGHEST)
    pair_logits = pair_weight * jnp.moveaxis(linear(num_head, "attention_2d")(pair_act), -1, 0)
    mask_2d = (seq_mask[:, None] * seq_mask[None, :]).astype(jnp.float32)
    logits = (scalar_logits + point_logits
              + pair_logits.astype(jnp.float32) - _MASK_PENALTY * (1.0 - mask_2d))
    attn = jax.nn.softmax(logits, axis=-1)  # [H, Nq, Nk], float32

    result_scalar = jnp.einsum("hqk,khc->qhc", attn.astype(self.dtype), v_scalar)
    result_point = jnp.einsum("hqk,khpx->qhpx", attn, v_point, precision=_HIGHEST)
    result_point = frames.apply_inverse(result_point)  # back to each query's local frame
    result_pair = jnp.einsum("hqk,qkc->qhc", attn.astype(self.dtype), pair_act.astype(self.dtype))

    point_features = [result_point[..., axis].reshape(num_res, -1) for axis in range(3)]
    point_norm = jnp.sqrt(_POINT_NORM_EPS + sum(jnp.square(x) for x in point_features))
    features = jnp.concatenate(
        [result_scalar.reshape(num_res, -1).astype(jnp.float32)] + point_features
        + [point_norm, result_pair.reshape(num_res, -1).astype(jnp.float32)], axis=-1)
    return linear(c.num_channel, "output_projection",
                  initializer=final_initializer(self.global_config))(features.astype(self.dtype))


def backbone_update(quat: Array, trans: Array, update: Array) -> tuple[Array, Array]:
  """Composes frames with a predicted local update, applied first (pre-composition).

  Jumper et al. (2021) Suppl. Alg. 23 "Backbone update": the update (b, c, d, t) is the
  rotation of the non-unit quaternion (1, b, c, d) and the translation t, both in the local
  frame. Frames are carried as unit quaternions (w, x, y, z) and translations, as AlphaFold
  does (the quaternion is what `traj` reports).

  Args:
    quat: [..., 4] unit quaternions; trans: [..., 3]; update: [..., 6].
  Returns:
    (quat, trans) of the composed frames, the quaternion normalised.
  """
  update = update.astype(quat.dtype)
  rot = quat_to_rot(quat, normalize=False)
  new_quat = quat_multiply(quat, jnp.concatenate([jnp.ones_like(update[..., :1]),
                                                  update[..., :3]], axis=-1))
  new_quat = new_quat / jnp.linalg.norm(new_quat, axis=-1, keepdims=True)
  return new_quat, trans + rot_vec(rot, update[..., 3:])


class AngleResnet(nn.Module):
  """Predicts the 7 torsion angles (sin, cos) from the current and the initial single act.

  Jumper et al. (2021) Suppl. Alg. 20 "StructureModule" lines 11-14 (AlphaFold's
  `MultiRigidSidechain`). Returns (normalised, unnormalised) angles [N, 7, 2], float32.
  """

  config: ConfigDict          # heads.structure_module.sidechain
  global_config: ConfigDict
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, act: Array, initial_act: Array) -> tuple[Array, Array]:
    c = self.config
    # Sum of projections = one projection of the concatenation.
    hidden = (Linear(c.num_channel, dtype=self.dtype, name="input_projection")(nn.relu(act))
              + Linear(c.num_channel, dtype=self.dtype,
                       name="input_projection_1")(nn.relu(initial_act)))
    final_init = final_initializer(self.global_config)
    for block in range(c.num_residual_block):
      suffix = "" if block == 0 else f"_{block}"
      update = Linear(c.num_channel, initializer="relu", dtype=self.dtype,
                      name=f"resblock1{suffix}")(nn.relu(hidden))
      update = Linear(c.num_channel, initializer=final_init, dtype=self.dtype,
                      name=f"resblock2{suffix}")(nn.relu(update))
      hidden = hidden + update
    unnormalized = Linear(2 * all_atom.NUM_TORSIONS, dtype=jnp.float32, precision=_HIGHEST,
                          name="unnormalized_angles")(nn.relu(hidden))
    unnormalized = unnormalized.reshape(act.shape[:-1] + (all_atom.NUM_TORSIONS, 2))
    norm = jnp.sqrt(jnp.maximum(jnp.sum(jnp.square(unnormalized), axis=-1, keepdims=True),
                                _ANGLE_NORM_EPS))
    return unnormalized / norm, unnormalized


class FoldIteration(nn.Module):
  """One structure-module layer: IPA, transition, backbone update, side chains.

  Jumper et al. (2021) Suppl. Alg. 20 "StructureModule" lines 6-21. One instance (one set of
  weights) serves every layer. Frames come in and go out as (quaternion, translation in
  `position_scale` units); the outgoing rotation carries no gradient (line 20).
  """

  config: ConfigDict          # heads.structure_module
  global_config: ConfigDict
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, carry: tuple[Array, Array, Array], initial_act: Array, pair_act: Array,
               seq_mask: Array, aatype: Array,
               deterministic: bool) -> tuple[tuple[Array, Array, Array], dict[str, Any]]:
    """carry = (act [N, c_s], quat [N, 4], trans [N, 3]) -> (new carry, this layer's outputs).

    The signature is `nn.scan`'s: a carry, then arguments broadcast to every layer (positional,
    as scan needs; `deterministic` stays a Python bool).
    """
    act, quat, trans = carry
    c = self.config
    # As the Evoformer's dropout (primitives.ResidualDropout): off in evaluation and whenever
    # `global_config.deterministic` is set.
    dropout = nn.Dropout(rate=c.dropout,
                         deterministic=deterministic or bool(self.global_config.deterministic))
    frames = Rigid(rot=quat_to_rot(quat, normalize=False), trans=trans)
    act = act + InvariantPointAttention(c, self.global_config, dtype=self.dtype,
                                        name="invariant_point_attention")(
                                            act, pair_act, seq_mask, frames)
    act = LayerNorm(dtype=self.dtype, name="attention_layer_norm")(dropout(act))

    final_init = final_initializer(self.global_config)
    transition_input = act
    for layer in range(c.num_layer_in_transition):
      last = layer == c.num_layer_in_transition - 1
      act = Linear(c.num_channel, initializer=final_init if last else "relu", dtype=self.dtype,
                   name="transition" if layer == 0 else f"transition_{layer}")(act)
      if not last:
        act = nn.relu(act)
    act = LayerNorm(dtype=self.dtype, name="transition_layer_norm")(
        dropout(act + transition_input))

    # The update feeds the geometry directly: computed in float32.
    update = Linear(6, initializer=final_init, dtype=jnp.float32, precision=_HIGHEST,
                    name="affine_update")(act)
    quat, trans = backbone_update(quat, trans, update)

    angles, unnormalized_angles = AngleResnet(c.sidechain, self.global_config, dtype=self.dtype,
                                              name="rigid_sidechain")(act, initial_act)
    backbone = Rigid(rot=quat_to_rot(quat, normalize=False), trans=trans * c.position_scale)
    group_frames = all_atom.torsion_angles_to_frames(aatype, backbone, angles)
    atom_pos = all_atom.frames_and_literature_positions_to_atom14_pos(aatype, group_frames)
    outputs = {
        "affine": jnp.concatenate([quat, trans], axis=-1),  # translation in position_scale units
        "sidechains": {
            "angles_sin_cos": angles,
            "unnormalized_angles_sin_cos": unnormalized_angles,
            "atom_pos": atom_pos,
            "frames": group_frames.to_tensor_12(),
        },
    }
    return (act, jax.lax.stop_gradient(quat), trans), outputs


class StructureModule(nn.Module):
  """Builds backbone frames, torsions and all-atom coordinates from the trunk's output.

  Jumper et al. (2021) Suppl. Alg. 20 "StructureModule" (with Alg. 21-24). Call as
  `module(representations={'single', 'pair'}, batch={'seq_mask', 'aatype', ...},
  deterministic=...)`; the batch's atom14/atom37 maps (`make_atom14_masks` features) are used
  when present, else derived from `aatype`. Returns MODEL_CONTRACT section 4's
  `structure_module` dict.
  """

  config: ConfigDict          # heads.structure_module
  global_config: ConfigDict
  dtype: Any = None           # compute dtype; None: global_config.dtype

  @nn.compact
  def __call__(self, representations: Mapping[str, Array], batch: Mapping[str, Array],
               deterministic: bool = True) -> dict[str, Any]:
    c = self.config
    dtype = compute_dtype(self.global_config, self.dtype)
    aatype = batch["aatype"]                       # [N]
    seq_mask = batch["seq_mask"]                   # [N]
    num_res = aatype.shape[0]

    single_act = LayerNorm(dtype=dtype, name="single_layer_norm")(representations["single"])
    initial_act = single_act                       # [N, c_s]
    act = Linear(c.num_channel, dtype=dtype, name="initial_projection")(single_act)
    pair_act = LayerNorm(dtype=dtype, name="pair_layer_norm")(representations["pair"])

    # Every residue starts at the origin with the identity rotation ("black hole" init).
    quat = jnp.tile(jnp.asarray([1.0, 0.0, 0.0, 0.0], jnp.float32), (num_res, 1))
    trans = jnp.zeros((num_res, 3), jnp.float32)
    # One set of weights for all layers: scan with the parameters broadcast (no layer axis),
    # which also compiles the layer once instead of num_layer times.
    fold_iterations = nn.scan(
        FoldIteration, variable_broadcast="params", split_rngs={"params": False, "dropout": True},
        in_axes=(nn.broadcast,) * 5, length=c.num_layer,
        **scan_trace_options(self.is_initializing()))
    (act, _, _), stacked = fold_iterations(c, self.global_config, dtype=dtype,
                                           name="fold_iteration")(
        (act, quat, trans), initial_act, pair_act, seq_mask, aatype, deterministic)

    scale = jnp.asarray([1.0] * 4 + [c.position_scale] * 3, jnp.float32)
    traj = stacked["affine"] * scale               # [L, N, 7], translations in Å
    masks = all_atom.make_atom14_masks(aatype)
    masks = {key: batch.get(key, value) for key, value in masks.items()}
    atom14_positions = stacked["sidechains"]["atom_pos"][-1]   # [N, 14, 3]
    atom37_positions = all_atom.atom14_to_atom37(
        atom14_positions, masks["residx_atom37_to_atom14"], masks["atom37_atom_exists"])
    return {
        "traj": traj,
        "sidechains": stacked["sidechains"],
        "final_atom14_positions": atom14_positions,
        "final_atom14_mask": masks["atom14_atom_exists"],
        "final_atom_positions": atom37_positions,
        "final_atom_mask": masks["atom37_atom_exists"],
        "final_affines": traj[-1],
        "act": act,                                # [N, c_s], input of the pLDDT head
    }
