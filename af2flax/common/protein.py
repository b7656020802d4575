"""Protein structures in AlphaFold's atom37 layout: the `Protein` type, mmCIF and PDB
reading and writing, and building a Protein from model outputs.

    from af2flax.common import protein
    prot = protein.read_structure("data/samples/mmcif/2q2k.cif", chain_id="A")
    entry = protein.read_mmcif_entry("data/samples/mmcif/2q2k.cif")   # templates
    positions, mask = entry.chain_atoms("A")                          # aligned to SEQRES
    text = protein.to_pdb(protein.from_prediction(aatype, positions, mask, plddt=plddt))

Every reader raises `StructureParseError` (a ValueError) naming the file and the problem;
nothing else escapes for malformed input. Conventions (first model, MSE as MET, highest
occupancy alternate location, insertion codes as separate residues, unobserved residues
kept with mask 0, non-standard residues mapped to their parent or UNK, waters and ligands
ignored) are documented in `protein_base`, `mmcif_io` and `pdb_io`.
"""

from __future__ import annotations

import gzip
import pathlib
from typing import Any, Mapping, Sequence

import numpy as np

from af2flax.common import residue_constants as rc
from af2flax.common.mmcif_io import (MmcifEntry, from_mmcif_string, mmcif_entry_from_string,
                                     read_mmcif, read_mmcif_entry, to_mmcif)
from af2flax.common.pdb_io import from_pdb_string, read_pdb, to_pdb
from af2flax.common.protein_base import (PathLike, Protein, StructureParseError,
                                         load_structure_text)

__all__ = [
    "Protein", "StructureParseError", "MmcifEntry", "read_structure", "write_structure",
    "read_mmcif", "read_pdb", "read_mmcif_entry", "from_mmcif_string", "from_pdb_string",
    "mmcif_entry_from_string", "to_mmcif", "to_pdb", "from_prediction", "from_model_output",
    "ideal_atom_mask",
]

_MMCIF_SUFFIXES = (".cif", ".mmcif")
_PDB_SUFFIXES = (".pdb", ".ent")


def _format_of(path: PathLike) -> str | None:
  suffixes = [s.lower() for s in pathlib.Path(path).suffixes]
  if suffixes and suffixes[-1] == ".gz":
    suffixes = suffixes[:-1]
  if suffixes and suffixes[-1] in _MMCIF_SUFFIXES:
    return "mmcif"
  if suffixes and suffixes[-1] in _PDB_SUFFIXES:
    return "pdb"
  return None


def read_structure(path: PathLike, chain_id: str | Sequence[str] | None = None,
                   fix_arginine: bool = True) -> Protein:
  """Reads an mmCIF (`.cif`, `.mmcif`) or PDB (`.pdb`, `.ent`) file, gzipped or not.

  The format comes from the suffix, or from the content (`data_` starts an mmCIF) when
  the suffix says nothing. `chain_id`: one chain, a list, or None for all protein chains.
  """
  file_format = _format_of(path)
  if file_format == "mmcif":
    return read_mmcif(path, chain_id, fix_arginine)
  if file_format == "pdb":
    return read_pdb(path, chain_id, fix_arginine)
  text = load_structure_text(path)
  if text.lstrip().startswith("data_"):
    return from_mmcif_string(text, chain_id, str(path), fix_arginine)
  return from_pdb_string(text, chain_id, str(path), fix_arginine)


def write_structure(prot: Protein, path: PathLike) -> None:
  """Writes PDB or mmCIF by the suffix of `path` (`.pdb`/`.cif`, optionally `.gz`)."""
  file_format = _format_of(path)
  if file_format is None:
    raise ValueError(f"{path}: unknown structure suffix; use .pdb, .cif (optionally .gz)")
  text = to_mmcif(prot) if file_format == "mmcif" else to_pdb(prot)
  if str(path).lower().endswith(".gz"):
    with gzip.open(path, "wt") as handle:
      handle.write(text)
  else:
    pathlib.Path(path).write_text(text)


def ideal_atom_mask(aatype: np.ndarray) -> np.ndarray:
  """[..., 37] float32: the heavy atoms each residue type has (0 everywhere for UNK)."""
  return rc.STANDARD_ATOM_MASK[np.asarray(aatype)].astype(np.float32)


def from_prediction(aatype: np.ndarray, final_atom_positions: np.ndarray,
                    final_atom_mask: np.ndarray, plddt: np.ndarray | None = None,
                    residue_index: np.ndarray | None = None,
                    chain_index: np.ndarray | None = None,
                    chain_names: Sequence[str] | None = None) -> Protein:
  """A Protein ready for `to_pdb`/`to_mmcif` from the structure module's outputs.

  Args:
    aatype: [N] int, 0..20.
    final_atom_positions: [N, 37, 3] (the structure module's `final_atom_positions`).
    final_atom_mask: [N, 37] (its `final_atom_mask`: the atoms each residue type has).
    plddt: optional [N] per-residue confidence (0-100) written to every atom's B-factor.
    residue_index: [N] residue numbers to write; default 1..N. AlphaFold writes the
      features' 0-based `residue_index` + 1.
    chain_index: [N] chain of each residue, default all 0; `chain_names` default 'A', 'B'...
  Accepts numpy or JAX arrays (converted to numpy float32/int32).
  """
  aatype = np.asarray(aatype, np.int32)
  num_res = aatype.shape[0]
  positions = np.asarray(final_atom_positions, np.float32)
  mask = np.asarray(final_atom_mask, np.float32)
  if residue_index is None:
    residue_index = np.arange(1, num_res + 1, dtype=np.int32)
  if chain_index is None:
    chain_index = np.zeros([num_res], np.int32)
  chain_index = np.asarray(chain_index, np.int32)
  if chain_names is None:
    num_chains = int(chain_index.max()) + 1 if num_res else 1
    chain_names = [_default_chain_name(i) for i in range(num_chains)]
  b_factors = np.zeros([num_res, rc.atom_type_num], np.float32)
  prot = Protein(aatype=aatype, atom_positions=positions * mask[..., None], atom_mask=mask,
                 residue_index=residue_index, chain_index=chain_index, b_factors=b_factors,
                 chain_names=tuple(chain_names))
  return prot if plddt is None else prot.with_residue_b_factors(np.asarray(plddt, np.float32))


def from_model_output(batch: Mapping[str, Any], outputs: Mapping[str, Any],
                      plddt: np.ndarray | None = None) -> Protein:
  """`from_prediction` for AlphaFold-named dicts: `batch['aatype']`, `batch['residue_index']`
  (0-based, written + 1), optional `batch['asym_id']` (1-based chain ids), and
  `outputs['structure_module']['final_atom_positions' | 'final_atom_mask']` (or those keys
  at the top level of `outputs`). A leading recycling/ensemble axis on batch features
  ([R, N]) is dropped by taking its first slice. `plddt` defaults to `outputs['plddt']`,
  else to the pLDDT of `outputs['predicted_lddt']['logits']` (Suppl. Alg. 29), else none.
  """
  structure = outputs.get("structure_module", outputs)
  positions = np.asarray(structure["final_atom_positions"])
  num_res = positions.shape[0]

  def feature(name: str) -> np.ndarray:
    value = np.asarray(batch[name])
    return value[0] if value.ndim == 2 and value.shape[1] == num_res else value

  chain_index = None
  if "asym_id" in batch:
    asym_id = feature("asym_id").astype(np.int32)
    chain_index = np.unique(asym_id, return_inverse=True)[1].astype(np.int32)
  if plddt is None and "plddt" in outputs:
    plddt = outputs["plddt"]
  elif plddt is None and "predicted_lddt" in outputs:
    from af2flax.common import confidence  # Lazy: keeps JAX out of file-only users.
    plddt = np.asarray(confidence.compute_plddt(outputs["predicted_lddt"]["logits"]))
  return from_prediction(feature("aatype"), positions, structure["final_atom_mask"], plddt,
                         residue_index=feature("residue_index") + 1, chain_index=chain_index)


def _default_chain_name(index: int) -> str:
  """A, B, ..., Z, a, ..., z, 0, ..., 9 (the 62 one-character PDB chain ids), then A63..."""
  alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789"
  return alphabet[index] if index < len(alphabet) else f"A{index + 1}"
