"""lDDT (local distance difference test) as AlphaFold computes it, superposition-free.

Mariani et al. (2013) lDDT, in the form of Jumper et al. (2021) Suppl. 1.9.6 and Alg. 29: for
every pair of points closer than `cutoff` in the true structure, the fraction of the four
tolerances (0.5, 1, 2, 4 Å) that the predicted distance stays within. The stereochemical
plausibility terms of the original lDDT are not included (as in AlphaFold).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array

LDDT_TOLERANCES = (0.5, 1.0, 2.0, 4.0)  # Å.


def pairwise_distances(points: Array, eps: float = 1e-10) -> Array:
  """[..., N, 3] -> [..., N, N] distances; the epsilon keeps the gradient at 0 finite."""
  diff = points[..., :, None, :] - points[..., None, :, :]
  return jnp.sqrt(eps + jnp.sum(jnp.square(diff), axis=-1))


def lddt(predicted_points: Array, true_points: Array, true_points_mask: Array,
         cutoff: float = 15.0, per_residue: bool = False) -> Array:
  """lDDT of predicted points against true points (AlphaFold's approximate lDDT).

  Jumper et al. (2021) Suppl. Alg. 29 "predictPerResidueLDDT_Ca" lines 1-3 (the lDDT-Cα target).

  Args:
    predicted_points: [..., N, 3] predicted positions (Å).
    true_points: [..., N, 3] true positions (Å).
    true_points_mask: [..., N] (or [..., N, 1]) 1 where the true point exists.
    cutoff: inclusion radius in the true structure (Å).
    per_residue: return [..., N] per-point scores instead of [...] global scores.

  Returns:
    lDDT in [0, 1]. A point (or structure) with nothing to score gets 1 (AlphaFold's
    regularised ratio (1e-10 + 0) / (1e-10 + 0)); callers mask such points.
  """
  if true_points_mask.ndim == true_points.ndim:
    true_points_mask = true_points_mask[..., 0]
  mask = true_points_mask.astype(jnp.float32)
  num_points = true_points.shape[-2]
  dmat_true = pairwise_distances(true_points.astype(jnp.float32))
  dmat_pred = pairwise_distances(predicted_points.astype(jnp.float32))
  dists_to_score = ((dmat_true < cutoff).astype(jnp.float32)
                    * mask[..., :, None] * mask[..., None, :]
                    * (1.0 - jnp.eye(num_points, dtype=jnp.float32)))
  dist_l1 = jnp.abs(dmat_true - dmat_pred)
  score = sum((dist_l1 < tol).astype(jnp.float32) for tol in LDDT_TOLERANCES) / len(
      LDDT_TOLERANCES)
  axes = (-1,) if per_residue else (-2, -1)
  norm = 1.0 / (1e-10 + jnp.sum(dists_to_score, axis=axes))
  return norm * (1e-10 + jnp.sum(dists_to_score * score, axis=axes))
