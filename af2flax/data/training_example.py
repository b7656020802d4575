"""One training example: raw record features -> the model's fixed-size feature dict.

Two stages, split by cost and by where they run (see transforms.py / msa_transforms.py):

  prepare_example (numpy, once per example): canonical layout, distillation MSA subsampling,
      MSA block deletion, residue crop, template subsampling, ground-truth targets.
  featurize (TensorFlow graph) or featurize_numpy (its TensorFlow-free twin): the
      per-recycling-iteration MSA features, then everything padded to fixed shapes with a
      leading recycle axis R = num_recycle + 1 (MODEL_CONTRACT section 3).

Randomness: `prepare_example` takes a numpy Generator, `featurize` / `featurize_numpy` a seed [2]
(stateless TF ops / numpy Generators per decision); the input pipeline derives both from (seed,
global example slot), so an example is a pure function of them. TensorFlow is imported only by
the TF functions (`featurize`, `prepared_signature`).
"""

from __future__ import annotations

from typing import Any, Mapping

import ml_collections
import numpy as np

from af2flax.common import residue_constants as rc
from af2flax.data import config as data_config
from af2flax.data import msa_transforms_numpy
from af2flax.data import targets as targets_lib
from af2flax.data import transforms

# Arrays of `prepare_example`'s output, their dtype and rank-shape with None for variable axes.
PREPARED_SPEC: dict[str, tuple[Any, tuple[int | None, ...]]] = {
    "msa": (np.int32, (None, None)),
    "deletion_matrix": (np.float32, (None, None)),
    "msa_profile": (np.float32, (None, 22)),
    "crop_start": (np.int32, ()),
    "seq_length": (np.int32, ()),
    "aatype": (np.int32, (None,)),
    "residue_index": (np.int32, (None,)),
    "between_segment_residues": (np.int32, (None,)),
    "all_atom_positions": (np.float32, (None, rc.atom_type_num, 3)),
    "all_atom_mask": (np.float32, (None, rc.atom_type_num)),
    "template_aatype": (np.int32, (None, None)),
    "template_all_atom_masks": (np.float32, (None, None, rc.atom_type_num)),
    "template_all_atom_positions": (np.float32, (None, None, rc.atom_type_num, 3)),
    "template_sum_probs": (np.float32, (None, 1)),
    "template_pseudo_beta": (np.float32, (None, None, 3)),
    "template_pseudo_beta_mask": (np.float32, (None, None)),
    "resolution": (np.float32, ()),
    "is_distillation": (np.float32, ()),
    "use_clamped_fape": (np.float32, ()),
}
# Ground truth the losses consume (af2_tiny batch.npz), from targets.make_targets.
TARGET_SPEC: dict[str, tuple[Any, tuple[int | None, ...]]] = {
    "atom14_alt_gt_exists": (np.float32, (None, 14)),
    "atom14_alt_gt_positions": (np.float32, (None, 14, 3)),
    "atom14_atom_exists": (np.float32, (None, 14)),
    "atom14_atom_is_ambiguous": (np.float32, (None, 14)),
    "atom14_gt_exists": (np.float32, (None, 14)),
    "atom14_gt_positions": (np.float32, (None, 14, 3)),
    "atom37_atom_exists": (np.float32, (None, rc.atom_type_num)),
    "backbone_affine_mask": (np.float32, (None,)),
    "backbone_affine_tensor": (np.float32, (None, 7)),
    "chi_angles": (np.float32, (None, 4)),
    "chi_mask": (np.float32, (None, 4)),
    "pseudo_beta": (np.float32, (None, 3)),
    "pseudo_beta_mask": (np.float32, (None,)),
    "residx_atom14_to_atom37": (np.int32, (None, 14)),
    "residx_atom37_to_atom14": (np.int32, (None, rc.atom_type_num)),
    "rigidgroups_alt_gt_frames": (np.float32, (None, 8, 12)),
    "rigidgroups_group_exists": (np.float32, (None, 8)),
    "rigidgroups_group_is_ambiguous": (np.float32, (None, 8)),
    "rigidgroups_gt_exists": (np.float32, (None, 8)),
    "rigidgroups_gt_frames": (np.float32, (None, 8, 12)),
}
PREPARED_SPEC.update(TARGET_SPEC)


def prepare_example(raw_features: Mapping[str, np.ndarray], config: ml_collections.ConfigDict,
                    rng: np.random.Generator) -> dict[str, np.ndarray]:
  """The per-example (non-ensembled) training transforms; returns arrays of PREPARED_SPEC.

  Order as in AlphaFold's training (Jumper et al. (2021) Suppl. 1.2): distillation MSA
  subsampling (1.3), MSA block deletion (Alg. 1), residue crop (1.2.8) and template subsampling
  (1.2.3), then the targets of the cropped residues (targets.make_targets; every target is a
  per-residue function of the structure, so cropping first gives the same values).
  Raises transforms.BadExampleError for inconsistent records.
  """
  train = config.train
  features = transforms.canonicalize_features(raw_features)
  num_seq = features["msa"].shape[0]
  if features["is_distillation"] > 0 and train.max_distillation_msa_seqs:
    rows = transforms.subsample_msa_rows(num_seq, train.max_distillation_msa_seqs, rng)
    features["msa"], features["deletion_matrix"] = (features["msa"][rows],
                                                    features["deletion_matrix"][rows])
  if train.block_delete_msa.enabled:
    rows = transforms.block_delete_msa_rows(features["msa"].shape[0], train.block_delete_msa, rng)
    features["msa"], features["deletion_matrix"] = (features["msa"][rows],
                                                    features["deletion_matrix"][rows])
  num_res = features["aatype"].shape[0]
  crop_start, crop_length = transforms.sample_crop(num_res, train.crop_size, rng)
  num_templates = features["template_aatype"].shape[0] if config.common.use_templates else 0
  template_indices = transforms.sample_templates(num_templates, train, rng)
  example = transforms.crop_residues(features, crop_start, crop_length, template_indices)
  example["crop_start"] = np.int32(crop_start)
  example["seq_length"] = np.int32(crop_length)
  example["msa_profile"] = transforms.msa_profile(features["msa"])
  example["template_pseudo_beta"], example["template_pseudo_beta_mask"] = transforms.pseudo_beta(
      example["template_aatype"], example["template_all_atom_positions"],
      example["template_all_atom_masks"])
  example["use_clamped_fape"] = np.float32(rng.random() < train.clamp_fape_prob)
  targets = targets_lib.make_targets(example["aatype"], example["all_atom_positions"],
                                     example["all_atom_mask"])
  example.update({key: targets[key] for key in TARGET_SPEC})
  return {key: np.asarray(example[key], dtype) for key, (dtype, _) in PREPARED_SPEC.items()}


def prepared_signature() -> dict[str, "tf.TensorSpec"]:
  """tf.TensorSpec of every `prepare_example` output (for tf.numpy_function and tests)."""
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  return {key: tf.TensorSpec(shape, tf.as_dtype(dtype))
          for key, (dtype, shape) in PREPARED_SPEC.items()}


def batch_shapes(config: ml_collections.ConfigDict) -> dict[str, tuple[tuple[int, ...], Any]]:
  """Shape (per example, with the recycle axis R first) and dtype of every batch array."""
  num_iterations = config.common.num_recycle + 1
  crop, rows = config.train.crop_size, data_config.num_msa_rows(config)
  extra, templates = config.common.max_extra_msa, config.train.max_templates
  shapes: dict[str, tuple[tuple[int, ...], Any]] = {}
  for key in ("msa_feat", "true_msa", "bert_mask", "msa_mask"):
    shapes[key] = ((rows, crop, 49) if key == "msa_feat" else (rows, crop),
                   np.int32 if key == "true_msa" else np.float32)
  shapes["msa_row_mask"] = ((rows,), np.float32)
  for key in ("extra_msa", "extra_msa_mask", "extra_has_deletion", "extra_deletion_value"):
    shapes[key] = ((extra, crop), np.int32 if key == "extra_msa" else np.float32)
  shapes["extra_msa_row_mask"] = ((extra,), np.float32)
  for key in ("aatype", "residue_index", "all_atom_positions", "all_atom_mask", "seq_mask",
              "template_aatype", "template_all_atom_masks", "template_all_atom_positions",
              "template_sum_probs", "template_pseudo_beta", "template_pseudo_beta_mask",
              *TARGET_SPEC):
    dtype, spec = PREPARED_SPEC.get(key, (np.float32, (None,)))
    template_axis = (templates,) if key.startswith("template_") else ()
    body = spec[len(template_axis):]
    body = tuple(crop if size is None else size for size in body)
    shapes[key] = (template_axis + body, dtype)
  shapes["target_feat"] = ((crop, 22), np.float32)
  shapes["template_mask"] = ((templates,), np.float32)
  for key in ("seq_length", "num_iter_recycling"):
    shapes[key] = ((), np.int32)
  for key in ("resolution", "use_clamped_fape", "is_distillation"):
    shapes[key] = ((), np.float32)
  return {key: ((num_iterations,) + shape, dtype) for key, (shape, dtype) in sorted(shapes.items())}


def featurize(example: Mapping[str, tf.Tensor], seed: tf.Tensor, num_iter_recycling: tf.Tensor,
              config: ml_collections.ConfigDict) -> dict[str, tf.Tensor]:
  """Prepared example (TF tensors) -> the model's feature dict with a leading recycle axis.

  Per-iteration MSA features come from msa_transforms (a fresh MSA sample per recycling
  iteration, Suppl. 1.10); every other array is padded to the crop size / max_templates
  (AlphaFold's make_fixed_size, zeros under zero masks) and repeated along R, as AlphaFold's
  ensembled batch has it. `num_iter_recycling` is an int32 scalar (Suppl. 1.10).
  """
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  from af2flax.data import msa_transforms  # pylint: disable=import-outside-toplevel
  shapes = batch_shapes(config)
  num_iterations = config.common.num_recycle + 1
  batch = msa_transforms.msa_features_per_iteration(
      example["msa"], example["deletion_matrix"], example["msa_profile"], example["crop_start"],
      example["seq_length"], seed, config)
  single = {key: example[key] for key in PREPARED_SPEC
            if key not in ("msa", "deletion_matrix", "msa_profile", "crop_start")}
  single["seq_mask"] = tf.ones_like(example["aatype"], tf.float32)
  single["target_feat"] = msa_transforms.make_target_feat(example["aatype"],
                                                          example["between_segment_residues"])
  del single["between_segment_residues"]
  single["template_mask"] = tf.ones(tf.shape(example["template_aatype"])[:1], tf.float32)
  single["num_iter_recycling"] = tf.cast(num_iter_recycling, tf.int32)
  for key, value in single.items():
    shape = shapes[key][0][1:]
    padded = msa_transforms.pad_to(value, shape)
    batch[key] = tf.tile(padded[None], [num_iterations] + [1] * len(shape))
  return batch


def featurize_numpy(example: Mapping[str, np.ndarray], seed: np.ndarray, num_iter_recycling: int,
                    config: ml_collections.ConfigDict) -> dict[str, np.ndarray]:
  """`featurize` without TensorFlow: the same keys, dtypes and shapes (`batch_shapes`).

  The per-iteration MSA features come from msa_transforms_numpy (draws from numpy Generators
  seeded by `seed` [2]: the same distributions as the TF backend, other values); every other
  array is padded and repeated along R exactly as `featurize` does.
  """
  shapes = batch_shapes(config)
  num_iterations = config.common.num_recycle + 1
  batch = msa_transforms_numpy.msa_features_per_iteration(
      example["msa"], example["deletion_matrix"], example["msa_profile"],
      int(example["crop_start"]), int(example["seq_length"]), seed, config)
  single = {key: example[key] for key in PREPARED_SPEC
            if key not in ("msa", "deletion_matrix", "msa_profile", "crop_start")}
  single["seq_mask"] = np.ones(np.shape(example["aatype"]), np.float32)
  single["target_feat"] = msa_transforms_numpy.make_target_feat(
      example["aatype"], example["between_segment_residues"])
  del single["between_segment_residues"]
  single["template_mask"] = np.ones(np.shape(example["template_aatype"])[:1], np.float32)
  single["num_iter_recycling"] = np.int32(num_iter_recycling)
  for key, value in single.items():
    shape, dtype = shapes[key]
    padded = msa_transforms_numpy.pad_to(value, shape[1:], dtype)
    batch[key] = np.ascontiguousarray(np.broadcast_to(padded, shape))
  return batch
