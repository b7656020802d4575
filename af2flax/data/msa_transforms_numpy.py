"""Per-recycling-iteration MSA transforms in numpy: the TensorFlow-free backend.

The same algorithms, output keys, dtypes and shapes as msa_transforms.py (the tf.data backend),
for hosts without TensorFlow (GPU images): for every recycling iteration the cluster centres are
drawn, corrupted for the masked-MSA loss, every other sequence joins its nearest centre, the
clusters are summarised and `msa_feat` / the extra-MSA features are built (Jumper et al. (2021)
Suppl. 1.2.7, 1.2.9, Table 1). The inference feature processing (af2flax/inference) uses the same
functions.

Randomness: one numpy Generator per random decision, seeded by the example's seed [2] (the one
the TF backend uses for its stateless ops) and the decision's stream id, so an example is a pure
function of its seed on any number of threads or processes. The draws differ from TensorFlow's
(another generator) but have the same distributions; given the same draws (`MsaSamples`) the
features equal the TF backend's (tests/data/test_msa_transforms_numpy.py).

Cost: the nearest-centre assignment is one float32 BLAS matmul [N, 21 L] x [21 L, S M] over all
iterations' centres at once (BLAS releases the GIL, so worker threads overlap it).
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import ml_collections
import numpy as np

from af2flax.data import config as data_config

NUM_MSA_CLASSES = 23      # 20 amino acids, X, gap, mask token
MASK_TOKEN = 22
GAP_INDEX = 21
NUM_MSA_FEAT = 49
# Stream ids of the random decisions (seeded with the example's seed).
_PERMUTE, _MASK, _EXTRA_SUBSET = 1, 2, 4


def stream_rng(seed: Sequence[int] | np.ndarray, stream: int) -> np.random.Generator:
  """The Generator of one random decision of an example with seed [2]."""
  return np.random.default_rng([int(value) for value in np.asarray(seed).reshape(-1)] + [stream])


def one_hot(tokens: np.ndarray, depth: int = NUM_MSA_CLASSES,
            weights: np.ndarray | None = None) -> np.ndarray:
  """float32 one-hot [..., depth]; tokens >= depth give all-zero rows; optional class weights."""
  tokens = np.asarray(tokens)
  out = np.zeros(tokens.shape + (depth,), np.float32)
  flat_tokens = tokens.reshape(-1)
  rows = np.flatnonzero(flat_tokens < depth)
  values = 1.0 if weights is None else np.asarray(weights, np.float32)[flat_tokens[rows]]
  out.reshape(-1)[rows * depth + flat_tokens[rows]] = values
  return out


def sample_cluster_centres(num_seq: int, num_samples: int, num_clusters: int,
                           rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
  """Row indices of (centres [S, M], extra [S, N - M]) for S independent MSA samples.

  Jumper et al. (2021) Suppl. 1.2.7: `max_msa_clusters` sequences are drawn without replacement
  as cluster centres, the first always being the query; the others form the extra MSA.
  M = min(max_msa_clusters, N).
  """
  order = np.zeros((num_samples, num_seq), np.int64)
  for sample in range(num_samples):
    order[sample, 1:] = 1 + rng.permutation(num_seq - 1)
  selected = min(num_clusters, num_seq)
  return order[:, :selected], order[:, selected:]


def mask_msa(msa: np.ndarray, profile: np.ndarray, rng: np.random.Generator, *,
             replace_fraction: float, uniform_prob: float, profile_prob: float,
             same_prob: float) -> tuple[np.ndarray, np.ndarray]:
  """Masked-MSA (BERT) corruption: (corrupted msa, bert_mask float32), both of msa's shape.

  Jumper et al. (2021) Suppl. 1.2.7: each position is selected with probability
  `replace_fraction` (15%); a selected residue becomes a uniformly random amino acid
  (`uniform_prob`), a draw from its column's profile [L, 22] (`profile_prob`), stays unchanged
  (`same_prob`) or becomes the mask token (the remaining probability). Replacements are drawn for
  the selected positions only (same distribution, a sixth of the draws).
  """
  mask_prob = 1.0 - uniform_prob - profile_prob - same_prob
  if mask_prob < -1e-9:
    raise ValueError(f"masked-MSA probabilities sum to more than 1: uniform {uniform_prob}, "
                     f"profile {profile_prob}, same {same_prob}")
  selected = rng.random(msa.shape, dtype=np.float32) < replace_fraction
  positions = np.nonzero(selected)
  corrupted = np.array(msa, np.int32)
  count = positions[0].size
  if count:
    tokens = corrupted[positions]
    probs = np.zeros((count, NUM_MSA_CLASSES), np.float64)
    probs[:, :20] = uniform_prob / 20.0
    probs[:, :22] += profile_prob * np.asarray(profile, np.float64)[positions[-1]]
    probs[np.arange(count), tokens] += same_prob
    probs[:, MASK_TOKEN] += max(mask_prob, 0.0)
    cumulative = np.cumsum(probs, axis=-1)
    draws = rng.random((count, 1)) * cumulative[:, -1:]
    corrupted[positions] = np.minimum(np.sum(cumulative <= draws, axis=-1), MASK_TOKEN)
  return corrupted, selected.astype(np.float32)


def nearest_cluster_agreement(msa: np.ndarray, centres: np.ndarray, gap_agreement_weight: float,
                              block_rows: int = 1024) -> np.ndarray:
  """Weighted number of agreeing positions between every MSA row and every centre [N, K].

  Jumper et al. (2021) Suppl. 1.2.7: sequences are assigned to the centre with the smallest
  Hamming distance; amino acids and X agree with weight 1, gaps with `gap_agreement_weight`,
  the centres' mask tokens with 0 (AlphaFold's one-hot matmul). float32 BLAS, block-wise over
  rows (bounded memory); counts are integers (or halves) far below 2**24, hence exact.
  """
  num_classes = 22 if gap_agreement_weight else 21
  weights = np.ones(num_classes, np.float32)
  if gap_agreement_weight:
    weights[GAP_INDEX] = gap_agreement_weight
  num_res = msa.shape[1]
  centres_t = np.ascontiguousarray(
      one_hot(centres, num_classes, weights).reshape(centres.shape[0], num_res * num_classes).T)
  agreement = np.empty((msa.shape[0], centres.shape[0]), np.float32)
  for start in range(0, msa.shape[0], block_rows):
    block = one_hot(msa[start:start + block_rows], num_classes)
    np.matmul(block.reshape(block.shape[0], -1), centres_t,
              out=agreement[start:start + block.shape[0]])
  return agreement


def summarize_clusters(centre_msa: np.ndarray, centre_deletions: np.ndarray,
                       extra_msa: np.ndarray, extra_deletions: np.ndarray,
                       assignment: np.ndarray) -> dict[str, np.ndarray]:
  """Cluster profile [M, L, 23] and mean deletion count [M, L] of every cluster (float32).

  Jumper et al. (2021) Suppl. 1.2.7 / Table 1 (`cluster_profile`, `cluster_deletion_mean`):
  averages over the centre (its corrupted sequence) and the extra sequences assigned to it
  (count + 1e-6 in the denominator, as AlphaFold). Bin counts instead of one-hot tensors; float32
  arithmetic in the TF backend's order, so both give the same values.
  """
  num_clusters, num_res = centre_msa.shape
  assignment = np.asarray(assignment, np.int64)
  members = np.bincount(assignment, minlength=num_clusters).astype(np.float32)
  counts = np.float32(1.0 + 1e-6) + members                                       # [M]
  cells = assignment[:, None] * num_res + np.arange(num_res)                      # [E, L]
  profile = np.bincount((cells * NUM_MSA_CLASSES + extra_msa).ravel(),
                        minlength=num_clusters * num_res * NUM_MSA_CLASSES).astype(np.float32)
  profile = profile.reshape(num_clusters, num_res, NUM_MSA_CLASSES)
  profile += one_hot(centre_msa)
  deletion_sum = np.bincount(cells.ravel(), weights=np.asarray(extra_deletions).ravel(),
                             minlength=num_clusters * num_res).astype(np.float32)
  deletion_sum = deletion_sum.reshape(num_clusters, num_res) + centre_deletions
  return {"cluster_profile": profile / counts[:, None, None],
          "cluster_deletion_mean": (deletion_sum / counts[:, None]).astype(np.float32)}


def deletion_value(deletions: np.ndarray) -> np.ndarray:
  """Deletion count squashed to [0, 1): 2/pi * arctan(d / 3) (Jumper et al. (2021) Table 1)."""
  deletions = np.asarray(deletions, np.float32)
  return np.arctan(deletions / np.float32(3.0)) * np.float32(2.0 / np.pi)


def make_msa_feat(msa: np.ndarray, deletions: np.ndarray, cluster_profile: np.ndarray | None,
                  cluster_deletion_mean: np.ndarray | None, out: np.ndarray | None = None
                  ) -> np.ndarray:
  """The 49 `msa_feat` channels (Jumper et al. (2021) Suppl. 1.2.9, Table 1), AlphaFold's order.

  cluster_msa one-hot (23), cluster_has_deletion (1), cluster_deletion_value (1),
  cluster_profile (23), cluster_deletion_mean (1, squashed like deletion_value); without cluster
  features only the first 25. `out`: a zero array to write into (e.g. a slice of the padded
  output, avoiding a copy).
  """
  channels = 25 if cluster_profile is None else NUM_MSA_FEAT
  if out is None:
    out = np.zeros(msa.shape + (channels,), np.float32)
  out[..., :23] = one_hot(msa)
  out[..., 23] = np.clip(deletions, 0.0, 1.0)
  out[..., 24] = deletion_value(deletions)
  if cluster_profile is not None:
    out[..., 25:48] = cluster_profile
    out[..., 48] = deletion_value(cluster_deletion_mean)
  return out


def make_target_feat(aatype: np.ndarray, between_segment_residues: np.ndarray) -> np.ndarray:
  """The 22 `target_feat` channels: has_break (1) and aatype one-hot with X (21) (Table 1)."""
  has_break = np.clip(np.asarray(between_segment_residues, np.float32), 0.0, 1.0)
  return np.concatenate([has_break[..., None], one_hot(aatype, 21)], axis=-1)


def pad_to(value: np.ndarray, shape: tuple[int, ...], dtype=None) -> np.ndarray:
  """Zero-pads every axis of `value` up to `shape` (AlphaFold's make_fixed_size)."""
  value = np.asarray(value)
  padded = np.zeros(shape, dtype or value.dtype)
  padded[tuple(slice(0, size) for size in value.shape)] = value
  return padded


@dataclasses.dataclass(frozen=True)
class MsaSamples:
  """The random draws of the S MSA samples of one example (S = iterations, or 1).

  centres [S, M] and extra [S, N - M] row indices, the corrupted centres [S, M, L] (full length)
  with their bert_mask, and extra_subset [S, <= max_extra_msa]: the extra rows kept (indices
  into `extra`, in output order).
  """
  centres: np.ndarray
  extra: np.ndarray
  corrupted: np.ndarray
  bert_mask: np.ndarray
  extra_subset: np.ndarray


def num_msa_samples(config: ml_collections.ConfigDict) -> int:
  """MSA samples per example: one per iteration with `resample_msa_in_recycling`, else one."""
  return config.common.num_recycle + 1 if config.common.resample_msa_in_recycling else 1


def draw_samples(msa: np.ndarray, profile: np.ndarray, seed: np.ndarray,
                 config: ml_collections.ConfigDict) -> MsaSamples:
  """The random part of `msa_features_per_iteration`: centres, masking, extra-MSA subset."""
  common = config.common
  num_samples = num_msa_samples(config)
  centres, extra = sample_cluster_centres(msa.shape[0], num_samples,
                                          data_config.num_msa_rows(config),
                                          stream_rng(seed, _PERMUTE))
  masked = common.masked_msa
  corrupted, bert_mask = mask_msa(
      msa[centres], profile, stream_rng(seed, _MASK),
      replace_fraction=common.masked_msa_replace_fraction, uniform_prob=masked.uniform_prob,
      profile_prob=masked.profile_prob, same_prob=masked.same_prob)
  # AlphaFold keeps a random subset of max_extra_msa extra sequences, after clustering.
  subset_rng = stream_rng(seed, _EXTRA_SUBSET)
  num_extra = extra.shape[1]
  subset = np.stack([subset_rng.permutation(num_extra)[:common.max_extra_msa]
                     for _ in range(num_samples)]).reshape(num_samples, -1)
  return MsaSamples(centres=centres, extra=extra, corrupted=corrupted, bert_mask=bert_mask,
                    extra_subset=subset)


def msa_features_from_samples(msa: np.ndarray, deletion_matrix: np.ndarray, crop_start: int,
                              num_res: int, samples: MsaSamples,
                              config: ml_collections.ConfigDict) -> dict[str, np.ndarray]:
  """The deterministic part of `msa_features_per_iteration`, given the draws (its Args/Returns).

  Clustering uses the full-length MSA (AlphaFold assigns before cropping); every output is
  cropped to [crop_start, crop_start + num_res) and zero-padded.
  """
  common, train = config.common, config.train
  num_iterations = common.num_recycle + 1
  num_samples, num_clusters = samples.centres.shape
  max_clusters, crop_size, max_extra = (data_config.num_msa_rows(config), train.crop_size,
                                        common.max_extra_msa)
  window = slice(int(crop_start), int(crop_start) + int(num_res))
  msa_cropped = np.ascontiguousarray(msa[:, window])
  deletions_cropped = np.ascontiguousarray(deletion_matrix[:, window], dtype=np.float32)
  centre_msa = samples.corrupted[:, :, window]                       # [S, M, C]
  centre_deletions = deletions_cropped[samples.centres]              # [S, M, C]
  channels = NUM_MSA_FEAT if common.msa_cluster_features else 25
  msa_feat = np.zeros((num_samples, max_clusters, crop_size, channels), np.float32)
  feat_view = msa_feat[:, :num_clusters, :num_res]
  if common.msa_cluster_features:
    agreement = nearest_cluster_agreement(
        msa, samples.corrupted.reshape(num_samples * num_clusters, -1),
        common.gap_agreement_weight, common.cluster_block_rows)     # [N, S * M]
    for sample in range(num_samples):
      extra = samples.extra[sample]
      columns = slice(sample * num_clusters, (sample + 1) * num_clusters)
      assignment = np.argmax(agreement[extra, columns], axis=1)
      clusters = summarize_clusters(centre_msa[sample], centre_deletions[sample],
                                    msa_cropped[extra], deletions_cropped[extra], assignment)
      make_msa_feat(centre_msa[sample], centre_deletions[sample], clusters["cluster_profile"],
                    clusters["cluster_deletion_mean"], out=feat_view[sample])
  else:
    make_msa_feat(centre_msa, centre_deletions, None, None, out=feat_view)
  kept = np.take_along_axis(samples.extra, samples.extra_subset, axis=1)   # [S, E']
  extra_msa, extra_deletions = msa_cropped[kept], deletions_cropped[kept]
  rows = (num_samples, max_clusters, crop_size)
  extra_rows = (num_samples, max_extra, crop_size)
  true_msa = msa[:, window][samples.centres]
  features = {
      "msa_feat": msa_feat,
      "true_msa": pad_to(true_msa, rows, np.int32),
      "bert_mask": pad_to(samples.bert_mask[:, :, window], rows, np.float32),
      "msa_mask": pad_to(np.ones(centre_deletions.shape, np.float32), rows),
      "msa_row_mask": pad_to(np.ones((num_samples, num_clusters), np.float32), rows[:2]),
      "extra_msa": pad_to(extra_msa, extra_rows, np.int32),
      "extra_msa_mask": pad_to(np.ones(extra_msa.shape, np.float32), extra_rows),
      "extra_msa_row_mask": pad_to(np.ones(extra_msa.shape[:2], np.float32), extra_rows[:2]),
      "extra_has_deletion": pad_to(np.clip(extra_deletions, 0.0, 1.0), extra_rows, np.float32),
      "extra_deletion_value": pad_to(deletion_value(extra_deletions), extra_rows, np.float32),
  }
  if num_samples != num_iterations:  # one MSA sample shared by every iteration
    features = {key: np.repeat(value, num_iterations, axis=0) for key, value in features.items()}
  return features


def msa_features_per_iteration(msa: np.ndarray, deletion_matrix: np.ndarray,
                               profile: np.ndarray, crop_start: int, num_res: int,
                               seed: np.ndarray, config: ml_collections.ConfigDict
                               ) -> dict[str, np.ndarray]:
  """All MSA-derived batch arrays for the R = num_recycle + 1 iterations, padded.

  msa, deletion_matrix [N, L_full] (full length), profile [L_full, 22], the crop window
  (crop_start, num_res) and the example's seed [2] -> msa_feat [R, M, C, 49], true_msa,
  bert_mask, msa_mask [R, M, C], msa_row_mask [R, M], extra_msa, extra_msa_mask,
  extra_has_deletion, extra_deletion_value [R, E, C], extra_msa_row_mask [R, E] with C the crop
  size, M `max_msa_clusters`, E `max_extra_msa` (Suppl. 1.2.7, 1.2.9). Each iteration has its
  own sample (Suppl. 1.10, `resample_msa_in_recycling`). As msa_transforms.py's TF op.
  """
  msa = np.asarray(msa, np.int32)
  samples = draw_samples(msa, profile, seed, config)
  return msa_features_from_samples(msa, deletion_matrix, crop_start, num_res, samples, config)
