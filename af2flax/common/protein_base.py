"""The `Protein` type (atom37 layout) and what the PDB and mmCIF readers share.

Import the public API from `af2flax.common.protein`; this module holds the pieces that
`pdb_io` and `mmcif_io` both need without importing each other:

* `Protein`, a frozen dataclass of numpy arrays in AlphaFold's atom37 layout
  (Jumper et al. 2021, Suppl. 1.2.1), plus optional metadata;
* `StructureParseError`, the one exception every reader raises for bad input;
* `residue_atom37`, which turns one residue's atoms into atom37 rows with AlphaFold's
  conventions (MSE selenium as MET sulfur, highest-occupancy alternate location, arginine
  NH1/NH2 naming fixed as in AlphaFold's template featurizer);
* `load_structure_text`, which reads plain or gzipped files by their magic bytes.
"""

from __future__ import annotations

import dataclasses
import gzip
import os
import zlib
from typing import Iterable, Mapping, NamedTuple, Sequence

import numpy as np
from Bio.Data import IUPACData

from af2flax.common import residue_constants as rc

PathLike = str | os.PathLike

# wwPDB writes 'X' for atoms of unknown type (UNX residues).
_ELEMENTS = frozenset(symbol.upper() for symbol in IUPACData.atom_weights) | {"X"}
_GZIP_MAGIC = b"\x1f\x8b"
_FLOAT32_MAX = float(np.finfo(np.float32).max)
_WATER_NAMES = frozenset({"HOH", "WAT", "DOD", "H2O", "D2O"})
# Backbone atoms kept for residues of unknown type (AlphaFold's tables give UNK no atoms).
_UNK_ATOMS = ("N", "CA", "C", "O", "CB", "OXT")


class StructureParseError(ValueError):
  """A structure file could not be read; the message names the file and the problem."""


def is_element(symbol: str) -> bool:
  """True for a chemical element symbol (any case), deuterium and wwPDB's unknown 'X'."""
  return symbol.upper() in _ELEMENTS


@dataclasses.dataclass(frozen=True, eq=False)
class Protein:
  """A protein structure in AlphaFold's atom37 layout (Jumper et al. 2021, Suppl. 1.2.1).

  Residues of all chains are concatenated in file order. A residue that the experiment
  did not resolve (listed in `_entity_poly_seq` / REMARK 465 but absent from the
  coordinates) is kept with `atom_mask` 0 everywhere.

  Chains: `chain_index[i]` indexes `chain_names`; `chain_id` gives the per-residue names.
  `seqres` maps chain name to the full one-letter sequence of the deposited construct
  (`_entity_poly_seq` or SEQRES, AlphaFold's letters: the CCD parent, 'X' if none; it may
  hold letters outside the 20, e.g. 'U'), when the file has one.
  """

  aatype: np.ndarray          # [N] int32, 0..19 standard residues, 20 = unknown (X)
  atom_positions: np.ndarray  # [N, 37, 3] float32, Ångström, zero where masked
  atom_mask: np.ndarray       # [N, 37] float32, 1 where the atom has coordinates
  residue_index: np.ndarray   # [N] int32, author (PDB) residue number
  chain_index: np.ndarray     # [N] int32, index into `chain_names`
  b_factors: np.ndarray       # [N, 37] float32
  chain_names: tuple[str, ...] = ("A",)
  insertion_code: np.ndarray | None = None  # [N] str ('' when none); None -> all ''
  resolution: float | None = None   # Å; None when the file gives none (e.g. NMR)
  release_date: str | None = None   # 'YYYY-MM-DD', earliest release
  structure_method: str | None = None
  source: str | None = None         # path (or '<string>') the structure was read from
  seqres: Mapping[str, str] = dataclasses.field(default_factory=dict)

  def __post_init__(self):
    set_field = lambda name, value: object.__setattr__(self, name, value)
    set_field("aatype", np.asarray(self.aatype, np.int32))
    num_res = self.aatype.shape[0] if self.aatype.ndim == 1 else -1
    arrays = {
        "atom_positions": (np.float32, (num_res, rc.atom_type_num, 3)),
        "atom_mask": (np.float32, (num_res, rc.atom_type_num)),
        "residue_index": (np.int32, (num_res,)),
        "chain_index": (np.int32, (num_res,)),
        "b_factors": (np.float32, (num_res, rc.atom_type_num)),
    }
    if num_res < 0:
      raise ValueError(f"Protein: aatype must be 1-D, got shape {self.aatype.shape}")
    for name, (dtype, shape) in arrays.items():
      value = np.asarray(getattr(self, name), dtype)
      if value.shape != shape:
        raise ValueError(f"Protein: {name} has shape {value.shape}, expected {shape}")
      set_field(name, value)
    insertion = (np.full(num_res, "", "<U1") if self.insertion_code is None
                 else np.asarray(self.insertion_code, "<U1"))
    if insertion.shape != (num_res,):
      raise ValueError(f"Protein: insertion_code has shape {insertion.shape}, expected {(num_res,)}")
    set_field("insertion_code", insertion)
    set_field("chain_names", tuple(str(name) for name in self.chain_names))
    set_field("seqres", dict(self.seqres))
    if len(set(self.chain_names)) != len(self.chain_names):
      raise ValueError(f"Protein: chain names are not unique: {self.chain_names}")
    if num_res and (self.aatype.min() < 0 or self.aatype.max() > rc.restype_num):
      raise ValueError(f"Protein: aatype outside 0..{rc.restype_num}")
    if num_res and (self.chain_index.min() < 0 or self.chain_index.max() >= len(self.chain_names)):
      raise ValueError(f"Protein: chain_index outside 0..{len(self.chain_names) - 1}")

  @property
  def num_res(self) -> int:
    return int(self.aatype.shape[0])

  @property
  def chain_id(self) -> np.ndarray:
    """[N] chain name of every residue."""
    return np.asarray(self.chain_names, dtype=object)[self.chain_index].astype(str)

  @property
  def sequence(self) -> str:
    """One-letter sequence of all residues (20 -> 'X'), chains concatenated."""
    return rc.aatype_to_sequence(self.aatype)

  def chain(self, name: str) -> "Protein":
    """The residues of chain `name`, as a one-chain Protein."""
    if name not in self.chain_names:
      raise KeyError(f"{self.source or 'protein'}: no chain {name!r}; chains are {self.chain_names}")
    return self.select_chains([name])

  def select_chains(self, names: Sequence[str]) -> "Protein":
    """The residues of the chains `names`, in that order, with chains renumbered."""
    pieces = []
    for name in names:
      if name not in self.chain_names:
        raise KeyError(f"{self.source or 'protein'}: no chain {name!r}; chains are {self.chain_names}")
      pieces.append(np.nonzero(self.chain_index == self.chain_names.index(name))[0])
    rows = np.concatenate(pieces) if pieces else np.zeros([0], np.int64)
    new_index = np.concatenate([np.full(len(p), i, np.int32) for i, p in enumerate(pieces)]
                               ) if pieces else np.zeros([0], np.int32)
    return dataclasses.replace(
        self, aatype=self.aatype[rows], atom_positions=self.atom_positions[rows],
        atom_mask=self.atom_mask[rows], residue_index=self.residue_index[rows],
        chain_index=new_index, b_factors=self.b_factors[rows],
        insertion_code=self.insertion_code[rows], chain_names=tuple(names),
        seqres={name: self.seqres[name] for name in names if name in self.seqres})

  def with_residue_b_factors(self, values: np.ndarray) -> "Protein":
    """A copy whose B-factor column holds one value per residue (e.g. pLDDT [N])."""
    values = np.asarray(values, np.float32)
    if values.shape != (self.num_res,):
      raise ValueError(f"per-residue values have shape {values.shape}, expected {(self.num_res,)}")
    return dataclasses.replace(self, b_factors=np.repeat(values[:, None], rc.atom_type_num, axis=1))


# --- Reading helpers shared by the PDB and mmCIF readers --------------------------------------

def load_structure_text(path: PathLike) -> str:
  """Reads a structure file, gunzipping it when it starts with the gzip magic bytes."""
  try:
    with open(path, "rb") as handle:
      raw = handle.read()
  except OSError as error:
    raise StructureParseError(f"{path}: cannot read the file ({error})") from error
  return decode_structure_bytes(raw, str(path))


def decode_structure_bytes(raw: bytes, source: str) -> str:
  if raw[:2] == _GZIP_MAGIC:
    try:
      raw = gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as error:
      raise StructureParseError(f"{source}: corrupt or truncated gzip data ({error})") from error
  if not raw.strip():
    raise StructureParseError(f"{source}: the file is empty")
  # Structure files are ASCII; a stray byte elsewhere (titles) must not stop the coordinates.
  return raw.decode("utf-8", errors="replace")


class AtomRecord(NamedTuple):
  """One atom of a residue, as either reader found it."""
  name: str          # atom name, e.g. 'CA'
  position: tuple[float, float, float]
  occupancy: float
  b_factor: float


def residue_type(resname: str) -> tuple[str, int]:
  """(one-letter code as AlphaFold writes it in sequences, aatype 0..20) of a CCD name.

  Standard residues map to themselves, modified ones to their parent through
  `CCD_NAME_TO_ONE_LETTER` (MSE -> M), everything else to 'X' / 20.
  """
  letter = rc.restype_3to1.get(resname) or rc.CCD_NAME_TO_ONE_LETTER.get(resname, "X")
  if len(letter) != 1:
    letter = "X"
  return letter, rc.restype_order.get(letter, rc.unk_restype_index)


def is_amino_acid_residue(resname: str, atom_names: Iterable[str], is_hetatm: bool) -> bool:
  """Whether a residue of a coordinate-only file (PDB, mmCIF without `_entity_poly_seq`)
  belongs to a protein chain: a standard or UNK residue, a modified amino acid (CCD parent
  among the 20) with a CA atom, or an unknown ATOM record with a CA atom. Waters, ions and
  nucleotides (no CA) are not."""
  if resname in _WATER_NAMES:
    return False
  if resname in rc.restype_3to1 or resname == "UNK":
    return True
  has_ca = "CA" in set(atom_names)
  letter = rc.CCD_NAME_TO_ONE_LETTER.get(resname)
  if letter is not None and letter in rc.restype_order:
    return has_ca
  return has_ca and not is_hetatm


def _allowed_atoms(aatype: int) -> np.ndarray:
  """[37] bool: atoms that a residue of this type may have (its heavy atoms and OXT)."""
  if aatype == rc.unk_restype_index:
    allowed = np.zeros(rc.atom_type_num, bool)
    allowed[[rc.atom_order[name] for name in _UNK_ATOMS]] = True
    return allowed
  allowed = rc.STANDARD_ATOM_MASK[aatype].astype(bool)
  allowed[rc.atom_order["OXT"]] = True
  return allowed


_ALLOWED_ATOMS = np.stack([_allowed_atoms(aatype) for aatype in range(rc.restype_num + 1)])


def residue_atom37(resname: str, aatype: int, atoms: Sequence[AtomRecord],
                   fix_arginine: bool = True) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Atom37 positions [37, 3], mask [37] and B-factors [37] of one residue.

  * MSE's selenium goes to MET's SD column (AlphaFold's convention);
  * of several copies of an atom (alternate locations), the one with the highest occupancy
    is kept, the first one on ties;
  * atoms outside the residue type's heavy atoms (+ OXT; backbone + CB for UNK), hydrogens
    and unknown names are dropped, so the mask never contradicts the aatype;
  * with `fix_arginine`, NH1/NH2 are swapped where NH2 is nearer CD than NH1, as
    AlphaFold's template featurizer does (IUPAC: NH1 is cis to CD).
  """
  positions = np.zeros([rc.atom_type_num, 3], np.float32)
  mask = np.zeros([rc.atom_type_num], np.float32)
  b_factors = np.zeros([rc.atom_type_num], np.float32)
  best_occupancy = np.full([rc.atom_type_num], -np.inf)
  allowed = _ALLOWED_ATOMS[aatype]
  for atom in atoms:
    name = atom.name.upper()
    if name == "SE" and resname == "MSE":
      name = "SD"
    index = rc.atom_order.get(name)
    if index is None or not allowed[index] or atom.occupancy <= best_occupancy[index]:
      continue
    best_occupancy[index] = atom.occupancy
    positions[index] = atom.position
    mask[index] = 1.0
    b_factors[index] = atom.b_factor
  if fix_arginine and aatype == rc.restype_order["R"]:
    cd, nh1, nh2 = (rc.atom_order[name] for name in ("CD", "NH1", "NH2"))
    if (mask[[cd, nh1, nh2]].all()
        and np.linalg.norm(positions[nh1] - positions[cd])
        > np.linalg.norm(positions[nh2] - positions[cd])):
      positions[[nh1, nh2]] = positions[[nh2, nh1]]
      b_factors[[nh1, nh2]] = b_factors[[nh2, nh1]]
  return positions, mask, b_factors


@dataclasses.dataclass
class ResidueRecord:
  """One residue being assembled by a reader."""
  chain: str
  number: int
  insertion_code: str
  resname: str
  atoms: list[AtomRecord]


def assemble_coordinate_residues(
    atoms: Iterable[tuple[tuple[str, int, str], str, bool, AtomRecord]]) -> list[ResidueRecord]:
  """Amino-acid residues of a coordinate-only file, in file order.

  `atoms` yields ((chain, number, insertion code), residue name, is HETATM, atom). Atoms
  are grouped by residue key; where one key holds several residue names (a ligand sharing
  a number, or microheterogeneity), the amino-acid variant whose best atom has the highest
  occupancy is kept.
  """
  found: dict[tuple[str, int, str], dict[str, tuple[ResidueRecord, bool]]] = {}
  for key, resname, is_hetatm, atom in atoms:
    variants = found.setdefault(key, {})
    if resname not in variants:
      variants[resname] = (ResidueRecord(key[0], key[1], key[2], resname, []), is_hetatm)
    variants[resname][0].atoms.append(atom)
  residues = []
  for variants in found.values():
    amino_acids = [residue for residue, is_hetatm in variants.values()
                   if is_amino_acid_residue(residue.resname, (a.name for a in residue.atoms),
                                            is_hetatm)]
    if amino_acids:
      residues.append(most_occupied(amino_acids))
  return residues


def most_occupied(variants: Sequence[ResidueRecord]) -> ResidueRecord:
  """The variant whose best atom has the highest occupancy (the first one on ties)."""
  return max(variants, key=lambda r: max((a.occupancy for a in r.atoms), default=-np.inf))


def protein_from_residues(residues: Sequence[ResidueRecord], chain_names: Sequence[str],
                          source: str, fix_arginine: bool = True, **metadata) -> Protein:
  """Stacks residues (grouped by chain, in `chain_names` order) into a Protein."""
  num_res = len(residues)
  positions = np.zeros([num_res, rc.atom_type_num, 3], np.float32)
  mask = np.zeros([num_res, rc.atom_type_num], np.float32)
  b_factors = np.zeros([num_res, rc.atom_type_num], np.float32)
  aatype = np.zeros([num_res], np.int32)
  chain_order = {name: i for i, name in enumerate(chain_names)}
  for i, residue in enumerate(residues):
    _, aatype[i] = residue_type(residue.resname)
    positions[i], mask[i], b_factors[i] = residue_atom37(
        residue.resname, int(aatype[i]), residue.atoms, fix_arginine)
  return Protein(
      aatype=aatype, atom_positions=positions, atom_mask=mask,
      residue_index=np.asarray([r.number for r in residues], np.int32).reshape([num_res]),
      chain_index=np.asarray([chain_order[r.chain] for r in residues], np.int32).reshape([num_res]),
      b_factors=b_factors, chain_names=tuple(chain_names),
      insertion_code=np.asarray([r.insertion_code for r in residues], "<U1").reshape([num_res]),
      source=source, **metadata)


def select_chain_names(available: Sequence[str], chain_id: str | Sequence[str] | None,
                       source: str) -> list[str]:
  """The chains to read: all of `available`, or the requested ones (error if absent)."""
  if chain_id is None:
    return list(available)
  wanted = [chain_id] if isinstance(chain_id, str) else list(chain_id)
  missing = [name for name in wanted if name not in available]
  if missing:
    raise StructureParseError(
        f"{source}: no protein chain {', '.join(map(repr, missing))}; "
        f"protein chains are {list(available)}")
  return wanted


def parse_float(text: str, what: str, source: str, default: float | None = None) -> float:
  """A float field; '?'/'.'/blank give `default` (an error when it is None)."""
  text = text.strip()
  if text in ("", "?", ".") and default is not None:
    return default
  try:
    value = float(text)
  except ValueError:
    raise StructureParseError(f"{source}: {what}: {text!r} is not a number") from None
  if not abs(value) <= _FLOAT32_MAX:
    raise StructureParseError(f"{source}: {what}: {text!r} is not a finite float32")
  return value


def check_chain_name(name: str, what: str, source: str) -> str:
  """Chain names are printable and free of whitespace (they become file tokens)."""
  if not name or any(c.isspace() or not c.isprintable() for c in name):
    raise StructureParseError(f"{source}: {what}: invalid chain id {name!r}")
  return name


def parse_int(text: str, what: str, source: str) -> int:
  try:
    return int(text.strip())
  except ValueError:
    raise StructureParseError(f"{source}: {what}: {text!r} is not an integer") from None
