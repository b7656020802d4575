"""The network trunk: input embeddings, templates, extra-MSA stack and Evoformer.

Jumper et al. (2021) Suppl. Alg. 2 "Inference" lines 5-18, AlphaFold's
`EmbeddingsAndEvoformer` (Haiku module `evoformer`).
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from af2flax.model.embedders import (ExtraMsaEmbedder, InputEmbedder, RecyclingEmbedder,
                                     RelativePositionEncoding, TemplateTorsionEmbedder)
from af2flax.model.evoformer import EvoformerIteration, layer_stack
from af2flax.model.primitives import Linear, compute_dtype
from af2flax.model.templates import TemplateEmbedding

# The trunk's parts, in order, each runnable on its own (the train step's separately compiled
# stages): the input, recycling, relative-position and template embeddings; the extra-MSA
# stack; the template torsion rows, the Evoformer stack and the single representation.
TRUNK_PARTS = ("embeddings", "extra_msa", "evoformer")


def check_trunk_parts(parts: Sequence[str], has_activations: bool) -> tuple[str, ...]:
  """`parts` as a tuple if it is a consecutive run of `TRUNK_PARTS` in their order, and
  `has_activations` (the previous parts' `activations` given) is True exactly when it does
  not start with 'embeddings'; else a ValueError that says what is wrong."""
  parts = tuple(parts)
  start = TRUNK_PARTS.index(parts[0]) if parts and parts[0] in TRUNK_PARTS else -1
  if start < 0 or parts != TRUNK_PARTS[start:start + len(parts)]:
    raise ValueError(f"trunk parts {parts!r}: expected consecutive parts of "
                     f"{', '.join(TRUNK_PARTS)}, in that order")
  if has_activations != (start > 0):
    raise ValueError(f"trunk parts {parts!r}: " + (
        "the activations of the parts before them are needed" if start > 0 else
        "activations are not taken when the parts start with 'embeddings'"))
  return parts


class EmbeddingsAndEvoformer(nn.Module):
  """Embeds one iteration's features and runs the extra-MSA stack and the Evoformer.

  Jumper et al. (2021) Suppl. Alg. 2 lines 5-18: input embedder (Alg. 3-5), recycling
  embedder (Alg. 32), template pair embedding (Alg. 16-17), extra-MSA stack (Alg. 18-19),
  template torsion rows (Suppl. 1.7.1), Evoformer stack (Alg. 6) and the single
  representation (Alg. 6 line 12).

  batch: one iteration's features (no recycle axis); prev: `prev_pos` [N_res, 37, 3],
  `prev_msa_first_row` [N_res, c_m], `prev_pair` [N_res, N_res, c_z].
  Returns {'msa' [N_seq, N_res, c_m] (template rows dropped), 'msa_first_row' [N_res, c_m],
  'pair' [N_res, N_res, c_z], 'single' [N_res, c_s]}.

  `parts` (consecutive `TRUNK_PARTS`) runs only those: when they stop before 'evoformer' the
  result is the activations {'msa' [N_seq, N_res, c_m], 'pair' [N_res, N_res, c_z]} that the
  next part takes as `activations` (then `prev` is not read). Running the parts one after
  another computes what one call does.
  """

  config: Any   # embeddings_and_evoformer
  global_config: Any

  def _shared(self, module: nn.Module) -> nn.Module:
    """`module`'s parameters go directly into this module's scope (AlphaFold's layout)."""
    nn.share_scope(self, module)
    return module

  @nn.compact
  def __call__(self, batch: Mapping[str, jax.Array], prev: Mapping[str, jax.Array],
               deterministic: bool = True, *, parts: Sequence[str] = TRUNK_PARTS,
               activations: Mapping[str, jax.Array] | None = None) -> dict[str, jax.Array]:
    c, gc = self.config, self.global_config
    dtype = compute_dtype(gc)
    parts = check_trunk_parts(parts, activations is not None)
    seq_mask = batch["seq_mask"].astype(jnp.float32)
    mask_2d = seq_mask[:, None] * seq_mask[None, :]
    if activations is not None:
      msa_act, pair_act = activations["msa"], activations["pair"]

    if "embeddings" in parts:
      # Suppl. Alg. 2 line 5, Alg. 3.
      msa_act, pair_act = self._shared(InputEmbedder(c, gc))(batch["target_feat"],
                                                             batch["msa_feat"])
      # Suppl. Alg. 2 line 6, Alg. 32.
      if c.recycle_pos or c.recycle_features:
        msa_act, pair_act = self._shared(RecyclingEmbedder(c, gc))(msa_act, pair_act,
                                                                   batch["aatype"], prev)
      # Suppl. Alg. 4-5.
      if c.max_relative_feature:
        pair_act = pair_act + self._shared(RelativePositionEncoding(c, gc))(
            batch["residue_index"])

      # Suppl. Alg. 2 lines 9-13.
      if c.template.enabled:
        template_batch = {key: value for key, value in batch.items()
                          if key.startswith("template_")}
        pair_act = pair_act + TemplateEmbedding(c.template, gc, name="template_embedding")(
            pair_act, template_batch, mask_2d, deterministic)

    if "extra_msa" in parts:
      # Suppl. Alg. 2 lines 14-16, Alg. 18.
      extra_msa_act = self._shared(ExtraMsaEmbedder(c, gc))(
          batch["extra_msa"], batch["extra_has_deletion"], batch["extra_deletion_value"])
      extra_block = EvoformerIteration(c.evoformer, gc, is_extra_msa=True,
                                       name="extra_msa_stack")
      extra_masks = (batch["extra_msa_mask"].astype(jnp.float32), mask_2d)
      _, pair_act = layer_stack(extra_block,
                                (extra_msa_act.astype(dtype), pair_act.astype(dtype)),
                                c.extra_msa_stack_num_block, gc, extra_masks, deterministic)

    if "evoformer" not in parts:
      return {"msa": msa_act, "pair": pair_act}

    # Suppl. Alg. 2 lines 7-8: template torsion features become extra MSA rows.
    msa_mask = batch["msa_mask"].astype(jnp.float32)
    if c.template.enabled and c.template.embed_torsion_angles:
      template_rows, template_row_mask = self._shared(TemplateTorsionEmbedder(c, gc))(batch)
      msa_act = jnp.concatenate([msa_act, template_rows.astype(msa_act.dtype)], axis=0)
      msa_mask = jnp.concatenate([msa_mask, template_row_mask.astype(msa_mask.dtype)], axis=0)

    # Suppl. Alg. 2 lines 17-18, Alg. 6.
    block = EvoformerIteration(c.evoformer, gc, is_extra_msa=False, name="evoformer_iteration")
    msa_act, pair_act = layer_stack(block, (msa_act.astype(dtype), pair_act.astype(dtype)),
                                    c.evoformer_num_block, gc, (msa_mask, mask_2d),
                                    deterministic)

    single_act = Linear(c.seq_channel, dtype=dtype, name="single_activations")(msa_act[0])
    num_sequences = batch["msa_feat"].shape[0]
    return {
        "single": single_act,
        "pair": pair_act,
        # Template rows are not part of the MSA seen by the masked-MSA head.
        "msa": msa_act[:num_sequences],
        "msa_first_row": msa_act[0],
    }
