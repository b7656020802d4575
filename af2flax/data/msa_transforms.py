"""Per-recycling-iteration MSA transforms as TensorFlow graph ops (stateless random).

For every recycling iteration (AlphaFold resamples the MSA in each one) these draw the cluster
centres, corrupt them for the masked-MSA loss, assign every other sequence to its nearest
centre, summarise the clusters and build `msa_feat` / the extra-MSA features (Jumper et al.
(2021) Suppl. 1.2.7, 1.2.9, Table 1).

Why TensorFlow and not numpy: these are the expensive transforms (the nearest-neighbour
assignment is a [N_seq, N_res*21] x [N_res*21, N_clust] matmul per iteration); tf.data runs
graph ops on its thread pool without the GIL, and `tf.random.stateless_*` with a per-example
seed makes every draw a pure function of (seed, example, iteration): the same seed gives the
same batches on any number of threads. The R iterations are computed together, vectorised over
a leading sample axis, with one agreement matmul against all iterations' centres (the extra
sequences are the same raw MSA rows in every iteration; only the centres change).
"""

from __future__ import annotations

import math

import ml_collections
import numpy as np
import tensorflow as tf

from af2flax.data import config as data_config

NUM_MSA_CLASSES = 23      # 20 amino acids, X, gap, mask token
MASK_TOKEN = 22
GAP_INDEX = 21
# Column block of the agreement matmul: every count <= 256 is exactly representable in bfloat16.
_AGREEMENT_COLUMN_BLOCK = 256

# Stream ids folded into the example's seed, one per random decision.
_PERMUTE, _MASK_POSITION, _MASK_VALUE, _EXTRA_SUBSET = 1, 2, 3, 4


def _fold(seed: tf.Tensor, stream: int | tf.Tensor) -> tf.Tensor:
  return tf.random.experimental.stateless_fold_in(seed, stream)


def sample_cluster_centres(num_seq: tf.Tensor, num_samples: int, num_clusters: int,
                           seed: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
  """Row indices of (centres [S, M], extra [S, N - M]) for S independent MSA samples.

  Jumper et al. (2021) Suppl. 1.2.7: `max_msa_clusters` sequences are drawn without
  replacement as cluster centres, the first always being the query; the others form the
  extra MSA. M = min(max_msa_clusters, N).
  """
  keys = tf.random.stateless_uniform([num_samples, num_seq - 1], seed=seed)
  shuffled = 1 + tf.argsort(keys, axis=1, stable=True)
  order = tf.concat([tf.zeros([num_samples, 1], tf.int32), tf.cast(shuffled, tf.int32)], axis=1)
  num_selected = tf.minimum(num_clusters, num_seq)
  return order[:, :num_selected], order[:, num_selected:]


def mask_msa(msa: tf.Tensor, profile: tf.Tensor, config: ml_collections.ConfigDict,
             replace_fraction: float, seed: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
  """Masked-MSA (BERT) corruption of the cluster centres: (corrupted msa, bert_mask).

  Jumper et al. (2021) Suppl. 1.2.7: each position is selected with probability
  `replace_fraction` (15%); a selected residue becomes a uniformly random amino acid
  (`uniform_prob`), a draw from the column profile (`profile_prob`), stays unchanged
  (`same_prob`) or becomes the mask token (the remaining probability).
  msa [..., L] int32, profile [L, 22] -> corrupted msa, bert_mask float32 of msa's shape.
  """
  mask_prob = 1.0 - config.uniform_prob - config.profile_prob - config.same_prob
  if mask_prob < 0:
    raise ValueError(f"masked_msa probabilities sum to more than 1: {config}")
  selected = tf.random.stateless_uniform(tf.shape(msa), seed=_fold(seed, _MASK_POSITION)) \
      < replace_fraction
  # Replacement draws only where a position is selected (15%): the same distribution as
  # drawing everywhere and keeping the selected ones, at a sixth of the cost.
  positions = tf.where(selected)                                            # [K, rank]
  tokens = tf.gather_nd(msa, positions)
  columns = positions[:, -1]
  uniform = tf.constant([1.0 / 20] * 20 + [0.0, 0.0], tf.float32)
  probs = (config.uniform_prob * uniform + config.profile_prob * tf.gather(profile, columns)
           + config.same_prob * tf.one_hot(tokens, 22))
  probs = tf.concat([probs, tf.fill([tf.shape(tokens)[0], 1], mask_prob)], axis=-1)
  replacement = tf.random.stateless_categorical(tf.math.log(probs + 1e-10), 1,
                                                seed=_fold(seed, _MASK_VALUE), dtype=tf.int32)
  corrupted = tf.tensor_scatter_nd_update(msa, positions, replacement[:, 0])
  return corrupted, tf.cast(selected, tf.float32)


def _agreement_one_hot(msa: tf.Tensor, weights: np.ndarray, num_column_blocks: tf.Tensor,
                       dtype: tf.DType) -> tf.Tensor:
  """[rows, L] tokens -> [num_column_blocks, rows, block * C] weighted one-hot, zero-padded."""
  num_classes = len(weights)
  length = tf.shape(msa)[1]
  block = -(-length // num_column_blocks)
  # MASK_TOKEN lies outside the C classes, so its one-hot (and the padding's) is all zero.
  msa = tf.pad(msa, [[0, 0], [0, block * num_column_blocks - length]], constant_values=MASK_TOKEN)
  one_hot = tf.one_hot(msa, num_classes, dtype=dtype) * tf.constant(weights, dtype)
  one_hot = tf.reshape(one_hot, [tf.shape(msa)[0], num_column_blocks, block * num_classes])
  return tf.transpose(one_hot, [1, 0, 2])


def nearest_cluster_agreement(msa: tf.Tensor, centres: tf.Tensor, gap_agreement_weight: float,
                              dtype: str = "float32", block_rows: int = 1024) -> tf.Tensor:
  """Weighted number of agreeing positions between every MSA row and every centre [N, K].

  Jumper et al. (2021) Suppl. 1.2.7: sequences are assigned to the centre with the smallest
  Hamming distance; AlphaFold scores agreements on amino acids (and X) with weight 1, on gaps
  with `gap_agreement_weight` and on the centres' mask tokens with 0 (the one-hot matmul of
  its nearest_neighbor_clusters). Computed block-wise over rows (bounded memory). In bfloat16
  (2x faster on CPUs with AVX512-BF16 or AMX) the columns are split into blocks of at most 256,
  whose partial counts are exact bfloat16 integers, and summed in float32: the result is exact.
  """
  weights = np.ones(21, np.float32)
  if gap_agreement_weight:
    weights = np.concatenate([weights, [np.float32(gap_agreement_weight)]])
  compute_dtype = tf.as_dtype(dtype)
  length = tf.shape(msa)[1]
  num_column_blocks = 1 if compute_dtype == tf.float32 else -(-length // _AGREEMENT_COLUMN_BLOCK)
  centres_one_hot = _agreement_one_hot(centres, weights, num_column_blocks, compute_dtype)
  num_seq = tf.shape(msa)[0]
  num_blocks = tf.maximum(1, -(-num_seq // block_rows))
  rows_per_block = -(-num_seq // num_blocks)   # <= block_rows, and no block of pure padding
  rows = tf.pad(msa, [[0, num_blocks * rows_per_block - num_seq], [0, 0]],
                constant_values=MASK_TOKEN)
  rows = tf.reshape(rows, [num_blocks, rows_per_block, length])

  def block_agreement(block: tf.Tensor) -> tf.Tensor:
    block_one_hot = _agreement_one_hot(block, np.ones_like(weights), num_column_blocks,
                                       compute_dtype)
    partial = tf.matmul(block_one_hot, centres_one_hot, transpose_b=True)   # [B, rows, K]
    return tf.reduce_sum(tf.cast(partial, tf.float32), axis=0)

  agreement = tf.map_fn(block_agreement, rows, parallel_iterations=1,
                        fn_output_signature=tf.TensorSpec([None, None], tf.float32))
  return tf.reshape(agreement, [-1, tf.shape(centres)[0]])[:num_seq]


def summarize_clusters(centre_msa: tf.Tensor, centre_deletions: tf.Tensor, extra_msa: tf.Tensor,
                       extra_deletions: tf.Tensor, assignment: tf.Tensor) -> dict[str, tf.Tensor]:
  """Cluster profile [M, L, 23] and mean deletion count [M, L] of every cluster.

  Jumper et al. (2021) Suppl. 1.2.7 / Table 1 (`cluster_profile`, `cluster_deletion_mean`):
  averages over the centre (its corrupted sequence) and the extra sequences assigned to it.
  Uses segment sums over (cluster, column, class) indices instead of one-hot tensors.
  """
  num_clusters = tf.shape(centre_msa)[0]
  length = tf.shape(centre_msa)[1]
  counts = 1.0 + 1e-6 + tf.math.unsorted_segment_sum(
      tf.ones_like(assignment, tf.float32), assignment, num_clusters)          # [M]
  columns = tf.range(length)[None, :]
  flat_index = (assignment[:, None] * length + columns) * NUM_MSA_CLASSES + extra_msa
  profile_sum = tf.math.unsorted_segment_sum(
      tf.ones_like(flat_index, tf.float32), flat_index, num_clusters * length * NUM_MSA_CLASSES)
  profile_sum = tf.reshape(profile_sum, [num_clusters, length, NUM_MSA_CLASSES])
  profile_sum += tf.one_hot(centre_msa, NUM_MSA_CLASSES)
  deletion_sum = tf.math.unsorted_segment_sum(extra_deletions, assignment, num_clusters)
  deletion_sum += centre_deletions
  return {"cluster_profile": profile_sum / counts[:, None, None],
          "cluster_deletion_mean": deletion_sum / counts[:, None]}


def deletion_value(deletions: tf.Tensor) -> tf.Tensor:
  """Deletion count squashed to [0, 1): 2/pi * arctan(d / 3) (Jumper et al. (2021) Table 1)."""
  return tf.atan(deletions / 3.0) * (2.0 / math.pi)


def make_msa_feat(msa: tf.Tensor, deletions: tf.Tensor, cluster_profile: tf.Tensor,
                  cluster_deletion_mean: tf.Tensor) -> tf.Tensor:
  """The 49 `msa_feat` channels (Jumper et al. (2021) Suppl. 1.2.9, Table 1), AlphaFold's order.

  cluster_msa one-hot (23), cluster_has_deletion (1), cluster_deletion_value (1),
  cluster_profile (23), cluster_deletion_mean (1, squashed like deletion_value).
  """
  return tf.concat([
      tf.one_hot(msa, NUM_MSA_CLASSES),
      tf.clip_by_value(deletions, 0.0, 1.0)[..., None],
      deletion_value(deletions)[..., None],
      cluster_profile,
      deletion_value(cluster_deletion_mean)[..., None],
  ], axis=-1)


def make_target_feat(aatype: tf.Tensor, between_segment_residues: tf.Tensor) -> tf.Tensor:
  """The 22 `target_feat` channels: has_break (1) and aatype one-hot with X (21) (Table 1)."""
  has_break = tf.clip_by_value(tf.cast(between_segment_residues, tf.float32), 0.0, 1.0)
  return tf.concat([has_break[..., None], tf.one_hot(aatype, 21)], axis=-1)


def pad_to(value: tf.Tensor, shape: tuple[int, ...]) -> tf.Tensor:
  """Zero-pads every axis of `value` up to the static `shape` (AlphaFold's make_fixed_size)."""
  if not shape:
    return tf.reshape(value, [])
  paddings = [[0, size - tf.shape(value)[axis]] for axis, size in enumerate(shape)]
  padded = tf.pad(value, paddings)
  padded.set_shape(shape)
  return padded


def msa_features_per_iteration(msa: tf.Tensor, deletion_matrix: tf.Tensor, profile: tf.Tensor,
                               crop_start: tf.Tensor, num_res: tf.Tensor, seed: tf.Tensor,
                               config: ml_collections.ConfigDict) -> dict[str, tf.Tensor]:
  """All MSA-derived batch arrays for the R = num_recycle + 1 iterations, padded.

  msa, deletion_matrix [N, L_full] (full length), profile [L_full, 22], the crop window
  (crop_start, num_res) and the example's stateless seed [2] -> msa_feat [R, M, C, 49],
  true_msa, bert_mask, msa_mask [R, M, C], msa_row_mask [R, M], extra_msa, extra_msa_mask,
  extra_has_deletion, extra_deletion_value [R, E, C], extra_msa_row_mask [R, E] with C the crop
  size, M `max_msa_clusters`, E `max_extra_msa` (Suppl. 1.2.7, 1.2.9). Each iteration has its
  own sample (Suppl. 1.10, `resample_msa_in_recycling`); all are computed at once, with one
  agreement matmul against the centres of every iteration.
  """
  common, train = config.common, config.train
  num_iterations = common.num_recycle + 1
  num_samples = num_iterations if common.resample_msa_in_recycling else 1
  max_clusters = data_config.num_msa_rows(config)
  crop_size, max_extra = train.crop_size, common.max_extra_msa
  num_seq = tf.shape(msa)[0]

  centres, extra = sample_cluster_centres(num_seq, num_samples, max_clusters, _fold(seed, _PERMUTE))
  num_clusters, num_extra = tf.shape(centres)[1], tf.shape(extra)[1]
  true_msa = tf.gather(msa, centres)                                   # [S, M, L_full]
  corrupted, bert_mask = mask_msa(true_msa, profile, common.masked_msa,
                                  common.masked_msa_replace_fraction, seed)

  def crop(value: tf.Tensor) -> tf.Tensor:
    return value[..., crop_start:crop_start + num_res]

  msa_cropped, deletions_cropped = crop(msa), crop(deletion_matrix)
  centre_msa = crop(corrupted)                                         # [S, M, C]
  centre_deletions = tf.gather(deletions_cropped, centres)
  extra_msa = tf.gather(msa_cropped, extra)                            # [S, N - M, C]
  extra_deletions = tf.gather(deletions_cropped, extra)
  if common.msa_cluster_features:
    agreement = nearest_cluster_agreement(
        msa, tf.reshape(corrupted, [-1, tf.shape(msa)[1]]), common.gap_agreement_weight,
        common.cluster_matmul_dtype, common.cluster_block_rows)       # [N, S * M]
    agreement = tf.transpose(tf.reshape(agreement, [num_seq, num_samples, num_clusters]), [1, 0, 2])
    assignment = tf.argmax(tf.gather(agreement, extra, batch_dims=1), axis=2,
                           output_type=tf.int32)                       # [S, N - M]
    # One segment space for all samples: cluster m of sample s is segment s * M + m.
    segments = assignment + num_clusters * tf.range(num_samples)[:, None]
    # Explicit sizes: the extra MSA may be empty, where a -1 reshape cannot infer the length.
    clusters = summarize_clusters(
        tf.reshape(centre_msa, [num_samples * num_clusters, num_res]),
        tf.reshape(centre_deletions, [num_samples * num_clusters, num_res]),
        tf.reshape(extra_msa, [num_samples * num_extra, num_res]),
        tf.reshape(extra_deletions, [num_samples * num_extra, num_res]),
        tf.reshape(segments, [-1]))
    shape = tf.shape(centre_msa)
    msa_feat = make_msa_feat(
        centre_msa, centre_deletions,
        tf.reshape(clusters["cluster_profile"], tf.concat([shape, [NUM_MSA_CLASSES]], 0)),
        tf.reshape(clusters["cluster_deletion_mean"], shape))
  else:
    msa_feat = tf.concat([tf.one_hot(centre_msa, NUM_MSA_CLASSES),
                          tf.clip_by_value(centre_deletions, 0.0, 1.0)[..., None],
                          deletion_value(centre_deletions)[..., None]], axis=-1)
  # AlphaFold keeps a random subset of max_extra_msa extra sequences, after clustering.
  subset_keys = tf.random.stateless_uniform([num_samples, num_extra], seed=_fold(seed, _EXTRA_SUBSET))
  subset = tf.argsort(subset_keys, axis=1, stable=True)[:, :max_extra]
  extra_msa = tf.gather(extra_msa, subset, batch_dims=1)
  extra_deletions = tf.gather(extra_deletions, subset, batch_dims=1)
  rows = (num_samples, max_clusters, crop_size)
  extra_rows = (num_samples, max_extra, crop_size)
  features = {
      "msa_feat": pad_to(msa_feat, rows + (msa_feat.shape[-1],)),
      "true_msa": pad_to(crop(true_msa), rows),
      "bert_mask": pad_to(crop(bert_mask), rows),
      "msa_mask": pad_to(tf.ones_like(centre_deletions), rows),
      "msa_row_mask": pad_to(tf.ones([num_samples, num_clusters]), rows[:2]),
      "extra_msa": pad_to(extra_msa, extra_rows),
      "extra_msa_mask": pad_to(tf.ones_like(extra_deletions), extra_rows),
      "extra_msa_row_mask": pad_to(tf.ones(tf.shape(extra_msa)[:2]), extra_rows[:2]),
      "extra_has_deletion": pad_to(tf.clip_by_value(extra_deletions, 0.0, 1.0), extra_rows),
      "extra_deletion_value": pad_to(deletion_value(extra_deletions), extra_rows),
  }
  if num_samples != num_iterations:  # one MSA sample shared by every iteration
    features = {key: tf.repeat(value, num_iterations, axis=0) for key, value in features.items()}
  return features
