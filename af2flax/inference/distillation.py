"""The self-distillation set: confidence filters and a resumable writer in the builder's format.

Jumper et al. (2021) Suppl. 1.3 "Self-distillation dataset": predicted structures of
unlabelled sequences become training targets after a confidence filter, with low-confidence
regions kept out of the structural losses. Here:
  * a prediction is kept when its mean pLDDT is at least `min_mean_plddt`;
  * residues with pLDDT below `mask_below` keep their sequence (MSA, aatype) but get
    `all_atom_mask` 0, so FAPE, torsion and violation terms ignore them;
  * a prediction with fewer than `min_unmasked_residues` confident residues is dropped.
Sources of the numbers: OpenFold, which reproduces AlphaFold's training, masks residues below
pLDDT 50 (`self_distillation_plddt_threshold = 50.0`); DeepMind confirm AlphaFold 2 filtered its
distillation set by pLDDT (google-deepmind/alphafold3#632: "We removed any pLDDT filtering for
AF3"), built its MSAs with HHblits on UniClust30 only and did not relax the predictions
(google-deepmind/alphafold#319). The mean-pLDDT default (80) is this project's choice, not
confirmed from a primary source. The supplement's own numbers could not be read from the stored
references when this was written: both thresholds are flags; check them against Suppl. 1.3
before a large run (docs/distillation.md).

Distillation examples carry `resolution` 0 (so the resolution-filtered heads skip them, as for
NMR) and `is_distillation` 1, and an extra `plddt` [N] feature (not in the parsed schema:
readers that parse by schema ignore it; it lets a set be re-thresholded without predicting
again).

`DistillationWriter` writes `af2flax.data.build_dataset`'s layout (shards, per-shard index and
failure sidecars, index.tsv, failures.tsv, dataset_info.json, build_manifest.json) one example
at a time: each finished input is staged as `staging/<id>.example` (or `.failure`) and a shard
is written as soon as all its inputs are staged, so a killed run loses at most the input in
progress and a re-run skips finished inputs. Nothing here needs TensorFlow (the builder's codec
and TFRecord writer are pure Python), so the set can be made on GPU machines.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from typing import Any, Mapping, Sequence

import numpy as np

from af2flax.data import tfrecord

logger = logging.getLogger(__name__)

STAGING_DIR = "staging"
STRUCTURES_DIR = "structures"


@dataclasses.dataclass(frozen=True)
class DistillationFilter:
  """Which predictions become examples, and which residues they supervise (Suppl. 1.3)."""
  min_mean_plddt: float = 80.0
  mask_below: float = 50.0
  min_unmasked_residues: int = 1

  def residue_mask(self, plddt: np.ndarray) -> np.ndarray:
    """[N] float32: 1 where pLDDT >= mask_below (supervised), 0 where masked."""
    return (np.asarray(plddt, np.float32) >= self.mask_below).astype(np.float32)

  def rejection(self, plddt: np.ndarray) -> str | None:
    """Why the prediction is dropped, or None when it is kept."""
    plddt = np.asarray(plddt, np.float32)
    mean = float(np.mean(plddt)) if plddt.size else 0.0
    if mean < self.min_mean_plddt:
      return f"filtered: mean pLDDT {mean:.2f} < {self.min_mean_plddt:g}"
    unmasked = int(self.residue_mask(plddt).sum())
    if unmasked < self.min_unmasked_residues:
      return (f"filtered: {unmasked} residues with pLDDT >= {self.mask_below:g}, fewer than "
              f"{self.min_unmasked_residues}")
    return None


def empty_template_features(num_res: int) -> dict[str, np.ndarray]:
  """Template features with no template (T = 0), the builder's layout."""
  return {"template_aatype": np.zeros((0, num_res, 22), np.float32),
          "template_all_atom_positions": np.zeros((0, num_res, 37, 3), np.float32),
          "template_all_atom_masks": np.zeros((0, num_res, 37), np.float32),
          "template_sum_probs": np.zeros((0, 1), np.float32),
          "template_domain_names": np.zeros((0,), object),
          "template_sequence": np.zeros((0,), object)}


def make_example(raw_features: Mapping[str, np.ndarray], example_id: str,
                 atom_positions: np.ndarray, atom_mask: np.ndarray, plddt: np.ndarray,
                 distillation_filter: DistillationFilter) -> dict[str, np.ndarray]:
  """A training example (schema `af2flax.data.tfrecord.FEATURES`) from a prediction.

  `raw_features`: the query's sequence, MSA and template features (AlphaFold's raw layout);
  `atom_positions` [N, 37, 3] / `atom_mask` [N, 37]: the predicted structure; `plddt` [N].
  """
  num_res = int(np.asarray(raw_features["aatype"]).shape[0])
  plddt = np.asarray(plddt, np.float32)
  if plddt.shape != (num_res,) or np.asarray(atom_positions).shape != (num_res, 37, 3):
    raise ValueError(f"{example_id}: prediction shapes {np.asarray(atom_positions).shape}, "
                     f"{plddt.shape} do not fit {num_res} residues")
  features = {name: np.asarray(value) for name, value in raw_features.items()
              if name in tfrecord.FEATURES}
  for name, value in empty_template_features(num_res).items():
    features.setdefault(name, value)
  supervised = distillation_filter.residue_mask(plddt)
  features.update({
      "all_atom_positions": np.asarray(atom_positions, np.float32),
      "all_atom_mask": np.asarray(atom_mask, np.float32) * supervised[:, None],
      "resolution": np.array([0.0], np.float32),
      "release_date": np.array([b""], object),
      "chain_id": np.array([example_id.encode()], object),
      "cluster_id": np.array([-1], np.int32),
      "cluster_size": np.array([0], np.int32),
      "is_distillation": np.array([1.0], np.float32),
      "plddt": plddt,
  })
  return features


def _write_atomically(path: str, data: bytes) -> None:
  tmp = f"{path}.tmp"
  with open(tmp, "wb") as handle:
    handle.write(data)
  os.replace(tmp, path)


def _tsv(rows: Sequence[Sequence[Any]]) -> bytes:
  return "".join("\t".join(" ".join(str(v).split()) for v in row) + "\n" for row in rows).encode()


class DistillationWriter:
  """Resumable output of a distillation run in the dataset builder's layout.

  `ids`: every input in a fixed order (the FASTA's); shard s holds a contiguous block of them,
  as the builder assigns files to shards. `manifest`: what determines the output (inputs and
  options); a directory holding another run's output is refused.
  """

  def __init__(self, out: str, ids: Sequence[str], num_shards: int,
               manifest: Mapping[str, Any], compression: str | None = None):
    from af2flax.data import build_dataset  # pylint: disable=import-outside-toplevel
    self._builder = build_dataset
    if len(set(ids)) != len(ids):
      raise ValueError("distillation inputs must have unique ids")
    self.out = os.path.abspath(out)
    self.ids = list(ids)
    self.compression = compression
    self.num_shards = max(1, min(num_shards, len(self.ids))) if self.ids else 1
    self.shard_of = dict(zip(self.ids, build_dataset.assign_shards(len(self.ids),
                                                                   self.num_shards)))
    for directory in (STAGING_DIR, build_dataset.SHARD_DIR, STRUCTURES_DIR):
      os.makedirs(os.path.join(self.out, directory), exist_ok=True)
    listing = hashlib.sha256("\n".join(self.ids).encode()).hexdigest()
    manifest_bytes = json.dumps(dict(manifest, format=build_dataset.FORMAT, ids_sha256=listing,
                                     num_inputs=len(self.ids), num_shards=self.num_shards,
                                     compression=compression or ""),
                                indent=1, sort_keys=True, default=str).encode()
    manifest_path = os.path.join(self.out, "build_manifest.json")
    if os.path.exists(manifest_path):
      with open(manifest_path, "rb") as handle:
        if handle.read() != manifest_bytes:
          raise ValueError(f"{self.out} holds a distillation run of other inputs or options "
                           f"({manifest_path} differs); use a new --out directory")
    else:
      _write_atomically(manifest_path, manifest_bytes)

  # --- staging ---------------------------------------------------------------------------------

  def _staged(self, example_id: str, kind: str) -> str:
    return os.path.join(self.out, STAGING_DIR, f"{example_id}.{kind}")

  def shard_complete(self, shard: int) -> bool:
    return os.path.exists(self._builder.shard_path(self.out, shard, self.num_shards)
                          + ".index.tsv")

  def is_done(self, example_id: str) -> bool:
    """Finished in an earlier run (staged, or already in a written shard)."""
    return (self.shard_complete(self.shard_of[example_id])
            or os.path.exists(self._staged(example_id, "example"))
            or os.path.exists(self._staged(example_id, "failure")))

  def add_example(self, example_id: str, features: Mapping[str, np.ndarray],
                  structure: str = "") -> None:
    """Stages one kept example (checked against the schema) and its index row."""
    serialized = tfrecord.encode_example(features)
    row = {"id": example_id, "length": int(np.asarray(features["aatype"]).shape[0]),
           "resolution": "0", "release_date": "", "cluster_id": -1, "cluster_size": 0,
           "shard": self.shard_of[example_id],
           "num_alignments": int(np.asarray(features["msa"]).shape[0]),
           "num_templates": int(np.asarray(features["template_aatype"]).shape[0]),
           "is_distillation": 1, "structure": structure}
    _write_atomically(self._staged(example_id, "index.json"), json.dumps(row).encode())
    _write_atomically(self._staged(example_id, "example"), serialized)
    self._maybe_write_shard(example_id)

  def add_failure(self, example_id: str, input_name: str, reason: str) -> None:
    _write_atomically(self._staged(example_id, "failure"),
                      json.dumps([input_name, reason]).encode())
    self._maybe_write_shard(example_id)

  # --- shards ----------------------------------------------------------------------------------

  def _maybe_write_shard(self, example_id: str) -> None:
    shard = self.shard_of[example_id]
    members = [i for i in self.ids if self.shard_of[i] == shard]
    if self.shard_complete(shard) or not all(
        os.path.exists(self._staged(i, "example")) or os.path.exists(self._staged(i, "failure"))
        for i in members):
      return
    self.write_shard(shard)

  def write_shard(self, shard: int) -> None:
    """Writes shard `shard` from its staged inputs and removes them from staging."""
    members = [i for i in self.ids if self.shard_of[i] == shard]
    records, rows, failures = [], [], []
    for example_id in members:
      if os.path.exists(self._staged(example_id, "example")):
        with open(self._staged(example_id, "example"), "rb") as handle:
          records.append(handle.read())
        with open(self._staged(example_id, "index.json")) as handle:
          rows.append(json.load(handle))
      else:
        with open(self._staged(example_id, "failure")) as handle:
          failures.append(json.load(handle))
    path = self._builder.shard_path(self.out, shard, self.num_shards)
    tfrecord.write_tfrecord(f"{path}.tmp", records, self.compression)
    os.replace(f"{path}.tmp", path)
    _write_atomically(f"{path}.failures.tsv", _tsv(failures))
    # The index sidecar last: its presence marks the shard complete (the builder's rule).
    _write_atomically(f"{path}.index.tsv", _tsv([[row[c] for c in self._builder.INDEX_COLUMNS]
                                                 for row in rows]))
    for example_id in members:
      for kind in ("example", "index.json", "failure"):
        if os.path.exists(self._staged(example_id, kind)):
          os.remove(self._staged(example_id, kind))
    logger.info("wrote shard %s (%d examples, %d failures)", path, len(records), len(failures))

  def finalize(self, extra_failures: Sequence[tuple[str, str]] = ()) -> dict[str, int] | None:
    """Writes any complete-but-unwritten shards, then index.tsv, failures.tsv and
    dataset_info.json when every shard is written; returns counts, or None if incomplete."""
    for shard in range(self.num_shards):
      if not self.shard_complete(shard):
        members = [i for i in self.ids if self.shard_of[i] == shard]
        if all(self.is_done(i) for i in members):
          self.write_shard(shard)
    if not all(self.shard_complete(s) for s in range(self.num_shards)):
      return None
    index_rows, failure_rows, sizes = [], [list(f) for f in extra_failures], []
    for shard in range(self.num_shards):
      path = self._builder.shard_path(self.out, shard, self.num_shards)
      with open(f"{path}.index.tsv") as handle:
        rows = [line.rstrip("\n").split("\t") for line in handle if line.strip()]
      with open(f"{path}.failures.tsv") as handle:
        failure_rows += [line.rstrip("\n").split("\t", 1) for line in handle if line.strip()]
      index_rows += rows
      sizes.append(len(rows))
    _write_atomically(os.path.join(self.out, "index.tsv"),
                      _tsv([self._builder.INDEX_COLUMNS] + index_rows))
    _write_atomically(os.path.join(self.out, "failures.tsv"),
                      _tsv([("input", "reason")] + failure_rows))
    info = {"format": self._builder.FORMAT, "num_examples": len(index_rows),
            "num_failures": len(failure_rows), "num_shards": self.num_shards,
            "compression": self.compression or "", "is_distillation": True,
            "shards": [os.path.relpath(self._builder.shard_path(self.out, s, self.num_shards),
                                       self.out) for s in range(self.num_shards)],
            "examples_per_shard": sizes,
            "features": {name: {"dtype": dtype, "rank": rank}
                         for name, (dtype, rank) in tfrecord.FEATURES.items()}}
    _write_atomically(os.path.join(self.out, "dataset_info.json"),
                      json.dumps(info, indent=1, sort_keys=True).encode())
    return {"num_examples": len(index_rows), "num_failures": len(failure_rows)}
