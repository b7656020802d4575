"""Training records for the input-pipeline tests: real PDB chains in AlphaFold's raw layout.

Structures come from ../shared/data/pdb_chains (parsed with Biopython into atom37); each
example's MSA is the query plus random point mutants of it with random deletions, so that the
MSA has the depth and layout (HHblits alphabet, deletion_matrix_int) of a real record.
"""

from __future__ import annotations

import gzip
import pathlib
from typing import Sequence

import numpy as np
from Bio.PDB import PDBParser

from af2flax.common import residue_constants as rc
from af2flax.data import tfrecord

_OURS_TO_HHBLITS = np.argsort(np.asarray(rc.MAP_HHBLITS_AATYPE_TO_OUR_AATYPE))


def load_pdb_chain(path: pathlib.Path) -> tuple[str, np.ndarray, np.ndarray]:
  """(sequence, atom37 positions [L, 37, 3], atom37 mask [L, 37]) of the first chain."""
  with gzip.open(path, "rt") as handle:
    structure = PDBParser(QUIET=True).get_structure(path.stem, handle)
  chain = next(structure[0].get_chains())
  letters, positions, masks = [], [], []
  for residue in chain:
    if residue.id[0] != " ":
      continue
    letters.append(rc.restype_3to1.get(residue.get_resname(), "X"))
    position = np.zeros((rc.atom_type_num, 3), np.float32)
    mask = np.zeros(rc.atom_type_num, np.float32)
    for atom in residue:
      if atom.get_id() in rc.atom_order:
        position[rc.atom_order[atom.get_id()]] = atom.get_coord()
        mask[rc.atom_order[atom.get_id()]] = 1.0
    positions.append(position)
    masks.append(mask)
  return "".join(letters), np.stack(positions), np.stack(masks)


def raw_example(name: str, sequence: str, positions: np.ndarray, mask: np.ndarray, *,
                num_msa: int, num_templates: int, rng: np.random.Generator,
                cluster_id: int = -1, is_distillation: float = 0.0,
                resolution: float = 2.0) -> dict[str, np.ndarray]:
  """A record with every feature of tfrecord.FEATURES, in AlphaFold's raw layout."""
  length = len(sequence)
  aatype = rc.sequence_to_aatype(sequence)
  msa_ours = np.repeat(aatype[None], num_msa, axis=0)
  mutate = rng.random(msa_ours.shape) < 0.3
  mutate[0] = False
  msa_ours[mutate] = rng.integers(0, 22, size=int(mutate.sum()))
  deletions = np.where(rng.random(msa_ours.shape) < 0.05, rng.integers(1, 9, msa_ours.shape), 0)
  deletions[0] = 0
  template_aatype = np.zeros((num_templates, length, 22), np.float32)
  template_aatype[:, np.arange(length), _OURS_TO_HHBLITS[aatype]] = 1.0
  template_positions = np.repeat(positions[None], num_templates, axis=0)
  template_positions = template_positions + rng.normal(size=template_positions.shape).astype(np.float32)
  return {
      "aatype": np.eye(21, dtype=np.int32)[aatype],
      "between_segment_residues": np.zeros(length, np.int32),
      "domain_name": np.asarray([name.encode()], object),
      "residue_index": np.arange(length, dtype=np.int32),
      "seq_length": np.full(length, length, np.int32),
      "sequence": np.asarray([sequence.encode()], object),
      "msa": _OURS_TO_HHBLITS[msa_ours].astype(np.int32),
      "deletion_matrix_int": deletions.astype(np.int32),
      "num_alignments": np.full(length, num_msa, np.int32),
      "msa_species_identifiers": np.asarray([b""] * num_msa, object),
      "template_aatype": template_aatype,
      "template_all_atom_positions": (template_positions * mask[None, ..., None]).astype(np.float32),
      "template_all_atom_masks": np.repeat(mask[None], num_templates, axis=0),
      "template_sum_probs": np.linspace(10, 1, num_templates, dtype=np.float32)[:, None],
      "template_domain_names": np.asarray([f"t{i}".encode() for i in range(num_templates)], object),
      "template_sequence": np.asarray([sequence.encode()] * num_templates, object),
      "all_atom_positions": positions.astype(np.float32),
      "all_atom_mask": mask.astype(np.float32),
      "resolution": np.asarray([resolution], np.float32),
      "release_date": np.asarray([b"2000-01-01"], object),
      "chain_id": np.asarray([name.encode()], object),
      "cluster_id": np.asarray([cluster_id], np.int32),
      "cluster_size": np.asarray([0], np.int32),
      "is_distillation": np.asarray([is_distillation], np.float32),
  }


def write_shards(directory: pathlib.Path, examples: Sequence[dict[str, np.ndarray]],
                 num_shards: int = 2) -> list[str]:
  """Writes the examples round-robin into `num_shards` TFRecord files; returns their paths."""
  directory.mkdir(parents=True, exist_ok=True)
  paths = []
  for shard in range(num_shards):
    path = directory / f"train-{shard:05d}-of-{num_shards:05d}.tfrecord"
    records = [tfrecord.encode_example(example) for example in examples[shard::num_shards]]
    tfrecord.write_tfrecord(str(path), records)
    paths.append(str(path))
  return paths
