"""The data section of the training config: sampling and transforms of the training input.

AlphaFold's values (Jumper et al. (2021) Suppl. 1.2, Table 4 and `alphafold/model/config.py`
`data.*`). Two presets:

  get_config("initial_training")   crop 256, 128 MSA clusters, 1024 extra sequences
  get_config("finetuning")         crop 384, 512 MSA clusters, 5120 extra sequences

A training preset (configs/*.py) embeds it as `config.data = data_config.get_config(...)` and
changes single fields on top (`config.data.train.crop_size = 128`).
"""

from __future__ import annotations

import ml_collections

STAGES = ("initial_training", "finetuning")


def get_config(stage: str = "initial_training") -> ml_collections.ConfigDict:
  """The data config for one training stage (Jumper et al. (2021) Suppl. Table 4)."""
  if stage not in STAGES:
    raise ValueError(f"Unknown training stage {stage!r}; expected one of {STAGES}")
  config = ml_collections.ConfigDict({
      # The implementation of the input pipeline: 'tf' (tf.data with TF graph ops), 'numpy' (a
      # worker pool and numpy transforms; no TensorFlow, for GPU images) or 'auto' (tf when
      # TensorFlow is importable, else numpy). Both give batches of the same keys, shapes and
      # distributions; their random draws differ (so a run resumed on the other backend does
      # not repeat the batches an uninterrupted run would have seen).
      "backend": "auto",
      "common": {
          # Number of recycling iterations (Suppl. 1.10): the network sees num_recycle + 1
          # MSA samples, one per iteration (leading axis R of every batch array).
          "num_recycle": 3,
          "resample_msa_in_recycling": True,
          # Masked MSA (BERT) corruption, Suppl. 1.2.7: of the selected positions, 10% become a
          # uniformly random amino acid, 10% a draw from the column profile, 10% stay unchanged,
          # the remaining 70% the mask token.
          "masked_msa": {
              "uniform_prob": 0.1,
              "profile_prob": 0.1,
              "same_prob": 0.1,
          },
          "masked_msa_replace_fraction": 0.15,
          # MSA clustering, Suppl. 1.2.7 / Table 1 (cluster_profile, cluster_deletion_mean).
          "msa_cluster_features": True,
          # Weight of gap-gap agreement in the nearest-neighbour Hamming similarity (AlphaFold
          # down-weights it to zero: gap agreement is mostly spurious).
          "gap_agreement_weight": 0.0,
          # dtype of the one-hot matmul that assigns extra sequences to cluster centres:
          # 'float32', or 'bfloat16' (exact as well: counts are summed over <=256-column blocks,
          # where every integer is a bfloat16 value; 2x faster on CPUs with AVX512-BF16).
          "cluster_matmul_dtype": "float32",
          # Rows of the extra-sequence MSA processed per matmul block (bounds host memory).
          "cluster_block_rows": 1024,
          "max_extra_msa": 1024,
          # AlphaFold's model_1/2 inference configs reserve MSA rows for template torsions;
          # training at Table 4 shapes uses all max_msa_clusters rows for the MSA.
          "reduce_msa_clusters_by_max_templates": False,
          "use_templates": True,
      },
      "train": {
          # Contiguous crop of the residue dimension, Suppl. 1.2.8.
          "crop_size": 256,
          "max_msa_clusters": 128,
          "max_templates": 4,
          # Templates are drawn from the top hits only (Suppl. 1.2.3: top 20 hits).
          "max_template_hits": 20,
          # Random number of templates min(Uniform{0..N}, max_templates), Suppl. 1.2.3.
          "subsample_templates": True,
          # MSA block deletion, Suppl. 1.2.6 Alg. 1.
          "block_delete_msa": {
              "enabled": True,
              "msa_fraction_per_block": 0.3,
              "num_blocks": 5,
              "randomize_num_blocks": False,
          },
          # Self-distillation examples: the MSA is uniformly subsampled to this many sequences
          # before anything else (Suppl. 1.3). 0 disables.
          "max_distillation_msa_seqs": 1000,
          # Draw num_iter_recycling uniformly from 0..num_recycle, one value per global batch
          # (Suppl. 1.10). False: always num_recycle.
          "uniform_recycling": True,
          # Fraction of examples trained with clamped FAPE (Suppl. 1.11.5).
          "clamp_fape_prob": 0.9,
      },
      "sampling": {
          # Mixture of sources (Suppl. 1.3): probability that a batch slot is a
          # self-distillation example; the rest are PDB chains.
          "distillation_fraction": 0.75,
          # Per-chain weight (Suppl. 1.2.5): 1/cluster_size times
          # max(min(N_res, length_weight_max), length_weight_min) / length_weight_max.
          "cluster_weighting": True,
          "length_weighting": True,
          "length_weight_min": 256,
          "length_weight_max": 512,
          # The same weights for the distillation source (its cluster column, if any).
          "weight_distillation_by_cluster": True,
          "weight_distillation_by_length": True,
          # Bad records: how many replacements a slot may draw before the pipeline gives up.
          "max_bad_record_retries": 100,
      },
      # Runtime knobs of the pipeline; they never change the batches' content.
      "pipeline": {
          "prefetch_batches": 2,
          # numpy backend: examples computed in parallel (0: one per host CPU, at most 8) by
          # 'thread's (numpy and BLAS release the GIL in the big ops) or 'process'es.
          "workers": 0,
          "worker_type": "thread",
          # Size of the pipeline's private thread pool (0: tf.data's shared pool) and the
          # threads one op may use (0: TF's default).
          "threads": 0,
          "max_intra_op_parallelism": 0,
      },
  })
  if stage == "finetuning":
    config.train.crop_size = 384
    config.train.max_msa_clusters = 512
    config.common.max_extra_msa = 5120
  return config


def num_msa_rows(config: ml_collections.ConfigDict) -> int:
  """Rows of `msa_feat` (cluster centres), after the optional template reservation."""
  rows = config.train.max_msa_clusters
  if config.common.reduce_msa_clusters_by_max_templates:
    rows -= config.train.max_templates
  return rows
