"""The full AlphaFold 2 monomer network with recycling.

Jumper et al. (2021) Suppl. Alg. 2 "Inference" and Suppl. 1.10 "Recycling". Usage
(MODEL_CONTRACT section 6):

    model = AlphaFold(config)   # config = af2flax.model.config.model_config('model_1_ptm')
    outputs = model.apply({'params': params}, batch, deterministic=False,
                          rngs={'dropout': key})

`batch` holds AlphaFold's features for one example with a leading recycle axis
R = num_recycle + 1; iteration i reads slice i (`resample_msa_in_recycling`).
`batch['num_iter_recycling'][0]` (capped at `num_recycle`; `num_recycle` when absent)
iterations run first without gradient, then the final iteration reads slice
`num_iter_recycling` and carries the gradient. Returns the final iteration's outputs.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from af2flax.common import residue_constants as rc
from af2flax.model.heads import (DistogramHead, ExperimentallyResolvedHead, MaskedMsaHead,
                                 PredictedAlignedErrorHead, PredictedLDDTHead)
from af2flax.model.primitives import layer_norm_recompute
from af2flax.model.structure import StructureModule
from af2flax.model.trunk import TRUNK_PARTS, EmbeddingsAndEvoformer

# Head config name -> (module class, AlphaFold's Haiku module name).
HEADS = {
    "distogram": (DistogramHead, "distogram_head"),
    "experimentally_resolved": (ExperimentallyResolvedHead, "experimentally_resolved_head"),
    "masked_msa": (MaskedMsaHead, "masked_msa_head"),
    "predicted_aligned_error": (PredictedAlignedErrorHead, "predicted_aligned_error_head"),
    "predicted_lddt": (PredictedLDDTHead, "predicted_lddt_head"),
    "structure_module": (StructureModule, "structure_module"),
}
# Heads that read the structure module's output run after it (AlphaFold's order).
_AFTER_STRUCTURE = ("predicted_lddt", "predicted_aligned_error")


class AlphaFoldIteration(nn.Module):
  """One recycling iteration: embeddings, Evoformer and the heads.

  Jumper et al. (2021) Suppl. Alg. 2 "Inference" lines 3-22. Heads with weight 0 are not
  built (as in AlphaFold: model_1..5 have no predicted-aligned-error head); the others run
  in sorted order, pLDDT and PAE after the structure module, whose single activations
  become `representations['structure_module']`.
  batch: one iteration's features (no recycle axis); prev: recycled `prev_pos`,
  `prev_msa_first_row`, `prev_pair`.
  """

  config: Any   # the model config

  @nn.compact
  def __call__(self, batch: Mapping[str, jax.Array], prev: Mapping[str, jax.Array],
               deterministic: bool = True, *,
               representations: Mapping[str, jax.Array] | None = None,
               trunk_only: bool = False, trunk_parts: Sequence[str] = TRUNK_PARTS,
               trunk_activations: Mapping[str, jax.Array] | None = None,
               heads: Sequence[str] | None = None,
               structure: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The iteration's outputs; `trunk_only=True`: only the trunk's `representations` (with
    `trunk_parts`, only those parts of it, after `trunk_activations`:
    `EmbeddingsAndEvoformer`); `representations=` those: only the heads (`prev` is then not
    read). `heads`: only these of the config's heads run (None: all); `structure`: the
    structure module's outputs, computed elsewhere, in its place (pLDDT and PAE read them)."""
    c = self.config
    gc = c.global_config
    if representations is None:
      representations = EmbeddingsAndEvoformer(c.embeddings_and_evoformer, gc,
                                               name="evoformer")(
          batch, prev, deterministic, parts=trunk_parts, activations=trunk_activations)
    else:
      representations = dict(representations)
    if trunk_only:
      return representations
    outputs: dict[str, Any] = {"representations": representations}

    def run_head(name: str) -> None:
      head_class, module_name = HEADS[name]
      outputs[name] = head_class(c.heads[name], gc, name=module_name)(
          representations, batch, deterministic)

    wanted = set(c.heads) if heads is None else set(heads)
    if structure is not None:
      outputs["structure_module"] = dict(structure)
      representations["structure_module"] = structure["act"]
      wanted.discard("structure_module")
    for name in sorted(c.heads):
      if name in _AFTER_STRUCTURE or not c.heads[name].weight or name not in wanted:
        continue
      if name not in HEADS:
        raise ValueError(f"heads.{name}: unknown head; expected one of {', '.join(sorted(HEADS))}")
      run_head(name)
      if name == "structure_module":
        representations["structure_module"] = outputs[name]["act"]
    for name in _AFTER_STRUCTURE:
      if name in c.heads and c.heads[name].weight and name in wanted:
        run_head(name)
    return outputs


def initial_prev(num_res: int, config: Any) -> dict[str, jax.Array]:
  """Zero recycled inputs of the first iteration (Suppl. Alg. 2 line 1), float32."""
  emb = config.embeddings_and_evoformer
  prev = {}
  if emb.recycle_pos:
    prev["prev_pos"] = jnp.zeros([num_res, rc.atom_type_num, 3], jnp.float32)
  if emb.recycle_features:
    prev["prev_msa_first_row"] = jnp.zeros([num_res, emb.msa_channel], jnp.float32)
    prev["prev_pair"] = jnp.zeros([num_res, num_res, emb.pair_channel], jnp.float32)
  return prev


def prev_from_outputs(outputs: Mapping[str, Any], prev: Mapping[str, jax.Array]
                       ) -> dict[str, jax.Array]:
  """Recycled inputs of the next iteration, without gradient (Suppl. 1.10)."""
  sources = {
      "prev_pos": lambda: outputs["structure_module"]["final_atom_positions"],
      "prev_msa_first_row": lambda: outputs["representations"]["msa_first_row"],
      "prev_pair": lambda: outputs["representations"]["pair"],
  }
  return {key: jax.lax.stop_gradient(sources[key]().astype(jnp.float32)) for key in prev}


def num_recycling_iterations(batch: Mapping[str, jax.Array], config: Any) -> jax.Array:
  """How many no-gradient recycling iterations run before the final one (int32):
  `batch['num_iter_recycling'][0]` capped at `config.num_recycle` (`num_recycle` when
  absent; 0 when the config recycles nothing)."""
  if not config.num_recycle:
    return jnp.asarray(0, jnp.int32)
  if "num_iter_recycling" not in batch:
    return jnp.asarray(config.num_recycle, jnp.int32)
  return jnp.minimum(batch["num_iter_recycling"][0], config.num_recycle).astype(jnp.int32)


def _check_prev(given: Mapping[str, jax.Array], expected: Mapping[str, jax.Array]) -> None:
  """`prev=` must hold exactly the recycled inputs this config recycles, at their shapes."""
  if set(given) != set(expected):
    raise ValueError(f"AlphaFold(prev=...) has keys {sorted(given)}; this config recycles "
                     f"{sorted(expected)}")
  for key, value in expected.items():
    if tuple(given[key].shape) != tuple(value.shape):
      raise ValueError(f"AlphaFold(prev=...)[{key!r}] has shape {tuple(given[key].shape)}; "
                       f"expected {tuple(value.shape)}")


def slice_recycle(batch: Mapping[str, jax.Array], index: jax.Array | int) -> dict[str, jax.Array]:
  """Slice `index` of the leading recycle axis of every feature."""
  return {key: jax.lax.dynamic_index_in_dim(value, index, axis=0, keepdims=False)
          for key, value in batch.items()}


class AlphaFold(nn.Module):
  """AlphaFold with recycling as trained (Jumper et al. 2021, Suppl. Alg. 2, Suppl. 1.10).

  `num_iter_recycling` iterations run inside a `while_loop` with their outputs passed
  through `stop_gradient`; the final iteration runs outside the loop and carries the
  gradient. Each iteration draws its own dropout randomness.
  """

  config: Any   # the model config

  @nn.compact
  def __call__(self, batch: Mapping[str, jax.Array], deterministic: bool = True, *,
               prev: Mapping[str, jax.Array] | None = None, recycle_only: bool = False,
               trunk_only: bool = False,
               representations: Mapping[str, jax.Array] | None = None,
               trunk_parts: Sequence[str] | None = None,
               trunk_activations: Mapping[str, jax.Array] | None = None,
               heads: Sequence[str] | None = None,
               structure: Mapping[str, Any] | None = None,
               iteration: int | jax.Array | None = None) -> dict[str, Any]:
    """The final iteration's outputs, after the no-gradient recycling iterations.

    The parts can also run apart (the train step's separately compiled programs):
    - `recycle_only=True` runs only the no-gradient iterations and returns the recycled
      inputs of the final one (`prev_pos`, `prev_msa_first_row`, `prev_pair`, float32,
      without gradient; zeros when no iteration runs);
    - `prev=` those inputs runs only the final iteration;
    - with `trunk_only=True` as well, only its trunk (embeddings, Evoformer), returning its
      `representations`;
    - `trunk_parts=` (with `trunk_only=True`) runs only those consecutive parts of the
      trunk (`trunk.TRUNK_PARTS`: 'embeddings', 'extra_msa', 'evoformer'). Parts that stop
      before 'evoformer' return the activations {'msa', 'pair'} that the next parts take as
      `trunk_activations=` (then without `prev=`: the recycled inputs are read only by
      'embeddings');
    - `representations=` those runs only the final iteration's heads; with `heads=` only
      those of them, and with `structure=` the structure module's outputs from an earlier
      call in its place.
    `apply(recycle_only=True)`, `apply(prev=..., trunk_only=True)`, then
    `apply(representations=...)` compute what one call does, and so do the trunk's parts
    one after another in place of the second, and `apply(representations=r,
    heads=['structure_module'])` then `apply(representations=r, structure=s)` (s: the
    first's `['structure_module']`) in place of the third.
    `iteration=i` with the parts that take `prev=`, `trunk_activations=` or
    `representations=`: they read iteration i's features instead of the final iteration's.
    So a recycling iteration runs as parts too: iteration i of `recycle_only=True`'s loop is
    `apply(prev=p, iteration=i)` with the dropout key `jax.random.fold_in(key, i)` (the
    loop's key: `nn.while_loop` folds in the iteration), and `prev_from_outputs` of its
    outputs is the next `p`.
    """
    given = {"recycle_only": recycle_only, "prev": prev is not None,
             "trunk_only": trunk_only, "representations": representations is not None,
             "trunk_parts": trunk_parts is not None,
             "trunk_activations": trunk_activations is not None,
             "heads": heads is not None, "structure": structure is not None}
    if iteration is not None and not (given["prev"] or given["trunk_activations"]
                                      or given["representations"]):
      raise ValueError("AlphaFold: iteration=... is taken only with prev=..., "
                       "trunk_activations=... or representations=...")
    allowed = (set(), {"recycle_only"}, {"prev"}, {"trunk_only"}, {"prev", "trunk_only"},
               {"representations"}, {"representations", "heads"},
               {"representations", "structure"}, {"representations", "heads", "structure"},
               {"trunk_only", "trunk_parts"},
               {"prev", "trunk_only", "trunk_parts"},
               {"trunk_only", "trunk_parts", "trunk_activations"})
    if {name for name, g in given.items() if g} not in allowed:
      raise ValueError(f"AlphaFold: {', '.join(n for n, g in given.items() if g)} cannot be "
                       "given together; the parts are recycle_only=True, prev=... with or "
                       "without trunk_only=True (and trunk_parts=...), trunk_parts=... with "
                       "trunk_activations=... and trunk_only=True, and representations=... "
                       "(with heads=... or structure=...)")
    # The parts themselves are checked where they run (`EmbeddingsAndEvoformer`).
    trunk_parts = TRUNK_PARTS if trunk_parts is None else tuple(trunk_parts)
    with layer_norm_recompute(self.config.global_config.get("layer_norm_recompute", True)):
      return self._recycle(batch, deterministic, prev, recycle_only, trunk_only,
                           representations, trunk_parts, trunk_activations, heads, structure,
                           iteration)

  def _recycle(self, batch: Mapping[str, jax.Array], deterministic: bool,
               given_prev: Mapping[str, jax.Array] | None, recycle_only: bool,
               trunk_only: bool, representations: Mapping[str, jax.Array] | None,
               trunk_parts: tuple[str, ...],
               trunk_activations: Mapping[str, jax.Array] | None,
               heads: Sequence[str] | None = None,
               structure: Mapping[str, Any] | None = None,
               at_iteration: int | jax.Array | None = None) -> dict[str, Any]:
    c = self.config
    if batch["aatype"].ndim != 2:
      raise ValueError(f"batch['aatype'] has shape {batch['aatype'].shape}; expected "
                       "[num_recycle + 1, N_res] (leading recycle axis, no example axis)")
    num_res = batch["aatype"].shape[1]
    iteration = AlphaFoldIteration(c, name="alphafold_iteration")

    def features(index):
      return slice_recycle(batch, index if c.resample_msa_in_recycling else 0)

    prev = initial_prev(num_res, c)
    num_iter = num_recycling_iterations(batch, c)
    if at_iteration is not None:  # a part of recycling iteration `at_iteration`, not the last
      num_iter = jnp.asarray(at_iteration, jnp.int32)

    if representations is not None:  # the trunk ran elsewhere: the heads only
      return iteration(features(num_iter), {}, deterministic, representations=representations,
                       heads=heads, structure=structure)
    if trunk_activations is not None:  # the trunk's first parts ran elsewhere
      return iteration(features(num_iter), {}, deterministic, trunk_only=True,
                       trunk_parts=trunk_parts, trunk_activations=trunk_activations)
    if given_prev is not None:  # the recycling iterations ran elsewhere
      _check_prev(given_prev, prev)
      prev = dict(given_prev)
    elif c.num_recycle:
      def body(module, carry):
        index, carry_prev = carry
        outputs = module(features(index), carry_prev, deterministic)
        return index + 1, prev_from_outputs(outputs, carry_prev)

      if self.is_initializing():
        # Parameters are created by one plain call; the loop needs them to exist.
        body(iteration, (jnp.asarray(0, jnp.int32), prev))
      else:
        _, prev = nn.while_loop(lambda module, carry: carry[0] < num_iter, body, iteration,
                                (jnp.asarray(0, jnp.int32), prev),
                                broadcast_variables="params", split_rngs={"dropout": True})
    if recycle_only:
      return prev
    return iteration(features(num_iter), prev, deterministic, trunk_only=trunk_only,
                     trunk_parts=trunk_parts)
