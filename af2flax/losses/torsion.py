"""Torsion angle loss with the angle-norm term.

Jumper et al. (2021) Suppl. 1.9.1 and Alg. 27 "torsionAngleLoss": squared chord distance between
predicted and true (sin, cos) of chi1-4, taking the pi-shifted true angle where a chi is
pi-periodic (Suppl. Table 2), plus the deviation of the unnormalised predictions from the unit
circle.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from af2flax.common import residue_constants as rc

Array = jax.Array


def masked_mean(mask: Array, value: Array, eps: float = 1e-10) -> Array:
  """sum(mask * value) / (sum(mask) * broadcast + eps), where `mask` broadcasts to `value`
  (AlphaFold's `utils.mask_mean` over all axes): a size-1 mask axis counts every value."""
  mask = jnp.asarray(mask, jnp.float32)
  broadcast = value.size / max(mask.size, 1) if mask.ndim else value.size
  return jnp.sum(mask * value) / (jnp.sum(mask) * broadcast + eps)


def supervised_chi_loss(angles_sin_cos: Array, unnormalized_angles_sin_cos: Array, aatype: Array,
                        seq_mask: Array, chi_mask: Array, chi_angles: Array, *,
                        chi_weight: float, angle_norm_weight: float) -> dict[str, Array]:
  """Torsion angle loss over all structure-module layers.

  Jumper et al. (2021) Suppl. Alg. 27 "torsionAngleLoss" (chi angles only, as AlphaFold's
  `supervised_chi_loss`; backbone torsions are not supervised).

  Args:
    angles_sin_cos: [L, N, 7, 2] normalised predicted (sin, cos) of every layer.
    unnormalized_angles_sin_cos: [L, N, 7, 2] the same before normalisation.
    aatype: [N] residue types.
    seq_mask: [N]; chi_mask: [N, 4]; chi_angles: [N, 4] true chis (radians).
    chi_weight, angle_norm_weight: weights of the two terms in `loss`.

  Returns:
    {'loss': chi_weight * chi_loss + angle_norm_weight * angle_norm_loss, 'chi_loss',
    'angle_norm_loss'}.
  """
  num_res = seq_mask.shape[0]
  pred_angles = jnp.reshape(angles_sin_cos.astype(jnp.float32), (-1, num_res, 7, 2))[:, :, 3:]
  restype = jnp.minimum(aatype, rc.unk_restype_index)
  chi_pi_periodic = jnp.asarray(np.asarray(rc.chi_pi_periodic, np.float32))[restype][None]
  chi_angles = chi_angles.astype(jnp.float32)
  true_sin_cos = jnp.stack([jnp.sin(chi_angles), jnp.cos(chi_angles)], axis=-1)[None]
  # -1 for pi-periodic chis (the alternative true angle chi + pi), +1 otherwise.
  shifted_true_sin_cos = (1.0 - 2.0 * chi_pi_periodic)[..., None] * true_sin_cos
  sq_chi_error = jnp.sum(jnp.square(true_sin_cos - pred_angles), axis=-1)
  sq_chi_error_shifted = jnp.sum(jnp.square(shifted_true_sin_cos - pred_angles), axis=-1)
  sq_chi_error = jnp.minimum(sq_chi_error, sq_chi_error_shifted)  # [L, N, 4]
  chi_loss = masked_mean(chi_mask.astype(jnp.float32)[None], sq_chi_error)

  unnormalized = jnp.reshape(unnormalized_angles_sin_cos.astype(jnp.float32), (-1, num_res, 7, 2))
  angle_norm = jnp.sqrt(jnp.sum(jnp.square(unnormalized), axis=-1) + 1e-6)
  angle_norm_loss = masked_mean(seq_mask.astype(jnp.float32)[None, :, None],
                                jnp.abs(angle_norm - 1.0))
  return {"loss": chi_weight * chi_loss + angle_norm_weight * angle_norm_loss,
          "chi_loss": chi_loss, "angle_norm_loss": angle_norm_loss}
