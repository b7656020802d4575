"""Inference-time feature processing in numpy: raw pipeline features -> the model's batch.

AlphaFold's evaluation-mode input processing (Jumper et al. (2021) Suppl. 1.2.6-1.2.9 and
1.11.2 with the settings of AlphaFold's `data.eval` config): no crop, no block deletion, the
first `max_templates` templates in search order. For every recycling iteration (Suppl. 1.10,
`resample_msa_in_recycling`) the MSA is sampled afresh:

  1. cluster centres: the query plus a random `max_msa_clusters - 1` of the other rows; the
     rest become the extra MSA (Suppl. 1.2.7);
  2. masked-MSA corruption of the centres (Suppl. 1.2.7: 15% of the positions; of those 10%
     uniform amino acid, 10% profile draw, 10% unchanged, 70% mask token) -- AlphaFold applies
     it at inference too;
  3. every extra row joins its nearest centre by Hamming agreement (gaps and masks do not
     count), giving the cluster profile and mean deletions (Suppl. Table 1);
  4. `max_extra_msa` random extra rows are kept;
  5. `msa_feat` (49 channels) and `target_feat` (22 channels) as in Suppl. Table 1.

Pure numpy (no TensorFlow: GPU machines have none); the randomness comes from
`numpy.random.default_rng([seed, iteration])`, so a seed gives the same batch every time. The
masking, nearest-centre clustering and feature construction are the training input's numpy
backend (af2flax/data/msa_transforms_numpy.py), so training and inference build `msa_feat` alike.
Optional padding (`num_res_multiple`, `pad_msa_rows`) gives a few fixed shapes for runs over
many sequences, so the model compiles once per shape instead of once per length; padded
residues and rows carry mask 0.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import numpy as np

from af2flax.common import residue_constants as rc
from af2flax.data import msa_transforms_numpy as msa_lib
from af2flax.data import transforms as data_transforms

NUM_MSA_TOKENS = msa_lib.NUM_MSA_CLASSES        # 20 amino acids, X, gap, mask token
GAP_TOKEN = msa_lib.GAP_INDEX
MASK_TOKEN = msa_lib.MASK_TOKEN
_HHBLITS_TO_OURS = np.asarray(rc.MAP_HHBLITS_AATYPE_TO_OUR_AATYPE, np.int32)

# AlphaFold's inference sizes (`data.eval.max_msa_clusters`, `data.common.max_extra_msa`).
DEFAULT_MAX_MSA_CLUSTERS = 512
DEFAULT_MAX_EXTRA_MSA = 1024


@dataclasses.dataclass(frozen=True)
class FeatureConfig:
  """The data settings of one model at inference (AlphaFold's `data.common` + `data.eval`)."""
  num_recycle: int = 3
  resample_msa_in_recycling: bool = True
  max_msa_clusters: int = DEFAULT_MAX_MSA_CLUSTERS
  max_extra_msa: int = DEFAULT_MAX_EXTRA_MSA
  use_templates: bool = False
  max_templates: int = 4
  masked_msa_replace_fraction: float = 0.15
  masked_msa_uniform_prob: float = 0.1
  masked_msa_profile_prob: float = 0.1
  masked_msa_same_prob: float = 0.1
  gap_agreement_weight: float = 0.0
  num_res_multiple: int = 0      # > 0: pad residues to a multiple of this
  pad_msa_rows: bool = False     # pad centres / extra rows to max_msa_clusters / max_extra_msa
  cluster_block_rows: int = 1024  # extra rows per block of the nearest-centre search (memory)

  def __post_init__(self):
    if self.num_recycle < 0 or self.max_msa_clusters < 1 or self.max_extra_msa < 0:
      raise ValueError(f"invalid feature config: {self}")
    mask_prob = 1.0 - (self.masked_msa_uniform_prob + self.masked_msa_profile_prob
                       + self.masked_msa_same_prob)
    if mask_prob < 0:
      raise ValueError("masked-MSA probabilities sum to more than 1")


def feature_config_from_model(model_config: Any, data_settings: Mapping[str, Any] | None = None,
                              **overrides: Any) -> FeatureConfig:
  """A model's FeatureConfig: recycles and templates from its model config, MSA sizes from
  `data_settings` (AlphaFold's per-preset `data.common` diffs: `max_extra_msa`,
  `reduce_msa_clusters_by_max_templates`), then `overrides`."""
  data_settings = dict(data_settings or {})
  template = model_config.embeddings_and_evoformer.template
  use_templates = bool(template.enabled) and bool(data_settings.get("use_templates", True))
  max_templates = int(template.max_templates)
  max_msa_clusters = DEFAULT_MAX_MSA_CLUSTERS
  if use_templates and data_settings.get("reduce_msa_clusters_by_max_templates", False):
    max_msa_clusters -= max_templates   # rows left for the template torsion features
  values = dict(num_recycle=int(model_config.num_recycle),
                resample_msa_in_recycling=bool(model_config.resample_msa_in_recycling),
                max_msa_clusters=max_msa_clusters,
                max_extra_msa=int(data_settings.get("max_extra_msa", DEFAULT_MAX_EXTRA_MSA)),
                use_templates=use_templates, max_templates=max_templates)
  values.update(overrides)
  return FeatureConfig(**values)


# --- the per-example (non-resampled) part ------------------------------------------------------

def canonical_inputs(raw: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  """AlphaFold's raw pipeline layout -> aatype [N] (0..20), msa [S, N] in our order (21 gap),
  deletion_matrix [S, N] float32, residue_index [N], between_segment_residues [N].

  Accepts `aatype` one-hot [N, 21] or indices [N], `deletion_matrix_int` or `deletion_matrix`;
  without `msa` the query alone is the MSA.
  """
  aatype = np.asarray(raw["aatype"])
  if aatype.ndim == 2:
    aatype = np.argmax(aatype, axis=-1)
  aatype = aatype.astype(np.int32)
  num_res = aatype.shape[0]
  if "msa" in raw:
    msa = _HHBLITS_TO_OURS[np.asarray(raw["msa"], np.int32)]
    deletions = np.asarray(raw.get("deletion_matrix_int", raw.get("deletion_matrix")),
                           np.float32)
  else:
    msa = aatype[None, :].copy()
    deletions = np.zeros((1, num_res), np.float32)
  if msa.ndim != 2 or msa.shape[1] != num_res or deletions.shape != msa.shape:
    raise ValueError(f"MSA of shape {msa.shape} (deletions {deletions.shape}) does not fit "
                     f"{num_res} residues")
  return {
      "aatype": aatype,
      "msa": msa,
      "deletion_matrix": deletions,
      "residue_index": np.asarray(raw.get("residue_index", np.arange(num_res)), np.int32),
      "between_segment_residues": np.asarray(
          raw.get("between_segment_residues", np.zeros(num_res)), np.int32),
  }


def msa_profile(msa: np.ndarray) -> np.ndarray:
  """[N, 22] frequency of each residue type and gap per column (AlphaFold's hhblits_profile)."""
  if msa.shape[0] == 0:
    return np.zeros((msa.shape[1], 22), np.float32)
  return data_transforms.msa_profile(msa)


def template_features(raw: Mapping[str, np.ndarray], num_res: int,
                      max_templates: int) -> dict[str, np.ndarray]:
  """The first `max_templates` templates (search order, as AlphaFold at inference), padded to
  `max_templates` with template_mask 0; aatype in our order, pseudo-β (Cβ, Cα for Gly)."""
  count = 0
  if "template_aatype" in raw:
    count = min(int(np.asarray(raw["template_aatype"]).shape[0]), max_templates)
  aatype = np.zeros((max_templates, num_res), np.int32)
  positions = np.zeros((max_templates, num_res, rc.atom_type_num, 3), np.float32)
  masks = np.zeros((max_templates, num_res, rc.atom_type_num), np.float32)
  sum_probs = np.zeros((max_templates, 1), np.float32)
  if count:
    hhblits_aatype = np.asarray(raw["template_aatype"])[:count]
    if hhblits_aatype.ndim == 3:
      hhblits_aatype = np.argmax(hhblits_aatype, axis=-1)
    aatype[:count] = _HHBLITS_TO_OURS[hhblits_aatype.astype(np.int32)]
    positions[:count] = np.asarray(raw["template_all_atom_positions"])[:count]
    masks[:count] = np.asarray(raw["template_all_atom_masks"])[:count]
    if "template_sum_probs" in raw:
      sum_probs[:count] = np.asarray(raw["template_sum_probs"]).reshape(-1, 1)[:count]
  is_gly = aatype == rc.restype_order["G"]
  ca, cb = rc.atom_order["CA"], rc.atom_order["CB"]
  pseudo_beta = np.where(is_gly[..., None], positions[..., ca, :], positions[..., cb, :])
  pseudo_beta_mask = np.where(is_gly, masks[..., ca], masks[..., cb])
  template_mask = (np.arange(max_templates) < count).astype(np.float32)
  return {
      "template_aatype": aatype,
      "template_all_atom_positions": positions * masks[..., None],
      "template_all_atom_masks": masks,
      "template_pseudo_beta": (pseudo_beta * pseudo_beta_mask[..., None]).astype(np.float32),
      "template_pseudo_beta_mask": pseudo_beta_mask.astype(np.float32),
      "template_mask": template_mask,
      "template_sum_probs": sum_probs,
  }


# --- the per-iteration (resampled) part --------------------------------------------------------

def mask_msa(msa: np.ndarray, profile: np.ndarray, config: FeatureConfig,
             rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
  """Masked-MSA corruption (Suppl. 1.2.7): returns (corrupted msa, bert_mask [S, N]).

  Each position is selected with probability `masked_msa_replace_fraction`; a selected one
  becomes a uniform amino acid, a draw from its column's profile, itself, or the mask token,
  with probabilities uniform/profile/same/rest (msa_transforms_numpy.mask_msa).
  """
  return msa_lib.mask_msa(msa, profile, rng, replace_fraction=config.masked_msa_replace_fraction,
                          uniform_prob=config.masked_msa_uniform_prob,
                          profile_prob=config.masked_msa_profile_prob,
                          same_prob=config.masked_msa_same_prob)


def _one_hot(tokens: np.ndarray, depth: int = NUM_MSA_TOKENS) -> np.ndarray:
  return msa_lib.one_hot(tokens, depth)


def cluster_extra_msa(centres: np.ndarray, centre_deletions: np.ndarray, extra: np.ndarray,
                      extra_deletions: np.ndarray, gap_agreement_weight: float = 0.0,
                      block_rows: int = 1024) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Nearest-centre assignment of extra rows and the cluster summaries (Suppl. 1.2.7).

  An extra row joins the centre it agrees with at most positions (amino acids and X count 1,
  gaps `gap_agreement_weight`, mask tokens 0; ties: the first centre). Returns
  (assignment [E], cluster_profile [S, N, 23], cluster_deletion_mean [S, N]); each centre
  counts itself once.
  """
  agreement = msa_lib.nearest_cluster_agreement(extra, centres, gap_agreement_weight, block_rows)
  assignment = np.argmax(agreement, axis=-1) if extra.shape[0] else np.zeros(0, np.int64)
  summary = msa_lib.summarize_clusters(centres, np.asarray(centre_deletions, np.float32), extra,
                                       np.asarray(extra_deletions, np.float32), assignment)
  return assignment, summary["cluster_profile"], summary["cluster_deletion_mean"]


def _deletion_value(deletions: np.ndarray) -> np.ndarray:
  """Deletion counts squashed to [0, 1): 2/π arctan(d / 3) (Suppl. Table 1)."""
  return msa_lib.deletion_value(deletions)


def sample_iteration(inputs: Mapping[str, np.ndarray], profile: np.ndarray,
                     config: FeatureConfig, rng: np.random.Generator) -> dict[str, np.ndarray]:
  """One recycling iteration's MSA features (steps 1-5 of the module docstring)."""
  msa, deletions = inputs["msa"], inputs["deletion_matrix"]
  num_seq, num_res = msa.shape
  order = np.concatenate([[0], 1 + rng.permutation(num_seq - 1)]).astype(np.int64)
  num_centres = min(config.max_msa_clusters, num_seq)
  centre_rows, extra_rows = order[:num_centres], order[num_centres:]
  centres, _ = mask_msa(msa[centre_rows], profile, config, rng)
  centre_deletions = deletions[centre_rows]
  extra, extra_deletions = msa[extra_rows], deletions[extra_rows]
  _, cluster_profile, cluster_deletion_mean = cluster_extra_msa(
      centres, centre_deletions, extra, extra_deletions, config.gap_agreement_weight,
      config.cluster_block_rows)
  keep = rng.permutation(extra.shape[0])[:config.max_extra_msa]
  extra, extra_deletions = extra[keep], extra_deletions[keep]
  msa_feat = msa_lib.make_msa_feat(centres, centre_deletions, cluster_profile,
                                   cluster_deletion_mean)
  return {
      "msa_feat": msa_feat.astype(np.float32),
      "msa_mask": np.ones((num_centres, num_res), np.float32),
      "msa_row_mask": np.ones((num_centres,), np.float32),
      "extra_msa": extra.astype(np.int32),
      "extra_msa_mask": np.ones(extra.shape, np.float32),
      "extra_msa_row_mask": np.ones((extra.shape[0],), np.float32),
      "extra_has_deletion": np.clip(extra_deletions, 0.0, 1.0).astype(np.float32),
      "extra_deletion_value": _deletion_value(extra_deletions),
  }


# --- assembly and padding ------------------------------------------------------------------------

def _pad(array: np.ndarray, axis: int, size: int) -> np.ndarray:
  if array.shape[axis] >= size:
    return array
  widths = [(0, 0)] * array.ndim
  widths[axis] = (0, size - array.shape[axis])
  return np.pad(array, widths)


# Axes of the per-iteration features (leading recycle axis excluded): name -> {axis: kind}.
_AXES = {
    "aatype": {0: "res"}, "target_feat": {0: "res"}, "residue_index": {0: "res"},
    "seq_mask": {0: "res"},
    "msa_feat": {0: "msa", 1: "res"}, "msa_mask": {0: "msa", 1: "res"}, "msa_row_mask": {0: "msa"},
    "extra_msa": {0: "extra", 1: "res"}, "extra_msa_mask": {0: "extra", 1: "res"},
    "extra_msa_row_mask": {0: "extra"}, "extra_has_deletion": {0: "extra", 1: "res"},
    "extra_deletion_value": {0: "extra", 1: "res"},
    "template_aatype": {1: "res"}, "template_all_atom_positions": {1: "res"},
    "template_all_atom_masks": {1: "res"}, "template_pseudo_beta": {1: "res"},
    "template_pseudo_beta_mask": {1: "res"},
}


def padded_num_res(num_res: int, multiple: int) -> int:
  return num_res if multiple <= 0 else -(-num_res // multiple) * multiple


def process_features(raw: Mapping[str, np.ndarray], config: FeatureConfig,
                     seed: int = 0) -> dict[str, np.ndarray]:
  """The model's input batch (MODEL_CONTRACT section 3) from raw pipeline features.

  Every array has a leading recycle axis R = num_recycle + 1; `num_iter_recycling` [R] holds
  num_recycle. `seq_length` is the real residue count even when residues are padded.
  """
  inputs = canonical_inputs(raw)
  aatype = inputs["aatype"]
  num_res = aatype.shape[0]
  profile = msa_profile(inputs["msa"])
  num_slices = config.num_recycle + 1
  draws = num_slices if config.resample_msa_in_recycling else 1
  samples = [sample_iteration(inputs, profile, config, np.random.default_rng([seed, i]))
             for i in range(draws)]
  samples += [samples[0]] * (num_slices - draws)

  has_break = np.clip(inputs["between_segment_residues"], 0, 1).astype(np.float32)
  fixed = {
      "aatype": aatype,
      "target_feat": msa_lib.make_target_feat(aatype, has_break),
      "residue_index": inputs["residue_index"],
      "seq_mask": np.ones((num_res,), np.float32),
  }
  if config.use_templates:
    fixed.update(template_features(raw, num_res, config.max_templates))

  sizes = {"res": padded_num_res(num_res, config.num_res_multiple),
           # At least one extra row (mask 0 when padded): an empty axis is not worth a
           # special case in the extra-MSA stack.
           "extra": max(1, config.max_extra_msa if config.pad_msa_rows
                        else samples[0]["extra_msa"].shape[0]),
           "msa": (config.max_msa_clusters if config.pad_msa_rows
                   else samples[0]["msa_feat"].shape[0])}

  def padded(name: str, value: np.ndarray) -> np.ndarray:
    for axis, kind in _AXES.get(name, {}).items():
      value = _pad(value, axis, sizes[kind])
    return value

  batch = {name: np.broadcast_to(padded(name, value), (num_slices,) + padded(name, value).shape)
           for name, value in fixed.items()}
  for name in samples[0]:
    batch[name] = np.stack([padded(name, sample[name]) for sample in samples])
  batch["seq_length"] = np.full((num_slices,), num_res, np.int32)
  batch["num_iter_recycling"] = np.full((num_slices,), config.num_recycle, np.int32)
  return {name: np.ascontiguousarray(value) for name, value in batch.items()}
