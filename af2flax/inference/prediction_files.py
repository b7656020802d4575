"""Published predicted structures (AlphaFold DB files and the like) as self-distillation inputs.

Jumper et al. (2021) Suppl. 1.3 builds the self-distillation set from predicted structures and
their per-residue confidence. The AlphaFold Protein Structure Database publishes such
predictions as PDB and mmCIF files with the pLDDT of each residue in every atom's B-factor;
this module turns a directory of them into checked inputs of the distillation writer
(`af2flax.distill --from_predictions`):

  * names: `AF-<UniProt accession>-F<k>-model_v<N>.{cif,pdb}[.gz]` (AlphaFold DB) gives the id
    `<accession>`; any other structure file gives its file stem (unsafe characters as '_');
  * `select_predictions` decides from the names alone which file stands for each id: fragments
    of multi-fragment entries (AlphaFold DB predicts long proteins in overlapping fragments; a
    fragment is no whole-chain prediction) are refused, F1 included when another fragment of
    the accession is present; an older `model_v<N>` of the same entry is superseded by the
    newest; of several files with one id (e.g. an entry's .cif.gz and .pdb.gz) the mmCIF is
    used; every other file is a failure with the reason;
  * `read_prediction` reads one file and its pLDDT (the CA atom's B-factor of each residue) and
    refuses files without pLDDT: B-factors outside 0-100, all CA B-factors equal (no
    per-residue confidence), a residue without CA, several chains.
"""

from __future__ import annotations

import collections
import dataclasses
import os
import re
from typing import Sequence

import numpy as np

from af2flax.common import protein
from af2flax.common import residue_constants as rc

STRUCTURE_SUFFIXES = (".cif", ".mmcif", ".pdb", ".ent")
_MMCIF_SUFFIXES = (".cif", ".mmcif")
# AlphaFold DB file stems, e.g. AF-P69905-F1-model_v4 (accessions may carry an isoform '-2').
_AFDB_STEM = re.compile(r"AF-(?P<accession>[A-Za-z0-9]+(?:-[0-9]+)?)-F(?P<fragment>[0-9]+)"
                        r"-model_v(?P<version>[0-9]+)")
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")


class PredictionFileError(ValueError):
  """A predicted-structure file that cannot be a distillation example; names the file."""


@dataclasses.dataclass(frozen=True)
class PredictionFile:
  """One input file and the example id it stands for."""
  path: str                     # relative to the predictions directory
  example_id: str
  stem: str                     # file name without .gz and the format suffix
  is_mmcif: bool
  accession: str | None = None  # AlphaFold DB names only
  fragment: int | None = None
  version: int | None = None

  @property
  def source(self) -> str:
    """What the file is, for logs."""
    if self.accession is None:
      return "predicted structure"
    return f"AlphaFold DB model_v{self.version} F{self.fragment}"


@dataclasses.dataclass(frozen=True)
class Selection:
  """The files that become examples (one per id, in listing order) and the refused ones."""
  files: list[PredictionFile]
  rejected: list[tuple[str, str]]   # (relative path, reason)


@dataclasses.dataclass(frozen=True)
class PredictedStructure:
  sequence: str              # one-letter, 20 amino acids and X
  atom_positions: np.ndarray  # [N, 37, 3] float32, Å
  atom_mask: np.ndarray       # [N, 37] float32
  plddt: np.ndarray           # [N] float32, the CA B-factors


def parse_name(relative_path: str) -> PredictionFile | None:
  """The id and AlphaFold DB fields of a file name; None when it is not a structure file."""
  name = os.path.basename(relative_path)
  if name.lower().endswith(".gz"):
    name = name[:-3]
  stem, suffix = os.path.splitext(name)
  if suffix.lower() not in STRUCTURE_SUFFIXES or not stem:
    return None
  is_mmcif = suffix.lower() in _MMCIF_SUFFIXES
  match = _AFDB_STEM.fullmatch(stem)
  if match:
    return PredictionFile(relative_path, match["accession"], stem, is_mmcif, match["accession"],
                          int(match["fragment"]), int(match["version"]))
  return PredictionFile(relative_path, _UNSAFE.sub("_", stem), stem, is_mmcif)


def select_predictions(relative_paths: Sequence[str]) -> Selection:
  """Which file stands for each id (see the module docstring); deterministic in the listing."""
  order = {path: index for index, path in enumerate(relative_paths)}
  rejected: list[tuple[str, str]] = []
  candidates: list[PredictionFile] = []
  for path in relative_paths:
    parsed = parse_name(path)
    if parsed is None:
      rejected.append((path, "not a structure file (expected .cif, .pdb, .mmcif, .ent, "
                             "optionally .gz)"))
    else:
      candidates.append(parsed)

  fragments = collections.defaultdict(set)
  for candidate in candidates:
    if candidate.accession is not None:
      fragments[candidate.accession].add(candidate.fragment)
  newest = collections.defaultdict(int)
  usable = []
  for candidate in candidates:
    if candidate.accession is None:
      usable.append(candidate)
      continue
    present = sorted(fragments[candidate.accession])
    if candidate.fragment != 1:
      rejected.append((candidate.path, f"fragment F{candidate.fragment} of a multi-fragment "
                       "AlphaFold DB entry (a long protein predicted in overlapping fragments): "
                       "not a whole-chain prediction"))
    elif len(present) > 1:
      others = ", ".join(f"F{k}" for k in present if k != 1)
      rejected.append((candidate.path, f"F1 of a multi-fragment AlphaFold DB entry ({others} "
                       "also present): not a whole-chain prediction"))
    else:
      usable.append(candidate)
      newest[candidate.accession] = max(newest[candidate.accession], candidate.version)

  by_id: dict[str, list[PredictionFile]] = collections.defaultdict(list)
  for candidate in usable:
    if candidate.accession is not None and candidate.version < newest[candidate.accession]:
      rejected.append((candidate.path, f"superseded: AlphaFold DB model_v"
                       f"{newest[candidate.accession]} of {candidate.accession} is also present"))
    else:
      by_id[candidate.example_id].append(candidate)
  chosen = {}
  for example_id, files in by_id.items():
    # mmCIF first (it carries the sequence of every residue), then the listing order.
    keep = min(files, key=lambda f: (not f.is_mmcif, order[f.path]))
    chosen[keep.path] = keep
    rejected += [(f.path, f"duplicate: {keep.path} has the same id {example_id!r} and is used")
                 for f in files if f is not keep]
  rejected.sort(key=lambda row: order[row[0]])
  return Selection([chosen[p] for p in relative_paths if p in chosen], rejected)


def plddt_from_b_factors(prot: protein.Protein, source: str) -> np.ndarray:
  """[N] float32: each residue's CA B-factor, checked to be a pLDDT (0-100, not constant)."""
  ca = rc.atom_order["CA"]
  no_ca = np.flatnonzero(prot.atom_mask[:, ca] < 0.5)
  if no_ca.size:
    raise PredictionFileError(
        f"{source}: {no_ca.size} residues have no CA atom (first: residue "
        f"{prot.residue_index[no_ca[0]]}); a prediction models every residue and its pLDDT is "
        "read from the CA B-factor")
  b_factors = prot.b_factors[prot.atom_mask > 0.5]
  if b_factors.min() < 0.0 or b_factors.max() > 100.0:
    raise PredictionFileError(
        f"{source}: no pLDDT: B-factors span {b_factors.min():g} to {b_factors.max():g}, "
        "outside pLDDT's 0-100")
  plddt = prot.b_factors[:, ca].astype(np.float32)
  if np.all(plddt == plddt[0]):
    raise PredictionFileError(
        f"{source}: no pLDDT: every CA B-factor is {plddt[0]:g} (no per-residue confidence)")
  return plddt


def read_prediction(path: str) -> PredictedStructure:
  """Reads one predicted structure (PDB or mmCIF, gzipped or not) and its pLDDT.

  Raises protein.StructureParseError (unreadable) or PredictionFileError (not a one-chain
  prediction with pLDDT), each naming the file.
  """
  prot = protein.read_structure(path)
  if len(prot.chain_names) != 1:
    raise PredictionFileError(f"{path}: {len(prot.chain_names)} protein chains "
                              f"({', '.join(prot.chain_names)}); a prediction file holds one")
  plddt = plddt_from_b_factors(prot, path)
  return PredictedStructure(prot.sequence, prot.atom_positions, prot.atom_mask, plddt)


def find_alignment_dir(alignments_root: str | None, prediction: PredictionFile) -> str | None:
  """`<root>/<id>/` or `<root>/<file stem>/`, if either exists; None (single sequence, the
  dataset builder's rule) otherwise."""
  if not alignments_root:
    return None
  for name in dict.fromkeys([prediction.example_id, prediction.stem]):
    path = os.path.join(alignments_root, name)
    if os.path.isdir(path):
      return path
  return None
