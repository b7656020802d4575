"""The numpy MSA transforms: equal to the TF ops where deterministic, same distributions where
random (Jumper et al. (2021) Suppl. 1.2.7, 1.2.9)."""

import ml_collections
import numpy as np
import pytest

from af2flax.data import config as data_config
from af2flax.data import msa_transforms_numpy as mnp


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
  return msa.astype(np.int32), deletions.astype(np.float32)


def _profile(msa):
  return np.eye(22)[msa].mean(axis=0).astype(np.float32)


# --- deterministic parts: equal to the TF backend ---------------------------------------------

@pytest.mark.parametrize("gap_weight", [0.0, 0.5])
def test_agreement_and_summaries_equal_the_tf_ops(gap_weight):
  """Agreement counts, argmax assignment, cluster profile and deletion mean are bit-equal to
  msa_transforms (TF), across row blocks (N not a multiple of the block), mask tokens in the
  centres and ties (near-identical rows)."""
  tf = pytest.importorskip("tensorflow")
  from af2flax.data import msa_transforms  # pylint: disable=import-outside-toplevel
  rng = np.random.default_rng(0)
  ancestors = rng.integers(0, 22, size=(5, 300))
  msa = ancestors[rng.integers(0, 5, size=333)]
  msa = np.where(rng.random(msa.shape) < 0.3, rng.integers(0, 22, msa.shape), msa).astype(np.int32)
  centres = np.where(rng.random((12, 300)) < 0.1, 22, msa[:12]).astype(np.int32)
  deletions = rng.integers(0, 7, size=msa.shape).astype(np.float32)
  ours = mnp.nearest_cluster_agreement(msa, centres, gap_weight, block_rows=100)
  theirs = msa_transforms.nearest_cluster_agreement(
      tf.constant(msa), tf.constant(centres), gap_weight, "float32", block_rows=128).numpy()
  np.testing.assert_array_equal(ours, theirs)
  extra = msa[12:]
  assignment = np.argmax(ours[12:], axis=1)
  tf_assignment = tf.argmax(theirs[12:], axis=1, output_type=tf.int32).numpy()
  np.testing.assert_array_equal(assignment, tf_assignment)
  summary = mnp.summarize_clusters(centres, deletions[:12], extra, deletions[12:], assignment)
  tf_summary = msa_transforms.summarize_clusters(
      tf.constant(centres), tf.constant(deletions[:12]), tf.constant(extra),
      tf.constant(deletions[12:]), tf.constant(tf_assignment))
  for key, value in summary.items():
    assert value.dtype == np.float32
    np.testing.assert_array_equal(value, tf_summary[key].numpy(), err_msg=key)


def test_msa_feat_and_target_feat_equal_the_tf_ops():
  tf = pytest.importorskip("tensorflow")
  from af2flax.data import msa_transforms  # pylint: disable=import-outside-toplevel
  rng = np.random.default_rng(1)
  msa = rng.integers(0, 23, size=(6, 30)).astype(np.int32)
  deletions = rng.integers(0, 30, size=msa.shape).astype(np.float32)
  profile = rng.dirichlet(np.ones(23), size=(6, 30)).astype(np.float32)
  deletion_mean = rng.random(msa.shape).astype(np.float32) * 5
  ours = mnp.make_msa_feat(msa, deletions, profile, deletion_mean)
  theirs = msa_transforms.make_msa_feat(tf.constant(msa), tf.constant(deletions),
                                        tf.constant(profile), tf.constant(deletion_mean)).numpy()
  assert ours.shape == theirs.shape == (6, 30, 49) and ours.dtype == np.float32
  exact = [c for c in range(49) if c not in (24, 48)]
  np.testing.assert_array_equal(ours[..., exact], theirs[..., exact])
  # arctan: numpy's and Eigen's float32 implementations may differ in the last bit.
  np.testing.assert_allclose(ours[..., [24, 48]], theirs[..., [24, 48]], rtol=0, atol=2e-7)
  aatype, breaks = np.array([0, 20, 5, 7]), np.array([0, 1, 0, 3])
  np.testing.assert_array_equal(
      mnp.make_target_feat(aatype, breaks),
      msa_transforms.make_target_feat(tf.constant(aatype), tf.constant(breaks)).numpy())


def _tf_features(msa, deletions, config, seed, crop_start=0):
  tf = pytest.importorskip("tensorflow")
  from af2flax.data import msa_transforms  # pylint: disable=import-outside-toplevel
  num_res = min(msa.shape[1], config.train.crop_size)
  features = msa_transforms.msa_features_per_iteration(
      tf.constant(msa), tf.constant(deletions), tf.constant(_profile(msa)),
      tf.constant(crop_start, tf.int32), tf.constant(num_res, tf.int32),
      tf.constant(seed, tf.int64), config)
  return {key: value.numpy() for key, value in features.items()}


@pytest.mark.parametrize("gap_weight", [0.0, 0.5])
def test_features_from_the_tf_backends_draws_equal_its_features(family, gap_weight):
  """End to end: recover the TF backend's random draws (centres, extra order, corruption) from
  its outputs, give them to the numpy backend's deterministic part, and get every output array
  of the TF backend (Suppl. 1.2.7, 1.2.9)."""
  msa, deletions = family
  config = _small_config(crop_size=48, clusters=8, extra=64)  # no crop, no extra truncation
  config.common.gap_agreement_weight = gap_weight
  theirs = _tf_features(msa, deletions, config, seed=(3, 4))
  num_res, row_of = msa.shape[1], {tuple(row): index for index, row in enumerate(msa)}
  centres, extra, corrupted, bert_masks = [], [], [], []
  for iteration in range(config.common.num_recycle + 1):
    centres.append([row_of[tuple(r)] for r in theirs["true_msa"][iteration, :, :num_res]])
    count = int(theirs["extra_msa_row_mask"][iteration].sum())
    extra.append([row_of[tuple(r)] for r in theirs["extra_msa"][iteration, :count, :num_res]])
    corrupted.append(np.argmax(theirs["msa_feat"][iteration, :, :num_res, :23], -1))
    bert_masks.append(theirs["bert_mask"][iteration, :, :num_res])
  samples = mnp.MsaSamples(
      centres=np.asarray(centres), extra=np.asarray(extra), corrupted=np.asarray(corrupted),
      bert_mask=np.asarray(bert_masks), extra_subset=np.tile(np.arange(len(extra[0])), (4, 1)))
  ours = mnp.msa_features_from_samples(msa, deletions, 0, num_res, samples, config)
  assert ours.keys() == theirs.keys()
  for key in ours:
    assert ours[key].shape == theirs[key].shape and ours[key].dtype == theirs[key].dtype, key
    if key == "msa_feat":
      np.testing.assert_allclose(ours[key], theirs[key], rtol=0, atol=2e-7)
      exact = [c for c in range(49) if c not in (24, 48)]
      np.testing.assert_array_equal(ours[key][..., exact], theirs[key][..., exact])
    else:
      np.testing.assert_allclose(ours[key], theirs[key], rtol=0, atol=2e-7, err_msg=key)


def test_output_layout_equals_the_tf_backend_with_crop_and_padding(family):
  """Keys, shapes, dtypes and masks agree with the TF op for a cropped, padded example (more
  rows and columns than the MSA) and without cluster features."""
  msa, deletions = family
  for clusters, extra, cluster_features in ((60, 30, True), (8, 16, False)):
    config = _small_config(crop_size=32, clusters=clusters, extra=extra)
    config.common.msa_cluster_features = cluster_features
    ours = mnp.msa_features_per_iteration(msa[:20], deletions[:20], _profile(msa[:20]), 5, 32,
                                          np.array([1, 2]), config)
    theirs = _tf_features(msa[:20], deletions[:20], config, seed=(1, 2), crop_start=5)
    for key in theirs:
      assert ours[key].shape == theirs[key].shape and ours[key].dtype == theirs[key].dtype, key
      for mask_key in ("msa_mask", "msa_row_mask", "extra_msa_mask", "extra_msa_row_mask"):
        np.testing.assert_array_equal(ours[mask_key], theirs[mask_key])
    # The query is centre 0, cropped to [5, 37), in every iteration.
    np.testing.assert_array_equal(ours["true_msa"][:, 0], np.tile(msa[0, 5:37], (4, 1)))


# --- random parts: the distributions of the TF backend ----------------------------------------

def _mask(msa, profile, seed):
  masked = data_config.get_config().common.masked_msa
  return mnp.mask_msa(msa, profile, np.random.default_rng(seed), replace_fraction=0.15,
                      uniform_prob=masked.uniform_prob, profile_prob=masked.profile_prob,
                      same_prob=masked.same_prob)


def test_masked_fraction_and_split_between_uniform_profile_same_and_mask_token():
  """Suppl. 1.2.7 (as tests/data/test_msa_transforms.py for TF): with every residue X and an
  all-X profile, a selected position is X w.p. 0.2 (profile + same), one of the 20 amino acids
  w.p. 0.1 (uniformly), the mask token w.p. 0.7; 15% of positions are selected."""
  num_seq, num_res = 400, 500
  msa = np.full((num_seq, num_res), 20)
  profile = np.zeros((num_res, 22))
  profile[:, 20] = 1
  corrupted, bert_mask = _mask(msa, profile, seed=1)
  selected = bert_mask.astype(bool)
  count = selected.sum()
  assert bert_mask.dtype == np.float32 and corrupted.dtype == np.int32
  assert abs(count / msa.size - 0.15) < 4 * np.sqrt(0.15 * 0.85 / msa.size)
  np.testing.assert_array_equal(corrupted[~selected], msa[~selected])
  outcomes = np.bincount(corrupted[selected], minlength=23) / count
  sigma = lambda p: 4 * np.sqrt(p * (1 - p) / count)  # noqa: E731
  assert abs(outcomes[22] - 0.7) < sigma(0.7)
  assert abs(outcomes[20] - 0.2) < sigma(0.2)
  assert abs(outcomes[:20].sum() - 0.1) < sigma(0.1)
  assert outcomes[21] == 0
  aa_counts = np.bincount(corrupted[selected], minlength=23)[:20]
  expected = aa_counts.sum() / 20
  assert np.sum((aa_counts - expected) ** 2 / expected) < 43.8   # chi-square 19 dof, 99.9%


def test_profile_component_follows_the_column_profile():
  """Residues A, profile half A / half gap: a gap comes only from the profile draw, 0.1 * 0.5."""
  msa = np.zeros((400, 500), np.int32)
  profile = np.zeros((500, 22))
  profile[:, 0] = profile[:, 21] = 0.5
  corrupted, bert_mask = _mask(msa, profile, seed=5)
  selected = bert_mask.astype(bool)
  gap_fraction = np.mean(corrupted[selected] == 21)
  assert abs(gap_fraction - 0.05) < 4 * np.sqrt(0.05 * 0.95 / selected.sum())


def test_cluster_centres_are_the_query_plus_a_uniform_sample():
  """Suppl. 1.2.7: centre 0 is the query; every other row is a centre with probability
  (M - 1) / (N - 1); centres and extra rows partition the MSA."""
  num_seq, clusters, draws = 41, 9, 2000
  rng = np.random.default_rng(2)
  counts = np.zeros(num_seq)
  for _ in range(draws // 4):
    centres, extra = mnp.sample_cluster_centres(num_seq, 4, clusters, rng)
    assert np.all(centres[:, 0] == 0)
    for sample in range(4):
      assert sorted(np.concatenate([centres[sample], extra[sample]])) == list(range(num_seq))
      counts[centres[sample, 1:]] += 1
  expected = draws * (clusters - 1) / (num_seq - 1)
  chi2 = np.sum((counts[1:] - expected) ** 2 / expected)
  assert chi2 < 73.4   # chi-square, 39 dof, 99.9%
  few = mnp.sample_cluster_centres(5, 2, clusters, rng)
  assert few[0].shape == (2, 5) and few[1].shape == (2, 0)


def test_draws_are_a_function_of_the_seed_and_resampled_per_iteration(family):
  msa, deletions = family
  config = _small_config(crop_size=32, extra=16)
  first = mnp.msa_features_per_iteration(msa, deletions, _profile(msa), 5, 32, np.array([1, 1]),
                                         config)
  again = mnp.msa_features_per_iteration(msa, deletions, _profile(msa), 5, 32, np.array([1, 1]),
                                         config)
  other = mnp.msa_features_per_iteration(msa, deletions, _profile(msa), 5, 32, np.array([1, 2]),
                                         config)
  for key in first:
    np.testing.assert_array_equal(first[key], again[key])
  assert not np.array_equal(first["msa_feat"], other["msa_feat"])
  assert not np.array_equal(first["true_msa"][0], first["true_msa"][1])
  assert first["extra_msa"].shape == (4, 16, 32) and first["extra_msa_row_mask"].sum() == 4 * 16
  config.common.resample_msa_in_recycling = False
  once = mnp.msa_features_per_iteration(msa, deletions, _profile(msa), 5, 32, np.array([1, 1]),
                                        config)
  for key in once:
    np.testing.assert_array_equal(once[key][0], once[key][3])


def test_extra_subset_is_uniform_over_the_extra_rows(family):
  """The max_extra_msa kept extra rows are a uniform subset (each kept w.p. E' / E)."""
  msa, deletions = family
  config = _small_config(crop_size=40, clusters=8, extra=10)
  config.common.masked_msa_replace_fraction = 0.0
  kept = np.zeros(len(msa))
  row_of = {tuple(row): index for index, row in enumerate(msa)}
  draws = 100
  for seed in range(draws):
    samples = mnp.draw_samples(msa, _profile(msa), np.array([seed, 0]), config)
    rows = np.take_along_axis(samples.extra, samples.extra_subset, axis=1)
    assert rows.shape == (4, 10) and all(len(set(r)) == 10 for r in rows)
    np.add.at(kept, rows.ravel(), 1)
    features = mnp.msa_features_from_samples(msa, deletions, 0, 40, samples, config)
    assert [row_of[tuple(r)] for r in features["extra_msa"][0]] == list(rows[0])
  assert kept[0] == 0
  # Each non-query row: P(extra) = 42/49, P(kept | extra) = 10/42 -> 10/49 per sample.
  expected = 4 * draws * 10 / 49
  chi2 = np.sum((kept[1:] - expected) ** 2 / expected)
  assert chi2 < 85.4   # chi-square, 48 dof, 99.9%
