"""Time, memory and achieved TFLOP/s of af2flax's full training step on one accelerator.

    python bench/train_step.py                         # the presets (bf16-auto), initial shapes
    python bench/train_step.py --variants bf16-cudnn,fp32-xla --shapes initial,finetune
    python bench/train_step.py --breakdown             # time per module (forward+backward)
    python bench/train_step.py --smoke                 # tiny model on the CPU (checks the script)
    python bench/train_step.py --lower_only            # tracing + lowering only (any device)
    python bench/train_step.py --lower_only --compile_only --memory_report DIR  # peak's buffers
    python bench/train_step.py --pipelined             # also steps back to back, as in training
    python bench/train_step.py --variants bf16-auto-split3hr-flatupdate-fwdrecycle \
        --program_times                                # a split step's programs one by one

The step is the product's own (`af2flax.train.step.make_train_step` with
`alphafold_objective`): the model with random recycling (`num_iter_recycling` no-gradient
iterations before the final one, read from the batch), every AlphaFold loss, the backward
pass, per-example gradient clipping to global norm 0.1, Adam with AlphaFold's schedule and the
EMA update; one example (AlphaFold's one example per core), or with `--examples N` N examples
per step on the one device, vmapped together (`vmap_batch_size` N; times then per example), or
with `--one_at_a_time` one after another in the loop over a device's examples, as the training
loop runs a batch larger than the device count (`vmap_batch_size` 1: the model's loops run
nested inside that loop).
The batch holds random features and the ground truth of a random chain at the given shapes
(`model_step._training_example`).

One compilation serves every recycling count (it is a loop bound in the batch), so each
variant reports the step at each recycling count (r=0: the gradient pass only) and the
expected step of initial training (recycles uniform in 0..3: the mean of the four), each the
median of `--steps` steps after warm-up, each waited for (`--pipelined` adds the mean of
`--steps` steps run back to back, which the training loop's host keeps ahead of the device);
the table also names the shapes (residues/MSA/extra
MSA/templates), the activation dtype and the remat policy ('nothing' saved per block, ',g4'
for groups of 4 blocks). TFLOP/s use the analytic count of
`af2flax.model.flops` (matrix products only) for the expected step. Each variant runs in its own
subprocess so that its peak memory is its own and an out-of-memory failure is a row of the
table. Needs jax, flax, optax, numpy and ml_collections only (no TensorFlow, no clu).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import fcntl
import json
import os
import pathlib
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time

BENCH = pathlib.Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(BENCH))


# The initial-training presets' model settings, which the "bf16-auto-..." variants change.
_BF16_AUTO = {"dtype": "bfloat16", "attention_impl": "auto"}


def _bf16_with_flags(xla_flags: str, attention_impl: str = "cudnn") -> dict:
  """A bf16 variant (cuDNN attention, the default until 2026-12-03; or 'auto', the presets
  since) under these XLA flags."""
  return {"dtype": "bfloat16", "attention_impl": attention_impl, "xla_flags": xla_flags}


# Our kernels up to 512 queries, the extra MSA's row attention included: "" overrides the
# fine-tuning preset's 'auto_cudnn' (since 2026-12-03's sixth session), as these variants
# were measured before it.
_PALLAS512 = {**_BF16_AUTO, "pallas_attention_max_queries": 512, "extra_msa_attention_impl": ""}
# The fine-tuning preset's attention settings (since 2026-12-03's sixth session), which the
# fine-tuning variants below start from.
_FINETUNE_OURS = {**_PALLAS512, "extra_msa_attention_impl": "cudnn"}
# The fine-tuning preset's checkpointing until 2026-12-04's eleventh session (12 groups of 4
# blocks, everything on the GPU), pinned in the variants measured with it. Without it a
# fine-tuning variant checkpoints as the preset does now (`remat_offload`, 55% offloaded).
# (Groups need the stacks' parameters scanned per array, which initial training's preset
# flattens since 2026-12-05.)
_GROUP4 = {"remat_group_size": 4, "remat_offload": False, "scan_flat_params": False}
# One checkpoint per block, every block's saved input on the GPU.
_GROUP1 = {"remat_group_size": 1, "remat_offload": False}
# ... with one checkpoint per block, every block's saved input in the host's pinned memory.
_FINETUNE_OFFLOAD = {**_FINETUNE_OURS, **_GROUP1, "remat_offload": True,
                     "remat_offload_fraction": 1.0}
# ... and the fine-tuning preset's own setting (since the eleventh session): 55% offloaded.
_FINETUNE_PRESET = {**_FINETUNE_OFFLOAD, "remat_offload_fraction": 0.55}
# CUDA-graph command buffers for kernels and library calls only (no loops or conditionals).
_CB_NO_LOOPS = "--xla_gpu_enable_command_buffer=FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,CUDNN"
_LHS = "--xla_gpu_enable_latency_hiding_scheduler=true"
_PIPELINED_OFFLOAD = "--xla_gpu_enable_pipelined_host_offloading=true"
# Seconds a compiled worker waits for the other workers' compilations (`--compile_wait`).
_COMPILE_WAIT_S = 1800.0

# name -> model global_config overrides, except the step's own keys (`STEP_KEYS`):
# 'xla_flags' (added to XLA_FLAGS of its worker), 'step_programs' (the train config's:
# 'split' runs `af2flax.train.programs.SplitTrainStep`, the step as separately compiled
# programs compiled at the same time), 'trunk_stages' (the train config's: the split step's
# trunk cut into more stages, `step.trunk_stages`), 'head_stages' (its heads as the structure
# module and the losses, `step.head_stages`), 'recycle_stages' (its recycling iterations as
# programs per part, `step.RecycleStages`), 'compile_workers' (how many of its programs XLA
# compiles at a time), 'flat_update' (`config.optimizer.flat_update`), 'compile_processes'
# (the bench's own: N worker processes compile the split step's programs into a new
# persistent cache, which its compile then reads; `bench/compile_processes.py`),
# 'recycle_through_forward' (its recycling iterations through the forward programs),
# 'compile_schedule' (the order its programs compile in) and 'cublas_stages' (stages whose
# programs compile with XLA's Triton GEMMs off).
STEP_KEYS = ("xla_flags", "step_programs", "trunk_stages", "head_stages", "recycle_stages",
             "compile_workers", "flat_update", "compile_processes", "recycle_through_forward",
             "compile_schedule", "cublas_stages")
VARIANTS = {
    "bf16-cudnn": {"dtype": "bfloat16", "attention_impl": "cudnn"},
    "bf16-xla": {"dtype": "bfloat16", "attention_impl": "xla"},
    "fp32-xla": {"dtype": "float32", "attention_impl": "xla"},
    "bf16-cudnn-dots": {"dtype": "bfloat16", "attention_impl": "cudnn",
                        "remat_policy": "dots_with_no_batch_dims_saveable"},
    "bf16-cudnn-noremat": {"dtype": "bfloat16", "attention_impl": "cudnn", "use_remat": False},
    "bf16-auto": {"dtype": "bfloat16", "attention_impl": "auto"},
    # The outer product mean's product in AlphaFold's layout [N_res, c, c', rows] (a transpose
    # of the matrix product's output), not [rows, c, c', N_res] as the presets since
    # 2026-12-04 (fourteenth session; H200: expected step 0.616 s against 0.604 s).
    "bf16-auto-opmaf2": {**_BF16_AUTO, "outer_product_mean_layout": "alphafold"},
    # The outer product mean's projection as a matrix product batched over rows, reading the
    # product [rows, c·c', N_res] in place (written 2026-12-04, fifteenth session; H200,
    # 2026-12-05, side by side: expected step 0.612 against the presets' 0.598 s, peak 6.26
    # against 6.38 GiB; not kept).
    "bf16-auto-opmbatched": {**_BF16_AUTO, "outer_product_mean_layout": "rows_batched"},
    # Each stack's parameters scanned as one [num_layers, P] array (`scan_flat_params`; written
    # 2026-12-04, fifteenth session), the initial-training preset since 2026-12-05's
    # seventeenth session (H200, side by side: expected step 0.571 against 0.598 s, peak 6.67
    # against 6.38 GiB): bf16-auto is the same now; noflatparams is the presets before.
    "bf16-auto-flatparams": {**_BF16_AUTO, "scan_flat_params": True},
    "bf16-auto-noflatparams": {**_BF16_AUTO, "scan_flat_params": False},
    # The flattened scan keeping its [num_layers, P] copy of the parameters for the backward
    # pass (`scan_flat_params_keep_copy`: the presets before 2026-12-05's twenty-first
    # session, which concatenates them again in the backward pass instead: 335 MiB less).
    "bf16-auto-flatcopy": {**_BF16_AUTO, "scan_flat_params_keep_copy": True},
    # Our kernels' backward pass walking the queries in blocks of 64 (the presets before
    # 2026-12-04's fifteenth session; 128 since: H200, 2026-12-05, side by side, expected step
    # 0.595 against 0.604 s) and of 256.
    "bf16-auto-lgq64": {**_BF16_AUTO, "pallas_tiling": "lg_block_q=64"},
    "bf16-auto-lgq256": {**_BF16_AUTO, "pallas_tiling": "lg_block_q=256"},
    # Each module of the extra-MSA blocks (or of every block) rematerialised on its own.
    "bf16-cudnn-subremat": {"dtype": "bfloat16", "attention_impl": "cudnn",
                            "remat_submodules": "extra_msa"},
    "bf16-cudnn-subremat-all": {"dtype": "bfloat16", "attention_impl": "cudnn",
                                "remat_submodules": "all"},
    # Attention and transitions in chunks of 1,024 rows: at fine-tuning shapes this chunks
    # only the extra-MSA stack (5,120 rows); at initial shapes it changes nothing.
    "bf16-cudnn-chunk1024": {"dtype": "bfloat16", "attention_impl": "cudnn",
                             "low_memory": True, "subbatch_size": 1024},
    # XLA's attention for the triangle attention only (faster at crop 256, bench/attention.py).
    "bf16-cudnn-trixla": {"dtype": "bfloat16", "attention_impl": "cudnn",
                          "triangle_attention_impl": "xla"},
    # Projections of one input as one matrix product (triangle multiplication, outer product
    # mean, q/k/v/gate of the self-attentions): the presets' default since 2026-12-02;
    # "separate" is the model before.
    "bf16-cudnn-fused": {"dtype": "bfloat16", "attention_impl": "cudnn",
                         "fuse_projections": True},
    "bf16-cudnn-separate": {"dtype": "bfloat16", "attention_impl": "cudnn",
                            "fuse_projections": False, "triangle_channels_first": False},
    # The triangle multiplication's edges laid out [c, N, N] (the presets' default since
    # 2026-12-02); "cl" is channels last, as before.
    "bf16-cudnn-cf": {"dtype": "bfloat16", "attention_impl": "cudnn",
                      "triangle_channels_first": True},
    "bf16-cudnn-cl": {"dtype": "bfloat16", "attention_impl": "cudnn",
                      "triangle_channels_first": False},
    # The outer product mean in chunks of 128 rows when training too (AlphaFold; the presets
    # until 2026-12-02 evening) and in one piece (the presets now).
    "bf16-cudnn-opmchunks": {"dtype": "bfloat16", "attention_impl": "cudnn",
                             "outer_product_mean_chunking": "always"},
    "bf16-cudnn-opmfull": {"dtype": "bfloat16", "attention_impl": "cudnn",
                           "outer_product_mean_chunking": "low_memory"},
    # Two-level checkpointing of the block stacks: groups of 4 blocks.
    "bf16-cudnn-group4": {"dtype": "bfloat16", "attention_impl": "cudnn", **_GROUP4},
    # The extra MSA's row attention and transition alone in chunks of N rows (0: unchunked;
    # the fine-tuning preset's default is 1024).
    **{f"bf16-cudnn-extra{size}": {"dtype": "bfloat16", "attention_impl": "cudnn",
                                   "extra_msa_subbatch_size": size}
       for size in (0, 512, 1024, 2560)},
    # Our Pallas (Triton) kernels for every attention whose shapes they take (at crop 256:
    # all of them, the extra MSA's 8-channel heads padded to 16), cuDNN for the rest.
    "bf16-pallas": {"dtype": "bfloat16", "attention_impl": "pallas"},
    # The presets with the extra MSA's row attention (8-channel heads) on cuDNN, as before
    # our kernels took it padded to 16 channels.
    "bf16-auto-extracudnn": {**_BF16_AUTO, "extra_msa_attention_impl": "cudnn"},
    # The presets with our kernels differentiated up to 512 queries (fine-tuning: crop 384,
    # 512 MSA rows), not only 256. H200, 2026-12-03 (fifth session, the 'logit_grads_xla_dq'
    # backward): 2.16 s, 16.17 GiB against the preset's 2.36 s, 14.87 GiB.
    "bf16-pallas512": {**_PALLAS512, **_GROUP4},
    # Fine-tuning with our kernels up to 512 queries and without two-level checkpointing
    # (H200, 2026-12-03: 2.07 s, 17.6 GiB, against the preset's 2.37 s, 15.2 GiB).
    "bf16-pallas512-group1": {**_PALLAS512, **_GROUP1},
    # The presets with our kernels reading q, k and v in place from the self-attentions'
    # fused projection (no slices copied, q scaled on loading). H200, 2026-12-03 (fifth
    # session): gradient pass 0.549 s against 0.525 s, so not kept.
    "bf16-auto-readsproj": {**_BF16_AUTO, "pallas_reads_projection": True},
    # The presets with another backward pass of our kernels (`global_config.pallas_backward`;
    # the presets: 'logit_grads_xla_dq'): 'grouped' (the presets before 2026-12-03's fifth
    # session: the bias gradient summed in registers) and 'logit_grads' (dQ from our query
    # kernel, not from XLA's product of the written logits' gradient with k).
    "bf16-auto-grouped": {**_BF16_AUTO, "pallas_backward": "grouped"},
    "bf16-auto-lg": {**_BF16_AUTO, "pallas_backward": "logit_grads"},
    # The presets with our kernels taking lengths that are not multiples of 16, padded (the
    # MSA column attention's 132 keys, cuDNN otherwise; `global_config.pallas_pad_lengths`).
    # H200, 2026-12-03 (sixth session): expected step 0.654 s against the presets' 0.635 s.
    "bf16-auto-padlengths": {**_BF16_AUTO, "pallas_pad_lengths": True},
    # Fine-tuning with our kernels up to 512 queries, the extra MSA's row attention on cuDNN
    # (not padded from 8 to 16 channels). H200, 2026-12-03 (sixth session): 2.204 s, 14.69
    # GiB; the fine-tuning preset since, with groups of 4 blocks until 2026-12-04's eleventh
    # session. Alone, with three pipeline stages (2026-12-04): 2.162 s, 15.29 GiB; two
    # examples one at a time: 2.152 s, 16.12 GiB per example.
    "bf16-pallas512-extracudnn": {**_FINETUNE_OURS, **_GROUP4},
    # Our kernels' forward and logits'-gradient kernels with two pipeline stages (the
    # default until 2026-12-03's eighth session, three since), and the fine-tuning preset
    # with the MSA column attention's 516 queries and keys padded to 528 for our kernels
    # (H200, 2026-12-04, alone: 2.898 s, 14.92 GiB against the preset's 2.162 s: 528 is
    # 33 blocks of 16).
    "bf16-auto-stages2": {**_BF16_AUTO, "pallas_tiling": "forward_stages=2,lg_stages=2"},
    "bf16-pallas512-extracudnn-stages2": {**_FINETUNE_OURS, **_GROUP4,
                                          "pallas_tiling": "forward_stages=2,lg_stages=2"},
    "bf16-pallas528-extracudnn-pad": {**_FINETUNE_OURS, **_GROUP4,
                                      "pallas_attention_max_queries": 528,
                                      "pallas_pad_lengths": True},
    # The fine-tuning preset without two-level checkpointing (one checkpoint per block; H200,
    # 2026-12-04: 1.851 s, 17.84 GiB), and the same with each block's saved input kept in the
    # host's pinned memory (`remat_offload`; H200, 2026-12-04, tenth session, alone: 2.113 s,
    # 13.88 GiB on the GPU and 7.30 GiB on the host, against the preset's 2.162 s and 15.29
    # GiB of the ninth session). Its profile: the copies to and from the host take 288 ms per
    # step (3.65 GiB each way, ~27 GB/s), under 7% of it beside compute.
    "bf16-pallas512-extracudnn-group1": {**_FINETUNE_OURS, **_GROUP1},
    "bf16-pallas512-extracudnn-offload": _FINETUNE_OFFLOAD,
    # Only the first share of each stack's blocks offloaded (`remat_offload_fraction`; the
    # last blocks keep their inputs on the GPU, trading GPU memory for the copies' time).
    # H200, 2026-12-04 (eleventh session), two examples one at a time, per example: all
    # 2.100 s, 15.00 GiB; 7/8 (42 of 48 Evoformer blocks, the 4 extra-MSA blocks) 2.071 s,
    # 15.08 GiB; 0.55 (27 of 48, the 4 extra-MSA blocks: the fine-tuning preset now) 2.000 s,
    # 15.14 GiB; half (24 of 48, 2 of 4) 1.966 s, 16.02 GiB. With 3 of the 4 extra-MSA
    # blocks offloaded and one on the GPU in a loop of its own (0.625 and 0.55 before
    # `offloaded_layers` stopped splitting off single layers): 20.5-22.6 GiB.
    "bf16-pallas512-extracudnn-offload88": {**_FINETUNE_OFFLOAD, "remat_offload_fraction": 0.875},
    # (`…-offload55` is the fine-tuning preset's own setting.)
    "bf16-pallas512-extracudnn-offload55": _FINETUNE_PRESET,
    # The fine-tuning preset with the outer product mean in AlphaFold's layout (see
    # bf16-auto-opmaf2).
    "bf16-pallas512-extracudnn-offload55-opmaf2": {**_FINETUNE_PRESET,
                                                   "outer_product_mean_layout": "alphafold"},
    "bf16-pallas512-extracudnn-offload55-opmbatched": {
        **_FINETUNE_PRESET, "outer_product_mean_layout": "rows_batched"},
    # The flattened parameter scan at fine-tuning shapes. H200, 2026-12-05 (eighteenth
    # session), side by side: 1.903 s and 13.95 GiB against 1.945 s and 14.06 GiB scanned per
    # array; now the fine-tuning preset (…-offload55 is the same), noflatparams the one before.
    "bf16-pallas512-extracudnn-offload55-flatparams": {**_FINETUNE_PRESET,
                                                       "scan_flat_params": True},
    "bf16-pallas512-extracudnn-offload55-noflatparams": {**_FINETUNE_PRESET,
                                                         "scan_flat_params": False},
    "bf16-pallas512-extracudnn-offload55-flatcopy": {**_FINETUNE_PRESET,
                                                     "scan_flat_params_keep_copy": True},
    # The fine-tuning preset with our kernels' backward pass in blocks of 64 queries (see
    # bf16-auto-lgq64).
    "bf16-pallas512-extracudnn-offload55-lgq64": {**_FINETUNE_PRESET,
                                                  "pallas_tiling": "lg_block_q=64"},
    "bf16-pallas512-extracudnn-offload50": {**_FINETUNE_OFFLOAD, "remat_offload_fraction": 0.5},
    # With the block inputs off the GPU, the extra MSA's row attention back on our kernels
    # (padded to 16 channels). H200, 2026-12-04, beside the next one: 2.078 s, 15.18 GiB.
    "bf16-pallas512-offload": {**_FINETUNE_OFFLOAD, "extra_msa_attention_impl": ""},
    # Attempts to overlap those copies with compute (H200, 2026-12-04; none did, the copies
    # stay 1-14% beside compute): XLA's latency-hiding scheduler (2.106 s); the loops of blocks
    # kept out of CUDA-graph command buffers, which moves the copies from the compute stream
    # to copy streams but leaves the compute stream waiting for them (2.136 s), the same with
    # the latency-hiding scheduler (2.133 s), no command buffers (2.169 s). Two blocks per
    # scan iteration (nn.scan's unroll=2, tried and removed) did not compile: "Expected
    # instruction to have shape equal to ..." after layout assignment, as for the template
    # stack nested in its loop over templates.
    "bf16-pallas512-extracudnn-offload-lhs": {**_FINETUNE_OFFLOAD, "xla_flags": _LHS},
    "bf16-pallas512-extracudnn-offload-cbnoloop": {**_FINETUNE_OFFLOAD, "xla_flags": _CB_NO_LOOPS},
    "bf16-pallas512-extracudnn-offload-cbnoloop-lhs": {**_FINETUNE_OFFLOAD,
                                                       "xla_flags": f"{_CB_NO_LOOPS} {_LHS}"},
    "bf16-pallas512-extracudnn-offload-nocb": {**_FINETUNE_OFFLOAD,
                                               "xla_flags": "--xla_gpu_enable_command_buffer="},
    # XLA's pipelining of host offloading (off by default): its collective pipeliner moves
    # each loop iteration's copy to the host into the next iteration and the copy back one
    # iteration ahead, so that they can run beside the block's compute. Every block offloaded,
    # and the fine-tuning preset's 55%.
    "bf16-pallas512-extracudnn-offload-pipe": {**_FINETUNE_OFFLOAD, "xla_flags": _PIPELINED_OFFLOAD},
    "bf16-pallas512-extracudnn-offload55-pipe": {**_FINETUNE_PRESET,
                                                 "xla_flags": _PIPELINED_OFFLOAD},
    "bf16-auto-offload": {**_BF16_AUTO, "remat_offload": True},
    # XLA's GPU compiler settings (compile time against step time).
    "bf16-cudnn-notriton": _bf16_with_flags("--xla_gpu_enable_triton_gemm=false"),
    "bf16-cudnn-autotune1": _bf16_with_flags("--xla_gpu_autotune_level=1"),
    "bf16-cudnn-autotune0": _bf16_with_flags("--xla_gpu_autotune_level=0"),
    "bf16-cudnn-autotune0-notriton": _bf16_with_flags(
        "--xla_gpu_autotune_level=0 --xla_gpu_enable_triton_gemm=false"),
    # Compile-time levers of jax 0.11's XLA (its LLVM module split flag is gone): the compile
    # thread count, XLA's autotuner of non-GEMM fusions off.
    "bf16-cudnn-par16": _bf16_with_flags("--xla_gpu_force_compilation_parallelism=16"),
    "bf16-cudnn-nofusiontune": _bf16_with_flags(
        "--xla_gpu_experimental_enable_fusion_autotuner=false"),
    # The presets under XLA flags aimed at the per-step small kernels of the scanned blocks
    # (the profile of 2026-12-03, fourth session: ~4,400 device-to-device copies and ~4,000
    # dynamic-update-slices of the stacked parameter gradients per step) and at the layer
    # norms' reductions: copy insertion with region analysis inside while loops; dynamic
    # slices fused into the matrix products that read them; normalisations as Triton
    # block-level fusions. H200, that session, gradient pass: 0.523, 0.525 and 0.745 s
    # against the presets' 0.522 s side by side. None kept.
    "bf16-auto-regioncopy": _bf16_with_flags(
        "--xla_gpu_copy_insertion_use_region_analysis=true", "auto"),
    "bf16-auto-dsfusion": _bf16_with_flags("--xla_gpu_enable_dynamic_slice_fusion=true", "auto"),
    "bf16-auto-blocklevel": _bf16_with_flags(
        "--xla_gpu_experimental_enable_fusion_block_level_rewriter=true", "auto"),
    # Step-time levers: no zero-initialisation of the buffers that dynamic-update-slice
    # accumulates into (the scans' stacked outputs), programmatic dependent launch (a kernel's
    # start overlaps the previous kernel's tail).
    "bf16-cudnn-dusinit": _bf16_with_flags(
        "--xla_gpu_enable_dus_accumulator_zero_init_elimination=true"),
    "bf16-cudnn-pdl": _bf16_with_flags("--xla_gpu_enable_pdl=true"),
    # CUDA-graph command buffers: all off (the profiles' setting), or only for kernels and
    # library calls (no while loops or conditionals captured as graphs): compile time against
    # launch overhead. H200, 2026-12-04, one after the other alone: 'cbnoloop' compiled in
    # 118.6 s against the presets' 135.2 s, expected step 0.636 against 0.625 s.
    "bf16-auto-nocb": _bf16_with_flags("--xla_gpu_enable_command_buffer=", "auto"),
    "bf16-auto-cbnoloop": _bf16_with_flags(_CB_NO_LOOPS, "auto"),
    # Triton's matrix products with warp specialization (producer and consumer warps), and
    # XLA's priority fusion allowed to form Triton fusions without a "hero" reduction or
    # product: flags aimed at the matrix products (28% of the presets' step) and the
    # memory-bound fusions around them.
    "bf16-auto-warpspec": _bf16_with_flags(
        "--xla_gpu_experimental_enable_triton_warp_specialization=true", "auto"),
    "bf16-auto-heroless": _bf16_with_flags(
        "--xla_gpu_experimental_enable_triton_heroless_priority_fusion=true", "auto"),
    # Layer norms differentiated by JAX (the model until 2026-12-04's twelfth session), against
    # the presets' own backward pass that keeps no float32 copy of the input
    # (`layer_norm_recompute`): the presets and the fine-tuning preset. H200, 2026-12-04,
    # thirteenth session, side by side: expected step 0.625 against the presets' 0.612 s;
    # fine-tuning 2.013 s, 15.21 GiB against 2.006 s, 14.92 GiB.
    "bf16-auto-lnautodiff": {**_BF16_AUTO, "layer_norm_recompute": False},
    "bf16-pallas512-extracudnn-offload55-lnautodiff": {**_FINETUNE_PRESET,
                                                       "layer_norm_recompute": False},
}
# The step as separately compiled programs, compiled at the same time
# (`af2flax.train.programs`), on the initial-training and fine-tuning presets: for the
# compile time. H200, 2026-12-05, alone on the machine, with the presets of before that day's
# flattened parameter scan: first compile 102.6 s against 158.8 s for one program (trace,
# lowering and XLA), expected step 0.616 s against ~0.60, peak 8.80 against 6.36 GiB;
# fine-tuning 1.977 s as one program, but 24.81 against 14.96 GiB. With host-offloaded
# residuals kept in host memory between programs, the heads' loss and gradient in one
# program, the gradient's buffers donated and the flattened parameter scan (eighteenth
# session): 102.6 s, 0.592 s against 0.571, 8.09 against 6.69 GiB; fine-tuning 1.947 s, 17.19
# GiB against 1.903 s, 13.95 GiB. Not the presets.
VARIANTS.update({
    "bf16-auto-split": {**_BF16_AUTO, "step_programs": "split"},
    "bf16-pallas512-extracudnn-offload55-split": {**_FINETUNE_PRESET, "step_programs": "split"},
    # The update on the parameters concatenated (`optimizer.flat_update`): for the compile.
    # H200, 2026-12-05: XLA 131.9 against 141.7 s for one program; split, 103.3 against
    # 102.6 s (the update is not the split step's longest program); the split step 0.621
    # against 0.616 s (two calls, not side by side). Side by side with the presets
    # (2026-12-05, eighteenth session): 0.577 against 0.571 s per expected step.
    "bf16-auto-flatupdate": {**_BF16_AUTO, "flat_update": True},
    "bf16-auto-split-flatupdate": {**_BF16_AUTO, "step_programs": "split", "flat_update": True},
    # The split step with the trunk in more stages, each with its own forward and backward
    # programs compiled beside the others: the trunk's backward program (82.4 s of XLA on an
    # H200, 2026-12-05) and its forward program (45.6 s, then recycle 43.1 s on the same
    # thread) are the split compile's two long chains.
    "bf16-auto-split2": {**_BF16_AUTO, "step_programs": "split",
                         "trunk_stages": "embeddings+extra_msa,evoformer"},
    "bf16-auto-split3": {**_BF16_AUTO, "step_programs": "split",
                         "trunk_stages": "embeddings,extra_msa,evoformer"},
    # and the update on one vector (the update program: 40.9 s of XLA on an H200, one of
    # the longest once the trunk's backward pass is cut).
    "bf16-auto-split3-flatupdate": {**_BF16_AUTO, "step_programs": "split",
                                    "trunk_stages": "embeddings,extra_msa,evoformer",
                                    "flat_update": True},
    "bf16-pallas512-extracudnn-offload55-split3": {
        **_FINETUNE_PRESET, "step_programs": "split",
        "trunk_stages": "embeddings,extra_msa,evoformer"},
    "bf16-pallas512-extracudnn-offload55-split2": {
        **_FINETUNE_PRESET, "step_programs": "split",
        "trunk_stages": "embeddings+extra_msa,evoformer"},
    # and the heads' gradient program (41.5 s of XLA on an H200, 2026-12-05) cut in two:
    # the structure module's forward and backward programs, and the losses' gradient.
    "bf16-auto-split3h": {**_BF16_AUTO, "step_programs": "split",
                          "trunk_stages": "embeddings,extra_msa,evoformer",
                          "head_stages": "structure,losses"},
    "bf16-auto-split3h-flatupdate": {**_BF16_AUTO, "step_programs": "split",
                                     "trunk_stages": "embeddings,extra_msa,evoformer",
                                     "head_stages": "structure,losses", "flat_update": True},
    # and the recycling program (43.1 s of XLA on an H200, 2026-12-05) as a program per part
    # of one iteration, run once per iteration.
    "bf16-auto-split3hr-flatupdate": {**_BF16_AUTO, "step_programs": "split",
                                      "trunk_stages": "embeddings,extra_msa,evoformer",
                                      "head_stages": "structure,losses", "recycle_stages": True,
                                      "flat_update": True},
    "bf16-pallas512-extracudnn-offload55-split3hr": {
        **_FINETUNE_PRESET, "step_programs": "split",
        "trunk_stages": "embeddings,extra_msa,evoformer", "head_stages": "structure,losses",
        "recycle_stages": True},
    "bf16-pallas512-extracudnn-offload55-split3h": {
        **_FINETUNE_PRESET, "step_programs": "split",
        "trunk_stages": "embeddings,extra_msa,evoformer", "head_stages": "structure,losses"},
})
# bf16-auto-split3hr-flatupdate with XLA compiling at most 2 or 4 of its programs at a time
# (`compile_workers`; all 16 at once on an H100, 2026-12-05: 84 s of XLA, about the sum of the
# programs compiled one after another).
VARIANTS.update({f"bf16-auto-split3hr-flatupdate-cw{n}": {
    **VARIANTS["bf16-auto-split3hr-flatupdate"], "compile_workers": n} for n in (2, 4)})
# ... with its programs compiled by 4 or 8 worker processes (written 2026-12-05, twenty-second
# session, untimed): the row's compile is from the workers' start to the step compiled.
VARIANTS.update({f"bf16-auto-split3hr-flatupdate-procs{n}": {
    **VARIANTS["bf16-auto-split3hr-flatupdate"], "compile_processes": n} for n in (4, 8)})
# ... with its recycling iterations through the forward programs: no program per part, the
# four (~21 s of the 88 s of single-program compile work, H100) left out.
VARIANTS["bf16-auto-split3hr-flatupdate-fwdrecycle"] = {
    **VARIANTS["bf16-auto-split3hr-flatupdate"], "recycle_through_forward": True}
# ... either, with a program started once the larger programs that tune its matrix products
# are compiled (`compile_schedule`: '-share' waits only for programs that wait for nothing,
# '-shareall' tunes every product once), so that XLA does not tune one product in several
# programs at the same time: 238 distinct products in either's StableHLO, against 449 and 351
# summed over their programs (XLA:CPU). H100 (2026-12-05, twenty-fourth session), -fwdrecycle:
# XLA 80.1 s all at once, 82.4 -share, 89.3 -shareall (the summed program seconds 507, 336, 240).
for _name in ("bf16-auto-split3hr-flatupdate", "bf16-auto-split3hr-flatupdate-fwdrecycle"):
  VARIANTS[f"{_name}-share"] = {**VARIANTS[_name], "compile_schedule": "share_autotuning"}
  VARIANTS[f"{_name}-shareall"] = {**VARIANTS[_name],
                                   "compile_schedule": "share_autotuning_all"}
# ... -fwdrecycle with the programs of some stages compiled with XLA's Triton GEMMs off
# (`cublas_stages`): cuBLAS's autotuning compiles no kernel, Triton's ~30-40 per product.
# '-cublas3': the stages outside the two block stacks (embeddings with the templates, the
# structure module, the heads and losses); '-cublas4': and the extra-MSA stack. H100
# (2026-12-06, one run each): first compile 52.1 s, 35.3 s -cublas3, 47.2 s -cublas4;
# expected step 0.702, 0.706, 0.709 s.
VARIANTS["bf16-auto-split3hr-flatupdate-fwdrecycle-cublas3"] = {
    **VARIANTS["bf16-auto-split3hr-flatupdate-fwdrecycle"],
    "cublas_stages": "embeddings,structure,losses"}
VARIANTS["bf16-auto-split3hr-flatupdate-fwdrecycle-cublas4"] = {
    **VARIANTS["bf16-auto-split3hr-flatupdate-fwdrecycle"],
    "cublas_stages": "embeddings,extra_msa,structure,losses"}
# The transitions' forward pass as one Pallas kernel (`global_config.transition_impl`,
# `af2flax/model/pallas_transition.py`; the presets' 'auto' since 2026-12-06), against XLA's
# layers ('-xlatrans', the presets before) and the kernel at 64 rows and 4 warps ('-ptrans64',
# the variant then named '-ptrans'). H100, side by side: expected step 0.685 s ('-xlatrans'),
# 0.678 s ('-ptrans64'), 0.669 s (128 rows, 8 warps: the presets now).
VARIANTS["bf16-auto-xlatrans"] = {**_BF16_AUTO, "transition_impl": "xla"}
VARIANTS["bf16-auto-ptrans64"] = {**_BF16_AUTO, "transition_impl": "auto",
                                  "transition_tiling": "block_rows=64,warps=4"}
# The transition kernel's backward pass as a kernel too (`global_config.transition_backward`;
# written 2026-12-06, twenty-seventh session, not yet timed on a GPU).
VARIANTS["bf16-auto-ptransbwd"] = {**_BF16_AUTO, "transition_backward": "pallas"}
# The triangle multiplication's layer norm, edge projections, gates and mask as one Pallas
# kernel (`global_config.triangle_projection_impl`, `af2flax/model/pallas_triangle.py`):
# written the same session, not yet timed on a GPU.
VARIANTS["bf16-auto-ptri"] = {**_BF16_AUTO, "triangle_projection_impl": "auto"}
VARIANTS["bf16-pallas512-extracudnn-offload55-ptri"] = {**_FINETUNE_PRESET,
                                                        "triangle_projection_impl": "auto"}
VARIANTS["bf16-pallas512-extracudnn-offload55-xlatrans"] = {**_FINETUNE_PRESET,
                                                            "transition_impl": "xla"}
RECYCLES = (0, 1, 2, 3)


def _train_config(variant: str, smoke: bool, stage: str):
  """The initial-training (or fine-tuning) preset with the variant's model settings, then
  the `--set` overrides (passed to workers in AF2FLAX_BENCH_SET)."""
  import importlib

  config = importlib.import_module(f"configs.{stage}").get_config()
  config.model.global_config.update(
      {k: v for k, v in VARIANTS[variant].items() if k not in STEP_KEYS})
  config.step_programs = VARIANTS[variant].get("step_programs", config.step_programs)
  config.trunk_stages = VARIANTS[variant].get("trunk_stages", config.trunk_stages)
  config.head_stages = VARIANTS[variant].get("head_stages", config.head_stages)
  config.recycle_stages = VARIANTS[variant].get("recycle_stages", config.recycle_stages)
  config.recycle_through_forward = VARIANTS[variant].get("recycle_through_forward",
                                                         config.recycle_through_forward)
  config.compile_workers = VARIANTS[variant].get("compile_workers", config.compile_workers)
  config.compile_schedule = VARIANTS[variant].get("compile_schedule", config.compile_schedule)
  config.cublas_stages = VARIANTS[variant].get("cublas_stages", config.cublas_stages)
  config.optimizer.flat_update = VARIANTS[variant].get("flat_update",
                                                       config.optimizer.flat_update)
  config.model.global_config.update(json.loads(os.environ.get("AF2FLAX_BENCH_SET", "{}")))
  if smoke:
    evo = config.model.embeddings_and_evoformer
    evo.evoformer_num_block = 2
    evo.extra_msa_stack_num_block = 1
    evo.template.template_pair_stack.num_block = 1
    config.model.heads.structure_module.num_layer = 2
  config.mesh.data = 1
  # --examples N: N examples per step on the one device, vmapped together, or one at a time
  # (--one_at_a_time) in the loop over the device's examples.
  config.batch_size = _examples()
  config.vmap_batch_size = 1 if os.environ.get("AF2FLAX_BENCH_ONE_AT_A_TIME") else _examples()
  return config


def _examples() -> int:
  """Examples per step (`--examples`, passed to workers in AF2FLAX_BENCH_EXAMPLES)."""
  return int(os.environ.get("AF2FLAX_BENCH_EXAMPLES", "1"))


def _batch_of(example: dict) -> dict:
  """A batch of `_examples()` copies of one example: [examples, ...]."""
  import numpy as np
  count = _examples()
  return {key: np.stack([np.asarray(value)] * count) for key, value in example.items()}


def _step_parts(variant: str, shape_name: str, smoke: bool):
  """(config, model, optimizer, un-jitted train step) of the preset that `shape_name` belongs
  to, with the variant's model settings, on a one-device mesh."""
  import jax

  from af2flax.model.alphafold import AlphaFold
  from af2flax.train import optimizer as optimizer_lib
  from af2flax.train import sharding as sharding_lib
  from af2flax.train import step as step_lib

  stage = "finetune" if shape_name == "finetune" else "initial_training"
  config = _train_config(variant, smoke, stage)
  model = AlphaFold(step_lib.model_config_for_step(config))  # marked when examples vmap
  optimizer = optimizer_lib.make_optimizer(config.optimizer)
  mesh = sharding_lib.make_mesh(config.mesh, jax.devices()[:1])
  objective = step_lib.alphafold_objective(model, config.model, config.trunk_stages,
                                           config.head_stages, config.recycle_stages)
  if config.step_programs == "split":
    from af2flax.train import programs  # pylint: disable=g-import-not-at-top
    return config, model, optimizer, programs.SplitTrainStep(
        objective, optimizer, config, mesh, sharding_lib.replicated(mesh))
  train_step = step_lib.make_train_step(objective, optimizer, config, mesh)
  return config, model, optimizer, train_step


def _compile_split(split_step, state, batch):
  """(trace+lower s, XLA s, the step, scratch GiB, per-program seconds) of a
  `SplitTrainStep`: its programs traced one after another, then compiled at the same time
  (XLA s: from the end of tracing to the last program compiled)."""
  seconds = split_step.compile(state, batch)
  return (seconds["trace_lower"], seconds["wall"] - seconds["trace_lower"], split_step,
          _largest_scratch_gib(_program_scratch_gib(split_step)), seconds)


def _program_scratch_gib(split_step) -> dict:
  """Each compiled program's scratch estimate (GiB, None: not reported)."""
  return {name: _scratch_gib(c)[0] for name, c in split_step.compiled.items()}


def _largest_scratch_gib(by_program: dict) -> float | None:
  return max((t for t in by_program.values() if t is not None), default=None)


def _residual_gib(split_step) -> dict:
  """GiB of all stages' residuals per device, in the accelerator's and the host's memory."""
  return {where: sum(split_step.residual_bytes(host=where == "host").values()) / 2**30
          for where in ("device", "host")}


def run_one(variant: str, shape_name: str, steps: int, smoke: bool,
            recycles: tuple[int, ...] = RECYCLES, profile_dir: str | None = None,
            program_times: bool = False, pipelined: bool = False) -> dict:
  """Compiles the train step for one variant and times it at every recycling count
  (`program_times`: and a split step's programs one by one, `_time_programs`; `pipelined`:
  and its steps back to back, `_time_steps`)."""
  import jax

  from af2flax.train import state as state_lib
  from model_step import SHAPES, _training_example

  config, model, optimizer, train_step = _step_parts(variant, shape_name, smoke)
  processes = VARIANTS[variant].get("compile_processes", 0)
  if processes:  # before this process's first compile: JAX opens its cache once
    if config.step_programs != "split":
      raise ValueError(f"{variant}: compile_processes needs step_programs='split'")
    import compile_processes  # pylint: disable=g-import-not-at-top
    cache_dir = compile_processes.new_cache()
  shapes = SHAPES[shape_name]
  num_slices = config.model.num_recycle + 1
  examples = {r: _training_example(shapes, num_slices, r) for r in recycles}
  first = _batch_of(examples[recycles[0]])
  init_batch = examples[recycles[0]]
  # Initialisation, in parts: tracing+lowering model.init, XLA compiling it, running it, and
  # the train state (Adam moments, EMA copy) built from the parameters.
  clock = [time.perf_counter()]
  def lap() -> float:
    clock.append(time.perf_counter())
    return clock[-1] - clock[-2]
  _progress(f"{variant},{shape_name}: initialising")
  init_lowered = jax.jit(lambda k: model.init(k, init_batch)["params"]).lower(
      jax.random.PRNGKey(0))
  init_parts = {"trace_lower": lap()}
  init_compiled = init_lowered.compile()
  init_parts["compile"] = lap()
  params = jax.block_until_ready(init_compiled(jax.random.PRNGKey(0)))
  init_parts["run"] = lap()
  # One program, as the training loop builds it (not op by op: thousands of small dispatches).
  state = jax.jit(lambda p: state_lib.create_train_state(p, optimizer, jax.random.PRNGKey(1)))(
      params)
  jax.block_until_ready(state)
  init_parts["train_state"] = lap()
  init_s = clock[-1] - clock[0]

  _progress(f"{variant},{shape_name}: initialised ({init_s:.1f} s); tracing the step")
  program_s = residual_gib = through_workers = None
  if config.step_programs == "split":
    if processes:
      # The workers start now, each tracing the step and compiling its share into the cache;
      # this process traces meanwhile, waits, then compiles from the cache. trace_s: its
      # tracing; XLA s: from then until the step is compiled (waiting, then loading).
      through_workers = compile_processes.compile_through_workers(
          train_step, state, first, variant, shape_name, smoke, cache_dir, processes)
      trace_s = through_workers["traced"]
      xla_compile_s = through_workers["done"] - trace_s
      compiled, program_s = train_step, through_workers["compile_s"]
      temp_gib = _largest_scratch_gib(_program_scratch_gib(train_step))
    else:
      trace_s, xla_compile_s, compiled, temp_gib, program_s = _compile_split(
          train_step, state, first)
    residual_gib = _residual_gib(train_step)
    # What the host's memory holds: the residuals left there (offloaded block inputs).
    lower_s, host_gib = 0.0, residual_gib["host"] or None
  else:
    step_fn = jax.jit(train_step, donate_argnums=0)
    trace_s, lower_s, lowered = _trace_and_lower(step_fn, state, first)
    _progress(f"{variant},{shape_name}: traced and lowered ({trace_s + lower_s:.1f} s); "
              "XLA compiling")
    start = time.perf_counter()
    compiled = lowered.compile()
    xla_compile_s = time.perf_counter() - start
    temp_gib, host_gib = _scratch_gib(compiled)
  _progress(f"{variant},{shape_name}: compiled (trace+lower {trace_s + lower_s:.1f} s, "
            f"XLA {xla_compile_s:.1f} s)")
  beside_compilation = not _wait_for_compilations()
  with _timing_lock():
    _progress(f"{variant},{shape_name}: timing steps")
    pipelined_s = {} if pipelined else None
    step_times, losses, program_ms = _time_steps(compiled, state, examples, recycles, steps,
                                                 profile_dir, program_times, pipelined_s)
  row = _row(variant, shape_name, config, shapes, recycles, step_times, losses,
             init_s=init_s, init_parts=init_parts, trace_s=trace_s, lower_s=lower_s,
             xla_compile_s=xla_compile_s, temp_gib=temp_gib, host_gib=host_gib)
  row["timed_beside_compilation"] = beside_compilation
  if program_ms:
    row["program_ms"] = program_ms
  if pipelined_s:
    row["pipelined_s"] = pipelined_s
    row["pipelined_expected_s"] = (sum(pipelined_s.values()) / len(pipelined_s)
                                   if set(recycles) == set(RECYCLES) else None)
  if program_s is not None:  # split: trace_s is tracing and lowering of all the programs
    row["program_compile_s"] = program_s
    row["residual_gib"] = residual_gib
  if through_workers is not None:
    row["compile_processes"] = through_workers["processes"]
    row["compile_worker_reports"] = through_workers["workers"]
    row["new_cache_entries"] = through_workers["new_cache_entries"]
  return row


def _progress(message: str) -> None:
  """A progress line on stderr (a worker's: in its `--log_dir` file, read while it runs)."""
  print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def _time_steps(compiled, state, examples, recycles, steps, profile_dir, program_times=False,
                pipelined=None):
  """Median step time and last loss per recycling count (and a profile, if asked); with
  `program_times` and a split step, its programs timed one by one (`_time_programs`); given a
  dict `pipelined`, the mean step of `steps` steps run back to back per count is put in it
  (the host waits only after the last: it dispatches ahead of the device, as the training
  loop's host does, which waits for a step's results one step late; the median above waits
  for each step, so it includes the time the host takes to start the next)."""
  import jax

  step_times, losses = {}, {}
  for count in recycles:
    batch = jax.device_put(_batch_of(examples[count]))
    state, metrics = compiled(state, batch)  # warm-up
    jax.block_until_ready(metrics)
    times = []
    for _ in range(steps):
      start = time.perf_counter()
      state, metrics = compiled(state, batch)
      jax.block_until_ready(metrics)
      times.append(time.perf_counter() - start)
    step_times[count] = statistics.median(times)
    losses[count] = float(metrics["loss"])

  if pipelined is not None:  # steps back to back, as the training loop runs them (the host ahead)
    for count in recycles:
      batch = jax.device_put(_batch_of(examples[count]))
      state, metrics = compiled(state, batch)
      jax.block_until_ready(metrics)
      start = time.perf_counter()
      for _ in range(steps):
        state, metrics = compiled(state, batch)
      jax.block_until_ready((state, metrics))
      pipelined[str(count)] = (time.perf_counter() - start) / steps

  program_ms = {}
  if program_times and getattr(compiled, "compiled", None):
    for count in recycles:
      state, program_ms[str(count)] = _time_programs(compiled, state, examples[count], steps)

  if profile_dir:  # A trace of two steps (perfetto JSON, readable by bench/profile_summary.py).
    import gzip  # pylint: disable=g-import-not-at-top
    os.makedirs(profile_dir, exist_ok=True)
    programs = getattr(compiled, "compiled", None) or {"train_step": compiled}
    for name, program in programs.items():  # the split step: one file per program
      stem = "train_step" if name == "train_step" else f"train_step.{name}"
      with gzip.open(os.path.join(profile_dir, f"{stem}.hlo.txt.gz"), "wt") as handle:
        handle.write(program.as_text())
    batch = jax.device_put(_batch_of(examples[recycles[0]]))
    with jax.profiler.trace(profile_dir, create_perfetto_trace=True):
      for _ in range(2):
        state, metrics = compiled(state, batch)
        jax.block_until_ready(metrics)
  return step_times, losses, program_ms


def _time_programs(split_step, state, example, steps):
  """A split step's programs timed one by one: `steps` steps in which the host waits for each
  program's outputs before it starts the next, so each program's time is its dispatch and its
  run on the device alone (the GPU idles between programs; the step is slower than untimed).
  Returns the state and {program: [median ms per call, calls per step]}; '(step)' is the
  median step so timed, '(gaps)' the step less the programs' sum."""
  import jax

  programs = split_step.compiled
  originals = dict(programs)
  times: dict = {name: [] for name in originals}

  def timed(name, program):
    def call(*args):
      start = time.perf_counter()
      out = jax.block_until_ready(program(*args))
      times[name].append(time.perf_counter() - start)
      return out
    return call

  batch = jax.device_put(_batch_of(example))
  step_s, programs_s = [], []
  try:
    programs.update({name: timed(name, program) for name, program in originals.items()})
    for _ in range(steps + 1):  # the first as warm-up
      for name in times:
        times[name].clear()
      start = time.perf_counter()
      state, metrics = split_step(state, batch)
      jax.block_until_ready(metrics)
      step_s.append(time.perf_counter() - start)
      programs_s.append({name: (sum(t), len(t)) for name, t in times.items() if t})
  finally:
    programs.update(originals)
  step_s, programs_s = step_s[1:], programs_s[1:]
  result = {name: [1e3 * statistics.median(p[name][0] / p[name][1] for p in programs_s),
                   programs_s[0][name][1]] for name in programs_s[0]}
  result["(step)"] = [1e3 * statistics.median(step_s), 1]
  result["(gaps)"] = [1e3 * statistics.median(
      s - sum(total for total, _ in p.values()) for s, p in zip(step_s, programs_s)), 1]
  return state, result


def _wait_for_compilations(poll_s: float = 1.0, limit_s: float | None = None) -> bool:
  """With `--parallel`, a worker that has compiled waits until every other worker started so
  far has compiled too (or exited) before it times steps: XLA's autotuner runs candidate
  kernels on the GPU while it compiles, so a compilation beside a timed step slows it
  (H200, 2026-12-03, eighth session: a side-by-side run read 0.683 s per expected step for
  the presets that took 0.622 s alone). Workers mark themselves in the AF2FLAX_BENCH_BARRIER
  directory: `started-ID` and `exited-ID` by the parent, `compiled-ID` here. A job started
  after others passed the barrier (more jobs than --parallel) still compiles beside them.

  The wait ends after `limit_s` (default: `--compile_wait`, passed in
  AF2FLAX_BENCH_COMPILE_WAIT) all the same, so that one slow compilation cannot hold every
  other worker's row past the run's time limit (H200, 2026-12-04, twelfth session: three
  variants at initial shapes, one of them under an XLA flag, gave no row in 470 s). Returns
  False when it ended so, with another worker still compiling: that row was timed beside a
  compilation and says so."""
  barrier = os.environ.get("AF2FLAX_BENCH_BARRIER")
  worker = os.environ.get("AF2FLAX_BENCH_WORKER_ID")
  if not barrier or not worker:
    return True
  if limit_s is None:
    limit_s = float(os.environ.get("AF2FLAX_BENCH_COMPILE_WAIT", _COMPILE_WAIT_S))
  directory = pathlib.Path(barrier)
  (directory / f"compiled-{worker}").touch()
  deadline = time.monotonic() + limit_s
  while True:
    names = {path.name for path in directory.iterdir()}
    started = {name[len("started-"):] for name in names if name.startswith("started-")}
    if all(f"compiled-{other}" in names or f"exited-{other}" in names for other in started):
      return True
    if time.monotonic() >= deadline:
      break
    time.sleep(poll_s)
  _progress(f"worker {worker}: other workers still compiling after {limit_s:.0f} s; "
            "timing beside them")
  return False


@contextlib.contextmanager
def _timing_lock():
  """With `--parallel`, workers compile side by side but time their steps one at a time."""
  path = os.environ.get("AF2FLAX_BENCH_LOCK")
  if not path:
    yield
    return
  with open(path, "a", encoding="utf-8") as handle:
    fcntl.flock(handle, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(handle, fcntl.LOCK_UN)


def _row(variant, shape_name, config, shapes, recycles, step_times, losses, *,
         init_s, init_parts, trace_s, lower_s, xla_compile_s, temp_gib, host_gib) -> dict:
  """One result row (seconds: wall time of initialisation, tracing, lowering and XLA;
  `init_parts`: the initialisation's parts, see `run_one`)."""
  import jax
  import numpy as np

  from af2flax.model.flops import forward_flops, train_step_flops

  compile_s = trace_s + lower_s + xla_compile_s
  gc = config.model.global_config
  # Recycles uniform in 0..3: the mean over the four counts (only when all were timed).
  expected = (sum(step_times.values()) / len(step_times) if set(recycles) == set(RECYCLES)
              else None)
  forward = sum(forward_flops(config.model, **shapes).values())
  remat = gc.get("use_remat", False)
  timed = expected if expected is not None else step_times[recycles[0]]
  timed_flops = train_step_flops(forward, (sum(RECYCLES) / len(RECYCLES) if expected is not None
                                           else recycles[0]), remat=remat)
  device = jax.devices()[0]
  stats = device.memory_stats() or {}
  examples = _examples()
  return {
      "variant": variant, "shapes": shape_name, "ok": True, "device": device.device_kind,
      "jax": jax.__version__, "init_s": init_s, "init_parts": init_parts,
      "compile_s": compile_s,
      "trace_s": trace_s, "lower_s": lower_s, "xla_compile_s": xla_compile_s,
      # Seconds per step; with `examples` > 1 the table divides them by it (per example).
      "step_s": {str(k): v for k, v in step_times.items()}, "expected_s": expected,
      "examples": examples, "vmapped": config.vmap_batch_size > 1,
      "tflops": examples * timed_flops / timed / 1e12, "forward_flop": forward,
      "peak_gib": stats.get("peak_bytes_in_use", 0) / 2 ** 30 if stats else None,
      "loss": losses, "finite": bool(np.all(np.isfinite(list(losses.values())))),
      "dtype": gc.get("dtype"), "shape_sizes": dict(shapes),
      "remat_policy": gc.get("remat_policy"),
      "remat_submodules": gc.get("remat_submodules"),
      "remat_group_size": gc.get("remat_group_size"),
      "remat_offload": gc.get("remat_offload", False),
      "remat_offload_fraction": gc.get("remat_offload_fraction", 1.0),
      # The flags XLA ran under: the variant's added to the environment's XLA_FLAGS.
      "xla_flags": os.environ.get("XLA_FLAGS", ""), "temp_gib": temp_gib,
      "host_gib": host_gib,
      "concurrent_workers": int(os.environ.get("AF2FLAX_BENCH_WORKERS", "1")),
      # JAX's persistent cache (JAX_COMPILATION_CACHE_DIR): compile_s may be a cache load.
      "compilation_cache": os.environ.get("JAX_COMPILATION_CACHE_DIR") or None,
      "use_remat": bool(remat),
  }


def _warm_device(seconds: float) -> None:
  """Runs a bf16 matrix product on the device for `seconds` (its clocks up, its libraries
  loaded), as a training run's initialisation has done before the step compiles: whether a
  compile-only run's slower XLA compile (80.1 against 64.3 s after the initialisation, H100,
  twenty-fourth session) is the device's warm-up."""
  import jax
  import jax.numpy as jnp

  matmul = jax.jit(lambda a: (a @ a) * 1e-3)
  a = jnp.ones((4096, 4096), jnp.bfloat16)
  end = time.perf_counter() + seconds
  while time.perf_counter() < end:
    a = matmul(a).block_until_ready()


def _with_flags(xla_flags: str, more: str) -> str:
  """XLA_FLAGS `xla_flags` with a variant's flags `more` after them (XLA takes the last)."""
  return f"{xla_flags} {more}".strip()


def _trace_and_lower(step_fn, state, batch):
  """Python tracing and lowering to StableHLO, timed apart from XLA's compilation: these two
  are the same on every backend, so a CPU measures them for the GPU."""
  start = time.perf_counter()
  traced = step_fn.trace(state, batch)
  trace_s = time.perf_counter() - start
  start = time.perf_counter()
  lowered = traced.lower()
  return trace_s, time.perf_counter() - start, lowered


def abstract_step(variant: str, shape_name: str, smoke: bool):
  """(config, un-jitted train step, abstract train state, batch) of `_step_parts` at
  `shape_name`: the state's parameters abstract (`jax.ShapeDtypeStruct`s, no
  initialisation), the batch a random example's, to trace or lower the step."""
  import jax

  from af2flax.train import state as state_lib
  from model_step import SHAPES, _training_example

  config, model, optimizer, train_step = _step_parts(variant, shape_name, smoke)
  example = _training_example(SHAPES[shape_name], config.model.num_recycle + 1, 0)
  params = jax.eval_shape(lambda k: model.init(k, example)["params"], jax.random.PRNGKey(0))
  state = jax.eval_shape(
      lambda p: state_lib.create_train_state(p, optimizer, jax.random.PRNGKey(1)), params)
  return config, train_step, state, _batch_of(example)


def run_lower_only(variant: str, shape_name: str, smoke: bool, compile_too: bool = False,
                   profile_dir: str | None = None, memory_report: str | None = None,
                   no_alone: bool = False, warm_device_s: float = 0.0) -> dict:
  """Traces and lowers the train step on abstract parameters (no initialisation, no XLA
  compilation): the device-independent part of the compile time, and the program's size.
  `compile_too`: also compiles it for this backend and reports XLA's scratch estimate
  (`memory_analysis().temp_size_in_bytes`), with nothing run; with `profile_dir`, XLA's
  compilation is traced there (host events: `bench/profile_summary.py DIR --host`); with
  `memory_report`, what is live at the program's memory peak (`memory_peak.py`) is written to
  MEMORY_REPORT/VARIANT-SHAPES.peak.txt (XLA dumps into MEMORY_REPORT/dump: `main` sets
  the flag before JAX starts). `no_alone`: a split step's programs are compiled together
  only, not again one after another (`_lower_split`). `warm_device_s`: first run matrix
  products on the device for that long (`_warm_device`)."""
  import jax

  if warm_device_s > 0:
    _warm_device(warm_device_s)
  config, train_step, state, first = abstract_step(variant, shape_name, smoke)
  if config.step_programs == "split":
    return _lower_split(variant, shape_name, train_step, state, first, compile_too, no_alone,
                        profile_dir)
  trace_s, lower_s, lowered = _trace_and_lower(jax.jit(train_step), state, first)
  text = lowered.as_text()
  row = {"variant": variant, "shapes": shape_name, "trace_s": trace_s, "lower_s": lower_s,
         "stablehlo_lines": text.count("\n"), "device": jax.devices()[0].device_kind,
         "jax": jax.__version__, "xla_flags": os.environ.get("XLA_FLAGS", ""),
         **_matrix_product_counts({"train_step": text})}
  if compile_too:
    if memory_report:  # this compilation's dump alone (several variants share the directory)
      for old in pathlib.Path(memory_report, "dump").glob("*"):
        if old.is_file():
          old.unlink()
    tracing = (jax.profiler.trace(profile_dir, create_perfetto_trace=True) if profile_dir
               else contextlib.nullcontext())
    with tracing:
      start = time.perf_counter()
      compiled = lowered.compile()
      row["xla_compile_s"] = time.perf_counter() - start
    row["temp_gib"] = _scratch_gib(compiled)[0]
    if memory_report:
      import memory_peak  # pylint: disable=g-import-not-at-top
      text = memory_peak.report(os.path.join(memory_report, "dump"), "train_step")
      path = os.path.join(memory_report, f"{variant}-{shape_name}.peak.txt")
      pathlib.Path(path).write_text(text + "\n", encoding="utf-8")
      row["memory_report"] = path
  return row


def _lower_split(variant, shape_name, split_step, state, batch, compile_too,
                 no_alone=False, profile_dir=None) -> dict:
  """`run_lower_only` for the split step: its programs traced and lowered (lines summed);
  with `compile_too`, compiled at the same time, as training does (`xla_compile_s`), then
  again one after another (each program's XLA seconds alone, `program_compile_s`: the longest
  bounds the concurrent compile on enough cores; on a GPU these reuse the first compile's
  GEMM autotuning, which XLA caches in the process), unless `no_alone`. Each program's
  seconds within the concurrent compile: `program_compile_together_s`; with `profile_dir`,
  the concurrent compile is traced there (`bench/profile_summary.py DIR --host`)."""
  import jax

  start = time.perf_counter()
  lowered = split_step.lower(state, batch)
  trace_s = time.perf_counter() - start
  texts = {name: low.as_text() for name, low in lowered.items()}  # printed once each
  program_lines = {name: text.count("\n") for name, text in texts.items()}
  row = {"variant": variant, "shapes": shape_name, "trace_s": trace_s,
         "lower_s": 0.0, "device": jax.devices()[0].device_kind, "jax": jax.__version__,
         "xla_flags": os.environ.get("XLA_FLAGS", ""),
         "stablehlo_lines": sum(program_lines.values()), "program_lines": program_lines,
         "residual_gib": _residual_gib(split_step), **_matrix_product_counts(texts)}
  if compile_too:
    # The concurrent compile from these lowered programs; the one-at-a-time compile from a
    # fresh lowering (a lowered program keeps its executable once compiled).
    tracing = (jax.profiler.trace(profile_dir, create_perfetto_trace=True) if profile_dir
               else contextlib.nullcontext())
    with tracing:
      together = split_step.compile(state, batch, lowered=lowered)
    row["xla_compile_s"] = together["wall"] - together["trace_lower"]
    row["program_compile_together_s"] = {k: v for k, v in together.items()
                                         if k not in ("trace_lower", "wall")}
    if not no_alone:
      alone = split_step.compile(state, batch, concurrent=False)
      row["program_compile_s"] = {k: v for k, v in alone.items()
                                  if k not in ("trace_lower", "wall")}
    row["program_temp_gib"] = _program_scratch_gib(split_step)
    largest = _largest_scratch_gib(row["program_temp_gib"])
    row["temp_gib"] = float("nan") if largest is None else largest
  return row


def _matrix_product_counts(texts: dict) -> dict:
  """The distinct matrix products of the programs' StableHLO (`texts`: name -> text) and
  their count summed over the programs: how many XLA's GPU autotuning tunes if every program
  compiles at once (each program tunes its own; one process caches them for later
  compiles), against the fewest it could."""
  from af2flax.train import programs  # pylint: disable=g-import-not-at-top
  products = [programs.matrix_products(text) for text in texts.values()]
  return {"matrix_products": len(frozenset().union(*products)),
          "matrix_products_per_program": sum(len(p) for p in products)}


def _scratch_gib(compiled) -> tuple[float | None, float | None]:
  """XLA's scratch estimate of a compiled program (beyond its arguments and outputs), and
  the part of it in the host's memory (`remat_offload`'s block inputs), GiB (None: not
  reported)."""
  memory = compiled.memory_analysis()
  if memory is None:
    return None, None
  host = getattr(memory, "host_temp_size_in_bytes", None)
  return memory.temp_size_in_bytes / 2 ** 30, (host / 2 ** 30 if host is not None else None)


def run_breakdown(variant: str, steps: int, smoke: bool) -> list[dict]:
  """Forward+backward time of each module type at initial-training shapes, x its count."""
  import jax
  import jax.numpy as jnp
  from af2flax.model import evoformer, structure, triangle
  from af2flax.model.primitives import Transition

  config = _train_config(variant, smoke, "initial_training").model
  gc = config.global_config
  evo = config.embeddings_and_evoformer
  dtype = jnp.bfloat16 if gc.dtype == "bfloat16" else jnp.float32
  n, s, e = (16, 4, 8) if smoke else (256, 128, 1024)
  c_m, c_z, c_e = evo.msa_channel, evo.pair_channel, evo.extra_msa_channel
  key = jax.random.PRNGKey(0)
  msa = jax.random.normal(key, (s, n, c_m), dtype)
  extra = jax.random.normal(key, (e, n, c_e), dtype)
  pair = jax.random.normal(key, (n, n, c_z), dtype)
  msa_mask = jnp.ones((s, n), jnp.float32)
  extra_mask = jnp.ones((e, n), jnp.float32)
  pair_mask = jnp.ones((n, n), jnp.float32)
  ec = evo.evoformer
  blocks = evo.evoformer_num_block
  cases = [
      ("msa_row_attention", evoformer.MSARowAttentionWithPairBias(ec.msa_row_attention_with_pair_bias, gc),
       (msa, msa_mask, pair), blocks),
      ("msa_column_attention", evoformer.MSAColumnAttention(ec.msa_column_attention, gc),
       (msa, msa_mask), blocks),
      ("msa_transition", Transition(ec.msa_transition, gc), (msa,), blocks),
      ("outer_product_mean", evoformer.OuterProductMean(ec.outer_product_mean, gc, c_z),
       (msa, msa_mask), blocks),
      ("triangle_multiplication (x2)", triangle.TriangleMultiplication(
          ec.triangle_multiplication_outgoing, gc), (pair, pair_mask), 2 * blocks),
      ("triangle_attention (x2)", triangle.TriangleAttention(
          ec.triangle_attention_starting_node, gc), (pair, pair_mask), 2 * blocks),
      ("pair_transition", Transition(ec.pair_transition, gc), (pair,), blocks),
      ("extra_msa block", evoformer.EvoformerIteration(ec, gc, is_extra_msa=True),
       ((extra, pair), (extra_mask, pair_mask)), evo.extra_msa_stack_num_block),
      ("structure_module (8 layers)", structure.StructureModule(config.heads.structure_module, gc),
       ({"single": jax.random.normal(key, (n, evo.seq_channel), dtype), "pair": pair},
        {"aatype": jnp.zeros((n,), jnp.int32), "seq_mask": jnp.ones((n,), jnp.float32)}), 1),
  ]
  rows = []
  for name, module, args, count in cases:
    params = jax.jit(module.init)(key, *args)

    def loss(p, *a, module=module):
      out = module.apply(p, *a)
      return sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in jax.tree.leaves(out)
                 if jnp.issubdtype(x.dtype, jnp.floating))

    grad = jax.jit(jax.grad(loss, argnums=(0, 1), allow_int=True))
    out = grad(params, *args)
    jax.block_until_ready(out)
    times = []
    for _ in range(steps):
      start = time.perf_counter()
      out = grad(params, *args)
      jax.block_until_ready(out)
      times.append(time.perf_counter() - start)
    rows.append({"module": name, "per_call_ms": 1e3 * statistics.median(times), "count": count})
  return rows


def _remat_label(row: dict) -> str:
  """'none', or the policy (default: nothing saved), with 'gN' for groups of N blocks and
  'host' for block inputs kept in host memory."""
  if not row.get("use_remat"):
    return "none"
  label = row.get("remat_policy") or "nothing"
  label = {"nothing_saveable": "nothing", "dots_with_no_batch_dims_saveable": "dots"}.get(
      label, label)
  if (row.get("remat_group_size") or 1) > 1:
    label += f",g{row['remat_group_size']}"
  if row.get("remat_offload"):
    fraction = row.get("remat_offload_fraction", 1.0)
    label += ",host" if fraction >= 1.0 else f",host{round(100 * fraction)}%"
  if row.get("remat_submodules") not in (None, "", "none"):
    label += f",sub:{row['remat_submodules']}"
  return label


_INIT_LABELS = {"trace_lower": "trace+lower", "train_state": "train state"}


def _format(rows: list[dict]) -> str:
  """The result table: shapes (residues/MSA/extra MSA/templates), dtype, remat policy, median
  step seconds per recycling count and expected, TFLOP/s, peak GiB, compile seconds."""
  header = (f"{'variant':24s} {'shapes':18s} {'dtype':8s} {'remat':10s} "
            + " ".join(f"{f'r={r} s':>7s}" for r in RECYCLES)
            + f" {'expect s':>8s} {'TFLOP/s':>8s} {'peak GiB':>8s} {'compile s':>9s}  device / note")
  lines = [header]
  for row in rows:
    if not row.get("ok"):
      lines.append(f"{row['variant']:24s} {row['shapes']:18s} FAILED: "
                   f"{row.get('error', '')[:150]}")
      continue
    per = row.get("examples", 1)  # seconds per example
    steps = {k: v / per for k, v in row["step_s"].items()}
    expected = row["expected_s"] / per if row["expected_s"] is not None else None
    def cell(value, width, fmt):
      return format(value, fmt) if value is not None else f"{'-':>{width}s}"
    sizes = row.get("shape_sizes") or {}
    shapes = (f"{row['shapes']} " + "/".join(str(sizes[k]) for k in (
        "num_res", "num_msa", "num_extra_msa", "num_templates")) if sizes else row["shapes"])
    dtype = {"bfloat16": "bf16", "float32": "fp32"}.get(row.get("dtype"), row.get("dtype") or "")
    lines.append(f"{row['variant']:24s} {shapes:18s} {dtype:8s} {_remat_label(row):10s} "
                 + " ".join(cell(steps.get(str(r)), 7, "7.3f") for r in RECYCLES)
                 + f" {cell(expected, 8, '8.3f')} "
                 f"{row['tflops']:8.1f} {row['peak_gib'] or 0:8.2f} "
                 f"{row['compile_s']:9.1f}  {row['device']}, jax {row['jax']}, "
                 + (f"{per} examples per step ("
                    + ("vmapped" if row.get("vmapped", True) else "one at a time")
                    + "; seconds per example), " if per > 1 else "")
                 + f"trace+lower {row['trace_s'] + row['lower_s']:.1f} s, "
                 f"init {row['init_s']:.1f} s"
                 + (" ({})".format(", ".join(f"{_INIT_LABELS.get(k, k)} {v:.1f}" for k, v in
                                             row["init_parts"].items()))
                    if row.get("init_parts") else "")
                 + (f", host memory {row['host_gib']:.2f} GiB" if row.get("host_gib") else "")
                 + (f", split: residuals {row['residual_gib']['device']:.2f} GiB on the device"
                    if row.get("residual_gib") else "")
                 + (", compilation cache on" if row.get("compilation_cache") else "")
                 + (f", compiled by {row['compile_processes']} worker processes (compile s: "
                    "from their start)" if row.get("compile_processes") else "")
                 + (", TIMED BESIDE ANOTHER COMPILATION" if row.get("timed_beside_compilation")
                    else ""))
  return "\n".join(lines)


def _run_worker(variant: str, shape_name: str, args, env: dict):
  """One variant at one shape in its own process: its result row (or breakdown list)."""
  command = [sys.executable, str(pathlib.Path(__file__).resolve()), "--one",
             f"{variant},{shape_name}", "--steps", str(args.steps), "--recycles", args.recycles,
             "--examples", str(args.examples)]
  if args.smoke:
    command.append("--smoke")
  if args.program_times:
    command.append("--program_times")
  if args.pipelined:
    command.append("--pipelined")
  if args.profile_dir:  # several jobs: each traces into its own subdirectory
    command += ["--profile_dir", os.path.join(args.profile_dir, f"{variant}-{shape_name}")
                if args.profile_per_job else args.profile_dir]
  worker_env = dict(env)
  flags = VARIANTS[variant].get("xla_flags", "")
  if flags:
    worker_env["XLA_FLAGS"] = _with_flags(worker_env.get("XLA_FLAGS", ""), flags)
  # The worker's stderr (its progress lines, XLA's messages) goes to a file: under --log_dir
  # it stays there, to be read while the run goes on or after it was cut short.
  if args.log_dir:
    os.makedirs(args.log_dir, exist_ok=True)
    log_path = os.path.join(args.log_dir, f"{variant}-{shape_name}.log")
  else:
    handle, log_path = tempfile.mkstemp(prefix=f"train_step_{variant}_", suffix=".log")
    os.close(handle)
  try:
    return _worker_result(command, worker_env, variant, shape_name, log_path, args.timeout)
  finally:
    if not args.log_dir:
      os.remove(log_path)


def _worker_result(command, worker_env, variant, shape_name, log_path, timeout):
  """Runs one worker with its stderr in `log_path`: its RESULT row, or a failed row."""
  with open(log_path, "w", encoding="utf-8") as log:
    with _WORKERS_LOCK:  # a run being stopped starts no worker (`_stop_workers`)
      if _STOPPING.is_set():
        return {"variant": variant, "shapes": shape_name, "ok": False, "error": "stopped"}
      process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=log, text=True,
                                 env=worker_env)
      _WORKERS.add(process)
    try:
      stdout, _ = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
      process.kill()
      process.communicate()
      return {"variant": variant, "shapes": shape_name, "ok": False,
              "error": f"timeout after {timeout} s"}
    finally:
      with _WORKERS_LOCK:
        _WORKERS.discard(process)
  results = [line for line in stdout.splitlines() if line.startswith("RESULT ")]
  if results:
    return json.loads(results[-1][len("RESULT "):])
  tail = pathlib.Path(log_path).read_text(encoding="utf-8").strip().splitlines()[-3:]
  return {"variant": variant, "shapes": shape_name, "ok": False,
          "error": " | ".join(tail or ["no output"])}


# The workers' processes still running (killed if the run itself is stopped), and whether
# it is being stopped; the lock orders a worker's start against the stop.
_WORKERS: set = set()
_WORKERS_LOCK = threading.Lock()
_STOPPING = threading.Event()


def _stop_workers() -> None:
  """Kills every worker process and keeps new ones from starting."""
  with _WORKERS_LOCK:
    _STOPPING.set()
    for process in list(_WORKERS):
      process.kill()


class _Stopped(Exception):
  """The run got SIGTERM (e.g. from `timeout`): report what finished, then stop."""


# Set by SIGTERM's handler (`_stop`), polled by `main`'s loop every `_STOP_POLL_S` seconds.
_STOP_REQUESTED = {"signalled": False}
_STOP_POLL_S = 0.1


def parse_value(text: str):
  """A `--set` value: JSON where it parses ('1', '0.5', 'true', '"x"'), else the string."""
  try:
    return json.loads(text)
  except json.JSONDecodeError:
    return text


def parse_set(items: list[str]) -> dict:
  """`--set KEY=VALUE` items -> {KEY: parse_value(VALUE)}; ValueError for an item without a
  key and '='."""
  overrides = {}
  for item in items:
    key, sep, value = item.partition("=")
    if not sep or not key:
      raise ValueError(f"--set {item!r}: expected KEY=VALUE")
    overrides[key] = parse_value(value)
  return overrides


def _stop(signum, frame):  # pylint: disable=unused-argument
  # Only a flag. A handler runs in the main thread between any two of its bytecodes, also
  # while it holds a lock of concurrent.futures (a future's condition, which a worker thread
  # then waits for at its end, and the interpreter's exit for that thread): an exception
  # raised there, or a lock taken here, could hang the run. `timeout` signals twice (the
  # process, then its process group); the second changes nothing.
  _STOP_REQUESTED["signalled"] = True


def _print_pipelined(row: dict) -> None:
  """Steps back to back (`--pipelined`): s per step at each recycling count."""
  pipelined = row.get("pipelined_s") if isinstance(row, dict) else None
  if not pipelined:
    return
  expected = row.get("pipelined_expected_s")
  print(f"  {row['variant']}: steps back to back, s per step: "
        + ", ".join(f"r={count} {seconds:.3f}" for count, seconds in pipelined.items())
        + (f"; expected {expected:.3f}" if expected is not None else ""), flush=True)


def _print_program_ms(row: dict) -> None:
  """A split step's programs timed one by one (`--program_times`): ms per call at each
  recycling count."""
  by_count = row.get("program_ms") if isinstance(row, dict) else None
  if not by_count:
    return
  counts = list(by_count)
  print(f"  {row['variant']}: its programs one by one (ms per call x calls per step)",
        flush=True)
  print("  " + f"{'program':24s}" + "".join(f" {'r=' + c:>14s}" for c in counts), flush=True)
  for name in by_count[counts[0]]:
    cells = "".join(f" {by_count[c][name][0]:8.2f} x {by_count[c][name][1]:2d}"
                    if name in by_count[c] else f" {'':>14s}" for c in counts)
    print(f"  {name:24s}{cells}", flush=True)


def _print_breakdown(variant: str, result: list[dict]) -> None:
  total = sum(r["per_call_ms"] * r["count"] for r in result)
  print(f"\nper-module forward+backward, variant {variant}, initial shapes "
        "(one call x count per step)")
  for r in result:
    print(f"  {r['module']:30s} {r['per_call_ms']:9.2f} ms x {r['count']:3d} = "
          f"{r['per_call_ms'] * r['count'] / 1e3:7.3f} s  "
          f"({100 * r['per_call_ms'] * r['count'] / total:4.1f}%)")


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--variants", default="bf16-auto",
                      help="comma-separated names of VARIANTS (default: bf16-auto, the "
                      "initial-training preset; the fine-tuning preset at --shapes finetune "
                      "is bf16-pallas512-extracudnn-offload55)")
  parser.add_argument("--shapes", default="initial")
  parser.add_argument("--steps", type=int, default=10, help="timed steps per recycling count")
  parser.add_argument("--recycles", default="0,1,2,3",
                      help="recycling counts to time (all four give the expected step)")
  parser.add_argument("--profile_dir", help="also trace two steps into this directory (several "
                      "variants or shapes: a subdirectory VARIANT-SHAPES each; with "
                      "--lower_only --compile_only: trace XLA's compilation instead)")
  parser.add_argument("--program_times", action="store_true",
                      help="a split step: after the timed steps, its programs timed one by "
                      "one (the host waits for each) at every recycling count")
  parser.add_argument("--pipelined", action="store_true",
                      help="also time --steps steps back to back per recycling count, the "
                      "host waiting only after the last, as the training loop runs them")
  parser.add_argument("--breakdown", action="store_true")
  parser.add_argument("--lower_only", action="store_true",
                      help="only trace and lower (no init, no XLA compile): the compile time's "
                      "device-independent part, measurable on a CPU")
  parser.add_argument("--compile_only", action="store_true",
                      help="with --lower_only: also compile (nothing runs) and print XLA's "
                      "scratch-memory estimate")
  parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                      help="model global_config override after the variant's (repeatable; "
                      "VALUE is JSON, e.g. --set remat_group_size=4)")
  parser.add_argument("--smoke", action="store_true")
  parser.add_argument("--timeout", type=int, default=900, help="seconds per variant")
  parser.add_argument("--json", help="also write the rows to this file")
  parser.add_argument("--parallel", type=int, default=1,
                      help="workers side by side: compilations overlap (their compile seconds "
                      "share the host's cores), timed steps run one worker at a time and only "
                      "once no other worker is compiling")
  parser.add_argument("--examples", type=int, default=1,
                      help="examples per step on the one device, vmapped together "
                      "(vmap_batch_size); the table gives seconds per example")
  parser.add_argument("--one_at_a_time", action="store_true",
                      help="with --examples N: the N examples one after another in the loop "
                      "over the device's examples (vmap_batch_size 1), not vmapped")
  parser.add_argument("--compile_wait", type=float, default=_COMPILE_WAIT_S,
                      help="with --parallel: seconds a compiled worker waits for the others' "
                      "compilations before timing its steps beside them (its row says so)")
  parser.add_argument("--log_dir", help="keep each worker's stderr (progress lines, XLA's "
                      "messages) in LOG_DIR/VARIANT-SHAPES.log")
  parser.add_argument("--no_alone", action="store_true",
                      help="with --lower_only --compile_only and a split step: compile its "
                      "programs together only, as training does, not again one after another "
                      "(which about doubles the run)")
  parser.add_argument("--warm_device", type=float, default=0.0, metavar="SECONDS",
                      help="with --lower_only: first run matrix products on the device for "
                      "SECONDS, as a training run's initialisation runs before the step compiles")
  parser.add_argument("--memory_report", help="with --lower_only --compile_only: XLA dumps "
                      "into MEMORY_REPORT/dump and what is live at the step's memory peak is "
                      "written to MEMORY_REPORT/VARIANT-SHAPES.peak.txt and printed")
  parser.add_argument("--one", help=argparse.SUPPRESS)
  args = parser.parse_args(argv)

  try:
    overrides = parse_set(args.set)
  except ValueError as error:
    parser.error(str(error))
  if overrides:
    os.environ["AF2FLAX_BENCH_SET"] = json.dumps(overrides)
  if args.examples < 1:
    parser.error(f"--examples {args.examples}: expected at least 1")
  os.environ["AF2FLAX_BENCH_EXAMPLES"] = str(args.examples)
  if args.one_at_a_time:
    os.environ["AF2FLAX_BENCH_ONE_AT_A_TIME"] = "1"
  os.environ["AF2FLAX_BENCH_COMPILE_WAIT"] = str(args.compile_wait)

  if args.memory_report:
    if not (args.lower_only and args.compile_only):
      parser.error("--memory_report needs --lower_only --compile_only")
    dump = os.path.join(os.path.abspath(args.memory_report), "dump")
    os.makedirs(dump, exist_ok=True)
    # Before JAX starts its backend (nothing above imports jax): XLA reads XLA_FLAGS once.
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                               + f" --xla_dump_to={dump} --xla_dump_hlo_pass_re=^$").strip()
  if args.lower_only:
    # The variants run in this process, whose XLA reads XLA_FLAGS once, as its backend starts
    # (below): their flags go there, so they must agree.
    variant_flags = {VARIANTS.get(v, {}).get("xla_flags", "") for v in args.variants.split(",")}
    if len(variant_flags) > 1:
      parser.error(f"--lower_only compiles every variant in one process, under one XLA_FLAGS: "
                   f"{args.variants} set different xla_flags; run them one at a time")
    if variant_flags != {""}:
      os.environ["XLA_FLAGS"] = _with_flags(os.environ.get("XLA_FLAGS", ""), variant_flags.pop())
    rows = []
    print(f"{'variant':20s} {'shapes':8s} {'trace s':>8s} {'lower s':>8s} {'StableHLO lines':>16s}"
          + (f" {'compile s':>9s} {'scratch GiB':>11s}" if args.compile_only else ""))
    for shape_name in args.shapes.split(","):
      for variant in args.variants.split(","):
        row = run_lower_only(variant, "smoke" if args.smoke else shape_name, args.smoke,
                             args.compile_only, args.profile_dir,
                             os.path.abspath(args.memory_report) if args.memory_report else None,
                             args.no_alone, args.warm_device)
        extra = (f" {row['xla_compile_s']:9.1f} {row['temp_gib']:11.2f}" if args.compile_only
                 else "")
        print(f"{variant:20s} {row['shapes']:8s} {row['trace_s']:8.1f} {row['lower_s']:8.1f} "
              f"{row['stablehlo_lines']:16d}{extra}  {row['device']}, jax {row['jax']}"
              + (f", set {overrides}" if overrides else ""), flush=True)
        if row.get("program_lines"):  # the split step: each program's size (and compile)
          for name, lines in row["program_lines"].items():
            together = row.get("program_compile_together_s", {}).get(name)
            alone = row.get("program_compile_s", {}).get(name)
            temp = row.get("program_temp_gib", {}).get(name)
            print(f"  {name:10s} {lines:8d} lines"
                  + (f", XLA {together:.1f} s together" if together is not None else "")
                  + (f", {alone:.1f} s alone" if alone is not None else "")
                  + (f", scratch {temp:.2f} GiB" if temp is not None else ""), flush=True)
          print(f"  residuals {row['residual_gib']['device']:.3f} GiB on the device, "
                f"{row['residual_gib']['host']:.3f} GiB on the host", flush=True)
        print(f"  matrix products: {row['matrix_products']} distinct, "
              f"{row['matrix_products_per_program']} summed over the programs", flush=True)
        if row.get("memory_report"):
          print(pathlib.Path(row["memory_report"]).read_text(encoding="utf-8"), flush=True)
        rows.append(row)
    if args.json:
      pathlib.Path(args.json).write_text(json.dumps(rows, indent=1) + "\n", encoding="utf-8")
    return 0

  if args.one:
    variant, shape_name = args.one.split(",")
    if shape_name == "breakdown":
      print("RESULT " + json.dumps(run_breakdown(variant, args.steps, args.smoke)))
    else:
      recycles = tuple(int(r) for r in args.recycles.split(","))
      print("RESULT " + json.dumps(run_one(variant, shape_name, args.steps, args.smoke,
                                           recycles, args.profile_dir, args.program_times,
                                           args.pipelined)))
    return 0

  env = dict(os.environ)
  env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
  if args.smoke:
    env.setdefault("JAX_PLATFORMS", "cpu")
    env.setdefault("XLA_FLAGS", "--xla_backend_optimization_level=0")
  jobs = [(v, s) for s in args.shapes.split(",") for v in args.variants.split(",")]
  if args.breakdown:
    jobs = [(args.variants.split(",")[0], "breakdown")]
  if args.smoke:
    jobs = [(v, "breakdown" if s == "breakdown" else "smoke") for v, s in jobs]
  for variant, _ in jobs:
    if variant not in VARIANTS:
      parser.error(f"--variants: unknown variant {variant!r}; known: {', '.join(VARIANTS)}")
  args.profile_per_job = len(jobs) > 1
  own_barrier = None
  if args.parallel > 1:
    # Side by side: no GPU memory preallocation, and one worker at a time in its timed steps.
    env["XLA_PYTHON_CLIENT_PREALLOCATE"] = "false"
    env["AF2FLAX_BENCH_WORKERS"] = str(min(args.parallel, len(jobs)))
    # An inherited lock (another run side by side) keeps that run's steps apart from ours too.
    env.setdefault("AF2FLAX_BENCH_LOCK",
                   os.path.join(tempfile.mkdtemp(prefix="train_step_bench"), "lock"))
    # ... and none times its steps while another still compiles (`_wait_for_compilations`).
    if "AF2FLAX_BENCH_BARRIER" not in env:
      env["AF2FLAX_BENCH_BARRIER"] = own_barrier = tempfile.mkdtemp(prefix="train_step_barrier")

  def job(numbered_job):
    number, variant_and_shape = numbered_job
    barrier = env.get("AF2FLAX_BENCH_BARRIER")
    if not barrier:
      return _run_worker(*variant_and_shape, args, env)
    worker = f"{os.getpid()}-{number}"  # unique across runs that share the directory
    pathlib.Path(barrier, f"started-{worker}").touch()
    try:
      return _run_worker(*variant_and_shape, args, dict(env, AF2FLAX_BENCH_WORKER_ID=worker))
    finally:
      pathlib.Path(barrier, f"exited-{worker}").touch()

  # Rows are printed, and the --json file rewritten, as each job finishes (not in job order),
  # so that a run cut short keeps what finished; SIGTERM stops the workers and reports.
  finished: dict[int, object] = {}

  def in_job_order() -> list:
    return [finished[n] for n in sorted(finished)]

  pool = concurrent.futures.ThreadPoolExecutor(max_workers=max(1, args.parallel))
  futures = {pool.submit(job, numbered): numbered[0] for numbered in enumerate(jobs)}
  _STOP_REQUESTED["signalled"] = False
  previous_handler = signal.signal(signal.SIGTERM, _stop)
  stopped = False
  try:
    pending = set(futures)
    while pending:
      if _STOP_REQUESTED["signalled"]:
        raise _Stopped()
      done, pending = concurrent.futures.wait(pending, timeout=_STOP_POLL_S,
                                              return_when=concurrent.futures.FIRST_COMPLETED)
      for future in sorted(done, key=futures.get):
        number = futures[future]
        variant, shape_name = jobs[number]
        result = future.result()
        if shape_name == "breakdown" and isinstance(result, list):
          _print_breakdown(variant, result)
          finished[number] = {"breakdown": result, "variant": variant}
        else:
          finished[number] = result
          print(_format([result]).splitlines()[-1], flush=True)
          _print_program_ms(result)
          _print_pipelined(result)
        if args.json:
          pathlib.Path(args.json).write_text(json.dumps(in_job_order(), indent=1))
  except (_Stopped, KeyboardInterrupt):
    stopped = True
    _stop_workers()
    unfinished = [",".join(jobs[n]) for n in range(len(jobs)) if n not in finished]
    print(f"\nstopped: {len(finished)} of {len(jobs)} jobs finished; unfinished: "
          f"{' '.join(unfinished)}" + (f" (their logs: {args.log_dir})" if args.log_dir else ""),
          flush=True)
  finally:
    if not stopped:  # once stopped, a late second SIGTERM only sets the flag again
      signal.signal(signal.SIGTERM, previous_handler)
    pool.shutdown(wait=not stopped, cancel_futures=True)
  if own_barrier:
    shutil.rmtree(own_barrier, ignore_errors=True)
  table_rows = [r for r in in_job_order() if "breakdown" not in r]
  if table_rows:
    print(f"\nmedian of {args.steps} steps per recycling count after a warm-up step; expected = "
          "mean over recycles 0..3")
    print(_format(table_rows))
  return 0 if not stopped and all(r.get("ok", True) for r in table_rows) else 1


if __name__ == "__main__":
  sys.exit(main())
