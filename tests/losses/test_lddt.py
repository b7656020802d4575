"""AlphaFold's lDDT against a float64 loop implementation of the same definition."""

import jax
import numpy as np
import pytest

from af2flax.losses.lddt import lddt
from tests.losses.structures import load_chain


def _lddt64(pred, true, mask, cutoff=15.0):
  n = len(true)
  per_res = np.zeros(n)
  total_score, total_count = 0.0, 0.0
  for i in range(n):
    score, count = 0.0, 0.0
    for j in range(n):
      if i == j or not (mask[i] and mask[j]):
        continue
      d_true = np.linalg.norm(true[i] - true[j])
      if d_true >= cutoff:
        continue
      diff = abs(d_true - np.linalg.norm(pred[i] - pred[j]))
      score += np.mean([diff < t for t in (0.5, 1.0, 2.0, 4.0)])
      count += 1
    per_res[i] = score / count if count else 1.0
    total_score, total_count = total_score + score, total_count + count
  return per_res, total_score / total_count


def test_lddt_matches_loop_definition_on_a_noised_structure():
  _, positions, mask = load_chain("1ahsA")
  true = positions[:60, 1].astype(np.float64)
  ca_mask = mask[:60, 1].copy()
  ca_mask[[3, 17]] = 0.0
  rng = np.random.default_rng(0)
  pred = true + rng.normal(size=true.shape) * 1.2
  per_res64, global64 = _lddt64(pred, true, ca_mask)
  fn = jax.jit(lddt, static_argnames=("per_residue",))
  per_res = np.asarray(fn(pred.astype(np.float32), true.astype(np.float32), ca_mask,
                          per_residue=True))
  sel = ca_mask > 0
  np.testing.assert_allclose(per_res[sel], per_res64[sel], atol=1e-5)
  assert float(fn(pred.astype(np.float32), true.astype(np.float32), ca_mask)) == pytest.approx(
      global64, abs=1e-5)
  assert 0.3 < global64 < 0.95
  exact = fn(true.astype(np.float32), true.astype(np.float32), ca_mask)
  assert float(exact) == pytest.approx(1.0, abs=1e-6)


def test_empty_mask_is_finite():
  points = np.zeros((5, 3), np.float32)
  value = lddt(points, points, np.zeros(5, np.float32), per_residue=True)
  assert np.isfinite(np.asarray(value)).all()
