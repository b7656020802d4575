"""Per-iteration MSA transforms (TF): masking statistics, clustering against numpy references."""

import ml_collections
import numpy as np
import pytest
import tensorflow as tf

from af2flax.data import config as data_config
from af2flax.data import msa_transforms


def _masked_msa_config(**overrides) -> ml_collections.ConfigDict:
  config = data_config.get_config().common.masked_msa
  config.update(overrides)
  return config


def _mask(msa: np.ndarray, profile: np.ndarray, seed=(1, 2)) -> tuple[np.ndarray, np.ndarray]:
  corrupted, bert_mask = msa_transforms.mask_msa(
      tf.constant(msa, tf.int32), tf.constant(profile, tf.float32), _masked_msa_config(), 0.15,
      tf.constant(seed, tf.int64))
  return corrupted.numpy(), bert_mask.numpy()


def test_masked_fraction_and_split_between_uniform_profile_same_and_mask_token():
  """Suppl. 1.2.7: 15% of positions; of those 10% uniform aa, 10% profile, 10% same, 70% mask.

  With every residue X (20) and a profile that is all X: a replaced residue is X with
  probability 0.1 (profile) + 0.1 (same) = 0.2, one of the 20 amino acids with 0.1 (uniform,
  0.005 each) and the mask token with 0.7.
  """
  num_seq, num_res = 400, 500
  msa = np.full((num_seq, num_res), 20)
  profile = np.zeros((num_res, 22))
  profile[:, 20] = 1
  corrupted, bert_mask = _mask(msa, profile)
  selected = bert_mask.astype(bool)
  count = selected.sum()
  assert abs(count / msa.size - 0.15) < 4 * np.sqrt(0.15 * 0.85 / msa.size)
  np.testing.assert_array_equal(corrupted[~selected], msa[~selected])
  outcomes = np.bincount(corrupted[selected], minlength=23) / count
  sigma = lambda p: 4 * np.sqrt(p * (1 - p) / count)  # noqa: E731
  assert abs(outcomes[22] - 0.7) < sigma(0.7)
  assert abs(outcomes[20] - 0.2) < sigma(0.2)
  assert abs(outcomes[:20].sum() - 0.1) < sigma(0.1)
  assert outcomes[21] == 0
  # Uniform part: each amino acid equally likely (chi-square, 19 dof, 99.9% = 43.8).
  aa_counts = np.bincount(corrupted[selected], minlength=23)[:20]
  expected = aa_counts.sum() / 20
  assert np.sum((aa_counts - expected) ** 2 / expected) < 43.8


def test_profile_component_follows_the_column_profile():
  """Residues 'A' with a profile half A / half gap: a gap can only come from the profile
  draw, so P(gap | selected) = 0.1 * 0.5."""
  msa = np.zeros((400, 500), np.int32)
  profile = np.zeros((500, 22))
  profile[:, 0] = profile[:, 21] = 0.5
  corrupted, bert_mask = _mask(msa, profile, seed=(5, 6))
  selected = bert_mask.astype(bool)
  gap_fraction = np.mean(corrupted[selected] == 21)
  assert abs(gap_fraction - 0.05) < 4 * np.sqrt(0.05 * 0.95 / selected.sum())


def _reference_agreement(msa, centres, gap_weight):
  weights = np.concatenate([np.ones(21), [gap_weight], [0.0]])
  return np.einsum("nlc,mlc->nm", np.eye(23)[msa], np.eye(23)[centres] * weights)


@pytest.mark.parametrize("dtype, gap_weight", [("float32", 0.0), ("bfloat16", 0.0),
                                               ("float32", 0.5)])
def test_agreement_matches_alphafold_weighted_hamming_similarity(dtype, gap_weight):
  """Exact equality with AlphaFold's einsum('mrc,nrc,c->mn') over 23 weighted classes, across
  row blocks (N not a multiple of the block) and 256-column blocks (L = 600)."""
  rng = np.random.default_rng(0)
  ancestors = rng.integers(0, 22, size=(5, 600))
  msa = ancestors[rng.integers(0, 5, size=333)]
  msa = np.where(rng.random(msa.shape) < 0.3, rng.integers(0, 22, msa.shape), msa)
  centres = np.where(rng.random((12, 600)) < 0.1, 22, msa[:12])
  agreement = msa_transforms.nearest_cluster_agreement(
      tf.constant(msa, tf.int32), tf.constant(centres, tf.int32), gap_weight, dtype, block_rows=128)
  np.testing.assert_array_equal(agreement.numpy(), _reference_agreement(msa, centres, gap_weight))


def _features(msa, deletions, config, seed=(7, 8), crop_start=0):
  num_res = min(msa.shape[1], config.train.crop_size)
  profile = np.eye(22)[msa].mean(axis=0)
  features = msa_transforms.msa_features_per_iteration(
      tf.constant(msa, tf.int32), tf.constant(deletions, tf.float32),
      tf.constant(profile, tf.float32), tf.constant(crop_start, tf.int32),
      tf.constant(num_res, tf.int32), tf.constant(seed, tf.int64), config)
  return {key: value.numpy() for key, value in features.items()}


def _small_config(crop_size=48, clusters=8, extra=64) -> ml_collections.ConfigDict:
  config = data_config.get_config()
  config.train.crop_size = crop_size
  config.train.max_msa_clusters = clusters
  config.common.max_extra_msa = extra
  return config


@pytest.fixture(scope="module")
def family():
  """A 40-residue MSA of 50 distinct sequences (mutants of 4 ancestors) with deletions."""
  rng = np.random.default_rng(11)
  ancestors = rng.integers(0, 20, size=(4, 40))
  msa = ancestors[rng.integers(0, 4, size=50)]
  msa = np.where(rng.random(msa.shape) < 0.25, rng.integers(0, 22, msa.shape), msa)
  msa[0] = ancestors[0]
  deletions = np.where(rng.random(msa.shape) < 0.1, rng.integers(1, 20, msa.shape), 0)
  return msa, deletions.astype(np.float32)


def test_cluster_features_recomputed_from_outputs(family):
  """End to end: with no extra-MSA truncation and no crop, the outputs determine every cluster;
  recompute assignments (argmax agreement over the corrupted centres), profiles and deletion
  means in numpy and compare with msa_feat channels 25-48 (Suppl. 1.2.7, Table 1)."""
  msa, deletions = family
  config = _small_config()
  features = _features(msa, deletions, config)
  num_res, clusters = msa.shape[1], config.train.max_msa_clusters
  rows = {tuple(row): index for index, row in enumerate(msa)}
  assert len(rows) == len(msa)
  for iteration in range(config.common.num_recycle + 1):
    msa_feat = features["msa_feat"][iteration, :, :num_res]
    corrupted = np.argmax(msa_feat[..., :23], axis=-1)
    centre_rows = [rows[tuple(row)] for row in features["true_msa"][iteration, :, :num_res]]
    extra_count = int(features["extra_msa_row_mask"][iteration].sum())
    extra_rows = [rows[tuple(row)] for row in features["extra_msa"][iteration, :extra_count, :num_res]]
    assert centre_rows[0] == 0
    assert sorted(centre_rows + extra_rows) == list(range(len(msa)))
    assignment = np.argmax(_reference_agreement(msa[extra_rows], corrupted, 0.0), axis=1)
    counts = 1 + 1e-6 + np.bincount(assignment, minlength=clusters)
    profile = np.eye(23)[corrupted].copy()
    deletion_sum = deletions[centre_rows].copy()
    for extra_index, cluster in zip(extra_rows, assignment):
      profile[cluster] += np.eye(23)[msa[extra_index]]
      deletion_sum[cluster] += deletions[extra_index]
    np.testing.assert_allclose(msa_feat[..., 25:48], profile / counts[:, None, None], atol=1e-6)
    np.testing.assert_allclose(msa_feat[..., 48],
                               np.arctan(deletion_sum / counts[:, None] / 3) * 2 / np.pi, atol=1e-6)
    np.testing.assert_allclose(msa_feat[..., 23], np.clip(deletions[centre_rows], 0, 1))
    np.testing.assert_allclose(msa_feat[..., 24], np.arctan(deletions[centre_rows] / 3) * 2 / np.pi,
                               atol=1e-6)
    bert = features["bert_mask"][iteration, :, :num_res].astype(bool)
    changed = corrupted != msa[centre_rows]
    assert not np.any(changed & ~bert)


def test_iterations_resample_and_seed_determines_everything(family):
  msa, deletions = family
  config = _small_config(crop_size=32, extra=16)
  first = _features(msa, deletions, config, seed=(1, 1), crop_start=5)
  again = _features(msa, deletions, config, seed=(1, 1), crop_start=5)
  other = _features(msa, deletions, config, seed=(1, 2), crop_start=5)
  for key in first:
    np.testing.assert_array_equal(first[key], again[key])
  assert not np.array_equal(first["msa_feat"], other["msa_feat"])
  assert not np.array_equal(first["true_msa"][0], first["true_msa"][1])   # resampled per iteration
  # The query is centre 0 in every iteration, cropped to the window [5, 37).
  np.testing.assert_array_equal(first["true_msa"][:, 0], np.tile(msa[0, 5:37], (4, 1)))
  # Extra MSA capped at max_extra_msa; masks flag exactly the real rows and columns.
  assert first["extra_msa"].shape == (4, 16, 32) and first["extra_msa_row_mask"].sum() == 4 * 16
  assert first["msa_row_mask"].sum() == 4 * 8


def test_padding_is_zero_under_zero_masks(family):
  msa, deletions = family
  config = _small_config(crop_size=64, clusters=60, extra=30)   # more rows/columns than the MSA
  features = _features(msa[:20], deletions[:20], config)
  assert features["msa_feat"].shape == (4, 60, 64, 49)
  assert np.all(features["msa_row_mask"][:, 20:] == 0) and np.all(features["msa_row_mask"][:, :20] == 1)
  assert np.all(features["msa_mask"][:, :20, 40:] == 0) and np.all(features["msa_mask"][:, :20, :40] == 1)
  assert np.all(features["msa_feat"][:, 20:] == 0) and np.all(features["msa_feat"][:, :, 40:] == 0)
  assert np.all(features["extra_msa_row_mask"] == 0)   # every sequence became a centre
  np.testing.assert_allclose(features["msa_feat"][:, :20, :40, :23].sum(-1), 1.0)
  np.testing.assert_allclose(features["msa_feat"][:, :20, :40, 25:48].sum(-1), 1.0, atol=1e-5)


def test_target_feat_layout():
  target_feat = msa_transforms.make_target_feat(tf.constant([0, 20, 5]), tf.constant([0, 1, 0])).numpy()
  assert target_feat.shape == (3, 22)
  np.testing.assert_array_equal(target_feat[:, 0], [0, 1, 0])
  np.testing.assert_array_equal(np.argmax(target_feat[:, 1:], -1), [0, 20, 5])
