"""prepare_example on real chains: crop consistency, targets, distillation and FAPE-clamp draws."""

import numpy as np
import pytest

from af2flax.data import config as data_config
from af2flax.data import targets
from af2flax.data import training_example
from af2flax.data import transforms
from tests.conftest import SHARED_DATA
from tests.data import pipeline_helpers


@pytest.fixture(scope="module")
def raw(shared_dir):
  path = sorted((SHARED_DATA / "pdb_chains").glob("*.pdb.gz"))[0]
  sequence, positions, mask = pipeline_helpers.load_pdb_chain(path)
  return pipeline_helpers.raw_example("chain", sequence, positions, mask, num_msa=60,
                                      num_templates=5, rng=np.random.default_rng(0))


def _config(crop_size=64):
  config = data_config.get_config()
  config.train.crop_size = crop_size
  return config


def test_prepared_arrays_follow_the_spec_and_share_one_crop(raw):
  config = _config()
  prepared = training_example.prepare_example(raw, config, np.random.default_rng(1))
  for key, (dtype, shape) in training_example.PREPARED_SPEC.items():
    assert prepared[key].dtype == dtype and prepared[key].ndim == len(shape), key
  canonical = transforms.canonicalize_features(raw)
  start, size = int(prepared["crop_start"]), int(prepared["seq_length"])
  assert size == 64
  window = slice(start, start + size)
  np.testing.assert_array_equal(prepared["aatype"], canonical["aatype"][window])
  np.testing.assert_array_equal(prepared["all_atom_positions"], canonical["all_atom_positions"][window])
  # The synthetic templates are the structure plus noise: each chosen one is aligned to the crop.
  for template in prepared["template_all_atom_positions"]:
    assert np.abs(template - prepared["all_atom_positions"]).max() < 10
  assert prepared["msa"].shape[1] == canonical["msa"].shape[1]        # MSA stays full length
  np.testing.assert_array_equal(prepared["msa"][0], canonical["aatype"])


def test_targets_of_the_crop_equal_the_crop_of_the_targets(raw):
  """Every target the losses read is a per-residue function of the structure, so computing
  them after cropping (cheaper) gives the same arrays."""
  config = _config()
  prepared = training_example.prepare_example(raw, config, np.random.default_rng(2))
  canonical = transforms.canonicalize_features(raw)
  full = targets.make_targets(canonical["aatype"], canonical["all_atom_positions"],
                              canonical["all_atom_mask"])
  window = slice(int(prepared["crop_start"]), int(prepared["crop_start"] + prepared["seq_length"]))
  for key in training_example.TARGET_SPEC:
    np.testing.assert_allclose(prepared[key], full[key][window], atol=1e-5, err_msg=key)


def test_distillation_msa_subsampling_and_clamped_fape_fraction(raw):
  config = _config()
  config.train.max_distillation_msa_seqs = 10
  config.train.block_delete_msa.enabled = False
  distillation = dict(raw, is_distillation=np.asarray([1.0], np.float32))
  rng = np.random.default_rng(3)
  assert training_example.prepare_example(distillation, config, rng)["msa"].shape[0] == 10
  assert training_example.prepare_example(raw, config, rng)["msa"].shape[0] == 60
  draws = 400
  clamped = [training_example.prepare_example(raw, config, rng)["use_clamped_fape"]
             for _ in range(draws)]
  assert abs(np.mean(clamped) - 0.9) < 4 * np.sqrt(0.09 / draws)
