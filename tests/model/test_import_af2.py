"""Import of AlphaFold parameter files: every published path and shape maps onto our tree."""

import functools
import json

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from af2flax.model import batch_spec, import_af2
from af2flax.model.alphafold import AlphaFold
from af2flax.model.config import MODEL_NAMES, model_config
from af2flax.tools import convert_params
from tests.conftest import REFERENCE

SHAPES_FILE = REFERENCE / "af2_param_shapes.json"


@functools.lru_cache(maxsize=None)
def published_shapes() -> dict:
  if not SHAPES_FILE.exists():
    pytest.skip(f"{SHAPES_FILE} not present")
  return json.loads(SHAPES_FILE.read_text())


@functools.lru_cache(maxsize=None)
def _expected_for(config_json: str):
  return convert_params.expected_params(ml_collections.ConfigDict(json.loads(config_json)))


def _expected(preset: str):
  """Presets whose model configs are equal (model_1/model_2, model_3/4/5, ...) share a trace."""
  return _expected_for(model_config(preset).to_json(sort_keys=True))


def _fake_file(preset: str) -> dict[str, np.ndarray]:
  """Arrays of exactly the published shapes; each holds its own index (broadcast, no copy)."""
  return {name: np.broadcast_to(np.float32(index), shape)
          for index, (name, shape) in enumerate(sorted(published_shapes()[preset].items()))}


@pytest.mark.parametrize("preset", MODEL_NAMES)
def test_every_published_parameter_maps_onto_the_preset(preset):
  flat = _fake_file(preset)
  params = import_af2.flax_from_haiku(flat, _expected(preset), source=preset)
  assert jax.tree.map(np.shape, params) == jax.tree.map(np.shape, _expected(preset))
  # Each array landed at its own path, and the inverse mapping gives the names back.
  back = import_af2.haiku_from_flax(params)
  assert set(back) == set(flat)
  for index, name in enumerate(sorted(flat)):
    assert float(np.asarray(back[name]).flat[0]) == index, name


def test_mismatches_name_the_path():
  flat = dict(_fake_file("model_1_ptm"))
  name = "alphafold/alphafold_iteration/evoformer/preprocess_msa//weights"
  flat[name] = np.zeros((48, 256), np.float32)
  del flat["alphafold/alphafold_iteration/masked_msa_head/logits//bias"]
  flat["alphafold/alphafold_iteration/evoformer/no_such_layer//weights"] = np.zeros(3, np.float32)
  with pytest.raises(import_af2.ParameterMismatchError) as error:
    import_af2.flax_from_haiku(flat, _expected("model_1_ptm"), source="params_model_1_ptm.npz")
  message = str(error.value)
  assert f"shape mismatch: {name}: params_model_1_ptm.npz has (48, 256), model expects (49, 256)" \
      in message
  assert "missing in params_model_1_ptm.npz: alphafold/alphafold_iteration/masked_msa_head/" \
      "logits//bias" in message
  assert "not in the model: alphafold/alphafold_iteration/evoformer/no_such_layer//weights" \
      in message
  # A ptm file does not fit a model without the pAE head.
  with pytest.raises(import_af2.ParameterMismatchError, match="predicted_aligned_error_head"):
    import_af2.flax_from_haiku(_fake_file("model_1_ptm"), _expected("model_1"))


def test_full_model_1_ptm_traces_at_training_shapes():
  """Shape-only trace of init and forward at AlphaFold's initial-training crop."""
  config = model_config("model_1_ptm")
  features = batch_spec.feature_shapes(256, 128, 1024, 4, num_slices=config.num_recycle + 1)
  model = AlphaFold(config)
  params = jax.eval_shape(model.init, jax.random.PRNGKey(0), features)
  assert jax.tree.map(jnp.shape, params) == jax.tree.map(jnp.shape, _expected("model_1_ptm"))
  num_params = sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(params))
  assert num_params == sum(int(np.prod(shape))
                           for shape in published_shapes()["model_1_ptm"].values())
  outputs = jax.eval_shape(lambda p, b: model.apply(p, b, deterministic=False,
                                                    rngs={"dropout": jax.random.PRNGKey(0)}),
                           params, features)
  assert outputs["representations"]["pair"].shape == (256, 256, 128)
  assert outputs["representations"]["msa"].shape == (128, 256, 256)
  assert outputs["representations"]["single"].shape == (256, 384)
  assert outputs["representations"]["pair"].dtype == jnp.bfloat16  # the training preset
  assert outputs["structure_module"]["final_atom_positions"].shape == (256, 37, 3)
  assert outputs["predicted_aligned_error"]["logits"].shape == (256, 256, 64)
  assert outputs["masked_msa"]["logits"].shape == (128, 256, 23)

  def loss(p, f):  # Traces the backward pass of every remat'ed block (no compilation).
    out = model.apply(p, f, deterministic=False, rngs={"dropout": jax.random.PRNGKey(0)})
    return jnp.sum(out["structure_module"]["final_atom_positions"].astype(jnp.float32))
  grads = jax.eval_shape(jax.grad(loss), params, features)
  assert jax.tree.map(jnp.shape, grads) == jax.tree.map(jnp.shape, params)


@pytest.mark.slow
def test_convert_params_tool_writes_a_restorable_checkpoint(tmp_path):
  """The CLI on a (fake, published-shape) model_3 file; restore gives the same arrays.
  Slow: writes two ~370 MB files."""
  flat = {name: np.full(shape, index % 7, np.float32)
          for index, (name, shape) in enumerate(sorted(published_shapes()["model_3"].items()))}
  source = tmp_path / "params_model_3.npz"
  np.savez(source, **flat)
  out = tmp_path / "ckpt"
  assert convert_params.main(["--af2", str(source), "--out", str(out)]) == 0
  back = import_af2.haiku_from_flax(import_af2.restore_params(out))
  assert set(back) == set(flat)
  name = "alphafold/alphafold_iteration/evoformer/evoformer_iteration/pair_transition/" \
         "transition1//weights"
  np.testing.assert_array_equal(back[name], flat[name])
  assert convert_params.main(["--af2", str(source), "--out", str(out)]) == 1  # exists


def test_params_checkpoint_round_trip(tmp_path):
  params = {"params": {"alphafold_iteration": {"evoformer": {
      "preprocess_1d": {"weights": np.arange(6, dtype=np.float32).reshape(2, 3),
                        "bias": np.ones(3, np.float32)}}}}}
  out = import_af2.save_params(tmp_path / "ckpt", params)
  restored = import_af2.restore_params(out)
  jax.tree.map(np.testing.assert_array_equal, restored, params)
  with pytest.raises(FileExistsError, match="already exists"):
    import_af2.save_params(out, params)
  with pytest.raises(FileNotFoundError, match="no params checkpoint"):
    import_af2.restore_params(tmp_path / "nothing")


def test_convert_params_tool_fails_clearly(tmp_path, capsys):
  source = tmp_path / "params_model_1_ptm.npz"
  np.savez(source, **{"alphafold/alphafold_iteration/evoformer/preprocess_1d//weights":
                      np.zeros((22, 256), np.float32)})
  assert convert_params.main(["--af2", str(source), "--out", str(tmp_path / "ckpt")]) == 1
  assert "missing in" in capsys.readouterr().err
  assert not (tmp_path / "ckpt").exists()
  renamed = tmp_path / "weights.npz"
  source.rename(renamed)
  assert convert_params.main(["--af2", str(renamed), "--out", str(tmp_path / "ckpt")]) == 1
  assert "--preset" in capsys.readouterr().err
  assert convert_params.main(["--af2", str(tmp_path / "absent.npz"), "--out",
                              str(tmp_path / "ckpt"), "--preset", "model_1"]) == 1
  assert "no such AlphaFold parameter file" in capsys.readouterr().err


def test_names_round_trip():
  tree = {"alphafold_iteration": {"evoformer": {"preprocess_1d": {"weights": 1, "bias": 2}}}}
  flat = import_af2.haiku_from_flax({"params": tree})
  assert flat == {"alphafold/alphafold_iteration/evoformer/preprocess_1d//weights": 1,
                  "alphafold/alphafold_iteration/evoformer/preprocess_1d//bias": 2}
  assert import_af2.flax_from_haiku(flat)["params"] == tree
  with pytest.raises(import_af2.ParameterMismatchError, match="not under 'alphafold/'"):
    import_af2.flax_from_haiku({"other/x//w": np.ones(1)})
