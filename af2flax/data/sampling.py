"""Which training example fills each batch slot: chain weights and source mixing.

Jumper et al. (2021) Suppl. 1.2.5: PDB chains are sampled with a weight that is the inverse of
their sequence-cluster size (40% identity clusters) times a length term
max(min(N_res, 512), 256) / 512; Suppl. 1.3: 75% of the examples come from the
self-distillation set, 25% from the PDB.

The schedule is stateless: the examples of global step s are a pure function of (seed, s),
computed identically by every host, so
  * each host takes its own slots of the step's global batch (hosts never share an example
    within a step: records are drawn without replacement inside a step),
  * resuming at step s needs nothing but s,
  * the global batch does not depend on the number of hosts.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import ml_collections
import numpy as np

# Stream ids that keep the independent random decisions of a step apart.
_STREAM_SOURCE, _STREAM_RECORD, _STREAM_RECYCLE, _STREAM_REPLACE = 0, 1, 2, 3
PDB, DISTILLATION = 0, 1


def chain_sampling_weights(num_res: np.ndarray, cluster_ids: Sequence[str] | np.ndarray | None,
                           *, cluster_weighting: bool = True, length_weighting: bool = True,
                           length_weight_min: int = 256, length_weight_max: int = 512) -> np.ndarray:
  """Per-chain sampling weight (Jumper et al. (2021) Suppl. 1.2.5), unnormalised.

  w = (1 / size of the chain's sequence cluster) * max(min(N_res, 512), 256) / 512. Chains
  without a cluster id (None or '') count as clusters of their own.
  """
  num_res = np.asarray(num_res, np.float64)
  weights = np.ones_like(num_res)
  if length_weighting:
    weights *= np.maximum(np.minimum(num_res, length_weight_max), length_weight_min) / length_weight_max
  if cluster_weighting and cluster_ids is not None:
    ids = [str(c) if c is not None and str(c) != "" else f"__single_{i}"
           for i, c in enumerate(cluster_ids)]
    _, inverse, counts = np.unique(np.asarray(ids), return_inverse=True, return_counts=True)
    weights /= counts[inverse]
  return weights


def weights_from_config(num_res: np.ndarray, cluster_ids, is_distillation: np.ndarray,
                        config: ml_collections.ConfigDict) -> np.ndarray:
  """Weights of every record, with the config's choices per source (config.sampling)."""
  is_distillation = np.asarray(is_distillation, bool)
  weights = np.zeros(len(num_res))
  clusters = None if cluster_ids is None else np.asarray(cluster_ids, object)
  for source_mask, by_cluster, by_length in (
      (~is_distillation, config.cluster_weighting, config.length_weighting),
      (is_distillation, config.weight_distillation_by_cluster, config.weight_distillation_by_length)):
    if source_mask.any():
      weights[source_mask] = chain_sampling_weights(
          np.asarray(num_res)[source_mask], None if clusters is None else clusters[source_mask],
          cluster_weighting=by_cluster, length_weighting=by_length,
          length_weight_min=config.length_weight_min, length_weight_max=config.length_weight_max)
  return weights


@dataclasses.dataclass(frozen=True)
class StepPlan:
  """The examples of one global step: record index and source per slot, recycling count."""
  records: np.ndarray          # [global_batch] int64, index into the record table
  sources: np.ndarray          # [global_batch] PDB or DISTILLATION
  num_iter_recycling: int


class StepSampler:
  """Stateless per-step sampling of records from weighted PDB and distillation sources.

  Args:
    weights: [num_records] weight of each record (0 = never sampled).
    is_distillation: [num_records] source of each record.
    distillation_fraction: probability that a slot draws from the distillation source
      (ignored when one source is empty).
    global_batch_size: examples per step over all hosts.
    num_recycle: recycling iterations of the model; with `uniform_recycling` each step draws
      num_iter_recycling uniformly from 0..num_recycle (Suppl. 1.10), else uses num_recycle.
    seed: the run's data seed.
  """

  def __init__(self, weights: np.ndarray, is_distillation: np.ndarray,
               distillation_fraction: float, global_batch_size: int, num_recycle: int,
               uniform_recycling: bool, seed: int):
    weights = np.asarray(weights, np.float64)
    is_distillation = np.asarray(is_distillation, bool)
    if weights.shape != is_distillation.shape:
      raise ValueError(f"weights {weights.shape} and is_distillation {is_distillation.shape} differ")
    if np.any(weights < 0) or not np.all(np.isfinite(weights)):
      raise ValueError("sampling weights must be finite and non-negative")
    self._sources = []
    for source in (PDB, DISTILLATION):
      members = np.flatnonzero((is_distillation == bool(source)) & (weights > 0))
      cumulative = np.cumsum(weights[members])
      self._sources.append((members, cumulative / cumulative[-1] if len(members) else cumulative))
    if not any(len(members) for members, _ in self._sources):
      raise ValueError("no record has a positive sampling weight")
    if not len(self._sources[DISTILLATION][0]):
      distillation_fraction = 0.0
    elif not len(self._sources[PDB][0]):
      distillation_fraction = 1.0
    self.distillation_fraction = float(distillation_fraction)
    self.global_batch_size = int(global_batch_size)
    self.num_recycle = int(num_recycle)
    self.uniform_recycling = bool(uniform_recycling)
    self.seed = int(seed)

  def _rng(self, *keys: int) -> np.random.Generator:
    return np.random.default_rng([self.seed, *keys])

  def _draw(self, source: int, count: int, rng: np.random.Generator) -> np.ndarray:
    members, cumulative = self._sources[source]
    indices = np.searchsorted(cumulative, rng.random(count), side="right")
    indices = np.minimum(indices, len(members) - 1)
    if count <= len(members):
      # Redraw duplicates so that no record appears twice in a step (hosts stay disjoint).
      for _ in range(1000):
        _, first = np.unique(indices, return_index=True)
        duplicate = np.ones(count, bool)
        duplicate[first] = False
        if not duplicate.any():
          break
        redraw = np.searchsorted(cumulative, rng.random(int(duplicate.sum())), side="right")
        indices[duplicate] = np.minimum(redraw, len(members) - 1)
    return members[indices]

  def plan(self, step: int) -> StepPlan:
    """The global batch of `step` (identical on every host)."""
    sources = (self._rng(step, _STREAM_SOURCE).random(self.global_batch_size)
               < self.distillation_fraction).astype(np.int64)
    records = np.zeros(self.global_batch_size, np.int64)
    record_rng = self._rng(step, _STREAM_RECORD)
    for source in (PDB, DISTILLATION):
      slots = np.flatnonzero(sources == source)
      if len(slots):
        records[slots] = self._draw(source, len(slots), record_rng)
    recycles = self.num_recycle
    if self.uniform_recycling:
      recycles = int(self._rng(step, _STREAM_RECYCLE).integers(0, self.num_recycle + 1))
    return StepPlan(records=records, sources=sources, num_iter_recycling=recycles)

  def replacement(self, step: int, slot: int, attempt: int, source: int) -> int:
    """A deterministic substitute record for a slot whose record turned out unusable."""
    return int(self._draw(source, 1, self._rng(step, _STREAM_REPLACE, slot, attempt))[0])


def example_seeds(seed: int, step: int, slot: int) -> tuple[np.random.Generator, np.ndarray]:
  """(numpy Generator, TF stateless seed [2] int64) of the example in (step, slot)."""
  sequence = np.random.SeedSequence([seed, step, slot])
  numpy_sequence, tf_sequence = sequence.spawn(2)
  tf_seed = tf_sequence.generate_state(2, np.uint32).astype(np.int64)
  return np.random.default_rng(numpy_sequence), tf_seed
