"""Confidence metrics from the heads' logits: pLDDT, predicted aligned error, pTM.

Jumper et al. (2021) Suppl. 1.9.6 (pLDDT, Alg. 29) and 1.9.7 (predicted aligned error and
TM-score). Pure JAX functions (numpy arrays in are fine; jit-compatible), computed in float32
or in the input's wider float dtype.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array

# TM-score's d0 is undefined below 15 residues and negative below 19 (Yang & Skolnick 2004,
# eqn. 5); AlphaFold clips the residue count to this minimum.
_TM_MIN_NUM_RES = 19


def _float(x) -> Array:
  x = jnp.asarray(x)
  return x if jnp.issubdtype(x.dtype, jnp.floating) and x.dtype.itemsize >= 4 else x.astype(
      jnp.float32)


def compute_plddt(logits: Array) -> Array:
  """Per-residue pLDDT in [0, 100]: 100 x expected lDDT-Cα over equal-width bins of [0, 1].

  Jumper et al. (2021) Suppl. Alg. 29 "predictPerResidueLDDT_Ca" lines 4-5.

  Args:
    logits: [..., N_res, num_bins] from the predicted lDDT head.
  """
  logits = _float(logits)
  num_bins = logits.shape[-1]
  bin_centers = (jnp.arange(num_bins, dtype=logits.dtype) + 0.5) / num_bins
  return 100.0 * jnp.sum(jax.nn.softmax(logits, axis=-1) * bin_centers, axis=-1)


def aligned_error_bin_centers(breaks: Array) -> Array:
  """[num_bins] centers of the aligned-error bins: midpoints, plus one step past the last break.

  Bins are [0, b_0), [b_0, b_1), ..., [b_last, inf); the open last bin is given the center
  b_last + step/2 + step, as AlphaFold does (its value is the maximum predicted error).
  """
  breaks = _float(breaks)
  step = breaks[1] - breaks[0]
  centers = breaks + step / 2
  return jnp.concatenate([centers, centers[-1:] + step])


def compute_predicted_aligned_error(logits: Array, breaks: Array) -> dict[str, Array]:
  """Expected aligned error of residue j in residue i's frame (Suppl. 1.9.7).

  Args:
    logits: [N_res, N_res, num_bins] from the predicted aligned error head.
    breaks: [num_bins - 1] bin edges (Å).

  Returns:
    {'aligned_confidence_probs': [N, N, num_bins], 'predicted_aligned_error': [N, N] (Å),
     'max_predicted_aligned_error': () (Å, the largest value the head can predict)}.
  """
  logits = _float(logits)
  probs = jax.nn.softmax(logits, axis=-1)
  centers = aligned_error_bin_centers(breaks).astype(logits.dtype)
  return {
      "aligned_confidence_probs": probs,
      "predicted_aligned_error": jnp.sum(probs * centers, axis=-1),
      "max_predicted_aligned_error": centers[-1],
  }


def predicted_tm_score(logits: Array, breaks: Array, residue_weights: Array | None = None,
                       asym_id: Array | None = None, interface: bool = False) -> Array:
  """Predicted TM-score (pTM), or interface pTM (ipTM) for complexes.

  Jumper et al. (2021) Suppl. 1.9.7 eqn. 40: for every alignment frame i, the expected
  TM-score term 1 / (1 + (e_ij / d0)^2) under the predicted aligned-error distribution,
  averaged over residues j with weights w_j; pTM is the value of the best frame (argmax of
  w_i x score_i). d0 = 1.24 (N - 15)^(1/3) - 1.8 with N = floor(sum w), clipped to >= 19.

  Args:
    logits: [N_res, N_res, num_bins] predicted aligned error logits.
    breaks: [num_bins - 1] bin edges (Å).
    residue_weights: [N_res] weights in [0, 1] (e.g. a residue mask); default all ones.
    asym_id: [N_res] chain ids, needed when `interface` is True.
    interface: count only pairs of residues on different chains (ipTM).
  """
  logits = _float(logits)
  num_res = logits.shape[0]
  if residue_weights is None:
    residue_weights = jnp.ones((num_res,), logits.dtype)
  residue_weights = jnp.asarray(residue_weights, logits.dtype)
  if interface and asym_id is None:
    raise ValueError("predicted_tm_score(interface=True) needs asym_id (chain id per residue)")

  clipped_num_res = jnp.maximum(jnp.floor(jnp.sum(residue_weights)), _TM_MIN_NUM_RES)
  d0 = 1.24 * (clipped_num_res - 15) ** (1.0 / 3) - 1.8
  probs = jax.nn.softmax(logits, axis=-1)
  centers = aligned_error_bin_centers(breaks).astype(logits.dtype)
  tm_per_bin = 1.0 / (1.0 + jnp.square(centers) / jnp.square(d0))
  predicted_tm_term = jnp.sum(probs * tm_per_bin, axis=-1)  # [N, N]

  pair_mask = jnp.ones((num_res, num_res), logits.dtype)
  if interface:
    asym_id = jnp.asarray(asym_id)
    pair_mask = (asym_id[:, None] != asym_id[None, :]).astype(logits.dtype)
  pair_weights = pair_mask * residue_weights[None, :] * residue_weights[:, None]
  normed_weights = pair_weights / (1e-8 + jnp.sum(pair_weights, axis=-1, keepdims=True))
  per_alignment = jnp.sum(predicted_tm_term * pair_mask * normed_weights, axis=-1)  # [N]
  return per_alignment[jnp.argmax(per_alignment * residue_weights)]
