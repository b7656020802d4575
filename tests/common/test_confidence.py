"""Confidence metrics (pLDDT, PAE, pTM) against hand-computed and float64 numpy values."""

import jax
import numpy as np
import pytest

from af2flax.common import confidence

compute_plddt = jax.jit(confidence.compute_plddt)
compute_predicted_aligned_error = jax.jit(confidence.compute_predicted_aligned_error)
predicted_tm_score = jax.jit(confidence.predicted_tm_score, static_argnames="interface")

PAE_BREAKS = np.linspace(0.0, 31.0, 63)  # AlphaFold's predicted_aligned_error head


def _softmax64(logits):
  logits = np.asarray(logits, np.float64)
  shifted = np.exp(logits - logits.max(axis=-1, keepdims=True))
  return shifted / shifted.sum(axis=-1, keepdims=True)


def _one_hot_logits(indices, num_bins, scale=1e4):
  return scale * np.eye(num_bins, dtype=np.float32)[np.asarray(indices)]


def test_plddt_of_certain_bins_is_the_bin_center():
  """Alg. 29: 50 bins of width 0.02 on [0, 1]; a certain prediction in bin k gives 100 (k + 0.5)/50."""
  bins = np.array([0, 1, 24, 49])
  plddt = np.asarray(compute_plddt(_one_hot_logits(bins, 50)))
  np.testing.assert_allclose(plddt, [1.0, 3.0, 49.0, 99.0], atol=1e-4)


def test_plddt_matches_float64_expectation():
  logits = np.random.default_rng(0).normal(size=(7, 50)) * 3
  expected = 100 * np.sum(_softmax64(logits) * (np.arange(50) + 0.5) / 50, axis=-1)
  np.testing.assert_allclose(np.asarray(compute_plddt(logits.astype(np.float32))),
                             expected, rtol=1e-5)


def test_predicted_aligned_error_bins():
  """Bin centers: midpoints of 0.5 Å steps, the open last bin at 31.75 Å (the maximum PAE)."""
  centers = np.asarray(confidence.aligned_error_bin_centers(PAE_BREAKS))
  assert centers.shape == (64,)
  np.testing.assert_allclose(centers[:3], [0.25, 0.75, 1.25], atol=1e-6)
  np.testing.assert_allclose(centers[-1], 31.75, atol=1e-5)
  indices = np.array([[0, 63], [10, 5]])
  result = compute_predicted_aligned_error(_one_hot_logits(indices, 64), PAE_BREAKS)
  np.testing.assert_allclose(np.asarray(result["predicted_aligned_error"]),
                             [[0.25, 31.75], [5.25, 2.75]], atol=1e-4)
  assert float(result["max_predicted_aligned_error"]) == pytest.approx(31.75)
  np.testing.assert_allclose(np.asarray(result["aligned_confidence_probs"]).sum(-1), 1.0, atol=1e-6)


def test_predicted_aligned_error_matches_float64_expectation():
  logits = np.random.default_rng(1).normal(size=(6, 6, 64)) * 2
  centers = np.concatenate([PAE_BREAKS + 0.25, [31.75]])
  expected = np.sum(_softmax64(logits) * centers, axis=-1)
  result = compute_predicted_aligned_error(logits.astype(np.float32), PAE_BREAKS)
  np.testing.assert_allclose(np.asarray(result["predicted_aligned_error"]), expected, rtol=1e-5)


def test_ptm_of_a_certain_prediction_follows_the_d0_formula():
  """Every pair certain to be within 0.25 Å: pTM = 1 / (1 + (0.25 / d0)^2), d0 from N = 40."""
  num_res = 40
  logits = _one_hot_logits(np.zeros((num_res, num_res), int), 64)
  d0 = 1.24 * (40 - 15) ** (1 / 3) - 1.8
  expected = 1 / (1 + (0.25 / d0) ** 2)
  assert float(predicted_tm_score(logits, PAE_BREAKS)) == pytest.approx(expected, abs=1e-6)
  # Fewer than 19 residues: d0 is computed for 19 (no negative or undefined d0).
  short = _one_hot_logits(np.full((8, 8), 10), 64)
  d0_short = 1.24 * (19 - 15) ** (1 / 3) - 1.8
  assert float(predicted_tm_score(short, PAE_BREAKS)) == pytest.approx(
      1 / (1 + (5.25 / d0_short) ** 2), abs=1e-6)


def _ptm64(logits, weights, pair_mask):
  centers = np.concatenate([PAE_BREAKS + 0.25, [31.75]])
  d0 = 1.24 * (max(int(weights.sum()), 19) - 15) ** (1 / 3) - 1.8
  term = np.sum(_softmax64(logits) / (1 + (centers / d0) ** 2), axis=-1)
  pair_weights = pair_mask * weights[None, :] * weights[:, None]
  per_alignment = np.sum(term * pair_weights / (1e-8 + pair_weights.sum(-1, keepdims=True)), -1)
  return per_alignment[np.argmax(per_alignment * weights)]


def test_ptm_and_iptm_match_float64_reference():
  """Random logits; residue weights pick the frames and residues; ipTM counts inter-chain pairs."""
  rng = np.random.default_rng(2)
  num_res = 30
  logits = rng.normal(size=(num_res, num_res, 64)) * 2
  weights = np.ones(num_res)
  weights[-4:] = 0.0  # padding residues
  ptm = predicted_tm_score(logits.astype(np.float32), PAE_BREAKS, weights)
  assert float(ptm) == pytest.approx(_ptm64(logits, weights, np.ones((num_res, num_res))), abs=1e-6)
  asym_id = np.repeat([1, 2], num_res // 2)
  iptm = predicted_tm_score(logits.astype(np.float32), PAE_BREAKS, weights,
                                       asym_id=asym_id, interface=True)
  inter_chain = (asym_id[:, None] != asym_id[None, :]).astype(float)
  assert float(iptm) == pytest.approx(_ptm64(logits, weights, inter_chain), abs=1e-6)
  assert float(iptm) != pytest.approx(float(ptm), abs=1e-4)
  with pytest.raises(ValueError, match="asym_id"):
    confidence.predicted_tm_score(logits, PAE_BREAKS, interface=True)
