"""Eval-mode feature processing: shapes, invariants of msa_feat, clustering, masking, padding.

Inputs are AlphaFold's own raw features of the `query` target (pipeline_query/features.npz:
73 residues, 1136 MSA rows, 8 templates).
"""

from __future__ import annotations

import numpy as np
import pytest

from af2flax.common import residue_constants as rc
from af2flax.inference import feature_processing as fp
from tests.conftest import REFERENCE


@pytest.fixture(scope="module")
def raw(shared_dir):
  with np.load(REFERENCE / "pipeline_query" / "features.npz", allow_pickle=False) as data:
    return {key: data[key] for key in data.files}


def test_shapes_dtypes_and_msa_feat_channels(raw):
  config = fp.FeatureConfig(num_recycle=2, max_msa_clusters=128, max_extra_msa=512,
                            use_templates=True, max_templates=4)
  batch = fp.process_features(raw, config, seed=0)
  r, n = 3, 73
  assert batch["msa_feat"].shape == (r, 128, n, 49) and batch["msa_feat"].dtype == np.float32
  assert batch["extra_msa"].shape == (r, 512, n) and batch["extra_msa"].dtype == np.int32
  assert batch["target_feat"].shape == (r, n, 22)
  assert batch["template_all_atom_positions"].shape == (r, 4, n, 37, 3)
  np.testing.assert_array_equal(batch["num_iter_recycling"], [2, 2, 2])
  np.testing.assert_array_equal(batch["seq_length"], [n] * 3)
  msa_feat = batch["msa_feat"]
  # One token per position (23 channels), a cluster profile that is a distribution.
  np.testing.assert_allclose(msa_feat[..., :23].sum(-1), 1.0)
  np.testing.assert_allclose(msa_feat[..., 25:48].sum(-1), 1.0, atol=1e-5)
  assert np.all((msa_feat[..., 23] == 0) | (msa_feat[..., 23] == 1))
  assert np.all((msa_feat[..., 24] >= 0) & (msa_feat[..., 24] < 1))
  # target_feat: no break channel, then the query's one-hot (21 classes).
  aatype = np.argmax(raw["aatype"], -1)
  np.testing.assert_array_equal(np.argmax(batch["target_feat"][0, :, 1:], -1), aatype)
  assert not batch["target_feat"][..., 0].any()
  # Extra MSA tokens are residues, X or gaps (the mask token only appears in the centres).
  assert batch["extra_msa"].max() <= 21


def test_query_is_the_first_centre_and_iterations_are_resampled(raw):
  config = fp.FeatureConfig(num_recycle=1, max_msa_clusters=64, max_extra_msa=128,
                            masked_msa_replace_fraction=0.0)
  batch = fp.process_features(raw, config, seed=3)
  aatype = np.argmax(raw["aatype"], -1)
  for iteration in range(2):
    np.testing.assert_array_equal(np.argmax(batch["msa_feat"][iteration, 0, :, :23], -1), aatype)
  assert not np.array_equal(batch["msa_feat"][0, 1:], batch["msa_feat"][1, 1:])
  again = fp.process_features(raw, config, seed=3)
  for key in batch:
    np.testing.assert_array_equal(batch[key], again[key])
  once = fp.process_features(raw, fp.FeatureConfig(num_recycle=1, max_msa_clusters=64,
                                                   max_extra_msa=128,
                                                   resample_msa_in_recycling=False), seed=3)
  np.testing.assert_array_equal(once["msa_feat"][0], once["msa_feat"][1])


def test_cluster_assignment_and_profiles_match_a_direct_computation():
  rng = np.random.default_rng(0)
  centres = rng.integers(0, 23, size=(5, 11))
  extra = rng.integers(0, 22, size=(40, 11))
  centre_del = rng.integers(0, 4, size=centres.shape).astype(np.float32)
  extra_del = rng.integers(0, 4, size=extra.shape).astype(np.float32)
  assignment, profile, deletion_mean = fp.cluster_extra_msa(
      centres, centre_del, extra, extra_del, gap_agreement_weight=0.5, block_rows=7)
  weights = np.ones(23)
  weights[21], weights[22] = 0.5, 0.0
  for e in range(extra.shape[0]):
    agreement = [np.sum((extra[e] == centres[s]) * weights[centres[s]]) for s in range(5)]
    assert assignment[e] == int(np.argmax(agreement))
  for s in range(5):
    members = np.flatnonzero(assignment == s)
    count = 1 + members.size
    expected = np.eye(23)[centres[s]] + np.eye(23)[extra[members]].sum(0)
    np.testing.assert_allclose(profile[s], expected / (count + 1e-6), rtol=1e-5)
    expected_del = (centre_del[s] + extra_del[members].sum(0)) / (count + 1e-6)
    np.testing.assert_allclose(deletion_mean[s], expected_del, rtol=1e-5)


def test_masked_msa_rates():
  rng = np.random.default_rng(1)
  msa = rng.integers(0, 20, size=(400, 250))
  profile = fp.msa_profile(msa)
  corrupted, bert_mask = fp.mask_msa(msa, profile, fp.FeatureConfig(), rng)
  assert abs(bert_mask.mean() - 0.15) < 0.005
  changed = corrupted != msa
  assert not changed[bert_mask == 0].any()
  selected = corrupted[bert_mask == 1]
  # 70% mask token; the rest amino acids (uniform, profile or unchanged).
  assert abs(np.mean(selected == fp.MASK_TOKEN) - 0.7) < 0.02
  assert selected.max() <= fp.MASK_TOKEN


def test_templates_are_the_first_four_in_our_residue_order(raw):
  features = fp.template_features(raw, 73, max_templates=4)
  np.testing.assert_array_equal(features["template_mask"], [1, 1, 1, 1])
  for t in range(4):
    letters = raw["template_sequence"][t]
    letters = letters.decode() if isinstance(letters, bytes) else str(letters)
    aligned = np.array([c != "-" for c in letters])
    expected = rc.sequence_to_aatype(letters.replace("-", "X"))
    np.testing.assert_array_equal(features["template_aatype"][t][aligned], expected[aligned])
  cb, ca = rc.atom_order["CB"], rc.atom_order["CA"]
  gly = features["template_aatype"] == rc.restype_order["G"]
  positions = features["template_all_atom_positions"]
  expected_beta = np.where(gly[..., None], positions[..., ca, :], positions[..., cb, :])
  np.testing.assert_allclose(features["template_pseudo_beta"], expected_beta)
  none = fp.template_features({}, 73, max_templates=4)
  assert not none["template_mask"].any() and none["template_aatype"].shape == (4, 73)


def test_padding_adds_masked_residues_and_rows(raw):
  config = fp.FeatureConfig(num_recycle=0, max_msa_clusters=16, max_extra_msa=32,
                            num_res_multiple=32, pad_msa_rows=True)
  small = {key: value for key, value in raw.items() if not key.startswith("template")}
  small["msa"], small["deletion_matrix_int"] = raw["msa"][:10], raw["deletion_matrix_int"][:10]
  batch = fp.process_features(small, config)
  assert batch["aatype"].shape == (1, 96)
  assert batch["msa_feat"].shape == (1, 16, 96, 49) and batch["extra_msa"].shape == (1, 32, 96)
  np.testing.assert_array_equal(batch["seq_mask"][0], np.arange(96) < 73)
  np.testing.assert_array_equal(batch["msa_row_mask"][0], np.arange(16) < 10)
  assert not batch["extra_msa_row_mask"].any()       # 10 rows: all are centres
  assert not batch["msa_mask"][0, :, 73:].any() and not batch["msa_feat"][0, :, 73:].any()
  assert batch["seq_length"][0] == 73


def test_single_sequence_input_has_one_masked_extra_row():
  raw = {"aatype": np.eye(21, dtype=np.int32)[[0, 5, 7, 20]]}
  batch = fp.process_features(raw, fp.FeatureConfig(num_recycle=0))
  assert batch["msa_feat"].shape == (1, 1, 4, 49)
  assert batch["extra_msa"].shape == (1, 1, 4) and not batch["extra_msa_mask"].any()


@pytest.mark.parametrize("gap_agreement_weight", [0.0, 0.5])
def test_clustering_equals_the_training_pipelines_tensorflow_ops(gap_agreement_weight):
  """Inference (numpy) and training (tf.data) build the cluster features the same way."""
  tf = pytest.importorskip("tensorflow")
  from af2flax.data import msa_transforms
  rng = np.random.default_rng(5)
  centres = rng.integers(0, 23, size=(6, 40)).astype(np.int32)    # with mask tokens (22)
  extra = rng.integers(0, 22, size=(50, 40)).astype(np.int32)
  centre_del = rng.integers(0, 5, size=centres.shape).astype(np.float32)
  extra_del = rng.integers(0, 5, size=extra.shape).astype(np.float32)
  agreement = msa_transforms.nearest_cluster_agreement(
      tf.constant(extra), tf.constant(centres), gap_agreement_weight)
  tf_assignment = tf.argmax(agreement, axis=-1, output_type=tf.int32)
  summary = msa_transforms.summarize_clusters(tf.constant(centres), tf.constant(centre_del),
                                              tf.constant(extra), tf.constant(extra_del),
                                              tf_assignment)
  assignment, profile, deletion_mean = fp.cluster_extra_msa(
      centres, centre_del, extra, extra_del, gap_agreement_weight, block_rows=16)
  np.testing.assert_array_equal(assignment, tf_assignment.numpy())
  np.testing.assert_allclose(profile, summary["cluster_profile"].numpy(), rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(deletion_mean, summary["cluster_deletion_mean"].numpy(), rtol=1e-5)
