"""A tiny AlphaFold trained on the bundled sample chains: the CPU demo and the tests' preset.

The whole recipe of `initial_training.py` (all heads and losses, random recycling, per-example
clipping, EMA, validation, checkpoints) with a network small enough for a laptop CPU: 2
Evoformer blocks of 32 MSA / 16 pair channels, 1 extra-MSA block, a 2-layer structure module,
no templates (the sample chains have none), crop 64, 16 MSA clusters, 32 extra sequences, up to
1 recycle; batch 2. On the first run the dataset is built from `data/samples` (PDB chains as
single-sequence examples, 2Q2K with its MSAs) into WORKDIR/dataset; 2 chains are held out for
validation. Run from the repository root:

    python -m af2flax.train --config=configs/tiny.py --workdir=/tmp/af2flax_tiny

Running it again resumes; `tensorboard --logdir /tmp/af2flax_tiny` shows the curves.
"""

import ml_collections

from af2flax.common import config_files


def get_config() -> ml_collections.ConfigDict:
  config = config_files.sibling_config(__file__, "initial_training")

  model = config.model
  evo = model.embeddings_and_evoformer
  evo.evoformer_num_block = 2
  evo.extra_msa_stack_num_block = 1
  evo.msa_channel, evo.pair_channel, evo.seq_channel, evo.extra_msa_channel = 32, 16, 32, 8
  evo.template.enabled = False
  evo.template.embed_torsion_angles = False
  blocks = evo.evoformer
  blocks.msa_row_attention_with_pair_bias.num_head = 4
  blocks.msa_column_attention.num_head = 4
  blocks.triangle_attention_starting_node.num_head = 2
  blocks.triangle_attention_ending_node.num_head = 2
  blocks.outer_product_mean.num_outer_channel = 8
  blocks.triangle_multiplication_outgoing.num_intermediate_channel = 16
  blocks.triangle_multiplication_incoming.num_intermediate_channel = 16
  heads = model.heads
  structure = heads.structure_module
  structure.num_layer = 2
  structure.num_channel = 32
  structure.num_head = 4
  structure.num_scalar_qk, structure.num_scalar_v = 8, 8
  structure.num_point_qk, structure.num_point_v = 4, 4
  structure.sidechain.num_channel = 32
  heads.predicted_lddt.num_channels = 32
  heads.predicted_aligned_error.num_channels = 32
  # float32 and no rematerialisation: CPUs have no fast bf16, and the model fits.
  model.global_config.dtype = "float32"
  model.global_config.use_remat = False

  data = config.data
  data.common.num_recycle = 1
  data.common.max_extra_msa = 32
  data.common.use_templates = False
  data.train.crop_size = 64
  data.train.max_msa_clusters = 16
  data.train.max_templates = 1

  config.dataset.build_sources = (("data/samples/pdb_chains", ""),
                                  ("data/samples/mmcif", "data/samples/alignments"))
  config.dataset.num_eval_examples = 2
  config.dataset.eval_batch_size = 2

  config.batch_size = 2
  config.num_train_steps = 300
  config.optimizer.warmup_steps = 10
  # A few hundred steps: average the last ~100 (AlphaFold's 0.999 suits its 78k steps; here
  # the EMA would still be mostly the initialisation when validated).
  config.optimizer.ema_decay = 0.99
  config.max_consecutive_skips = 5
  config.checkpoint.every_steps = 50
  config.log_every_steps = 10
  config.eval_every_steps = 100
  # Compiles in seconds on a CPU; no persistent cache (tests train it many times per process).
  config.compilation_cache_dir = ""
  return config
