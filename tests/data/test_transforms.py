"""Per-example transforms (numpy): layout, block deletion, crop, templates; statistics on many draws."""

import numpy as np
import pytest

from af2flax.common import residue_constants as rc
from af2flax.data import config as data_config
from af2flax.data import transforms
from tests.conftest import REFERENCE


@pytest.fixture(scope="module")
def query_features(shared_dir):
  """AlphaFold's raw features for the `query` target, plus a placeholder structure."""
  with np.load(REFERENCE / "pipeline_query" / "features.npz", allow_pickle=False) as data:
    features = dict(data)
  num_res = features["aatype"].shape[0]
  features["all_atom_positions"] = np.zeros((num_res, 37, 3), np.float32)
  features["all_atom_mask"] = np.zeros((num_res, 37), np.float32)
  return features


def _chi_square(counts: np.ndarray, expected: np.ndarray) -> float:
  return float(np.sum((counts - expected) ** 2 / expected))


def test_canonical_layout_of_alphafold_features(query_features):
  """Property: the MSA/template alphabets are mapped to ours (query row = aatype; template rows
  spell template_sequence), deletions are floats, shapes agree."""
  canonical = transforms.canonicalize_features(query_features)
  aatype = rc.sequence_to_aatype(str(query_features["sequence"][0]))
  np.testing.assert_array_equal(canonical["aatype"], aatype)
  np.testing.assert_array_equal(canonical["msa"][0], aatype)
  assert canonical["msa"].max() <= 21 and canonical["deletion_matrix"].dtype == np.float32
  np.testing.assert_array_equal(canonical["deletion_matrix"], query_features["deletion_matrix_int"])
  letters = rc.restypes_with_x + ["-"]
  for row, sequence in zip(canonical["template_aatype"], query_features["template_sequence"]):
    assert "".join(letters[i] for i in row) == str(sequence)
  assert canonical["template_sum_probs"].shape == (8, 1)


@pytest.mark.parametrize("feature, bad_shape", [("msa", (5, 7)), ("deletion_matrix_int", (3, 73)),
                                                 ("all_atom_positions", (73, 36, 3)),
                                                 ("template_all_atom_masks", (8, 73, 14))])
def test_inconsistent_record_raises_naming_the_feature(query_features, feature, bad_shape):
  broken = dict(query_features)
  broken[feature] = np.zeros(bad_shape, broken[feature].dtype)
  with pytest.raises(transforms.BadExampleError, match=feature):
    transforms.canonicalize_features(broken)


def test_block_deletion_keeps_query_and_matches_expected_depth():
  """Alg. 1: contiguous blocks of floor(0.3 N) rows from 5 uniform starts; the expected number
  of kept rows is 1 + sum_i (1 - min(i + 1, b) / N)^5 over rows i >= 1."""
  config = data_config.get_config().train.block_delete_msa
  num_seq, draws = 200, 4000
  block = int(0.3 * num_seq)
  rng = np.random.default_rng(0)
  kept_counts = []
  for _ in range(draws):
    kept = transforms.block_delete_msa_rows(num_seq, config, rng)
    assert kept[0] == 0 and np.all(np.diff(kept) > 0)
    deleted = np.setdiff1d(np.arange(num_seq), kept)
    runs = np.split(deleted, np.flatnonzero(np.diff(deleted) != 1) + 1) if len(deleted) else []
    assert len(runs) <= config.num_blocks
    kept_counts.append(len(kept))
  rows = np.arange(1, num_seq)
  expected = 1 + np.sum((1 - np.minimum(rows + 1, block) / num_seq) ** config.num_blocks)
  standard_error = np.std(kept_counts) / np.sqrt(draws)
  assert abs(np.mean(kept_counts) - expected) < 4 * standard_error


def test_crop_start_is_uniform_and_length_is_min_of_chain_and_crop():
  rng = np.random.default_rng(1)
  num_res, crop_size, draws = 300, 256, 9000
  starts = np.asarray([transforms.sample_crop(num_res, crop_size, rng) for _ in range(draws)])
  assert np.all(starts[:, 1] == crop_size)
  counts = np.bincount(starts[:, 0], minlength=num_res - crop_size + 1)
  assert len(counts) == 45
  # chi-square with 44 degrees of freedom: the 99.9% quantile is 78.7.
  assert _chi_square(counts, np.full(45, draws / 45)) < 78.7
  for length in (10, 256, 257, 1000):
    start, size = transforms.sample_crop(length, crop_size, rng)
    assert size == min(length, crop_size) and 0 <= start <= length - size


def test_template_count_distribution():
  """Suppl. 1.2.3: count = min(Uniform{0..N}, 4), distinct templates among the top hits."""
  config = data_config.get_config().train
  rng = np.random.default_rng(2)
  draws, available = 7000, 6
  counts = np.zeros(5)
  for _ in range(draws):
    chosen = transforms.sample_templates(available, config, rng)
    assert len(set(chosen.tolist())) == len(chosen) and np.all(chosen < available)
    counts[len(chosen)] += 1
  expected = draws * np.asarray([1, 1, 1, 1, 3]) / 7
  assert _chi_square(counts, expected) < 18.5  # 4 dof, 99.9%
  assert max(transforms.sample_templates(50, config, rng).max(initial=0) for _ in range(300)) < 20
  config.subsample_templates = False
  np.testing.assert_array_equal(transforms.sample_templates(6, config, rng), np.arange(4))


def test_distillation_subsample_keeps_query_and_caps_depth():
  rng = np.random.default_rng(3)
  rows = transforms.subsample_msa_rows(5000, 1000, rng)
  assert len(rows) == 1000 and rows[0] == 0 and len(np.unique(rows)) == 1000
  np.testing.assert_array_equal(transforms.subsample_msa_rows(10, 1000, rng), np.arange(10))


def test_pseudo_beta_is_cb_or_glycine_ca():
  aatype = np.asarray([rc.restype_order["G"], rc.restype_order["A"]])
  positions = np.random.default_rng(4).normal(size=(2, 37, 3)).astype(np.float32)
  mask = np.ones((2, 37), np.float32)
  mask[1, rc.atom_order["CB"]] = 0
  beta, beta_mask = transforms.pseudo_beta(aatype, positions, mask)
  np.testing.assert_array_equal(beta[0], positions[0, rc.atom_order["CA"]])
  np.testing.assert_array_equal(beta[1], positions[1, rc.atom_order["CB"]])
  np.testing.assert_array_equal(beta_mask, [1, 0])


def test_msa_profile_is_column_frequency(query_features):
  msa = transforms.canonicalize_features(query_features)["msa"]
  expected = np.eye(22)[msa].mean(axis=0)
  np.testing.assert_allclose(transforms.msa_profile(msa), expected, atol=1e-6)


def test_crop_residues_keeps_msa_full_length_and_aligns_the_rest(query_features):
  canonical = transforms.canonicalize_features(query_features)
  cropped = transforms.crop_residues(canonical, 10, 30, np.asarray([2, 0]))
  assert cropped["msa"].shape == canonical["msa"].shape
  np.testing.assert_array_equal(cropped["aatype"], canonical["aatype"][10:40])
  np.testing.assert_array_equal(cropped["template_aatype"], canonical["template_aatype"][[2, 0], 10:40])
  np.testing.assert_array_equal(cropped["template_sum_probs"], canonical["template_sum_probs"][[2, 0]])
  assert cropped["all_atom_positions"].shape == (30, 37, 3)
