"""AlphaFold's initial training (Jumper et al. 2021, Suppl. 1.11 and Table 4).

Full model_1 (48 Evoformer blocks, templates), crop 256, 128 MSA clusters, 1024 extra
sequences, 4 templates, up to 3 recycles drawn uniformly; Adam lr 1e-3 (β 0.9/0.999, ε 1e-6),
1000 linear warm-up steps, ×0.95 after 50k steps, global batch 128 (one example per TPU core
in AlphaFold's run), per-example gradient clipping at global norm 0.1, EMA 0.999 of the
parameters for evaluation; no violation and no experimentally-resolved loss (fine-tuning adds
them: configs/finetune.py). ≈10M samples = 78k steps.

    python -m af2flax.train --config=configs/initial_training.py --workdir=gs://BUCKET/af2/initial \\
        --config.dataset.train_dirs=gs://BUCKET/af2/pdb,gs://BUCKET/af2/distillation \\
        --config.dataset.eval_dirs=gs://BUCKET/af2/validation

On a Cloud TPU pod slice (one example per core, e.g. v4-128 or v3-128):

    ./launch_tpu.sh --name af2 --zone us-central2-b --accelerator v4-128 \\
        --config configs/initial_training.py --workdir gs://BUCKET/af2/initial -- \\
        --config.dataset.train_dirs=gs://BUCKET/af2/pdb,gs://BUCKET/af2/distillation
"""

import ml_collections

from af2flax.data import config as data_config_lib
from af2flax.losses import total as total_loss_lib
from af2flax.model import config as model_config_lib


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.seed = 0

  # The network: AlphaFold's model_1 tree (templates on), bf16 activations, remat per block.
  config.model = model_config_lib.model_config("model_1")
  config.model.heads = total_loss_lib.apply_training_stage(config.model.heads,
                                                           "initial_training")
  # Each stack's parameters scanned as one [num_layers, P] array, each layer's row split back
  # into its arrays inside the block's checkpoint (same values): the scan's backward pass
  # writes one gradient row per layer instead of one per parameter array (93 in an Evoformer
  # block). H200, 2026-12-05, side by side with the presets before: expected step 0.571
  # against 0.598 s, peak 6.67 against 6.38 GiB (docs/benchmarks.md). Does not combine with
  # remat_group_size > 1. The fine-tuning preset has it too (measured there in the
  # eighteenth session).
  config.model.global_config.scan_flat_params = True

  # The input: AlphaFold's sampling and transforms at initial-training sizes.
  config.data = data_config_lib.get_config("initial_training")
  config.model.num_recycle = config.data.common.get_ref("num_recycle")
  config.dataset = ml_collections.ConfigDict({
      # Comma-separated TFRecord directories written by `python -m af2flax.data.build_dataset`.
      "train_dirs": "",
      "eval_dirs": "",
      # If train_dirs is empty: build datasets from these (structures dir, alignments dir or "")
      # pairs into <workdir>/dataset on the first run.
      "build_sources": (),
      # Å recorded for built structures whose file gives no resolution (header-less PDB
      # files); 0 leaves it unknown, and the resolution-filtered losses skip those examples.
      "default_resolution": 0.0,
      # Validation examples held out of a built dataset (used when eval_dirs is empty).
      "num_eval_examples": 0,
      # Also evaluate this many training examples the same way (`train_eval/...`; -1: all).
      "num_train_eval_examples": 0,
      "eval_batch_size": 8,
  })

  # Optimisation (Suppl. 1.11.3, 1.11.7).
  config.batch_size = 128
  config.num_train_steps = 78_000
  # Each device runs its examples one after another; >1 vmaps that many together (faster on
  # small models, more memory and compile time).
  config.vmap_batch_size = 1
  # 'one': the train step is one XLA program. 'split': six programs (recycling iterations;
  # the trunk's forward and backward passes; the heads' losses and their gradient in one;
  # the example's clipped gradient added up; update), more with the options below, that
  # XLA compiles at the same time; same values (af2flax/train/programs.py). Needs
  # vmap_batch_size 1. H200,
  # 2026-12-05 (eighteenth session): first compile 102.6 against 158.8 s, but the expected
  # step 0.592 against 0.571 s and the peak 8.09 against 6.69 GiB (fine-tuning shapes: 17.19
  # against 13.95 GiB), as the trunk's saved values stay alive through its whole backward
  # program: for short runs and debugging, not the preset. H100, 2026-12-05 (twenty-first
  # session), with trunk_stages='embeddings,extra_msa,evoformer', head_stages=
  # 'structure,losses', recycle_stages=True and the flat update: 105.0 against 172.0 s,
  # expected step 0.708 against 0.687 s, peak 7.76 against 6.69 GiB.
  config.step_programs = "one"
  # With 'split': the trunk as one stage ('trunk'), or cut into more, each with its own
  # forward and backward programs compiled beside the others, e.g.
  # 'embeddings+extra_msa,evoformer' or 'embeddings,extra_msa,evoformer' (the parts of
  # af2flax.model.trunk.TRUNK_PARTS, in order; step.trunk_stages). Same values. With 'one'
  # the stages run one after another inside the one program.
  config.trunk_stages = "trunk"
  # With 'split': the heads with every loss as one stage ('heads'), or 'structure,losses':
  # the structure module as a stage of its own, then the other heads and the losses, so the
  # heads' gradient is two shorter compiles (step.head_stages). Same values.
  config.head_stages = "heads"
  # With 'split': True runs the recycling iterations as programs of their own per part (the
  # trunk's stages, then the structure module), each run once per iteration, instead of
  # one program holding them all (step.RecycleStages). Same values.
  config.recycle_stages = False
  # With 'split', recycle_stages=True and head_stages='structure,losses': True runs the
  # recycling iterations through the final iteration's forward programs (iteration i's
  # features and dropout key), then a small program that makes the next iteration's inputs,
  # instead of a program per part: four fewer programs to compile (a quarter of the split
  # step's compile work, H100). Python reads how many iterations the examples run (it
  # waits for the device to finish the step before), and each iteration writes the forward
  # programs' residuals, which nothing reads (the offloaded ones to host memory: not for
  # the fine-tuning preset). Same values (step.RecycleStages.next_prev). H100, 2026-12-05
  # (twenty-fourth session): expected step 0.703 s (0.708 with a program per part), peak
  # 7.80 GiB, first compile 78.7 s after the initialisation (105.0 s with a program per part).
  config.recycle_through_forward = False
  # With 'split': how many programs XLA compiles at a time (0: all at once). On an H100 all
  # 16 programs at once took about as long as one after another (2026-12-05), and 2 or 4 at a
  # time as long again (96-103 s of XLA): a bound on a compile's host memory, no faster.
  config.compile_workers = 0
  # With 'split': 'together' compiles every program at once. 'share_autotuning_all' starts
  # a program once the larger programs that tune its matrix products are compiled, so that
  # XLA's GPU autotuning (two thirds of the split step's compile, H200) tunes each product
  # once instead of once per program compiling it at the same time (the split step's 238
  # distinct products are 449 summed over its programs; with recycle_through_forward, 351);
  # 'share_autotuning' waits only where programs that wait for nothing tune at least half
  # of a program's products (no chains of waits; some products tuned twice). Same programs
  # (programs.autotuning_schedule). H100, 2026-12-05 (twenty-fourth session), with
  # recycle_through_forward: the programs' summed compile seconds 507 -> 336 / 240, but the
  # wall 80.1 -> 82.4 / 89.3 s (the largest program's own autotuning, then the waits).
  config.compile_schedule = "together"
  # With 'split': stages (comma-separated names of `trunk_stages` and `head_stages`, e.g.
  # 'embeddings,structure,losses') whose programs XLA compiles with its Triton GEMMs off:
  # their matrix products go to cuBLAS, whose autotuning compiles nothing, where Triton's
  # compiles ~30-40 candidate kernels per product (two thirds of the split step's compile).
  # Fewer kernels to compile on the host, for whatever those stages' products lose to cuBLAS.
  # Same values up to float rounding. '' (none): every program as XLA_FLAGS says. H100,
  # 2026-12-06 (twenty-fifth session, one run each), the split step with
  # recycle_through_forward: first compile 35.3 s with 'embeddings,structure,losses' against
  # 52.1 s, 0.706 against 0.702 s per expected step.
  config.cublas_stages = ""
  # True: XLA compiles the train step on a thread of its own while the state is created (its
  # own compile) or restored (Orbax's reads), right after the step is traced; False: the
  # step is only traced there and compiled once the state exists. Same program. Off until
  # timed on a GPU: on a 2-core CPU no change (2026-12-05), and on an H100 the step's XLA
  # compile took 64.3 s after the initialisation against 80.1 s in a compile-only run, for
  # reasons not yet known (a cold device?) that compiling beside the initialisation might
  # bring back.
  config.compile_beside_state = False
  config.optimizer = ml_collections.ConfigDict({
      "learning_rate": 1e-3, "b1": 0.9, "b2": 0.999, "eps": 1e-6,
      "warmup_steps": 1000, "decay_steps": 50_000, "decay_factor": 0.95,
      "clip_norm": 0.1,  # per example, before averaging
      "ema_decay": 0.999,
      "global_clip_norm": 0.0,  # off; >0 also clips the averaged gradient
      # True: Adam and the EMA on all parameters concatenated (the same values; off by itself
      # when FSDP splits parameters, step.flat_update). Compiles faster: H200, 2026-12-05,
      # XLA 131.9 against 141.7 s for the one-program step; but the expected step is 0.577
      # against 0.571 s side by side (eighteenth session), so it stays off.
      "flat_update": False,
      "weight_decay": 0.0,
  })
  config.max_consecutive_skips = 20  # non-finite steps in a row before the run stops
  config.init_from = ""  # Orbax params from `python -m af2flax.tools.convert_params`

  # Devices: examples over all devices; fsdp > 1 also splits parameters and optimizer state.
  config.mesh = ml_collections.ConfigDict({"data": -1, "fsdp": 1})
  config.sharding = ml_collections.ConfigDict({
      "rules": [
          # Scanned layer stacks: never split the layer axis.
          (".*(evoformer_iteration|extra_msa_stack|__layer_stack_no_state)/.*",
           "fsdp_stacked"),
          (".*", "fsdp"),
      ],
      "min_size_to_shard_mb": 1.0,
  })

  # Checkpoints, metrics, validation.
  config.checkpoint = ml_collections.ConfigDict({
      "every_steps": 1000, "keep": 3, "keep_best": 1,
      "best_metric": "val/lddt_ca", "best_mode": "max", "async_save": True,
  })
  config.log_every_steps = 50
  config.eval_every_steps = 2000
  # JAX's persistent compilation cache: a resumed run loads the compiled step instead of
  # compiling it again (minutes at full size). "{workdir}" is this run's workdir; a shared
  # directory (e.g. gs://BUCKET/af2/jax_cache) serves every run of the same model and shapes;
  # "" turns it off.
  config.compilation_cache_dir = "{workdir}/compilation_cache"
  config.profile_steps = 0  # >0: trace this many steps from profile_first_step (TensorBoard)
  config.profile_first_step = 10
  return config
