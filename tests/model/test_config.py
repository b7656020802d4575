"""Model presets equal AlphaFold's model_config; from_alphafold_dict round-trips a dump's tree."""

import json

import pytest

from af2flax.model import config as config_lib
from tests.conftest import REFERENCE

TINY_CONFIG = REFERENCE / "af2_tiny" / "config.json"
OURS = set(config_lib.OUR_GLOBAL_DEFAULTS)


def _flatten(tree, prefix=""):
  flat = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      flat.update(_flatten(value, f"{prefix}{key}."))
    else:
      flat[prefix + key] = value
  return flat


def _alphafold_tree():
  if not TINY_CONFIG.exists():
    pytest.skip(f"{TINY_CONFIG} not present")
  return json.loads(TINY_CONFIG.read_text())["model_config"]


def test_presets_have_alphafolds_tree():
  """Same keys as AlphaFold's model_config (the dump's tree), plus our global_config keys."""
  alphafold_keys = set(_flatten(_alphafold_tree()))
  for name in config_lib.MODEL_NAMES:
    ours = set(_flatten(config_lib.model_config(name).to_dict()))
    assert ours - alphafold_keys == {f"global_config.{key}" for key in OURS}, name
    assert alphafold_keys <= ours, name


def test_preset_values_are_alphafolds():
  """Jumper et al. (2021) Suppl. Table 5, 1.11 and AlphaFold's config.py."""
  c = config_lib.model_config("model_1_ptm")
  e = c.embeddings_and_evoformer
  assert (e.evoformer_num_block, e.extra_msa_stack_num_block) == (48, 4)
  assert (e.msa_channel, e.pair_channel, e.seq_channel, e.extra_msa_channel) == (256, 128, 384, 64)
  evo = e.evoformer
  assert evo.msa_row_attention_with_pair_bias.dropout_rate == 0.15
  assert evo.msa_row_attention_with_pair_bias.num_head == 8
  assert evo.triangle_attention_starting_node.num_head == 4
  for name in ("triangle_attention_starting_node", "triangle_attention_ending_node",
               "triangle_multiplication_outgoing", "triangle_multiplication_incoming"):
    assert evo[name].dropout_rate == 0.25
  assert evo.triangle_attention_ending_node.orientation == "per_column"
  assert evo.msa_column_attention.dropout_rate == evo.msa_transition.dropout_rate == 0.0
  assert evo.outer_product_mean.first is False and evo.outer_product_mean.num_outer_channel == 32
  assert evo.triangle_multiplication_incoming.equation == "kjc,kic->ijc"
  assert e.max_relative_feature == 32 and e.prev_pos.num_bins == 15
  t = e.template
  assert t.enabled and t.embed_torsion_angles and not t.use_template_unit_vector
  assert t.template_pair_stack.num_block == 2 and t.template_pair_stack.pair_transition\
      .num_intermediate_factor == 2
  assert t.dgram_features.to_dict() == {"min_bin": 3.25, "max_bin": 50.75, "num_bins": 39}
  h = c.heads
  assert (h.distogram.weight, h.masked_msa.weight, h.predicted_lddt.weight,
          h.experimentally_resolved.weight, h.predicted_aligned_error.weight,
          h.structure_module.weight) == (0.3, 2.0, 0.01, 0.01, 0.1, 1.0)
  sm = h.structure_module
  assert (sm.num_layer, sm.num_channel, sm.dropout, sm.position_scale) == (8, 384, 0.1, 10.0)
  assert sm.fape.clamp_distance == 10.0 and sm.sidechain.weight_frac == 0.5
  assert sm.violation_tolerance_factor == 12.0 and sm.clash_overlap_tolerance == 1.5
  assert c.num_recycle == 3 and c.resample_msa_in_recycling
  g = c.global_config
  assert g.zero_init and not g.deterministic and g.subbatch_size == 4
  assert g.use_remat and g.dtype == "bfloat16" and g.use_scan and not g.low_memory


@pytest.mark.parametrize("name,templates,ptm", [
    ("model_1", True, False), ("model_2", True, False), ("model_3", False, False),
    ("model_4", False, False), ("model_5", False, False), ("model_1_ptm", True, True),
    ("model_2_ptm", True, True), ("model_3_ptm", False, True), ("model_4_ptm", False, True),
    ("model_5_ptm", False, True)])
def test_preset_differences(name, templates, ptm):
  c = config_lib.model_config(name)
  assert c.embeddings_and_evoformer.template.enabled == templates
  assert c.embeddings_and_evoformer.template.embed_torsion_angles == templates
  assert c.heads.predicted_aligned_error.weight == (0.1 if ptm else 0.0)
  base = config_lib.model_config("model_1_ptm" if templates else "model_3_ptm")
  if not ptm:
    base.heads.predicted_aligned_error.weight = 0.0
  assert c.to_dict() == base.to_dict()


def test_from_alphafold_dict_keeps_every_value():
  tree = _alphafold_tree()
  ours = config_lib.from_alphafold_dict(tree)
  flat = _flatten(ours.to_dict())
  for key, value in _flatten(tree).items():
    assert flat[key] == value, key
  assert ours.global_config.dtype == "float32"   # AlphaFold's own precision
  assert ours.embeddings_and_evoformer.evoformer_num_block == 2
  overridden = config_lib.from_alphafold_dict(tree, dtype="bfloat16", low_memory=True)
  assert overridden.global_config.dtype == "bfloat16" and overridden.global_config.low_memory
  # Keys a dump's AlphaFold version lacks take the current defaults.
  del tree["embeddings_and_evoformer"]["evoformer"]["triangle_multiplication_outgoing"][
      "fuse_projection_weights"]
  assert config_lib.from_alphafold_dict(tree).embeddings_and_evoformer.evoformer\
      .triangle_multiplication_outgoing.fuse_projection_weights is False
  # A full AlphaFold config ({'data', 'model'}) works too.
  assert config_lib.from_alphafold_dict({"model": tree}).to_dict() == \
      config_lib.from_alphafold_dict(tree).to_dict()


def test_bad_inputs_are_named():
  with pytest.raises(ValueError, match="model_6"):
    config_lib.model_config("model_6")
  with pytest.raises(ValueError, match="missing heads"):
    config_lib.from_alphafold_dict({"embeddings_and_evoformer": {}, "global_config": {}})
