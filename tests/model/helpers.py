"""Small model configs and inputs shared by the model tests."""

from __future__ import annotations

import jax
import ml_collections
import numpy as np

from af2flax.model import batch_spec
from af2flax.model.config import model_config

TINY_SHAPES = {"num_res": 11, "num_msa": 5, "num_extra_msa": 7, "num_templates": 2}


def tiny_config(preset: str = "model_1_ptm", dtype: str = "float32",
                **global_overrides) -> ml_collections.ConfigDict:
  """`preset` with every size cut down (same structure, same switches)."""
  config = model_config(preset)
  emb = config.embeddings_and_evoformer
  emb.evoformer_num_block = 2
  emb.extra_msa_stack_num_block = 1
  emb.msa_channel, emb.pair_channel, emb.seq_channel, emb.extra_msa_channel = 16, 8, 16, 8
  for name in ("triangle_multiplication_outgoing", "triangle_multiplication_incoming"):
    emb.evoformer[name].num_intermediate_channel = 8
    emb.template.template_pair_stack[name].num_intermediate_channel = 8
  emb.evoformer.outer_product_mean.num_outer_channel = 4
  emb.evoformer.outer_product_mean.chunk_size = 4
  for name in ("triangle_attention_starting_node", "triangle_attention_ending_node"):
    emb.template.template_pair_stack[name].key_dim = 8
    emb.template.template_pair_stack[name].value_dim = 8
  emb.template.attention.key_dim = emb.template.attention.value_dim = 8
  emb.template.template_pair_stack.num_block = 1
  emb.template.subbatch_size = 16
  heads = config.heads
  heads.structure_module.num_layer = 2
  heads.structure_module.num_channel = 16
  heads.structure_module.sidechain.num_channel = 8
  heads.predicted_lddt.num_channels = 8
  config.num_recycle = 1
  config.global_config.update({"dtype": dtype, "use_remat": False, **global_overrides})
  return config


def tiny_iteration_inputs(config: ml_collections.ConfigDict, seed: int = 0):
  """One iteration's features and random recycled inputs for `config`."""
  batch = batch_spec.random_features(seed, num_slices=None, **TINY_SHAPES)
  rng = np.random.default_rng(seed + 1)
  emb = config.embeddings_and_evoformer
  n = TINY_SHAPES["num_res"]
  prev = {
      "prev_pos": batch["template_all_atom_positions"][0] + rng.normal(size=(n, 37, 3)).astype(
          np.float32),
      "prev_msa_first_row": rng.normal(size=(n, emb.msa_channel)).astype(np.float32),
      "prev_pair": rng.normal(size=(n, n, emb.pair_channel)).astype(np.float32),
  }
  return batch, prev


def perturb_params(params, seed: int = 0, scale: float = 0.1):
  """Adds noise to every parameter, so that zero-initialised layers do something."""
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.PRNGKey(seed), len(leaves))
  return jax.tree.unflatten(treedef, [leaf + scale * jax.random.normal(key, leaf.shape)
                                      for leaf, key in zip(leaves, keys)])


def relative_error(ours, reference) -> float:
  ours, reference = np.asarray(ours, np.float64), np.asarray(reference, np.float64)
  return float(np.linalg.norm(ours - reference) / max(np.linalg.norm(reference), 1e-30))
