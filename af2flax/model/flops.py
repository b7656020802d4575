"""Analytic FLOP count of AlphaFold's forward pass (matrix products only).

Used by the benchmarks to turn step times into achieved TFLOP/s. Counts 2·m·n·k for every
matrix product and einsum of the network (projections, attention logits and weighted sums,
the triangle and outer products); element-wise work (layer norms, softmax, gating, masks) is
left out, as is the small structure-module geometry. Each term names the module and the line
of its algorithm (Jumper et al. 2021, Suppl. Alg. 6-22).

At AlphaFold's initial-training shapes (256 residues, 128 MSA clusters, 1024 extra sequences,
4 templates, model_1) the forward pass is 1.18e13 FLOP; a training step with per-block
rematerialisation does the forward twice and the backward (2x forward) once: 4x forward.
"""

from __future__ import annotations

from typing import Any


def _attention(batch: int, queries: int, keys: int, c_in: int, heads: int, key_dim: int,
               value_dim: int, c_out: int, gating: bool) -> float:
  """Gated multi-head attention (Alg. 7/8/13/14 core): q, k, v (+gate) and output
  projections, logits and the weighted sum. key_dim/value_dim are totals over heads."""
  projections = 2 * batch * (queries * c_in * key_dim + keys * c_in * key_dim
                             + keys * c_in * value_dim)
  if gating:
    projections += 2 * batch * queries * c_in * value_dim
  projections += 2 * batch * queries * value_dim * c_out
  core = 2 * batch * queries * keys * (key_dim + value_dim)
  del heads
  return float(projections + core)


def _transition(rows: int, channels: int, factor: int) -> float:
  return float(2 * 2 * rows * channels * channels * factor)


def _triangle_multiplication(n: int, c_z: int, c_mid: int) -> float:
  projections = 4 * 2 * n * n * c_z * c_mid          # left/right projections and gates
  product = 2 * n * n * n * c_mid                     # Alg. 11/12 line 4
  output = 2 * n * n * c_mid * c_z + 2 * n * n * c_z * c_z  # output projection + gating
  return float(projections + product + output)


def _triangle_attention(n: int, c_z: int, heads: int, key_dim: int, value_dim: int) -> float:
  bias = 2 * n * n * c_z * heads
  return bias + _attention(n, n, n, c_z, heads, key_dim, value_dim, c_z, True)


def _outer_product_mean(s: int, n: int, c_m: int, c_outer: int, c_z: int) -> float:
  projections = 2 * 2 * s * n * c_m * c_outer
  outer = 2 * s * n * n * c_outer * c_outer
  output = 2 * n * n * c_outer * c_outer * c_z
  return float(projections + outer + output)


def _block(config: Any, s: int, n: int, c_m: int, c_z: int, extra: bool) -> dict[str, float]:
  """One Evoformer (Alg. 6) or extra-MSA (Alg. 18) block, by module."""
  row = config.msa_row_attention_with_pair_bias
  col = config.msa_column_attention
  terms = {
      "msa_row_attention": 2 * n * n * c_z * row.num_head
                           + _attention(s, n, n, c_m, row.num_head, c_m, c_m, c_m, True),
      "msa_transition": _transition(s * n, c_m, config.msa_transition.num_intermediate_factor),
      "outer_product_mean": _outer_product_mean(
          s, n, c_m, config.outer_product_mean.num_outer_channel, c_z),
      "triangle_multiplication": sum(
          _triangle_multiplication(n, c_z, config[name].num_intermediate_channel)
          for name in ("triangle_multiplication_outgoing", "triangle_multiplication_incoming")),
      "triangle_attention": sum(
          _triangle_attention(n, c_z, config[name].num_head, c_z, c_z)
          for name in ("triangle_attention_starting_node", "triangle_attention_ending_node")),
      "pair_transition": _transition(n * n, c_z, config.pair_transition.num_intermediate_factor),
  }
  if extra:  # Alg. 19: one query per column; single-head keys and values.
    head_dim = c_m // col.num_head
    terms["msa_column_attention"] = float(
        2 * n * s * c_m * 2 * head_dim + 2 * n * c_m * c_m + 2 * n * s * c_m * c_m * 2
        + 2 * n * s * col.num_head * head_dim * 2)
  else:
    terms["msa_column_attention"] = _attention(n, s, s, c_m, col.num_head, c_m, c_m, c_m, True)
  return terms


def forward_flops(config: Any, num_res: int, num_msa: int, num_extra_msa: int,
                  num_templates: int) -> dict[str, float]:
  """FLOP of one forward iteration, by module group; `config` is the model config."""
  evo = config.embeddings_and_evoformer
  n, s, e, t = num_res, num_msa, num_extra_msa, num_templates
  c_m, c_z, c_s = evo.msa_channel, evo.pair_channel, evo.seq_channel
  c_e = evo.extra_msa_channel
  counts: dict[str, float] = {}

  def add(prefix: str, terms: dict[str, float], repeat: int) -> None:
    for name, value in terms.items():
      counts[f"{prefix}/{name}"] = counts.get(f"{prefix}/{name}", 0.0) + repeat * value

  add("evoformer", _block(evo.evoformer, s, n, c_m, c_z, extra=False), evo.evoformer_num_block)
  add("extra_msa", _block(evo.evoformer, e, n, c_e, c_z, extra=True),
      evo.extra_msa_stack_num_block)

  if evo.template.enabled and t:
    stack = evo.template.template_pair_stack
    c_t = evo.template.attention.key_dim  # template pair channel (64)
    block = {
        "triangle_attention": sum(_triangle_attention(n, c_t, stack[name].num_head, c_t, c_t)
                                  for name in ("triangle_attention_starting_node",
                                               "triangle_attention_ending_node")),
        "triangle_multiplication": sum(
            _triangle_multiplication(n, c_t, stack[name].num_intermediate_channel)
            for name in ("triangle_multiplication_outgoing", "triangle_multiplication_incoming")),
        "pair_transition": _transition(n * n, c_t, stack.pair_transition.num_intermediate_factor),
    }
    add("templates", block, stack.num_block * t)
    att = evo.template.attention
    counts["templates/pointwise_attention"] = _attention(
        n * n, 1, t, c_z, att.num_head, att.key_dim, att.value_dim, c_z, False)
    counts["templates/embedding"] = float(2 * t * n * n * 88 * c_t)

  # Input embeddings (Alg. 3-5, 32) and the single projection.
  counts["embeddings"] = float(2 * s * n * 49 * c_m + 2 * e * n * 25 * c_e
                               + 2 * n * n * (65 + 15) * c_z + 2 * n * c_m * c_s)
  # Structure module (Alg. 20-22): 8 layers of IPA sharing weights, pair bias once per layer.
  sm = config.heads.structure_module
  ipa = (2 * n * c_s * (sm.num_head * (sm.num_scalar_qk * 2 + sm.num_scalar_v)
                        + sm.num_head * 3 * (sm.num_point_qk * 2 + sm.num_point_v))
         + 2 * n * n * c_z * sm.num_head
         + 2 * n * n * sm.num_head * (sm.num_scalar_qk + sm.num_scalar_v + c_z)
         + 2 * n * sm.num_head * (sm.num_scalar_v + 4 * sm.num_point_v + c_z) * c_s
         + 3 * 2 * n * c_s * c_s)
  counts["structure_module"] = float(sm.num_layer * ipa)
  # Heads: distogram and pAE logits from the pair, masked MSA from the MSA.
  counts["heads"] = float(2 * n * n * c_z * 64 * 2 + 2 * s * n * c_m * 23)
  return counts


def train_step_flops(forward: float, num_iter_recycling: float, remat: bool = True) -> float:
  """FLOP of one training step: `num_iter_recycling` forward-only iterations, then a forward
  and backward (2x forward) with gradient, plus a second forward when blocks are
  rematerialised."""
  return forward * (num_iter_recycling + (4.0 if remat else 3.0))
