"""Model configuration: AlphaFold's `model_config` tree as an ml_collections ConfigDict.

`model_config('model_1_ptm')` returns the tree of AlphaFold's `config.model_config(name)
['model']` with the same keys and values (Jumper et al. 2021, Suppl. Table 5 and 1.11):
`embeddings_and_evoformer` (48 Evoformer blocks, 4 extra-MSA blocks, c_m=256, c_z=128,
c_s=384, c_e=64, dropout rates, templates), `heads` (each head's settings, its loss
settings and weight), `global_config`, `num_recycle`, `resample_msa_in_recycling`.

af2flax adds, under `global_config`:
  dtype          'bfloat16' | 'float32'  activation dtype (parameters stay float32; softmax,
                                         layer-norm statistics and structure geometry run in
                                         float32). Presets: 'bfloat16' (AlphaFold trained in
                                         bf16); `from_alphafold_dict`: 'float32'.
  remat_policy   name in jax.checkpoint_policies used when `use_remat` (None: save nothing).
  use_scan       nn.scan over stacked blocks (off: the same loop fully unrolled).
  remat_group_size with `use_remat`, g > 1 runs a stack of blocks as groups of g, each group
                 rematerialised and each block in it again (two-level checkpointing): fewer
                 saved block inputs for one more forward pass. Presets: 1 (fine-tuning: 4
                 until 2026-12-04).
  scan_flat_params  each stack's parameters scanned as one [num_layers, P] array, each
                 layer's row split back into its arrays inside the checkpoint: the scan's
                 backward pass writes a layer's parameter gradient once instead of once per
                 array (93 per Evoformer block). Same values; not with `remat_group_size` > 1.
                 Presets: True in initial training and fine-tuning (H200, 2026-12-05:
                 expected step 0.571 against 0.598 s, peak 6.67 against 6.38 GiB;
                 fine-tuning 1.903 against 1.945 s, 13.95 against 14.06 GiB); False here.
                 With `use_remat` the backward pass concatenates the parameters again
                 rather than keeping the forward pass's [num_layers, P] copy (335 MiB for
                 the Evoformer in float32) unless `scan_flat_params_keep_copy`, which is
                 the behaviour before 2026-12-05 (twenty-first session), for comparison.
  remat_offload  with `use_remat` ('nothing_saveable', no groups): each block's input, all a
                 block keeps for its backward pass, waits in the host's pinned memory instead
                 of the accelerator's (copied out in the forward pass, back in the backward
                 pass). Presets: True in fine-tuning, else False.
  remat_offload_fraction  with `remat_offload`, the share of each stack's blocks (the first
                 ~f * n, `evoformer.offloaded_layers`) whose inputs go to the host; the rest
                 keep theirs on the device: each kept input saves its copies' time.
                 Presets: 0.55 in fine-tuning (with `remat_offload`, `remat_group_size` 1:
                 2.000 s, 15.14 GiB per example on an H200 against 2.152 s, 16.12 GiB for
                 groups of 4, docs/benchmarks.md), else 1.0.
  remat_submodules 'none' | 'extra_msa' | 'all': also rematerialise each module of a block on
                 its own (the extra-MSA blocks, or all blocks): the backward pass holds one
                 module's intermediates instead of a block's, for one more forward pass.
                 Presets: 'none' (at fine-tuning shapes it added 1.5 GiB, docs/benchmarks.md).
  low_memory     chunk attention, transitions and template attention in `subbatch_size`
                 (`template.subbatch_size`) rows, as AlphaFold does at inference.
  extra_msa_subbatch_size  chunk the extra MSA's row attention and transition in this many
                 rows, in training too (0: as `low_memory` says). Presets: 1024 in fine-tuning
                 (5,120 extra sequences), else 0.
  attention_impl 'xla' (logits materialised, AlphaFold's arithmetic) | 'cudnn' (flash
                 attention through `jax.nn.dot_product_attention`) | 'pallas' (our Pallas
                 kernels, `pallas_attention.py`, which sum the shared bias's gradient inside
                 the backward kernel) | 'auto' (on a GPU with bf16 activations our kernels
                 where they take the shapes, else cuDNN where it does, else XLA; see
                 `primitives.attention_path`) | 'auto_cudnn' ('auto' without our kernels).
                 Presets: 'auto'; `from_alphafold_dict`: 'xla'.
  pallas_attention_max_queries  the longest query axis that takes our kernels (0: 256, the
                 measured crop). Fine-tuning needs 512: crop 384, and its MSA column
                 attention's queries are the 512 sequences. Measured there on an H200 with
                 the 'logit_grads_xla_dq' backward: 2.16 s per step against cuDNN's 2.36 s,
                 but a 16.17 GiB peak against 14.87 GiB; with the extra MSA's row attention
                 on cuDNN (`extra_msa_attention_impl`) 2.20 s and 14.69 GiB, under the 16 GiB
                 that fine-tuning must fit in (docs/benchmarks.md). Presets: 512 in
                 fine-tuning, else 0.
  triangle_attention_impl  the same choice for the triangle attention only ("": as
                 `attention_impl`). Presets: "".
  extra_msa_attention_impl  the same choice for the extra MSA's row attention only ("": as
                 `attention_impl`). Presets: 'auto_cudnn' in fine-tuning (its 8-channel heads
                 padded to 16 in our kernels cost 1.5 GiB there), else "".
  fuse_projections  projections of one input as one matrix product over concatenated weights
                 (triangle multiplication's five, the outer product mean's two, q/k/v/gate of
                 the self-attentions): the same values and parameters. Presets: True (5% faster
                 expected step on an H100, docs/benchmarks.md).
  pallas_reads_projection  with `fuse_projections`, our Pallas kernels read q, k and v in
                 place from the self-attentions' fused projection and scale q as they load
                 it (`pallas_attention.fused_self_attention`), instead of slices of it
                 copied, and q scaled, in memory first. Same values. Presets: False (on an
                 H200 the gradient pass took 0.549 s against 0.525 s, docs/benchmarks.md).
  pallas_backward  how our kernels' backward pass gets dK, dV and the shared bias's gradient
                 (`pallas_attention.Tiling.backward`): 'grouped' (summed over groups of rows
                 in registers) | 'logit_grads' (the logits' gradient [B, H, Q, K] written
                 where there is a bias, XLA sums it over rows) | 'logit_grads_xla_dq' (and
                 dQ as XLA's product of it with k). The same values up to float rounding.
                 Presets: 'logit_grads_xla_dq' (gradient pass 9% faster than 'grouped' on an
                 H200, docs/benchmarks.md).
  pallas_pad_lengths  our kernels also take query and key lengths that are not multiples of
                 16, padded to the next one (padding keys get a -inf logit, padding queries
                 are sliced off: the same values). In training that is the MSA column
                 attention, whose 132 keys (128 sequences + 4 template rows) otherwise run
                 cuDNN (24.6 ms per initial-training step in the H200 profile of
                 2026-12-03). Presets: False (H200, 2026-12-03, sixth session: expected
                 initial step 0.654 s against 0.635 s without it; at fine-tuning shapes, the
                 516 sequences padded to 528: 2.90 s against 2.16 s, 2026-12-04).
  pallas_tiling  block sizes, warps and pipeline stages of our kernels, as comma-separated
                 `pallas_attention.Tiling` fields over its defaults, e.g.
                 'forward_stages=2,lg_block_q=64' ("": the defaults; the backward pass is
                 `pallas_backward`). The same values; only the speed changes
                 (`bench/pallas_attention.py --sweep` times choices). Presets: "".
  examples_vmapped  set by the train step (`step.model_config_for_step`) when it vmaps
                 several examples (`vmap_batch_size` > 1): attentions with a bias that 'auto'
                 would hand to cuDNN run through XLA (jax's cuDNN attention cannot batch a
                 shared bias under vmap); ours and cuDNN without a bias still run.
  triangle_channels_first  the triangle multiplication with its edges laid out [c, N, N]
                 (projections write that layout, fused; no transposes around the product).
                 Same values and parameters. Presets: True (6% faster expected step on an
                 H100).
  outer_product_mean_chunking  'always' (AlphaFold: the outer product mean in chunks of its
                 `chunk_size` rows, training too) | 'low_memory' (chunks only with
                 `low_memory`, as the other chunking). Same values. Presets: 'low_memory' (3%
                 faster expected step on an H200; the unchunked intermediate is
                 [N, c, c, N], 67 MB in bf16 at crop 256).
  outer_product_mean_layout  'alphafold' (AlphaFold's einsums: the product over sequences
                 laid out [N_res, c, c', rows], a transpose of the matrix product's output, and
                 two more in the backward pass) | 'rows_first' (laid out [rows, c, c', N_res]:
                 the matrix product writes it as it is; XLA's GPU compiler still copies it
                 for the projection) | 'rows_batched' (that layout, projected by a matrix
                 product batched over rows with the weight broadcast along them, which reads
                 each row's [c·c', N_res] slice in place; not yet timed on a GPU). Same
                 values up to float rounding. Presets: 'rows_first' (H200: expected initial
                 step 0.604 against 0.616 s, every recycling count faster; docs/benchmarks.md,
                 2026-12-04 fourteenth session).
  layer_norm_recompute  layer norms keep only their input and two statistics per row for
                 the backward pass, which recomputes the normalised input
                 (`primitives.layer_norm`), instead of JAX's autodiff keeping the float32
                 normalised input (`primitives.layer_norm_autodiff`: full-size float32
                 arrays, e.g. 480 MiB per extra-MSA layer norm at fine-tuning shapes). Same
                 values; gradients equal up to float rounding. Presets: True (H200: expected
                 step 0.612 against 0.625 s, fine-tuning peak 14.92 against 15.21 GiB;
                 docs/benchmarks.md, 2026-12-04 thirteenth session).
  transition_impl 'xla' | 'auto' | 'pallas' (`primitives.transition_path`): the MSA and
                 pair transitions' forward pass as one Pallas kernel that keeps the hidden
                 layer on chip (`pallas_transition`; 'auto': on a GPU with 16-bit
                 activations), its backward pass JAX's differentiation of the same layers in
                 XLA. Same parameters; values equal up to the compute dtype's rounding.
                 Presets: 'auto' (H100, side by side: expected initial step 0.669 against
                 0.685 s, peak 6.74 against 6.73 GiB; docs/benchmarks.md, 2026-12-06
                 twenty-seventh session; fine-tuning not yet timed with it).
  transition_tiling  rows per program, hidden channels per loop step, warps and stages of
                 that kernel (`pallas_transition.Tiling` fields, e.g. 'block_rows=128,warps=8').
                 Presets: "".
  transition_backward  with the transition kernel: 'xla' (JAX's differentiation of the
                 layers) | 'pallas' (a kernel recomputes the layer norm and the hidden layer
                 and writes the hidden layer's gradient and the normalised input's, on chip
                 through both layers; XLA takes the weights' products and sums:
                 `pallas_transition.transition(backward=...)`). Presets: 'xla' ('pallas' not
                 yet timed on a GPU).
  triangle_projection_impl 'xla' | 'auto' | 'pallas', as `transition_impl`, for the
                 triangle multiplication's input side with `triangle_channels_first`: its
                 layer norm, edge projections, their gates and mask, and the output gate's
                 projection as one Pallas kernel (`pallas_triangle`), which writes only the
                 gated edges [c, N, N] and the gate's logits; the backward pass XLA's. Same
                 parameters. Presets: 'xla' (not yet timed on a GPU).
  triangle_projection_tiling  that kernel's `pallas_transition.Tiling` fields (its
                 defaults: 64 rows, 4 warps, `pallas_triangle.DEFAULT_TILING`). Presets: "".
and turns `use_remat` on in the presets (AlphaFold's file has it off: its inference does not
need it; training at crop 256 does). Everything else equals AlphaFold's values.
`from_alphafold_dict(d)` builds this tree from an AlphaFold `model_config` dict, e.g. the
`model_config` of a reference dump's config.json.
"""

from __future__ import annotations

import copy
from typing import Any, Mapping

import ml_collections

MODEL_NAMES = ("model_1", "model_2", "model_3", "model_4", "model_5",
               "model_1_ptm", "model_2_ptm", "model_3_ptm", "model_4_ptm", "model_5_ptm")

# Our additions to AlphaFold's global_config (see module docstring).
OUR_GLOBAL_DEFAULTS = {
    "dtype": "bfloat16",
    "remat_policy": "nothing_saveable",
    "use_scan": True,
    "remat_submodules": "none",
    "remat_group_size": 1,
    "scan_flat_params": False,
    "scan_flat_params_keep_copy": False,
    "remat_offload": False,
    "remat_offload_fraction": 1.0,
    "extra_msa_subbatch_size": 0,
    "low_memory": False,
    "attention_impl": "auto",
    "triangle_attention_impl": "",
    "extra_msa_attention_impl": "",
    "pallas_attention_max_queries": 0,
    "fuse_projections": True,
    "pallas_reads_projection": False,
    "pallas_backward": "logit_grads_xla_dq",
    "pallas_pad_lengths": False,
    "pallas_tiling": "",
    "examples_vmapped": False,
    "triangle_channels_first": True,
    "outer_product_mean_chunking": "low_memory",
    "outer_product_mean_layout": "rows_first",
    "layer_norm_recompute": True,
    "transition_impl": "auto",
    "transition_tiling": "",
    "transition_backward": "xla",
    "triangle_projection_impl": "xla",
    "triangle_projection_tiling": "",
}


def _attention(dropout_rate: float, num_head: int, orientation: str, **extra: Any) -> dict:
  return {"dropout_rate": dropout_rate, "gating": True, "num_head": num_head,
          "orientation": orientation, "shared_dropout": True, **extra}


def _transition(dropout_rate: float, factor: int) -> dict:
  return {"dropout_rate": dropout_rate, "num_intermediate_factor": factor,
          "orientation": "per_row", "shared_dropout": True}


def _multiplication(equation: str, channels: int) -> dict:
  return {"dropout_rate": 0.25, "equation": equation, "num_intermediate_channel": channels,
          "orientation": "per_row", "shared_dropout": True, "fuse_projection_weights": False}


def _base_model_config() -> dict:
  """AlphaFold's CONFIG['model'] (alphafold/model/config.py), before the preset diffs."""
  template_attention = {"key_dim": 64, "value_dim": 64}
  return {
      "embeddings_and_evoformer": {
          "evoformer_num_block": 48,
          "evoformer": {
              "msa_row_attention_with_pair_bias": _attention(0.15, 8, "per_row"),
              "msa_column_attention": _attention(0.0, 8, "per_column"),
              "msa_transition": _transition(0.0, 4),
              "outer_product_mean": {"first": False, "chunk_size": 128, "dropout_rate": 0.0,
                                     "num_outer_channel": 32, "orientation": "per_row",
                                     "shared_dropout": True},
              "triangle_attention_starting_node": _attention(0.25, 4, "per_row"),
              "triangle_attention_ending_node": _attention(0.25, 4, "per_column"),
              "triangle_multiplication_outgoing": _multiplication("ikc,jkc->ijc", 128),
              "triangle_multiplication_incoming": _multiplication("kjc,kic->ijc", 128),
              "pair_transition": _transition(0.0, 4),
          },
          "extra_msa_channel": 64,
          "extra_msa_stack_num_block": 4,
          "max_relative_feature": 32,
          "msa_channel": 256,
          "pair_channel": 128,
          "prev_pos": {"min_bin": 3.25, "max_bin": 20.75, "num_bins": 15},
          "recycle_features": True,
          "recycle_pos": True,
          "seq_channel": 384,
          "template": {
              "attention": {"gating": False, "key_dim": 64, "num_head": 4, "value_dim": 64},
              "dgram_features": {"min_bin": 3.25, "max_bin": 50.75, "num_bins": 39},
              "embed_torsion_angles": False,
              "enabled": False,
              "template_pair_stack": {
                  "num_block": 2,
                  "triangle_attention_starting_node": _attention(0.25, 4, "per_row",
                                                                 **template_attention),
                  "triangle_attention_ending_node": _attention(0.25, 4, "per_column",
                                                               **template_attention),
                  "triangle_multiplication_outgoing": _multiplication("ikc,jkc->ijc", 64),
                  "triangle_multiplication_incoming": _multiplication("kjc,kic->ijc", 64),
                  "pair_transition": _transition(0.0, 2),
              },
              "max_templates": 4,
              "subbatch_size": 128,
              "use_template_unit_vector": False,
          },
      },
      "global_config": {
          "deterministic": False,
          "multimer_mode": False,
          "subbatch_size": 4,
          "use_remat": False,
          "zero_init": True,
          "eval_dropout": False,
      },
      "heads": {
          "distogram": {"first_break": 2.3125, "last_break": 21.6875, "num_bins": 64,
                        "weight": 0.3},
          "predicted_aligned_error": {
              # num_bins - 1 bins of 0.5 Å over [0, max_error_bin]; the last is open.
              "max_error_bin": 31.0, "num_bins": 64, "num_channels": 128,
              "filter_by_resolution": True, "min_resolution": 0.1, "max_resolution": 3.0,
              "weight": 0.0,
          },
          "experimentally_resolved": {"filter_by_resolution": True, "max_resolution": 3.0,
                                      "min_resolution": 0.1, "weight": 0.01},
          "structure_module": {
              "num_layer": 8,
              "fape": {"clamp_distance": 10.0, "clamp_type": "relu", "loss_unit_distance": 10.0},
              "angle_norm_weight": 0.01,
              "chi_weight": 0.5,
              "clash_overlap_tolerance": 1.5,
              "compute_in_graph_metrics": True,
              "dropout": 0.1,
              "num_channel": 384,
              "num_head": 12,
              "num_layer_in_transition": 3,
              "num_point_qk": 4,
              "num_point_v": 8,
              "num_scalar_qk": 16,
              "num_scalar_v": 16,
              "position_scale": 10.0,
              "sidechain": {"atom_clamp_distance": 10.0, "num_channel": 128,
                            "num_residual_block": 2, "weight_frac": 0.5, "length_scale": 10.0},
              "structural_violation_loss_weight": 1.0,
              "violation_tolerance_factor": 12.0,
              "weight": 1.0,
          },
          "predicted_lddt": {"filter_by_resolution": True, "max_resolution": 3.0,
                             "min_resolution": 0.1, "num_bins": 50, "num_channels": 128,
                             "weight": 0.01},
          "masked_msa": {"num_output": 23, "weight": 2.0},
      },
      "num_recycle": 3,
      "resample_msa_in_recycling": True,
  }


# Jumper et al. (2021) Suppl. Table 5: models 1.1.1 and 1.1.2 (model_1, model_2) use
# templates with torsion-angle rows; the _ptm models add the predicted-aligned-error head.
_TEMPLATE_DIFF = {"embeddings_and_evoformer.template.embed_torsion_angles": True,
                  "embeddings_and_evoformer.template.enabled": True}
_PTM_DIFF = {"heads.predicted_aligned_error.weight": 0.1}
MODEL_DIFFS: dict[str, dict[str, Any]] = {
    "model_1": dict(_TEMPLATE_DIFF), "model_2": dict(_TEMPLATE_DIFF),
    "model_3": {}, "model_4": {}, "model_5": {},
    "model_1_ptm": {**_TEMPLATE_DIFF, **_PTM_DIFF}, "model_2_ptm": {**_TEMPLATE_DIFF, **_PTM_DIFF},
    "model_3_ptm": dict(_PTM_DIFF), "model_4_ptm": dict(_PTM_DIFF), "model_5_ptm": dict(_PTM_DIFF),
}

# The data-side settings of each preset (AlphaFold's `data.common` after the preset diff), for
# the input pipeline: extra-MSA depth, template use, and whether the MSA clusters make room
# for the template rows.
DATA_SETTINGS: dict[str, dict[str, Any]] = {}
for _name in MODEL_NAMES:
  _base = _name.replace("_ptm", "")
  DATA_SETTINGS[_name] = {
      "max_extra_msa": 5120 if _base in ("model_1", "model_3", "model_4") else 1024,
      "use_templates": _base in ("model_1", "model_2"),
      "reduce_msa_clusters_by_max_templates": _base in ("model_1", "model_2"),
  }


def _set_path(config: ml_collections.ConfigDict, dotted: str, value: Any) -> None:
  *parents, leaf = dotted.split(".")
  node = config
  for key in parents:
    node = node[key]
  node[leaf] = value


def model_config(name: str) -> ml_collections.ConfigDict:
  """The model config of AlphaFold preset `name` ('model_1' ... 'model_5_ptm').

  AlphaFold's values plus af2flax's `global_config` additions (module docstring), with
  `use_remat` on for training.
  """
  if name not in MODEL_DIFFS:
    raise ValueError(f"unknown model preset {name!r}; expected one of {', '.join(MODEL_NAMES)}")
  config = ml_collections.ConfigDict(_base_model_config())
  for dotted, value in MODEL_DIFFS[name].items():
    _set_path(config, dotted, value)
  config.global_config.update(OUR_GLOBAL_DEFAULTS)
  config.global_config.use_remat = True
  return config


def _merge(base: dict, update: Mapping[str, Any]) -> dict:
  for key, value in update.items():
    if isinstance(value, Mapping) and isinstance(base.get(key), dict):
      _merge(base[key], value)
    else:
      base[key] = copy.deepcopy(value if not isinstance(value, Mapping) else dict(value))
  return base


_REQUIRED = ("embeddings_and_evoformer", "heads", "global_config")


def from_alphafold_dict(alphafold_model_config: Mapping[str, Any],
                        **global_overrides: Any) -> ml_collections.ConfigDict:
  """Our model config from an AlphaFold `model_config` tree (nested dict or ConfigDict).

  Every value given wins; keys AlphaFold added in other versions and absent from the tree
  take AlphaFold's current defaults. af2flax's additions take `OUR_GLOBAL_DEFAULTS` except
  `dtype='float32'` (AlphaFold's own precision), then `global_overrides`.
  """
  tree = (alphafold_model_config.to_dict() if isinstance(alphafold_model_config,
                                                          ml_collections.ConfigDict)
          else alphafold_model_config)
  if "model" in tree and "embeddings_and_evoformer" not in tree:
    tree = tree["model"]  # A full AlphaFold config with `data` and `model`.
  missing = [key for key in _REQUIRED if key not in tree]
  if missing:
    raise ValueError(f"not an AlphaFold model_config tree: missing {', '.join(missing)} "
                     f"(top-level keys: {', '.join(sorted(tree))})")
  merged = _base_model_config()
  merged["global_config"].update(OUR_GLOBAL_DEFAULTS)
  merged["global_config"]["dtype"] = "float32"
  merged["global_config"]["attention_impl"] = "xla"
  _merge(merged, tree)
  merged["global_config"].update(global_overrides)
  return ml_collections.ConfigDict(merged)
