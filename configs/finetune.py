"""AlphaFold's fine-tuning stage (Jumper et al. 2021, Suppl. 1.11 and Table 4).

`initial_training` with: crop 384, 512 MSA clusters, 5120 extra sequences; learning rate 5e-4
without warm-up; structural violation loss (weight 1.0) and experimentally-resolved loss
(0.01) switched on; the predicted-aligned-error head trained (weight 0.1, the pTM models,
Suppl. 1.9.7). ≈1.5M samples = 12k steps. Start from the parameters of initial training or of
an imported AlphaFold model:

    python -m af2flax.tools.convert_params --af2 params_model_1_ptm.npz --out /tmp/model_1_ptm
    python -m af2flax.train --config=configs/finetune.py --workdir=gs://BUCKET/af2/finetune \\
        --config.init_from=/tmp/model_1_ptm \\
        --config.dataset.train_dirs=gs://BUCKET/af2/pdb,gs://BUCKET/af2/distillation
"""

import ml_collections

from af2flax.common import config_files
from af2flax.data import config as data_config_lib
from af2flax.losses import total as total_loss_lib


def get_config() -> ml_collections.ConfigDict:
  config = config_files.sibling_config(__file__, "initial_training")
  config.model.heads = total_loss_lib.apply_training_stage(config.model.heads, "finetuning",
                                                           train_pae=True)
  config.data = data_config_lib.get_config("finetuning")
  config.model.num_recycle = config.data.common.get_ref("num_recycle")
  config.num_train_steps = 12_000
  config.optimizer.learning_rate = 5e-4
  config.optimizer.warmup_steps = 0
  # 5,120 extra sequences: their row attention and transition in chunks of 1,024 rows (same
  # values; the peak memory of a step drops from 24.7 to 18.3 GiB for 2% more time on an
  # H200, docs/benchmarks.md).
  config.model.global_config.extra_msa_subbatch_size = 1024
  # One checkpoint per block, with the saved inputs of the first 55% of each stack's blocks
  # (27 of the 48 Evoformer blocks, all 4 extra-MSA blocks) in the host's pinned memory,
  # copied out in the forward pass and back in the backward pass; the last 21 Evoformer
  # blocks keep theirs on the GPU. On an H200 with two examples per device, one at a time as
  # training runs them (2026-12-04, docs/benchmarks.md): 2.000 s and 15.14 GiB per example,
  # against 2.152 s and 16.12 GiB for the earlier preset (12 rematerialised groups of 4,
  # `remat_group_size=4`, which keeps everything on the GPU) and 1.966 s and 16.02 GiB with
  # half the blocks offloaded. With memory to spare, remat_offload=False is the fastest
  # (1.85 s, 17.8 GiB at one example per device).
  config.model.global_config.remat_group_size = 1
  config.model.global_config.remat_offload = True
  config.model.global_config.remat_offload_fraction = 0.55
  # On a GPU: our attention kernels (Pallas) up to 512 queries, so also for the MSA row and
  # column attentions at these shapes (256 otherwise), and the extra MSA's row attention
  # (8-channel heads, which our kernels pad to 16) on cuDNN ('auto_cudnn': XLA off GPUs):
  # 2.20 s and 14.69 GiB per gradient pass on an H200, against 2.36 s and 14.87 GiB with
  # cuDNN for all of those (docs/benchmarks.md, 2026-12-03, sixth session).
  config.model.global_config.pallas_attention_max_queries = 512
  config.model.global_config.extra_msa_attention_impl = "auto_cudnn"
  # Each stack's parameters scanned as one array, as in initial training. H200, 2026-12-05,
  # side by side with the stacks scanned per array: 1.903 against 1.945 s per gradient pass,
  # peak 13.95 against 14.06 GiB (docs/benchmarks.md, eighteenth session).
  config.model.global_config.scan_flat_params = True
  return config
