"""Structural violations (Suppl. 1.9.11) on a real structure and controlled distortions."""

import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from af2flax.common import residue_constants as rc
from af2flax.data import targets
from af2flax.losses import violations
from tests.losses.structures import load_chain

CONFIG = ml_collections.ConfigDict({"violation_tolerance_factor": 12.0,
                                    "clash_overlap_tolerance": 1.5})
NUM_RES = 40


@functools.lru_cache(maxsize=None)
def _truth():
  aatype, positions, mask = load_chain("1ahsA")
  aatype, positions, mask = aatype[:NUM_RES], positions[:NUM_RES], mask[:NUM_RES]
  batch = targets.make_targets(aatype, positions, mask)
  batch.update(aatype=aatype, residue_index=np.arange(NUM_RES, dtype=np.int32),
               seq_mask=np.ones(NUM_RES, np.float32))
  # Score only resolved atoms, so the truth is a clean reference structure.
  batch["atom14_atom_exists"] = batch["atom14_gt_exists"]
  return batch


@jax.jit
def _violations(batch, positions):
  found = violations.find_structural_violations(batch, positions, CONFIG)
  metrics = violations.compute_violation_metrics(batch, positions, found)
  return found, metrics, violations.structural_violation_loss(found, batch["atom14_atom_exists"])


def test_the_true_structure_has_no_violations():
  batch = _truth()
  found, metrics, loss = _violations(batch, batch["atom14_gt_positions"])
  assert float(loss) < 1e-3
  assert float(metrics["violations_per_residue"]) == 0.0
  assert float(metrics["violations_extreme_ca_ca_distance"]) == 0.0


def test_stretched_peptide_bond():
  """Moving residues i+1.. along the C(i)->N(i+1) bond by 1 Å changes only that bond length."""
  batch = _truth()
  positions = batch["atom14_gt_positions"].copy()
  i = 20
  bond = positions[i + 1, 0] - positions[i, 2]
  length = np.linalg.norm(bond)
  positions[i + 1:] += bond / length * 1.0
  found, metrics, loss = _violations(batch, positions)
  between = found["between_residues"]
  expected_mask = np.zeros(NUM_RES)
  expected_mask[[i, i + 1]] = 1.0
  np.testing.assert_array_equal(np.asarray(between["connections_per_residue_violation_mask"]),
                                expected_mask)
  gt, sigma = rc.between_res_bond_length_c_n[0], rc.between_res_bond_length_stddev_c_n[0]
  assert batch["aatype"][i + 1] != rc.resname_to_idx["PRO"]
  new_length = length + 1.0
  expected = max(np.sqrt(1e-6 + (new_length - gt) ** 2) - 12 * sigma, 0.0) / (NUM_RES - 1)
  assert float(between["bonds_c_n_loss_mean"]) == pytest.approx(expected, rel=1e-3)
  assert float(between["angles_ca_c_n_loss_mean"]) < 1e-6
  assert float(metrics["violations_between_residue_bond"]) == pytest.approx(2 / NUM_RES)
  # Nothing else is violated: the violation loss is this bond's term.
  assert float(loss) == pytest.approx(float(between["bonds_c_n_loss_mean"]), rel=1e-5)


def test_clash_between_distant_residues():
  batch = _truth()
  positions = batch["atom14_gt_positions"].copy()
  a, b = 5, 30
  positions[b, 1] = positions[a, 1] + np.asarray([1.0, 0.0, 0.0])  # CA(b) 1 Å from CA(a).
  found, _, _ = _violations(batch, positions)
  clash = np.asarray(found["between_residues"]["clashes_per_atom_clash_mask"])
  assert clash[a, 1] == 1.0 and clash[b, 1] == 1.0
  per_atom = np.asarray(found["between_residues"]["clashes_per_atom_loss_sum"])
  radius_c = rc.van_der_waals_radius["C"]
  assert per_atom[a, 1] >= (2 * radius_c - 1.5 - 1.0) - 1e-4
  assert np.asarray(found["total_per_residue_violations_mask"])[[a, b]].all()


def test_within_residue_bond_violation():
  batch = _truth()
  positions = batch["atom14_gt_positions"].copy()
  m = 12
  cb = 4
  assert batch["atom14_gt_exists"][m, cb] == 1
  positions[m, cb] = positions[m, 1] + 0.5 * (positions[m, cb] - positions[m, 1])
  found, metrics, _ = _violations(batch, positions)
  within = np.asarray(found["within_residues"]["per_atom_violations"])
  assert within[m, cb] == 1.0 and within[m, 1] == 1.0
  assert within[np.arange(NUM_RES) != m].sum() == 0
  assert float(metrics["violations_within_residue"]) == pytest.approx(1 / NUM_RES)


_loss_and_grad = jax.jit(jax.value_and_grad(lambda positions, batch: _violations(batch,
                                                                                  positions)[2]))


@pytest.mark.parametrize("exists", [0.0, 1.0])
def test_degenerate_inputs_are_finite_with_finite_gradients(exists):
  """All atoms at the origin (coincident) and/or no existing atoms: finite loss and gradient."""
  batch = dict(_truth())
  batch["atom14_atom_exists"] = batch["atom14_atom_exists"] * exists
  batch["seq_mask"] = batch["seq_mask"] * exists

  value, grad = _loss_and_grad(jnp.zeros((NUM_RES, 14, 3)), batch)
  assert np.isfinite(float(value)) and np.isfinite(np.asarray(grad)).all()
  if not exists:
    assert float(value) == 0.0
