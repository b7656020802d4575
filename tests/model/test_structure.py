"""Structure module: parity with AlphaFold on af2_tiny, parameter layout, bf16, IPA invariance."""

import json

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from af2flax.geometry.rigid import Rigid, quat_multiply, quat_to_rot
from af2flax.model import structure
from af2flax.model.import_af2 import flax_to_haiku
from tests.conftest import REFERENCE
from tests.model.tiny_reference import load_tiny, module_params, relative_error

FRAME_FIELDS = ["xx", "xy", "xz", "yx", "yy", "yz", "zx", "zy", "zz"]
PARITY_RTOL = 1e-4


@pytest.fixture(scope="module")
def tiny():
  params, batch, outputs, config = load_tiny()
  sm_params = module_params(params, "structure_module")
  representations = {"single": outputs["representations/single"],
                     "pair": outputs["representations/pair"]}
  return sm_params, batch, outputs, config, representations


def _apply(config, sm_params, representations, batch, dtype=None, deterministic=True, rngs=None):
  module = structure.StructureModule(config.heads.structure_module, config.global_config,
                                     dtype=dtype)
  fn = jax.jit(lambda p, r, b: module.apply({"params": p}, r, b, deterministic=deterministic,
                                            rngs=rngs))
  return fn(sm_params, representations, batch)


def _with_dropout(config, rate):
  config = ml_collections.ConfigDict(config.to_dict())
  config.heads.structure_module.dropout = rate
  return config


@pytest.fixture(scope="module")
def fp32_outputs(tiny):
  """Deterministic float32 outputs. The dump ran without dropout; here the rate is 0.1, so
  parity also shows that `deterministic=True` switches dropout off."""
  sm_params, batch, _, config, representations = tiny
  return _apply(_with_dropout(config, 0.1), sm_params, representations, batch)


def _reference_sidechains(outputs):
  prefix = "structure_module/sidechains/"
  return {
      "angles_sin_cos": outputs[prefix + "angles_sin_cos"],
      "unnormalized_angles_sin_cos": outputs[prefix + "unnormalized_angles_sin_cos"],
      "atom_pos": np.stack([outputs[prefix + f"atom_pos/{c}"] for c in "xyz"], axis=-1),
      "frames": np.stack([outputs[prefix + f"frames/rot/{f}"] for f in FRAME_FIELDS]
                         + [outputs[prefix + f"frames/trans/{c}"] for c in "xyz"], axis=-1),
  }


def test_parameter_tree_is_alphafolds(tiny):
  """init creates exactly AlphaFold's parameter paths and shapes (tiny config)."""
  sm_params, batch, _, config, representations = tiny
  module = structure.StructureModule(config.heads.structure_module, config.global_config)
  shapes = jax.eval_shape(lambda: module.init(jax.random.PRNGKey(0), representations, batch))
  ours = jax.tree_util.tree_map(lambda x: x.shape, shapes["params"])
  theirs = jax.tree_util.tree_map(lambda x: x.shape, sm_params)
  assert ours == theirs


def test_parameter_shapes_of_published_models(tiny):
  """With the published sizes, every structure_module path/shape of model_1_ptm is produced."""
  _, batch, _, config, _ = tiny
  path = REFERENCE / "af2_param_shapes.json"
  if not path.exists():
    pytest.skip(f"{path} missing")
  with open(path) as handle:
    published = json.load(handle)["model_1_ptm"]
  prefix = "alphafold/alphafold_iteration/structure_module"
  expected = {k: tuple(v) for k, v in published.items() if k.startswith(prefix + "/")}
  sm_config = ml_collections.ConfigDict(config.heads.structure_module.to_dict())
  sm_config.num_channel = 384
  sm_config.num_layer = 8
  num_res = batch["aatype"].shape[0]
  representations = {"single": jax.ShapeDtypeStruct((num_res, 384), jnp.float32),
                     "pair": jax.ShapeDtypeStruct((num_res, num_res, 128), jnp.float32)}
  module = structure.StructureModule(sm_config, config.global_config)
  shapes = jax.eval_shape(lambda r: module.init(jax.random.PRNGKey(0), r, batch), representations)
  ours = {k: tuple(v.shape) for k, v in flax_to_haiku(shapes["params"], prefix).items()}
  assert ours == expected


def test_parity_with_alphafold(tiny, fp32_outputs):
  """Every structure-module output equals AlphaFold's (relative error < 1e-4, atoms < 1e-3 Å)."""
  _, _, outputs, _, _ = tiny
  ours = fp32_outputs
  errors = {
      "traj": relative_error(ours["traj"], outputs["structure_module/traj"]),
      "final_affines": relative_error(ours["final_affines"],
                                      outputs["structure_module/final_affines"]),
      "final_atom_positions": relative_error(ours["final_atom_positions"],
                                             outputs["structure_module/final_atom_positions"]),
      "final_atom14_positions": relative_error(ours["final_atom14_positions"],
                                               outputs["structure_module/final_atom14_positions"]),
      "act": relative_error(ours["act"], outputs["representations/structure_module"]),
  }
  for key, ref in _reference_sidechains(outputs).items():
    errors[f"sidechains/{key}"] = relative_error(ours["sidechains"][key], ref)
  assert all(error < PARITY_RTOL for error in errors.values()), errors
  atom_error = np.abs(np.asarray(ours["final_atom_positions"])
                      - outputs["structure_module/final_atom_positions"]).max()
  assert atom_error < 1e-3
  # q and -q are the same rotation: compare the rotations of the final affines too.
  np.testing.assert_allclose(
      np.asarray(quat_to_rot(ours["final_affines"][:, :4])),
      np.asarray(quat_to_rot(jnp.asarray(outputs["structure_module/final_affines"][:, :4]))),
      atol=1e-5)
  for key in ("final_atom_mask", "final_atom14_mask"):
    np.testing.assert_array_equal(np.asarray(ours[key]), outputs[f"structure_module/{key}"])


def test_output_shapes_and_float32_geometry(tiny, fp32_outputs):
  """Output layout of MODEL_CONTRACT section 4."""
  _, batch, _, config, _ = tiny
  num_layer = config.heads.structure_module.num_layer
  num_res = batch["aatype"].shape[0]
  expected = {
      "traj": (num_layer, num_res, 7), "final_affines": (num_res, 7),
      "final_atom_positions": (num_res, 37, 3), "final_atom_mask": (num_res, 37),
      "final_atom14_positions": (num_res, 14, 3), "final_atom14_mask": (num_res, 14),
      "act": (num_res, config.heads.structure_module.num_channel),
  }
  for key, shape in expected.items():
    assert fp32_outputs[key].shape == shape, key
  sidechain_shapes = {"angles_sin_cos": (7, 2), "unnormalized_angles_sin_cos": (7, 2),
                      "atom_pos": (14, 3), "frames": (8, 12)}
  for key, shape in sidechain_shapes.items():
    assert fp32_outputs["sidechains"][key].shape == (num_layer, num_res) + shape, key


def test_bfloat16_compute_keeps_float32_geometry(tiny, fp32_outputs):
  """bf16 activations: finite, float32 coordinates/frames, close to the float32 result."""
  sm_params, batch, _, config, representations = tiny
  bf16_representations = {k: jnp.asarray(v, jnp.bfloat16) for k, v in representations.items()}
  # Only aatype and seq_mask: the atom14/atom37 maps are then derived from aatype.
  small_batch = {"aatype": batch["aatype"], "seq_mask": batch["seq_mask"]}
  ours = _apply(config, sm_params, bf16_representations, small_batch, dtype=jnp.bfloat16)
  for key in ("final_atom_mask", "final_atom14_mask"):
    np.testing.assert_array_equal(np.asarray(ours[key]), np.asarray(fp32_outputs[key]))
  for key in ("traj", "final_affines", "final_atom_positions", "final_atom14_positions"):
    assert ours[key].dtype == jnp.float32, key
    assert np.all(np.isfinite(np.asarray(ours[key]))), key
  for key, value in ours["sidechains"].items():
    assert value.dtype == jnp.float32, key
  assert ours["act"].dtype == jnp.bfloat16
  mask = np.asarray(ours["final_atom_mask"])[..., None]
  deviation = (np.asarray(ours["final_atom_positions"])
               - np.asarray(fp32_outputs["final_atom_positions"])) * mask
  rms = np.sqrt(np.sum(deviation**2) / (3 * mask.sum()))
  assert rms < 0.1, rms  # measured 0.015 Å on af2_tiny
  assert relative_error(np.asarray(ours["act"], np.float32), fp32_outputs["act"]) < 0.02


def test_dropout_when_not_deterministic(tiny, fp32_outputs):
  sm_params, batch, _, config, representations = tiny
  rngs = {"dropout": jax.random.PRNGKey(3)}
  config = _with_dropout(config, 0.1)
  config.global_config.deterministic = False  # af2_tiny's config (the dump's) has it on
  train = _apply(config, sm_params, representations, batch, deterministic=False, rngs=rngs)
  assert np.all(np.isfinite(np.asarray(train["final_atom_positions"])))
  assert not np.allclose(np.asarray(train["act"]), np.asarray(fp32_outputs["act"]), atol=1e-3)


def test_global_deterministic_switches_dropout_off(tiny, fp32_outputs):
  """`global_config.deterministic` turns the structure module's dropout off in training too,
  as it does the Evoformer's (AlphaFold's FoldIteration honours the same flag)."""
  sm_params, batch, _, config, representations = tiny
  config = _with_dropout(config, 0.1)
  config.global_config.deterministic = True
  train = _apply(config, sm_params, representations, batch, deterministic=False,
                 rngs={"dropout": jax.random.PRNGKey(3)})
  np.testing.assert_allclose(np.asarray(train["act"]), np.asarray(fp32_outputs["act"]),
                             rtol=1e-5, atol=1e-5)


def _random_frames(rng, num_res):
  """Random unit quaternions [num_res, 4] and translations [num_res, 3] (numpy, float32)."""
  quat = rng.normal(size=(num_res, 4))
  quat /= np.linalg.norm(quat, axis=-1, keepdims=True)
  return quat.astype(np.float32), rng.normal(size=(num_res, 3)).astype(np.float32)


def _move_frames(motion_quat, motion_trans, quat, trans):
  """Frames motion ∘ (quat, trans) for one rigid motion (quaternion [4], translation [3])."""
  motion = Rigid.from_quaternion(motion_quat, motion_trans)
  return quat_multiply(jnp.broadcast_to(motion_quat, quat.shape), quat), motion.apply(trans)


def test_ipa_is_invariant_to_global_rigid_motion(tiny):
  """IPA's output does not change when every frame is moved by the same rigid motion."""
  _, _, _, config, _ = tiny
  rng = np.random.default_rng(0)
  num_res, c = 12, config.heads.structure_module
  single = rng.normal(size=(num_res, c.num_channel)).astype(np.float32)
  pair = rng.normal(size=(num_res, num_res, 32)).astype(np.float32)
  seq_mask = np.ones((num_res,), np.float32)
  seq_mask[-2:] = 0.0
  quat, trans = _random_frames(rng, num_res)
  motion_quat, motion_trans = _random_frames(rng, 1)
  global_config = ml_collections.ConfigDict(config.global_config.to_dict())
  global_config.zero_init = False  # a zero output projection would make the test vacuous
  ipa = structure.InvariantPointAttention(c, global_config)

  @jax.jit
  def run():
    frames = Rigid.from_quaternion(quat, trans)
    params = ipa.init(jax.random.PRNGKey(0), single, pair, seq_mask, frames)
    moved = Rigid.from_quaternion(*_move_frames(motion_quat[0], 3.0 * motion_trans[0], quat, trans))
    return (ipa.apply(params, single, pair, seq_mask, frames),
            ipa.apply(params, single, pair, seq_mask, moved))

  out, moved_out = run()
  assert float(jnp.abs(out).max()) > 1e-2
  np.testing.assert_allclose(np.asarray(moved_out), np.asarray(out), atol=2e-4, rtol=1e-4)


def test_fold_iteration_is_equivariant(tiny):
  """Moving the input frames moves the output frames and atoms; activations are unchanged.

  Also checks Alg. 20 line 20: the outgoing rotation carries no gradient, the translation does.
  """
  sm_params, batch, _, config, representations = tiny
  c = config.heads.structure_module
  fold = structure.FoldIteration(c, config.global_config)
  params = {"params": sm_params["fold_iteration"]}
  rng = np.random.default_rng(1)
  num_res = batch["aatype"].shape[0]
  act = rng.normal(size=(num_res, c.num_channel)).astype(np.float32)
  initial_act = rng.normal(size=(num_res, c.num_channel)).astype(np.float32)
  quat, trans = _random_frames(rng, num_res)
  motion_quat, motion_trans = _random_frames(rng, 1)
  motion_quat, motion_trans = motion_quat[0], 3.0 * motion_trans[0]

  def run(act, quat, trans):
    return fold.apply(params, (act, quat, trans), initial_act, representations["pair"],
                      batch["seq_mask"], batch["aatype"], True)

  @jax.jit
  def everything():
    (act_out, quat_out, trans_out), outputs = run(act, quat, trans)
    moved_carry, moved_outputs = run(act, *_move_frames(motion_quat, motion_trans, quat, trans))
    # Expected: the motion applied to the outputs (atoms in Å: translation times position_scale).
    expected_quat, expected_trans = _move_frames(motion_quat, motion_trans, quat_out, trans_out)
    motion_angstrom = Rigid.from_quaternion(motion_quat, c.position_scale * motion_trans)
    expected_atoms = motion_angstrom.apply(outputs["sidechains"]["atom_pos"])
    grad_quat = jax.grad(lambda x: jnp.sum(run(x, quat, trans)[0][1]))(act)
    grad_trans = jax.grad(lambda x: jnp.sum(run(x, quat, trans)[0][2]))(act)
    return (act_out, moved_carry, quat_to_rot(expected_quat), expected_trans, expected_atoms,
            moved_outputs["sidechains"]["atom_pos"], grad_quat, grad_trans)

  (act_out, (moved_act, moved_quat, moved_trans), expected_rot, expected_trans, expected_atoms,
   moved_atoms, grad_quat, grad_trans) = everything()
  np.testing.assert_allclose(np.asarray(moved_act), np.asarray(act_out), atol=1e-4, rtol=1e-4)
  np.testing.assert_allclose(np.asarray(quat_to_rot(moved_quat)), np.asarray(expected_rot),
                             atol=1e-5)
  np.testing.assert_allclose(np.asarray(moved_trans), np.asarray(expected_trans), atol=1e-4)
  exists = batch["atom14_atom_exists"][..., None]
  np.testing.assert_allclose(np.asarray(moved_atoms), np.asarray(expected_atoms) * exists,
                             atol=1e-3)
  assert float(jnp.abs(grad_quat).max()) == 0.0
  assert float(jnp.abs(grad_trans).max()) > 0.0


def test_backbone_update_matches_rigid_composition():
  """Alg. 23: the quaternion update equals composing with the normalised (1, b, c, d) frame."""
  rng = np.random.default_rng(2)
  quat, trans = _random_frames(rng, 5)
  update = rng.normal(size=(5, 6)).astype(np.float32)

  @jax.jit
  def run():
    new_quat, new_trans = structure.backbone_update(quat, trans, update)
    expected = Rigid.from_quaternion(quat, trans).compose_quaternion_update(update)
    return new_quat, quat_to_rot(new_quat), new_trans, expected

  new_quat, new_rot, new_trans, expected = run()
  np.testing.assert_allclose(np.linalg.norm(np.asarray(new_quat), axis=-1), 1.0, atol=1e-6)
  np.testing.assert_allclose(np.asarray(new_rot), np.asarray(expected.rot), atol=1e-5)
  np.testing.assert_allclose(np.asarray(new_trans), np.asarray(expected.trans), atol=1e-5)


def test_gradients_reach_every_parameter(tiny):
  """A loss on the final atoms back-propagates to every structure-module parameter."""
  sm_params, batch, _, config, representations = tiny
  module = structure.StructureModule(config.heads.structure_module, config.global_config)

  def loss(params):
    out = module.apply({"params": params}, representations, batch)
    return jnp.sum(out["final_atom_positions"] ** 2) + jnp.sum(out["traj"] ** 2)

  norms = jax.jit(lambda p: jax.tree_util.tree_map(jnp.linalg.norm, jax.grad(loss)(p)))(sm_params)
  flat = [(jax.tree_util.keystr(path), float(norm))
          for path, norm in jax.tree_util.tree_leaves_with_path(norms)]
  assert len(flat) == len(jax.tree_util.tree_leaves(sm_params))
  assert all(np.isfinite(norm) and norm > 0 for _, norm in flat), flat
