"""Structure-quality metrics for validation and model selection (pure JAX functions).

* lDDT-Cα per residue and global: AlphaFold's implementation (`af2flax.losses.lddt`, 15 Å
  inclusion radius, tolerances 0.5/1/2/4 Å, no stereochemistry terms).
* Cα-RMSD after optimal superposition (Kabsch 1976, weighted by the mask, no reflections).
* TM-score (Zhang & Skolnick 2004) and GDT-TS / GDT-HA (Zemla 2003), each the maximum over
  superpositions found by the search of the TM-score program: every fragment of L, L/2, L/4, ...
  (down to 4) consecutive aligned residues seeds a Kabsch superposition, which is then refined
  `num_iterations` times by re-superposing on the residues within a radius (d0_search for
  TM-score, clipped to [4.5, 8] Å; the cutoff itself for each GDT cutoff), keeping at least the
  3 closest. The best score over all seeds and iterations is returned. TM-score is normalised by
  the number of residues of the true structure (those in `mask`), d0 = 1.24 (L - 15)^(1/3) - 1.8
  (at least 0.5). GDT counts residues within 1, 2, 4, 8 Å (TS) or 0.5, 1, 2, 4 Å (HA).
  This is a heuristic maximisation, like the reference programs; on chains without outliers it
  finds the optimum, elsewhere it is a lower bound close to it.
* Structural-violation statistics: fractions of residues with violations and the mean loss terms
  (`af2flax.losses.violations`, Suppl. 1.9.11).

All functions take one structure pair ([N, 3] Cα coordinates in Å, residue correspondence by
index, a [N] mask of residues present in the true structure; padding has mask 0) and are
`jax.jit`-able; vmap them over a batch.
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import jax
import jax.numpy as jnp
import ml_collections

from af2flax.losses import lddt as lddt_lib
from af2flax.losses import violations as violations_lib

Array = jax.Array

GDT_TS_CUTOFFS = (1.0, 2.0, 4.0, 8.0)
GDT_HA_CUTOFFS = (0.5, 1.0, 2.0, 4.0)
_MIN_SEED_LENGTH = 4
_MIN_SELECTED = 3


def lddt_ca(predicted_ca: Array, true_ca: Array, mask: Array, cutoff: float = 15.0,
            per_residue: bool = False) -> Array:
  """lDDT-Cα of a prediction (AlphaFold's lDDT on Cα atoms); [N] if `per_residue` else ()."""
  return lddt_lib.lddt(predicted_ca, true_ca, mask, cutoff=cutoff, per_residue=per_residue)


def kabsch(mobile: Array, target: Array, weights: Array) -> tuple[Array, Array]:
  """Weighted least-squares rigid superposition (proper rotation, Kabsch 1976).

  Args:
    mobile, target: [..., N, 3]; weights: [..., N] (>= 0).

  Returns:
    (rot [..., 3, 3], trans [..., 3]) minimising sum_i w_i |rot @ mobile_i + trans - target_i|².
  """
  w = weights.astype(jnp.float32)[..., None]
  w_sum = jnp.maximum(jnp.sum(w, axis=-2, keepdims=True), 1e-8)
  mobile_center = jnp.sum(w * mobile, axis=-2, keepdims=True) / w_sum
  target_center = jnp.sum(w * target, axis=-2, keepdims=True) / w_sum
  covariance = jnp.einsum("...ni,...nj->...ij", w * (mobile - mobile_center),
                          target - target_center)
  u, _, vt = jnp.linalg.svd(covariance)
  # Flip the smallest singular direction if the optimum would be a reflection.
  det = jnp.linalg.det(jnp.einsum("...ji,...kj->...ik", vt, u))
  flip = jnp.stack([jnp.ones_like(det), jnp.ones_like(det), jnp.sign(det + 1e-30)], axis=-1)
  rot = jnp.einsum("...ji,...j,...kj->...ik", vt, flip, u)
  trans = target_center[..., 0, :] - jnp.einsum("...ij,...j->...i", rot, mobile_center[..., 0, :])
  return rot, trans


def _superposed_distances(predicted: Array, true: Array, weights: Array) -> Array:
  """Distances [..., N] after superposing `predicted` [N, 3] on `true` [N, 3] with each set
  of `weights` [..., N]."""
  rot, trans = kabsch(predicted, true, weights)
  moved = jnp.einsum("nj,...ij->...ni", predicted, rot) + trans[..., None, :]
  return jnp.sqrt(jnp.sum(jnp.square(moved - true), axis=-1) + 1e-12)


def ca_rmsd(predicted_ca: Array, true_ca: Array, mask: Array) -> Array:
  """Cα-RMSD (Å) after optimal superposition of the masked residues."""
  mask = mask.astype(jnp.float32)
  predicted_ca = predicted_ca.astype(jnp.float32)
  true_ca = true_ca.astype(jnp.float32)
  dist = _superposed_distances(predicted_ca, true_ca, mask)
  return jnp.sqrt(jnp.sum(mask * jnp.square(dist)) / jnp.maximum(jnp.sum(mask), 1.0))


def tm_d0(num_residues: Array) -> Array:
  """TM-score distance scale d0(L) = 1.24 (L - 15)^(1/3) - 1.8, at least 0.5 Å."""
  length = jnp.asarray(num_residues, jnp.float32)
  return jnp.maximum(1.24 * jnp.cbrt(jnp.maximum(length - 15.0, 0.0)) - 1.8, 0.5)


def _seed_masks(mask: Array, seed_stride: int) -> tuple[Array, Array]:
  """Masks [S, N] of the seed fragments (consecutive residues of the masked list) and their
  validity [S]: lengths L, L/2, L/4, ... (at least 4, or L if shorter), every start position
  in steps of `seed_stride`."""
  num_res = mask.shape[-1]
  mask = mask.astype(jnp.float32)
  length = jnp.sum(mask).astype(jnp.int32)
  rank = jnp.cumsum(mask).astype(jnp.int32) - 1  # Position among the masked residues.
  num_levels = max(1, int(math.ceil(math.log2(max(num_res, 1) / _MIN_SEED_LENGTH))) + 1)
  starts = jnp.arange(0, num_res, seed_stride)
  seeds, valid = [], []
  for level in range(num_levels):
    frag_len = jnp.maximum(length // (2 ** level), jnp.minimum(length, _MIN_SEED_LENGTH))
    level_valid = (level == 0) | (length // (2 ** level) >= _MIN_SEED_LENGTH)
    in_frag = (rank[None, :] >= starts[:, None]) & (rank[None, :] < starts[:, None] + frag_len)
    seeds.append(in_frag.astype(jnp.float32) * mask[None, :])
    valid.append(level_valid & (starts + frag_len <= length))
  return jnp.concatenate(seeds, axis=0), jnp.concatenate(valid, axis=0)


def _select_within(dist: Array, mask: Array, radius: Array) -> Array:
  """Residues within `radius` [..., 1], or at least the `_MIN_SELECTED` closest ones."""
  masked = jnp.where(mask > 0, dist, jnp.inf)
  closest = -jax.lax.top_k(-masked, min(_MIN_SELECTED, dist.shape[-1]))[0]
  return mask * (masked <= jnp.maximum(radius, closest[..., -1:])).astype(jnp.float32)


def _search_max(predicted: Array, true: Array, mask: Array, radii: Array, score_fn,
                num_iterations: int, seed_stride: int) -> Array:
  """For each refinement radius r_c: the max over seeds and iterations of score_fn(distances
  [C, S, N]) -> [C, S], refining with residues within r_c. Returns [C]."""
  seeds, valid = _seed_masks(mask, seed_stride)
  num_radii = radii.shape[0]
  selection0 = jnp.broadcast_to(seeds, (num_radii,) + seeds.shape)

  def step(selection, _):
    dist = _superposed_distances(predicted, true, selection)
    score = jnp.where(valid[None], score_fn(dist), -jnp.inf)
    return _select_within(dist, mask, radii[:, None, None]), jnp.max(score, axis=-1)

  _, scores = jax.lax.scan(step, selection0, None, length=num_iterations + 1)
  return jnp.maximum(jnp.max(scores, axis=0), 0.0)


def tm_score(predicted_ca: Array, true_ca: Array, mask: Array, num_iterations: int = 20,
             seed_stride: int = 1) -> Array:
  """TM-score of the prediction, normalised by the true structure's length (see module doc)."""
  mask = mask.astype(jnp.float32)
  predicted_ca, true_ca = predicted_ca.astype(jnp.float32), true_ca.astype(jnp.float32)
  length = jnp.sum(mask)
  d0 = tm_d0(length)
  d0_search = jnp.clip(d0, 4.5, 8.0)

  def score_fn(dist):
    return jnp.sum(mask / (1.0 + jnp.square(dist / d0)), axis=-1) / jnp.maximum(length, 1.0)

  return _search_max(predicted_ca, true_ca, mask, d0_search[None], score_fn, num_iterations,
                     seed_stride)[0]


def gdt_fractions(predicted_ca: Array, true_ca: Array, mask: Array, cutoffs: Sequence[float],
                  num_iterations: int = 20, seed_stride: int = 1) -> Array:
  """[C]: for each cutoff the largest fraction of residues within it after superposition."""
  mask = mask.astype(jnp.float32)
  predicted_ca, true_ca = predicted_ca.astype(jnp.float32), true_ca.astype(jnp.float32)
  length = jnp.maximum(jnp.sum(mask), 1.0)
  radii = jnp.asarray(cutoffs, jnp.float32)

  def score_fn(dist):  # [C, S, N] -> [C, S]
    return jnp.sum(mask * (dist <= radii[:, None, None]), axis=-1) / length

  return _search_max(predicted_ca, true_ca, mask, radii, score_fn, num_iterations, seed_stride)


def gdt(predicted_ca: Array, true_ca: Array, mask: Array,
        cutoffs: Sequence[float] = GDT_TS_CUTOFFS, num_iterations: int = 20,
        seed_stride: int = 1) -> Array:
  """Global distance test: mean over `cutoffs` of the largest fraction of residues within the
  cutoff after superposition (GDT-TS with the default cutoffs)."""
  return jnp.mean(gdt_fractions(predicted_ca, true_ca, mask, cutoffs, num_iterations,
                                seed_stride))


def gdt_ts(predicted_ca: Array, true_ca: Array, mask: Array, **kwargs) -> Array:
  return gdt(predicted_ca, true_ca, mask, GDT_TS_CUTOFFS, **kwargs)


def gdt_ha(predicted_ca: Array, true_ca: Array, mask: Array, **kwargs) -> Array:
  return gdt(predicted_ca, true_ca, mask, GDT_HA_CUTOFFS, **kwargs)


def structure_metrics(predicted_ca: Array, true_ca: Array, mask: Array,
                      num_iterations: int = 20, seed_stride: int = 1) -> dict[str, Array]:
  """All Cα metrics of one prediction: lddt_ca, tm_score, gdt_ts, gdt_ha, ca_rmsd."""
  search = dict(num_iterations=num_iterations, seed_stride=seed_stride)
  cutoffs = sorted(set(GDT_TS_CUTOFFS) | set(GDT_HA_CUTOFFS))
  fractions = gdt_fractions(predicted_ca, true_ca, mask, cutoffs, **search)
  by_cutoff = dict(zip(cutoffs, jnp.unstack(fractions)))
  return {
      "lddt_ca": lddt_ca(predicted_ca, true_ca, mask),
      "tm_score": tm_score(predicted_ca, true_ca, mask, **search),
      "gdt_ts": sum(by_cutoff[c] for c in GDT_TS_CUTOFFS) / len(GDT_TS_CUTOFFS),
      "gdt_ha": sum(by_cutoff[c] for c in GDT_HA_CUTOFFS) / len(GDT_HA_CUTOFFS),
      "ca_rmsd": ca_rmsd(predicted_ca, true_ca, mask),
  }


def violation_statistics(batch: Mapping[str, Array], atom14_pred_positions: Array,
                         structure_config: ml_collections.ConfigDict) -> dict[str, Array]:
  """Summary of the structural violations of a predicted structure (Suppl. 1.9.11).

  Args:
    batch: `aatype`, `residue_index`, `seq_mask`, `atom14_atom_exists`,
      `residx_atom14_to_atom37`.
    atom14_pred_positions: [N, 14, 3].
    structure_config: `heads.structure_module` (tolerances).

  Returns:
    Fractions of residues with violations (`violations_*`, as AlphaFold's metrics), the mean
    loss terms (`bonds_c_n_loss_mean`, `angles_*_loss_mean`, `clashes_mean_loss`), the number
    of clashing atoms and the violation loss (`violation_loss`).
  """
  violations = violations_lib.find_structural_violations(batch, atom14_pred_positions,
                                                         structure_config)
  stats = violations_lib.compute_violation_metrics(batch, atom14_pred_positions, violations)
  between = violations["between_residues"]
  for key in ("bonds_c_n_loss_mean", "angles_ca_c_n_loss_mean", "angles_c_n_ca_loss_mean",
              "clashes_mean_loss"):
    stats[key] = between[key]
  stats["num_clashing_atoms"] = jnp.sum(between["clashes_per_atom_clash_mask"])
  stats["num_within_residue_violating_atoms"] = jnp.sum(
      violations["within_residues"]["per_atom_violations"])
  stats["violation_loss"] = violations_lib.structural_violation_loss(
      violations, batch["atom14_atom_exists"])
  return stats
