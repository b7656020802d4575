"""Shapes of the model's input features, and synthetic inputs of those shapes.

The feature names, shapes and dtypes are AlphaFold's (MODEL_CONTRACT section 3). Used to
trace the model shape-only (`jax.eval_shape`, e.g. to check an imported parameter tree) and
to make well-formed synthetic inputs for tests and benchmarks. Synthetic inputs are random
but structurally valid: one-hot features, backbone-like template coordinates, masks of ones.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from af2flax.common import residue_constants as rc

NUM_TARGET_FEAT = 22
NUM_MSA_FEAT = 49


def feature_shapes(num_res: int, num_msa: int, num_extra_msa: int, num_templates: int,
                   num_slices: int | None = 1) -> dict[str, jax.ShapeDtypeStruct]:
  """ShapeDtypeStructs of every feature the network reads.

  `num_slices`: size of the leading recycle axis (num_recycle + 1); None for one
  iteration's features without that axis (`num_iter_recycling` is then omitted).
  """
  n, s, e, t = num_res, num_msa, num_extra_msa, num_templates
  shapes = {
      "aatype": ((n,), jnp.int32),
      "target_feat": ((n, NUM_TARGET_FEAT), jnp.float32),
      "residue_index": ((n,), jnp.int32),
      "seq_mask": ((n,), jnp.float32),
      "seq_length": ((), jnp.int32),
      "msa_feat": ((s, n, NUM_MSA_FEAT), jnp.float32),
      "msa_mask": ((s, n), jnp.float32),
      "msa_row_mask": ((s,), jnp.float32),
      "extra_msa": ((e, n), jnp.int32),
      "extra_msa_mask": ((e, n), jnp.float32),
      "extra_msa_row_mask": ((e,), jnp.float32),
      "extra_has_deletion": ((e, n), jnp.float32),
      "extra_deletion_value": ((e, n), jnp.float32),
      "template_aatype": ((t, n), jnp.int32),
      "template_all_atom_positions": ((t, n, rc.atom_type_num, 3), jnp.float32),
      "template_all_atom_masks": ((t, n, rc.atom_type_num), jnp.float32),
      "template_pseudo_beta": ((t, n, 3), jnp.float32),
      "template_pseudo_beta_mask": ((t, n), jnp.float32),
      "template_mask": ((t,), jnp.float32),
      "template_sum_probs": ((t, 1), jnp.float32),
  }
  if num_slices is None:
    return {key: jax.ShapeDtypeStruct(shape, dtype) for key, (shape, dtype) in shapes.items()}
  shapes["num_iter_recycling"] = ((), jnp.int32)
  return {key: jax.ShapeDtypeStruct((num_slices,) + shape, dtype)
          for key, (shape, dtype) in shapes.items()}


def _backbone_like(rng: np.random.Generator, num_res: int) -> np.ndarray:
  """atom37 coordinates [N, 37, 3] of a random chain: Cα 3.8 Å apart, other atoms near."""
  steps = rng.normal(size=(num_res, 3))
  steps *= 3.8 / np.linalg.norm(steps, axis=-1, keepdims=True)
  ca = np.cumsum(steps, axis=0)
  positions = ca[:, None, :] + rng.normal(scale=1.2, size=(num_res, rc.atom_type_num, 3))
  positions[:, rc.atom_order["CA"]] = ca
  return positions.astype(np.float32)


def random_features(seed: int, num_res: int, num_msa: int, num_extra_msa: int,
                    num_templates: int, num_slices: int | None = 1,
                    num_iter_recycling: int = 0) -> dict[str, np.ndarray]:
  """Synthetic features with the shapes of `feature_shapes` (numpy, host memory)."""
  rng = np.random.default_rng(seed)
  n, s, e, t = num_res, num_msa, num_extra_msa, num_templates

  def one_iteration() -> dict[str, np.ndarray]:
    aatype = rng.integers(0, 20, size=n).astype(np.int32)
    template_aatype = rng.integers(0, 20, size=(t, n)).astype(np.int32)
    positions = np.stack([_backbone_like(rng, n) for _ in range(t)]) if t else np.zeros(
        (0, n, rc.atom_type_num, 3), np.float32)
    atom_masks = np.broadcast_to(rc.restype_atom37_mask[template_aatype],
                                 (t, n, rc.atom_type_num)).astype(np.float32)
    is_gly = template_aatype == rc.restype_order["G"]
    pseudo_beta = np.where(is_gly[..., None], positions[:, :, rc.atom_order["CA"]],
                           positions[:, :, rc.atom_order["CB"]])
    return {
        "aatype": aatype,
        "target_feat": np.eye(NUM_TARGET_FEAT, dtype=np.float32)[aatype + 1],
        "residue_index": np.arange(n, dtype=np.int32),
        "seq_mask": np.ones(n, np.float32),
        "seq_length": np.asarray(n, np.int32),
        "msa_feat": rng.uniform(size=(s, n, NUM_MSA_FEAT)).astype(np.float32),
        "msa_mask": np.ones((s, n), np.float32),
        "msa_row_mask": np.ones(s, np.float32),
        "extra_msa": rng.integers(0, 23, size=(e, n)).astype(np.int32),
        "extra_msa_mask": np.ones((e, n), np.float32),
        "extra_msa_row_mask": np.ones(e, np.float32),
        "extra_has_deletion": (rng.uniform(size=(e, n)) < 0.1).astype(np.float32),
        "extra_deletion_value": rng.uniform(size=(e, n)).astype(np.float32),
        "template_aatype": template_aatype,
        "template_all_atom_positions": positions,
        "template_all_atom_masks": atom_masks,
        "template_pseudo_beta": pseudo_beta.astype(np.float32),
        "template_pseudo_beta_mask": np.ones((t, n), np.float32),
        "template_mask": np.ones(t, np.float32),
        "template_sum_probs": rng.uniform(size=(t, 1)).astype(np.float32),
    }

  if num_slices is None:
    return one_iteration()
  slices = [one_iteration() for _ in range(num_slices)]
  batch = {key: np.stack([piece[key] for piece in slices]) for key in slices[0]}
  batch["num_iter_recycling"] = np.full(num_slices, num_iter_recycling, np.int32)
  return batch
