"""Running one model on one example: recycling with optional early stop, and its confidences.

Jumper et al. (2021) Suppl. Alg. 2 "Inference" and Suppl. 1.10 "Recycling". The network's
recycling iterations run here one at a time (`AlphaFoldIteration`, the same weights as the
full `AlphaFold` module), so that recycling can stop early: after each iteration the RMS change
of the Cα-Cα distance matrix against the previous iteration is computed on the device, and
once it falls below `recycle_tolerance` (Å) the prediction is final, as ColabFold does. With no
tolerance the result equals `AlphaFold.apply` with `num_iter_recycling = num_recycle`.

One jitted function per distinct model config serves every model of that config (AlphaFold's
model_3..5 share theirs), so parameters are arguments, not constants of the compiled code.
"""

from __future__ import annotations

import dataclasses
import json
import time
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from af2flax.common import confidence
from af2flax.common import residue_constants as rc
from af2flax.model.alphafold import AlphaFoldIteration

PyTree = Any
_CA = rc.atom_order["CA"]
_STEP_CACHE: dict[str, Callable] = {}


@dataclasses.dataclass(frozen=True)
class Prediction:
  """What one model predicted for one example (numpy, residues unpadded)."""
  model_name: str
  final_atom_positions: np.ndarray     # [N, 37, 3] Å
  final_atom_mask: np.ndarray          # [N, 37]
  plddt: np.ndarray                    # [N] 0-100
  predicted_aligned_error: np.ndarray | None   # [N, N] Å (pTM models only)
  max_predicted_aligned_error: float | None
  ptm: float | None
  num_recycles: int                    # recycling iterations run before the final one
  recycle_changes: tuple[float, ...]   # Cα distance-matrix RMS change after each recycle (Å)
  seconds: float                       # wall time of this call (includes compilation if any)

  @property
  def mean_plddt(self) -> float:
    return float(np.mean(self.plddt))

  def ranking_confidence(self, metric: str) -> float:
    """'plddt': mean pLDDT; 'ptm': pTM (AlphaFold DB's two ranking scores)."""
    if metric == "ptm":
      if self.ptm is None:
        raise ValueError(f"{self.model_name} has no pTM (not a _ptm model)")
      return float(self.ptm)
    return self.mean_plddt


def inference_config(config: ml_collections.ConfigDict, *, num_recycle: int | None = None,
                     chunk_size: int | None = None,
                     dtype: str | None = None) -> ml_collections.ConfigDict:
  """`config` set up for inference: deterministic, no remat (no backward pass), optional
  recycles, activation dtype and chunking.

  `chunk_size` turns on the model's `low_memory` mode: attention, transitions and template
  attention run in chunks of that many rows (AlphaFold's `subbatch_size`), and the outer
  product mean in chunks of that many residues, trading speed for peak memory on long chains.
  Without it the outer product mean still runs in AlphaFold's chunks (its config's
  `chunk_size`, 128): training's one-piece mode (`outer_product_mean_chunking`) would hold an
  [N, 32, 32, N] intermediate, 8.6 GB in bf16 at 2,048 residues.
  """
  config = ml_collections.ConfigDict(config.to_dict())
  gc = config.global_config
  gc.deterministic = True
  gc.eval_dropout = False
  gc.use_remat = False
  gc.outer_product_mean_chunking = "always"
  if num_recycle is not None:
    config.num_recycle = int(num_recycle)
  if dtype is not None:
    gc.dtype = dtype
  if chunk_size:
    gc.low_memory = True
    gc.subbatch_size = int(chunk_size)
    config.embeddings_and_evoformer.template.subbatch_size = int(chunk_size)
    config.embeddings_and_evoformer.evoformer.outer_product_mean.chunk_size = int(chunk_size)
  else:
    gc.low_memory = False
  return config


def initial_prev(num_res: int, config: ml_collections.ConfigDict) -> dict[str, jax.Array]:
  """Zero recycled inputs of the first iteration (Suppl. Alg. 2 line 1; float32)."""
  emb = config.embeddings_and_evoformer
  prev = {}
  if emb.recycle_pos:
    prev["prev_pos"] = jnp.zeros((num_res, rc.atom_type_num, 3), jnp.float32)
  if emb.recycle_features:
    prev["prev_msa_first_row"] = jnp.zeros((num_res, emb.msa_channel), jnp.float32)
    prev["prev_pair"] = jnp.zeros((num_res, num_res, emb.pair_channel), jnp.float32)
  return prev


def _next_prev(outputs: Mapping[str, Any], prev: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
  sources = {
      "prev_pos": lambda: outputs["structure_module"]["final_atom_positions"],
      "prev_msa_first_row": lambda: outputs["representations"]["msa_first_row"],
      "prev_pair": lambda: outputs["representations"]["pair"],
  }
  return {key: sources[key]().astype(jnp.float32) for key in prev}


def ca_distance_change(ca: jax.Array, previous_ca: jax.Array, mask: jax.Array) -> jax.Array:
  """RMS change (Å) of the Cα-Cα distance matrix between two iterations, over real residues.

  Distances make it independent of the global frame, which recycling does not fix (ColabFold's
  early-stop criterion).
  """
  def distances(x):
    return jnp.sqrt(jnp.sum(jnp.square(x[:, None] - x[None, :]), axis=-1) + 1e-12)
  pair_mask = mask[:, None] * mask[None, :]
  squared = jnp.square(distances(ca) - distances(previous_ca)) * pair_mask
  return jnp.sqrt(jnp.sum(squared) / jnp.maximum(jnp.sum(pair_mask), 1.0))


def _make_step(config: ml_collections.ConfigDict) -> Callable:
  """jit(params, features, prev) -> (slim outputs, next prev, Cα change), for `config`."""
  iteration = AlphaFoldIteration(config)
  has_pae = "predicted_aligned_error" in config.heads and bool(
      config.heads.predicted_aligned_error.weight)

  def step(params, features, prev):
    outputs = iteration.apply({"params": params}, features, prev, deterministic=True)
    mask = features["seq_mask"].astype(jnp.float32)
    change = ca_distance_change(outputs["structure_module"]["final_atom_positions"][:, _CA],
                                prev["prev_pos"][:, _CA], mask) if "prev_pos" in prev else (
                                    jnp.asarray(jnp.inf, jnp.float32))
    structure = outputs["structure_module"]
    slim = {
        "final_atom_positions": structure["final_atom_positions"].astype(jnp.float32),
        "final_atom_mask": structure["final_atom_mask"].astype(jnp.float32),
        "plddt": confidence.compute_plddt(outputs["predicted_lddt"]["logits"]),
    }
    if has_pae:
      logits = outputs["predicted_aligned_error"]["logits"]
      breaks = outputs["predicted_aligned_error"]["breaks"]
      pae = confidence.compute_predicted_aligned_error(logits, breaks)
      slim["predicted_aligned_error"] = pae["predicted_aligned_error"]
      slim["max_predicted_aligned_error"] = pae["max_predicted_aligned_error"]
      slim["ptm"] = confidence.predicted_tm_score(logits, breaks, residue_weights=mask)
    return slim, _next_prev(outputs, prev), change

  return jax.jit(step)


def compiled_step(config: ml_collections.ConfigDict) -> Callable:
  """The jitted iteration of `config`, shared by all runners with an equal config (the
  recycle count is not part of one iteration, so it does not count)."""
  tree = config.to_dict()
  tree.pop("num_recycle", None)
  key = json.dumps(tree, sort_keys=True, default=str)
  if key not in _STEP_CACHE:
    _STEP_CACHE[key] = _make_step(config)
  return _STEP_CACHE[key]


class ModelRunner:
  """One model (config + parameters) ready to predict examples.

  `params` is the model's parameter tree ({'alphafold_iteration': ...}, with or without the
  {'params': ...} level), numpy or device arrays; it is placed on the default device once.
  """

  def __init__(self, name: str, config: ml_collections.ConfigDict, params: PyTree):
    self.name = name
    self.config = config
    if set(params) == {"params"}:
      params = params["params"]
    if "alphafold_iteration" not in params:
      raise ValueError(f"{name}: parameters have no 'alphafold_iteration' subtree (top-level "
                       f"keys: {sorted(params)}); not an AlphaFold parameter tree")
    self.params = jax.device_put(params["alphafold_iteration"])
    self._step = compiled_step(config)

  def predict(self, batch: Mapping[str, np.ndarray], *, num_res: int | None = None,
              recycle_tolerance: float | None = None) -> Prediction:
    """Runs the recycling iterations on `batch` (leading recycle axis R = num_recycle + 1).

    `num_res`: the real residue count when the batch is padded (outputs are cut to it).
    `recycle_tolerance`: stop recycling once the Cα distance-matrix RMS change is below it (Å).
    """
    start = time.perf_counter()
    num_slices = int(np.asarray(batch["aatype"]).shape[0])
    padded_res = int(np.asarray(batch["aatype"]).shape[1])
    num_res = padded_res if num_res is None else int(num_res)
    num_recycle = min(int(self.config.num_recycle), num_slices - 1)
    features = {key: value for key, value in batch.items() if key != "num_iter_recycling"}
    prev = initial_prev(padded_res, self.config)
    changes: list[float] = []
    outputs = None
    recycles = 0
    for index in range(num_recycle + 1):
      sliced = {key: jnp.asarray(value[index]) for key, value in features.items()}
      outputs, prev, change = self._step(self.params, sliced, prev)
      if index > 0:
        changes.append(float(change))    # synchronises: the next step needs no more than this
        recycles = index
        if recycle_tolerance is not None and changes[-1] < recycle_tolerance:
          break
    outputs = jax.device_get(outputs)
    has_pae = "predicted_aligned_error" in outputs
    cut = slice(0, num_res)
    return Prediction(
        model_name=self.name,
        final_atom_positions=np.asarray(outputs["final_atom_positions"])[cut],
        final_atom_mask=np.asarray(outputs["final_atom_mask"])[cut],
        plddt=np.asarray(outputs["plddt"], np.float32)[cut],
        predicted_aligned_error=(np.asarray(outputs["predicted_aligned_error"], np.float32)
                                 [cut, cut] if has_pae else None),
        max_predicted_aligned_error=(float(outputs["max_predicted_aligned_error"])
                                     if has_pae else None),
        ptm=float(outputs["ptm"]) if has_pae else None,
        num_recycles=recycles,
        recycle_changes=tuple(changes),
        seconds=time.perf_counter() - start)
