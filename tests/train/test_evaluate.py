"""Validation metrics on real structures: exact rigid motions and an independent float64
implementation (numpy loops) of lDDT-Cα, RMSD, TM-score and GDT with the same search."""

import functools

import jax
import numpy as np
import pytest

from af2flax.train import evaluate
from tests.losses.structures import load_chain

NUM_RES = 64


def _rotation(seed):
  q = np.random.default_rng(seed).normal(size=4)
  w, x, y, z = q / np.linalg.norm(q)
  return np.asarray([[1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y)],
                     [2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x)],
                     [2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)]])


@functools.lru_cache(maxsize=None)
def _ca(name):
  _, positions, mask = load_chain(name)
  assert mask[:NUM_RES, 1].all()
  return positions[:NUM_RES, 1].astype(np.float64)


_metrics = jax.jit(evaluate.structure_metrics)


def _kabsch64(mobile, target, weights):
  w = weights[:, None] / weights.sum()
  mc, tc = (w * mobile).sum(0), (w * target).sum(0)
  h = ((mobile - mc) * w).T @ (target - tc)
  u, _, vt = np.linalg.svd(h)
  d = np.sign(np.linalg.det(vt.T @ u.T))
  rot = vt.T @ np.diag([1.0, 1.0, d]) @ u.T
  return rot, tc - rot @ mc


def _distances64(pred, true, selected):
  rot, trans = _kabsch64(pred, true, selected.astype(np.float64))
  return np.linalg.norm(pred @ rot.T + trans - true, axis=-1)


def _search64(pred, true, radius, score, iterations=20):
  """The TM-score program's search: fragment seeds of L, L/2, ... >= 4, iterative refinement on
  residues within `radius` (at least the 3 closest); max of `score` over everything."""
  n = len(true)
  best, length = 0.0, n
  while True:
    for start in range(0, n - length + 1):
      selected = np.zeros(n, bool)
      selected[start:start + length] = True
      for _ in range(iterations + 1):
        dist = _distances64(pred, true, selected)
        best = max(best, score(dist))
        selected = dist <= max(radius, np.sort(dist)[2])
    length //= 2
    if length < 4:
      return best


def _reference_metrics(pred, true):
  n = len(true)
  d0 = max(1.24 * (n - 15) ** (1 / 3) - 1.8, 0.5)
  tm = _search64(pred, true, min(max(d0, 4.5), 8.0),
                 lambda d: np.mean(1.0 / (1.0 + (d / d0) ** 2)))
  fractions = {c: _search64(pred, true, c, lambda d, c=c: np.mean(d <= c))
               for c in (0.5, 1.0, 2.0, 4.0, 8.0)}
  rmsd = np.sqrt(np.mean(_distances64(pred, true, np.ones(n, bool)) ** 2))
  true_d = np.linalg.norm(true[:, None] - true[None], axis=-1)
  pred_d = np.linalg.norm(pred[:, None] - pred[None], axis=-1)
  scored = (true_d < 15.0) & ~np.eye(n, dtype=bool)
  diff = np.abs(true_d - pred_d)
  preserved = sum((diff < t) for t in (0.5, 1.0, 2.0, 4.0)) / 4.0
  lddt = (preserved * scored).sum() / scored.sum()
  return {"tm_score": tm, "ca_rmsd": rmsd, "lddt_ca": lddt,
          "gdt_ts": np.mean([fractions[c] for c in (1.0, 2.0, 4.0, 8.0)]),
          "gdt_ha": np.mean([fractions[c] for c in (0.5, 1.0, 2.0, 4.0)])}


@pytest.mark.parametrize("name", ["1ahsA", "1eteA"])
def test_rigid_motion_scores_perfectly(name):
  true = _ca(name)
  moved = true @ _rotation(1).T + np.asarray([30.0, -12.0, 4.0])
  metrics = _metrics(moved.astype(np.float32), true.astype(np.float32), np.ones(NUM_RES))
  assert float(metrics["ca_rmsd"]) < 1e-3
  for key in ("lddt_ca", "tm_score", "gdt_ts", "gdt_ha"):
    assert float(metrics[key]) == pytest.approx(1.0, abs=1e-5), key


def test_noised_structure_matches_float64_reference():
  true = _ca("1ahsA")
  rng = np.random.default_rng(3)
  # Coordinate noise plus a displaced segment, so the optimal superposition is a real search.
  pred = true + rng.normal(size=true.shape) * 1.0
  pred[40:] += np.asarray([3.0, 0.0, 0.0])
  pred = pred @ _rotation(2).T
  expected = _reference_metrics(pred, true)
  ours = _metrics(pred.astype(np.float32), true.astype(np.float32), np.ones(NUM_RES))
  for key, value in expected.items():
    assert float(ours[key]) == pytest.approx(value, abs=2e-4), (key, float(ours[key]), value)
  assert 0.3 < expected["tm_score"] < 0.95 and 0.2 < expected["gdt_ha"] < expected["gdt_ts"] < 1
  # The search beats the superposition on all residues (the refinement matters).
  all_fit = np.linalg.norm(pred @ _kabsch64(pred, true, np.ones(NUM_RES))[0].T
                           + _kabsch64(pred, true, np.ones(NUM_RES))[1] - true, axis=-1)
  assert expected["gdt_ha"] > np.mean([np.mean(all_fit <= c) for c in (0.5, 1, 2, 4)])


def test_masked_residues_are_ignored():
  """Padding (mask 0, arbitrary coordinates) gives the metrics of the unpadded structures."""
  true = _ca("1ahsA")[:48]
  rng = np.random.default_rng(4)
  pred = true + rng.normal(size=true.shape)
  pad = 16
  padded_true = np.concatenate([true, rng.normal(size=(pad, 3)) * 50])
  padded_pred = np.concatenate([pred, rng.normal(size=(pad, 3)) * 50])
  mask = np.concatenate([np.ones(48), np.zeros(pad)])
  ours = _metrics(padded_pred.astype(np.float32), padded_true.astype(np.float32), mask)
  expected = _reference_metrics(pred, true)
  for key, value in expected.items():
    assert float(ours[key]) == pytest.approx(value, abs=2e-4), key


def test_tm_d0():
  assert float(evaluate.tm_d0(100)) == pytest.approx(1.24 * 85 ** (1 / 3) - 1.8, rel=1e-6)
  assert float(evaluate.tm_d0(10)) == 0.5


def test_violation_statistics_flag_a_distorted_structure():
  import ml_collections
  from af2flax.data import targets
  aatype, positions, mask = load_chain("1ahsA")
  aatype, positions, mask = aatype[:NUM_RES], positions[:NUM_RES], mask[:NUM_RES]
  batch = targets.make_targets(aatype, positions, mask)
  batch.update(aatype=aatype, residue_index=np.arange(NUM_RES, dtype=np.int32),
               seq_mask=np.ones(NUM_RES, np.float32))
  batch["atom14_atom_exists"] = batch["atom14_gt_exists"]
  config = ml_collections.ConfigDict({"violation_tolerance_factor": 12.0,
                                      "clash_overlap_tolerance": 1.5})
  stats_fn = jax.jit(lambda b, x: evaluate.violation_statistics(b, x, config))
  clean = stats_fn(batch, batch["atom14_gt_positions"])
  assert float(clean["violations_per_residue"]) == 0.0 and float(clean["violation_loss"]) < 1e-3
  distorted = batch["atom14_gt_positions"].copy()
  distorted[30:] += np.asarray([0.0, 0.0, 2.0])  # Breaks the 29-30 peptide bond.
  distorted[10, 1] = distorted[50, 1]             # Puts CA(10) onto CA(50).
  stats = stats_fn(batch, distorted)
  # Residues 29-30 (broken bond) and 9-11 (bond angles around the moved CA).
  assert float(stats["violations_between_residue_bond"]) == pytest.approx(5 / NUM_RES)
  assert float(stats["num_clashing_atoms"]) >= 2
  assert float(stats["bonds_c_n_loss_mean"]) > 0 and float(stats["violation_loss"]) > 0.1
