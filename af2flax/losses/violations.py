"""Structural violations: bond lengths, bond angles and clashes of the predicted atoms.

Jumper et al. (2021) Suppl. 1.9.11 "Structural violations", eq. 44-47: flat-bottom losses on the
peptide bond (C-N length, CA-C-N and C-N-CA angles) between consecutive residues, on
van der Waals overlaps between residues, and on the bounds of intra-residue distances
(`residue_constants.make_atom14_dists_bounds`, Engh & Huber). All operate on the atom14
layout; the masks come from the ground-truth features (`atom14_atom_exists`, ...).
"""

from __future__ import annotations

import functools
from typing import Mapping

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from af2flax.common import residue_constants as rc
from af2flax.losses.torsion import masked_mean

Array = jax.Array


def _distance(a: Array, b: Array, eps: float) -> Array:
  return jnp.sqrt(eps + jnp.sum(jnp.square(a - b), axis=-1))


def _flat_bottom(metric: Array, gt_metric, gt_stddev, mask: Array, tolerance_factor_soft: float,
                 tolerance_factor_hard: float) -> tuple[Array, Array, Array]:
  """Per-pair loss relu(|metric - gt| - soft·σ), its masked mean and the hard violations."""
  error = jnp.sqrt(1e-6 + jnp.square(metric - gt_metric))
  loss_per_residue = jax.nn.relu(error - tolerance_factor_soft * gt_stddev)
  loss = jnp.sum(mask * loss_per_residue) / (jnp.sum(mask) + 1e-6)
  violation_mask = mask * (error > tolerance_factor_hard * gt_stddev)
  return loss_per_residue, loss, violation_mask


def between_residue_bond_loss(pred_atom_positions: Array, pred_atom_mask: Array,
                              residue_index: Array, aatype: Array,
                              tolerance_factor_soft: float = 12.0,
                              tolerance_factor_hard: float = 12.0) -> dict[str, Array]:
  """Flat-bottom losses on the peptide bond geometry between consecutive residues.

  Jumper et al. (2021) Suppl. 1.9.11 eq. 44-45: C(i)-N(i+1) length and the cosines of the
  CA(i)-C(i)-N(i+1) and C(i)-N(i+1)-CA(i+1) angles, within `tolerance_factor` standard
  deviations of the literature values (a longer C-N bond before proline). Pairs whose
  residue_index differs by more than one (chain breaks, crop gaps) are not scored.

  Args:
    pred_atom_positions: [N, 14 (or 37), 3]; pred_atom_mask: [N, 14 (or 37)].
    residue_index: [N]; aatype: [N].

  Returns:
    'c_n_loss_mean', 'ca_c_n_loss_mean', 'c_n_ca_loss_mean' (scalars), 'per_residue_loss_sum'
    [N] (each bond's loss shared half-half by its two residues), 'per_residue_violation_mask' [N].
  """
  residue_index = residue_index.astype(jnp.float32)
  mask = pred_atom_mask.astype(jnp.float32)
  this_ca, this_c = pred_atom_positions[:-1, 1], pred_atom_positions[:-1, 2]
  next_n, next_ca = pred_atom_positions[1:, 0], pred_atom_positions[1:, 1]
  this_ca_mask, this_c_mask = mask[:-1, 1], mask[:-1, 2]
  next_n_mask, next_ca_mask = mask[1:, 0], mask[1:, 1]
  no_gap = (residue_index[1:] - residue_index[:-1] == 1.0).astype(jnp.float32)

  c_n_length = _distance(this_c, next_n, 1e-6)
  next_is_proline = (aatype[1:] == rc.resname_to_idx["PRO"]).astype(jnp.float32)
  gt_length = ((1.0 - next_is_proline) * rc.between_res_bond_length_c_n[0]
               + next_is_proline * rc.between_res_bond_length_c_n[1])
  gt_stddev = ((1.0 - next_is_proline) * rc.between_res_bond_length_stddev_c_n[0]
               + next_is_proline * rc.between_res_bond_length_stddev_c_n[1])
  c_n_per_res, c_n_loss, c_n_violation = _flat_bottom(
      c_n_length, gt_length, gt_stddev, this_c_mask * next_n_mask * no_gap,
      tolerance_factor_soft, tolerance_factor_hard)

  ca_c_length = _distance(this_ca, this_c, 1e-6)
  n_ca_length = _distance(next_n, next_ca, 1e-6)
  c_ca_unit = (this_ca - this_c) / ca_c_length[:, None]
  c_n_unit = (next_n - this_c) / c_n_length[:, None]
  n_ca_unit = (next_ca - next_n) / n_ca_length[:, None]

  ca_c_n_per_res, ca_c_n_loss, ca_c_n_violation = _flat_bottom(
      jnp.sum(c_ca_unit * c_n_unit, axis=-1), rc.between_res_cos_angles_ca_c_n[0],
      rc.between_res_cos_angles_ca_c_n[1], this_ca_mask * this_c_mask * next_n_mask * no_gap,
      tolerance_factor_soft, tolerance_factor_hard)
  c_n_ca_per_res, c_n_ca_loss, c_n_ca_violation = _flat_bottom(
      jnp.sum(-c_n_unit * n_ca_unit, axis=-1), rc.between_res_cos_angles_c_n_ca[0],
      rc.between_res_cos_angles_c_n_ca[1], this_c_mask * next_n_mask * next_ca_mask * no_gap,
      tolerance_factor_soft, tolerance_factor_hard)

  # Unlike AlphaFold, which reports the unmasked per-bond loss here, bonds that are not scored
  # (gaps, missing atoms, padding) add nothing to the per-residue sum. This sum is a diagnostic
  # output only: the loss terms above are the same either way.
  per_bond_loss = (c_n_per_res * this_c_mask * next_n_mask * no_gap
                   + ca_c_n_per_res * this_ca_mask * this_c_mask * next_n_mask * no_gap
                   + c_n_ca_per_res * this_c_mask * next_n_mask * next_ca_mask * no_gap)
  per_residue_loss_sum = 0.5 * (jnp.pad(per_bond_loss, (0, 1)) + jnp.pad(per_bond_loss, (1, 0)))
  per_bond_violation = jnp.maximum(jnp.maximum(c_n_violation, ca_c_n_violation), c_n_ca_violation)
  per_residue_violation = jnp.maximum(jnp.pad(per_bond_violation, (0, 1)),
                                      jnp.pad(per_bond_violation, (1, 0)))
  return {"c_n_loss_mean": c_n_loss, "ca_c_n_loss_mean": ca_c_n_loss,
          "c_n_ca_loss_mean": c_n_ca_loss, "per_residue_loss_sum": per_residue_loss_sum,
          "per_residue_violation_mask": per_residue_violation}


def between_residue_clash_loss(atom14_pred_positions: Array, atom14_atom_exists: Array,
                               atom14_atom_radius: Array, residue_index: Array,
                               overlap_tolerance_soft: float = 1.5,
                               overlap_tolerance_hard: float = 1.5) -> dict[str, Array]:
  """Clash loss between atoms of different residues.

  Jumper et al. (2021) Suppl. 1.9.11 eq. 46 (pairs in different residues): relu(r_i + r_j -
  tolerance - d_ij) over van der Waals radii, except the peptide C-N bond and disulfide SG-SG.

  Args:
    atom14_pred_positions: [N, 14, 3]; atom14_atom_exists: [N, 14];
    atom14_atom_radius: [N, 14] (0 for absent atoms); residue_index: [N].

  Returns:
    'mean_loss' (scalar), 'per_atom_loss_sum' [N, 14], 'per_atom_clash_mask' [N, 14].
  """
  exists = atom14_atom_exists.astype(jnp.float32)
  dists = _distance(atom14_pred_positions[:, None, :, None, :],
                    atom14_pred_positions[None, :, None, :, :], 1e-10)  # [N, N, 14, 14]
  dists_mask = exists[:, None, :, None] * exists[None, :, None, :]
  # Each pair of residues once; same-residue pairs are within_residue_violations' job.
  dists_mask *= (residue_index[:, None] < residue_index[None, :])[:, :, None, None]
  c_one_hot = jax.nn.one_hot(2, 14)
  n_one_hot = jax.nn.one_hot(0, 14)
  neighbour = ((residue_index[:, None] + 1) == residue_index[None, :])[:, :, None, None]
  dists_mask *= 1.0 - neighbour * c_one_hot[:, None] * n_one_hot[None, :]
  sg = rc.restype_name_to_atom14_names["CYS"].index("SG")
  sg_one_hot = jax.nn.one_hot(sg, 14)
  dists_mask *= 1.0 - sg_one_hot[:, None] * sg_one_hot[None, :]

  lower_bound = dists_mask * (atom14_atom_radius[:, None, :, None]
                              + atom14_atom_radius[None, :, None, :])
  error = dists_mask * jax.nn.relu(lower_bound - overlap_tolerance_soft - dists)
  mean_loss = jnp.sum(error) / (1e-6 + jnp.sum(dists_mask))
  per_atom_loss_sum = jnp.sum(error, axis=(0, 2)) + jnp.sum(error, axis=(1, 3))
  clash = dists_mask * (dists < lower_bound - overlap_tolerance_hard)
  per_atom_clash_mask = jnp.maximum(jnp.max(clash, axis=(0, 2)), jnp.max(clash, axis=(1, 3)))
  return {"mean_loss": mean_loss, "per_atom_loss_sum": per_atom_loss_sum,
          "per_atom_clash_mask": per_atom_clash_mask}


def within_residue_violations(atom14_pred_positions: Array, atom14_atom_exists: Array,
                              atom14_dists_lower_bound: Array, atom14_dists_upper_bound: Array,
                              tighten_bounds_for_loss: float = 0.0) -> dict[str, Array]:
  """Bond, angle (as virtual bond) and clash violations within each residue.

  Jumper et al. (2021) Suppl. 1.9.11 eq. 46 (pairs in the same residue): distances outside
  [lower, upper] bounds per residue type.

  Args:
    atom14_pred_positions: [N, 14, 3]; atom14_atom_exists: [N, 14];
    atom14_dists_lower_bound, atom14_dists_upper_bound: [N, 14, 14].

  Returns:
    'per_atom_loss_sum' [N, 14], 'per_atom_violations' [N, 14].
  """
  exists = atom14_atom_exists.astype(jnp.float32)
  dists_masks = (1.0 - jnp.eye(14)[None]) * exists[:, :, None] * exists[:, None, :]
  dists = _distance(atom14_pred_positions[:, :, None, :], atom14_pred_positions[:, None, :, :],
                    1e-10)
  low_error = jax.nn.relu(atom14_dists_lower_bound + tighten_bounds_for_loss - dists)
  high_error = jax.nn.relu(dists - (atom14_dists_upper_bound - tighten_bounds_for_loss))
  loss = dists_masks * (low_error + high_error)
  per_atom_loss_sum = jnp.sum(loss, axis=1) + jnp.sum(loss, axis=2)
  violations = dists_masks * ((dists < atom14_dists_lower_bound)
                              | (dists > atom14_dists_upper_bound))
  per_atom_violations = jnp.maximum(jnp.max(violations, axis=1), jnp.max(violations, axis=2))
  return {"per_atom_loss_sum": per_atom_loss_sum, "per_atom_violations": per_atom_violations}


@functools.lru_cache(maxsize=None)
def _atom37_radius() -> np.ndarray:
  return np.asarray([rc.van_der_waals_radius[name[0]] for name in rc.atom_types], np.float32)


@functools.lru_cache(maxsize=None)
def _dists_bounds(overlap_tolerance: float, tolerance_factor: float) -> tuple[np.ndarray, ...]:
  bounds = rc.make_atom14_dists_bounds(overlap_tolerance=overlap_tolerance,
                                       bond_length_tolerance_factor=tolerance_factor)
  # [21, 14, 14]; row 20 (unknown residues, no atoms) is all zeros.
  return bounds["lower_bound"], bounds["upper_bound"]


def find_structural_violations(batch: Mapping[str, Array], atom14_pred_positions: Array,
                               config: ml_collections.ConfigDict) -> dict:
  """All violation terms of Suppl. 1.9.11 for predicted atom14 positions.

  Args:
    batch: `aatype`, `residue_index`, `atom14_atom_exists`, `residx_atom14_to_atom37`.
    atom14_pred_positions: [N, 14, 3].
    config: `heads.structure_module` (`violation_tolerance_factor`, `clash_overlap_tolerance`).

  Returns:
    Nested dict as AlphaFold's: 'between_residues' {bonds_c_n_loss_mean,
    angles_ca_c_n_loss_mean, angles_c_n_ca_loss_mean, connections_per_residue_loss_sum,
    connections_per_residue_violation_mask, clashes_mean_loss, clashes_per_atom_loss_sum,
    clashes_per_atom_clash_mask}, 'within_residues' {per_atom_loss_sum, per_atom_violations},
    'total_per_residue_violations_mask' [N].
  """
  aatype = jnp.minimum(batch["aatype"], rc.unk_restype_index)
  exists = batch["atom14_atom_exists"].astype(jnp.float32)
  connection = between_residue_bond_loss(
      atom14_pred_positions, exists, batch["residue_index"], aatype,
      tolerance_factor_soft=config.violation_tolerance_factor,
      tolerance_factor_hard=config.violation_tolerance_factor)
  atom14_radius = exists * jnp.asarray(_atom37_radius())[batch["residx_atom14_to_atom37"]]
  clashes = between_residue_clash_loss(
      atom14_pred_positions, exists, atom14_radius, batch["residue_index"],
      overlap_tolerance_soft=config.clash_overlap_tolerance,
      overlap_tolerance_hard=config.clash_overlap_tolerance)
  lower, upper = _dists_bounds(float(config.clash_overlap_tolerance),
                               float(config.violation_tolerance_factor))
  within = within_residue_violations(
      atom14_pred_positions, exists, jnp.asarray(lower)[aatype], jnp.asarray(upper)[aatype])
  per_residue_violations = jnp.maximum(
      jnp.maximum(connection["per_residue_violation_mask"],
                  jnp.max(clashes["per_atom_clash_mask"], axis=-1)),
      jnp.max(within["per_atom_violations"], axis=-1))
  return {
      "between_residues": {
          "bonds_c_n_loss_mean": connection["c_n_loss_mean"],
          "angles_ca_c_n_loss_mean": connection["ca_c_n_loss_mean"],
          "angles_c_n_ca_loss_mean": connection["c_n_ca_loss_mean"],
          "connections_per_residue_loss_sum": connection["per_residue_loss_sum"],
          "connections_per_residue_violation_mask": connection["per_residue_violation_mask"],
          "clashes_mean_loss": clashes["mean_loss"],
          "clashes_per_atom_loss_sum": clashes["per_atom_loss_sum"],
          "clashes_per_atom_clash_mask": clashes["per_atom_clash_mask"],
      },
      "within_residues": {
          "per_atom_loss_sum": within["per_atom_loss_sum"],
          "per_atom_violations": within["per_atom_violations"],
      },
      "total_per_residue_violations_mask": per_residue_violations,
  }


def extreme_ca_ca_distance_violations(pred_atom_positions: Array, pred_atom_mask: Array,
                                      residue_index: Array,
                                      max_angstrom_tolerance: float = 1.5) -> Array:
  """Fraction of consecutive (no gap) residue pairs whose CA-CA distance exceeds the ideal
  3.80 Å by more than `max_angstrom_tolerance` (a metric, no gradient use)."""
  residue_index = residue_index.astype(jnp.float32)
  mask = pred_atom_mask.astype(jnp.float32)
  ca_ca = _distance(pred_atom_positions[:-1, 1], pred_atom_positions[1:, 1], 1e-6)
  violations = (ca_ca - rc.ca_ca) > max_angstrom_tolerance
  no_gap = (residue_index[1:] - residue_index[:-1] == 1.0).astype(jnp.float32)
  return masked_mean(mask[:-1, 1] * mask[1:, 1] * no_gap, violations.astype(jnp.float32))


def compute_violation_metrics(batch: Mapping[str, Array], atom14_pred_positions: Array,
                              violations: Mapping) -> dict[str, Array]:
  """Fractions of residues with violations (AlphaFold's in-graph `metrics`), over `seq_mask`."""
  seq_mask = batch["seq_mask"].astype(jnp.float32)
  between = violations["between_residues"]
  return {
      "violations_extreme_ca_ca_distance": extreme_ca_ca_distance_violations(
          atom14_pred_positions, batch["atom14_atom_exists"], batch["residue_index"]),
      "violations_between_residue_bond": masked_mean(
          seq_mask, between["connections_per_residue_violation_mask"]),
      "violations_between_residue_clash": masked_mean(
          seq_mask, jnp.max(between["clashes_per_atom_clash_mask"], axis=-1)),
      "violations_within_residue": masked_mean(
          seq_mask, jnp.max(violations["within_residues"]["per_atom_violations"], axis=-1)),
      "violations_per_residue": masked_mean(
          seq_mask, violations["total_per_residue_violations_mask"]),
  }


def structural_violation_loss(violations: Mapping, atom14_atom_exists: Array) -> Array:
  """Suppl. 1.9.11 eq. 47: L_viol = L_bondlength + L_bondangle + L_clash, the clash and
  within-residue terms summed per atom and averaged over existing atoms."""
  between = violations["between_residues"]
  num_atoms = jnp.sum(atom14_atom_exists.astype(jnp.float32))
  return (between["bonds_c_n_loss_mean"] + between["angles_ca_c_n_loss_mean"]
          + between["angles_c_n_ca_loss_mean"]
          + jnp.sum(between["clashes_per_atom_loss_sum"]
                    + violations["within_residues"]["per_atom_loss_sum"]) / (1e-6 + num_atoms))
