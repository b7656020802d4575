"""Output heads: parity with AlphaFold's logits on af2_tiny, published shapes, bf16."""

import json

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from af2flax.model import heads
from af2flax.model.import_af2 import flax_to_haiku
from tests.conftest import REFERENCE
from tests.model.tiny_reference import load_tiny, module_params, relative_error

# (class, Haiku module name, config name, fixture input representation, output keys)
HEADS = [
    (heads.DistogramHead, "distogram_head", "distogram", "pair", ("logits", "bin_edges")),
    (heads.MaskedMsaHead, "masked_msa_head", "masked_msa", "msa", ("logits",)),
    (heads.PredictedLDDTHead, "predicted_lddt_head", "predicted_lddt", "structure_module",
     ("logits",)),
    (heads.ExperimentallyResolvedHead, "experimentally_resolved_head", "experimentally_resolved",
     "single", ("logits",)),
    (heads.PredictedAlignedErrorHead, "predicted_aligned_error_head", "predicted_aligned_error",
     "pair", ("logits", "breaks")),
]


@pytest.fixture(scope="module")
def tiny():
  params, batch, outputs, config = load_tiny()
  representations = {name: outputs[f"representations/{name}"]
                     for name in ("msa", "pair", "single", "structure_module")}
  return params, batch, outputs, config, representations


def _apply(head_class, head_config, global_config, params, representations, dtype=None):
  module = head_class(head_config, global_config, dtype=dtype)
  return jax.jit(lambda p, r: module.apply({"params": p}, r))(params, representations)


@pytest.mark.parametrize("head_class,haiku_name,config_name,source,keys", HEADS,
                         ids=[h[2] for h in HEADS])
def test_parity_with_alphafold(tiny, head_class, haiku_name, config_name, source, keys):
  """Logits (and bin edges) equal AlphaFold's, relative error < 1e-4; params are AF's tree."""
  params, batch, outputs, config, representations = tiny
  head_params = module_params(params, haiku_name)
  module = head_class(config.heads[config_name], config.global_config)
  init_shapes = jax.eval_shape(lambda: module.init(jax.random.PRNGKey(0), representations, batch))
  assert (jax.tree_util.tree_map(lambda x: x.shape, init_shapes["params"])
          == jax.tree_util.tree_map(lambda x: x.shape, head_params))
  ours = _apply(head_class, config.heads[config_name], config.global_config, head_params,
                {source: representations[source]})
  assert set(ours) == set(keys)
  for key in keys:
    error = relative_error(ours[key], outputs[f"{config_name}/{key}"])
    assert error < 1e-4, (key, error)
    assert ours[key].dtype == jnp.float32


def test_distogram_logits_are_symmetric(tiny):
  params, _, _, config, representations = tiny
  ours = _apply(heads.DistogramHead, config.heads.distogram, config.global_config,
                module_params(params, "distogram_head"), representations)
  logits = np.asarray(ours["logits"])
  np.testing.assert_array_equal(logits, np.swapaxes(logits, 0, 1))


def test_parameter_shapes_of_published_models(tiny):
  """With the published channel sizes, the heads produce model_1_ptm's paths and shapes."""
  _, _, _, config, _ = tiny
  path = REFERENCE / "af2_param_shapes.json"
  if not path.exists():
    pytest.skip(f"{path} missing")
  with open(path) as handle:
    published = json.load(handle)["model_1_ptm"]
  num_res, num_seq = 16, 4
  representations = {
      "msa": jax.ShapeDtypeStruct((num_seq, num_res, 256), jnp.float32),
      "pair": jax.ShapeDtypeStruct((num_res, num_res, 128), jnp.float32),
      "single": jax.ShapeDtypeStruct((num_res, 384), jnp.float32),
      "structure_module": jax.ShapeDtypeStruct((num_res, 384), jnp.float32),
  }
  for head_class, haiku_name, config_name, _, _ in HEADS:
    prefix = f"alphafold/alphafold_iteration/{haiku_name}"
    expected = {k: tuple(v) for k, v in published.items() if k.startswith(prefix + "/")}
    module = head_class(config.heads[config_name], config.global_config)
    shapes = jax.eval_shape(lambda r, m=module: m.init(jax.random.PRNGKey(0), r), representations)
    ours = {k: tuple(v.shape) for k, v in flax_to_haiku(shapes["params"], prefix).items()}
    assert ours == expected, haiku_name


def test_bfloat16_heads_return_float32_logits(tiny):
  params, _, outputs, config, representations = tiny
  global_config = ml_collections.ConfigDict(config.global_config.to_dict())
  global_config.dtype = "bfloat16"  # the dtype comes from global_config when not given
  bf16 = {k: jnp.asarray(v, jnp.bfloat16) for k, v in representations.items()}
  for head_class, haiku_name, config_name, source, _ in HEADS:
    ours = _apply(head_class, config.heads[config_name], global_config,
                  module_params(params, haiku_name), bf16)
    assert ours["logits"].dtype == jnp.float32
    assert np.all(np.isfinite(np.asarray(ours["logits"])))
    assert relative_error(ours["logits"], outputs[f"{config_name}/logits"]) < 0.02, haiku_name
