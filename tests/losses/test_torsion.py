"""Torsion angle loss (Suppl. Alg. 27): pi-periodic chis, the angle-norm term, empty masks."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from af2flax.common import residue_constants as rc
from af2flax.losses import torsion


def _inputs(num_res=6, layers=2):
  rng = np.random.default_rng(0)
  aatype = np.asarray([rc.restype_order[a] for a in "DFKGEY"][:num_res], np.int32)
  chi_mask = np.asarray(rc.chi_angles_mask, np.float32)[aatype]
  chi = rng.uniform(-np.pi, np.pi, size=(num_res, 4)).astype(np.float32)
  return aatype, chi_mask, chi, layers


_loss = jax.jit(lambda *a: torsion.supervised_chi_loss(*a, chi_weight=0.5,
                                                       angle_norm_weight=0.01))


def _pred_from_chi(chi, layers, scale=1.0):
  sin_cos = np.stack([np.sin(chi), np.cos(chi)], -1)
  angles = np.zeros((layers, chi.shape[0], 7, 2), np.float32)
  angles[..., 1] = 1.0
  angles[:, :, 3:] = sin_cos
  return angles, angles * scale


def test_exact_and_pi_shifted_angles():
  aatype, chi_mask, chi, layers = _inputs()
  seq_mask = np.ones(len(aatype), np.float32)
  angles, raw = _pred_from_chi(chi, layers)
  out = _loss(angles, raw, aatype, seq_mask, chi_mask, chi)
  assert float(out["chi_loss"]) == pytest.approx(0.0, abs=1e-6)
  assert float(out["angle_norm_loss"]) == pytest.approx(0.0, abs=1e-5)
  # chi + pi: free for pi-periodic chis (ASP chi2, PHE chi2, GLU chi3, TYR chi2), else chord^2=4.
  shifted, _ = _pred_from_chi(chi + np.pi, layers)
  out = _loss(shifted, shifted, aatype, seq_mask, chi_mask, chi)
  periodic = np.asarray(rc.chi_pi_periodic, np.float32)[aatype]
  expected = 4.0 * np.sum(chi_mask * (1.0 - periodic)) / np.sum(chi_mask)
  assert periodic.sum() == 4
  assert float(out["chi_loss"]) == pytest.approx(expected, rel=1e-5)
  assert float(out["loss"]) == pytest.approx(0.5 * expected + 0.01 * float(
      out["angle_norm_loss"]), rel=1e-6)


def test_angle_norm_term_and_masks():
  aatype, chi_mask, chi, layers = _inputs()
  angles, raw = _pred_from_chi(chi, layers, scale=2.0)
  seq_mask = np.asarray([1, 1, 1, 0, 0, 0], np.float32)
  out = _loss(angles, raw, aatype, seq_mask, chi_mask, chi)
  assert float(out["angle_norm_loss"]) == pytest.approx(1.0, rel=1e-5)  # |2 u| - 1 = 1.


def test_empty_masks_give_zero_and_finite_gradients():
  aatype, chi_mask, chi, layers = _inputs()
  angles, raw = _pred_from_chi(chi, layers)
  raw[:, 2:] = 0.0  # Padding rows: zero unnormalised angles.
  zeros = np.zeros(len(aatype), np.float32)

  def loss(angles, raw):
    return torsion.supervised_chi_loss(angles, raw, aatype, zeros, chi_mask * 0, chi,
                                       chi_weight=0.5, angle_norm_weight=0.01)["loss"]

  value, grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(jnp.asarray(angles),
                                                                  jnp.asarray(raw))
  assert float(value) == 0.0
  assert all(np.isfinite(np.asarray(g)).all() for g in grads)
