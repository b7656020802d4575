"""AlphaFold's chemistry tables: residue and atom types, rigid groups, stereochemistry.

The values are AlphaFold's own (Jumper et al. 2021, Suppl. 1.8-1.9 and Table 2), shipped
inside the package as `residue_constants_data.json` (tables exported from
`alphafold/common/residue_constants.py`) and `stereo_chemical_props.txt` (Engh & Huber
bond lengths and angles). Arrays keep AlphaFold's dtypes. Every name matches the key of
the data file, so `residue_constants.restype_atom14_to_rigid_group` is AlphaFold's
`residue_constants.restype_atom14_to_rigid_group`.

Nothing here reads outside the package.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import json
import pathlib
from typing import Any, Mapping, Sequence

import numpy as np

_DATA_DIR = pathlib.Path(__file__).resolve().parent
_TABLES_FILE = _DATA_DIR / "residue_constants_data.json"
STEREO_CHEMICAL_PROPS_FILE = _DATA_DIR / "stereo_chemical_props.txt"


def _decode(value: Any) -> Any:
  """Turns the JSON encoding of the tables back into numpy arrays and tuples."""
  if isinstance(value, dict):
    if "__ndarray__" in value:
      return np.asarray(value["__ndarray__"], dtype=value["dtype"]).reshape(value["shape"])
    return {key: _decode(item) for key, item in value.items()}
  if isinstance(value, list):
    return [_decode(item) for item in value]
  return value


def _load_tables() -> dict[str, Any]:
  with open(_TABLES_FILE) as handle:
    raw = json.load(handle)
  tables = {key: _decode(value) for key, value in raw.items()}
  # JSON cannot key a dict by a tuple; the file writes `('ARG', 'N')` as a string.
  tables["chi_groups_for_atom"] = {
      ast.literal_eval(key): [tuple(pair) for pair in value]
      for key, value in tables["chi_groups_for_atom"].items()
  }
  tables["ID_TO_HHBLITS_AA"] = {int(key): value for key, value in tables["ID_TO_HHBLITS_AA"].items()}
  tables["MAP_HHBLITS_AATYPE_TO_OUR_AATYPE"] = tuple(tables["MAP_HHBLITS_AATYPE_TO_OUR_AATYPE"])
  for name in ("chi_angles_atoms", "stereo_residue_bonds", "stereo_residue_virtual_bonds",
               "stereo_residue_bond_angles"):
    tables[name] = {res: [list(entry) for entry in entries] for res, entries in tables[name].items()}
  tables["rigid_group_atom_positions"] = {
      res: [[atom, group, list(position)] for atom, group, position in entries]
      for res, entries in tables["rigid_group_atom_positions"].items()
  }
  return tables


_TABLES = _load_tables()
TABLE_NAMES: tuple[str, ...] = tuple(_TABLES)

# --- Residue and atom vocabularies -------------------------------------------------------
restypes: list[str] = _TABLES["restypes"]                       # 20 one-letter codes
restypes_with_x: list[str] = _TABLES["restypes_with_x"]          # + 'X' (unknown), 21
restypes_with_x_and_gap: list[str] = _TABLES["restypes_with_x_and_gap"]  # + '-', 22
restype_order: dict[str, int] = _TABLES["restype_order"]
restype_order_with_x: dict[str, int] = _TABLES["restype_order_with_x"]
restype_num: int = _TABLES["restype_num"]                        # 20
unk_restype: str = _TABLES["unk_restype"]
unk_restype_index: int = _TABLES["unk_restype_index"]            # 20
restype_1to3: dict[str, str] = _TABLES["restype_1to3"]
restype_3to1: dict[str, str] = _TABLES["restype_3to1"]
resnames: list[str] = _TABLES["resnames"]
resname_to_idx: dict[str, int] = _TABLES["resname_to_idx"]
atom_types: list[str] = _TABLES["atom_types"]                    # atom37 order
atom_order: dict[str, int] = _TABLES["atom_order"]
atom_type_num: int = _TABLES["atom_type_num"]                    # 37
residue_atoms: dict[str, list[str]] = _TABLES["residue_atoms"]
restype_name_to_atom14_names: dict[str, list[str]] = _TABLES["restype_name_to_atom14_names"]
residue_atom_renaming_swaps: dict[str, dict[str, str]] = _TABLES["residue_atom_renaming_swaps"]
CCD_NAME_TO_ONE_LETTER: dict[str, str] = _TABLES["CCD_NAME_TO_ONE_LETTER"]
HHBLITS_AA_TO_ID: dict[str, int] = _TABLES["HHBLITS_AA_TO_ID"]
ID_TO_HHBLITS_AA: dict[int, str] = _TABLES["ID_TO_HHBLITS_AA"]
MAP_HHBLITS_AATYPE_TO_OUR_AATYPE: tuple[int, ...] = _TABLES["MAP_HHBLITS_AATYPE_TO_OUR_AATYPE"]
PROTEIN_CHAIN: str = _TABLES["PROTEIN_CHAIN"]
POLYMER_CHAIN: str = _TABLES["POLYMER_CHAIN"]

# --- Atom masks and layouts ----------------------------------------------------------------
STANDARD_ATOM_MASK: np.ndarray = _TABLES["STANDARD_ATOM_MASK"]   # [21, 37] int32
restype_atom37_mask: np.ndarray = _TABLES["restype_atom37_mask"]  # [21, 37]
restype_atom14_mask: np.ndarray = _TABLES["restype_atom14_mask"]  # [21, 14]

# --- Torsions (Suppl. Table 2) --------------------------------------------------------------
chi_angles_atoms: dict[str, list[list[str]]] = _TABLES["chi_angles_atoms"]
chi_angles_mask: list[list[float]] = _TABLES["chi_angles_mask"]  # [20, 4]
chi_pi_periodic: list[list[float]] = _TABLES["chi_pi_periodic"]  # [21, 4]
chi_angles_atom_indices: np.ndarray = _TABLES["chi_angles_atom_indices"]  # [20, 4, 4]
chi_angle_atoms_for_res: list = _TABLES["chi_angle_atoms_for_res"]
chi_atom_1_one_hot: np.ndarray = _TABLES["chi_atom_1_one_hot"]
chi_atom_2_one_hot: np.ndarray = _TABLES["chi_atom_2_one_hot"]
chi_groups_for_atom: dict[tuple[str, str], list[tuple[int, int]]] = _TABLES["chi_groups_for_atom"]

# --- Rigid groups (Suppl. 1.8, Alg. 24) -----------------------------------------------------
rigid_group_atom_positions: dict[str, list] = _TABLES["rigid_group_atom_positions"]
restype_rigid_group_default_frame: np.ndarray = _TABLES["restype_rigid_group_default_frame"]  # [21, 8, 4, 4]
restype_atom14_to_rigid_group: np.ndarray = _TABLES["restype_atom14_to_rigid_group"]  # [21, 14]
restype_atom14_rigid_group_positions: np.ndarray = _TABLES["restype_atom14_rigid_group_positions"]  # [21, 14, 3]
restype_atom37_to_rigid_group: np.ndarray = _TABLES["restype_atom37_to_rigid_group"]  # [21, 37]
restype_atom37_rigid_group_positions: np.ndarray = _TABLES["restype_atom37_rigid_group_positions"]  # [21, 37, 3]

# --- Stereochemistry (Suppl. 1.9.11) --------------------------------------------------------
van_der_waals_radius: dict[str, float] = _TABLES["van_der_waals_radius"]
atomtype_radius: dict[str, float] = _TABLES["atomtype_radius"]
ca_ca: float = _TABLES["ca_ca"]
between_res_bond_length_c_n: list[float] = _TABLES["between_res_bond_length_c_n"]
between_res_bond_length_stddev_c_n: list[float] = _TABLES["between_res_bond_length_stddev_c_n"]
between_res_cos_angles_c_n_ca: list[float] = _TABLES["between_res_cos_angles_c_n_ca"]
between_res_cos_angles_ca_c_n: list[float] = _TABLES["between_res_cos_angles_ca_c_n"]
stereo_residue_bonds: dict[str, list] = _TABLES["stereo_residue_bonds"]
stereo_residue_virtual_bonds: dict[str, list] = _TABLES["stereo_residue_virtual_bonds"]
stereo_residue_bond_angles: dict[str, list] = _TABLES["stereo_residue_bond_angles"]
atom14_dists_bounds_default: dict[str, np.ndarray] = _TABLES["atom14_dists_bounds_default"]


def table(name: str) -> Any:
  """Returns the table `name` exactly as decoded from the shipped data file."""
  return _TABLES[name]


# --- Stereochemical properties file (Engh & Huber), as AlphaFold parses it ----------------

@dataclasses.dataclass(frozen=True)
class Bond:
  atom1_name: str
  atom2_name: str
  length: float
  stddev: float


@dataclasses.dataclass(frozen=True)
class BondAngle:
  atom1_name: str
  atom2_name: str
  atom3name: str
  angle_rad: float
  stddev: float


@functools.lru_cache(maxsize=None)
def load_stereo_chemical_props() -> tuple[Mapping[str, list[Bond]], Mapping[str, list[Bond]],
                                          Mapping[str, list[BondAngle]]]:
  """Parses `stereo_chemical_props.txt` into bonds, virtual bonds and bond angles per residue.

  Virtual bonds close each bond angle (the distance between its outer atoms, by the law of
  cosines, with the error propagated from both bonds and the angle), as in AlphaFold.
  """
  lines = STEREO_CHEMICAL_PROPS_FILE.read_text().splitlines()
  lines_iter = iter(lines)
  residue_bonds: dict[str, list[Bond]] = {}
  next(lines_iter)  # Header of the bond-length section.
  for line in lines_iter:
    if line.strip() == "-":
      break
    bond, resname, length, stddev = line.split()
    atom1, atom2 = bond.split("-")
    residue_bonds.setdefault(resname, []).append(Bond(atom1, atom2, float(length), float(stddev)))
  residue_bonds["UNK"] = []

  residue_bond_angles: dict[str, list[BondAngle]] = {}
  next(lines_iter)  # Blank line.
  next(lines_iter)  # Header of the bond-angle section.
  for line in lines_iter:
    if line.strip() == "-":
      break
    angle, resname, angle_degree, stddev_degree = line.split()
    atom1, atom2, atom3 = angle.split("-")
    residue_bond_angles.setdefault(resname, []).append(
        BondAngle(atom1, atom2, atom3, float(angle_degree) / 180.0 * np.pi,
                  float(stddev_degree) / 180.0 * np.pi))
  residue_bond_angles["UNK"] = []

  def make_bond_key(atom1_name: str, atom2_name: str) -> str:
    return "-".join(sorted([atom1_name, atom2_name]))

  residue_virtual_bonds: dict[str, list[Bond]] = {}
  for resname, bond_angles in residue_bond_angles.items():
    bond_cache = {make_bond_key(b.atom1_name, b.atom2_name): b for b in residue_bonds[resname]}
    residue_virtual_bonds[resname] = []
    for ba in bond_angles:
      bond1 = bond_cache[make_bond_key(ba.atom1_name, ba.atom2_name)]
      bond2 = bond_cache[make_bond_key(ba.atom2_name, ba.atom3name)]
      gamma = ba.angle_rad
      length = np.sqrt(bond1.length**2 + bond2.length**2
                       - 2 * bond1.length * bond2.length * np.cos(gamma))
      dl_outer = 0.5 / length
      dl_dgamma = (2 * bond1.length * bond2.length * np.sin(gamma)) * dl_outer
      dl_db1 = (2 * bond1.length - 2 * bond2.length * np.cos(gamma)) * dl_outer
      dl_db2 = (2 * bond2.length - 2 * bond1.length * np.cos(gamma)) * dl_outer
      stddev = np.sqrt((dl_dgamma * ba.stddev)**2 + (dl_db1 * bond1.stddev)**2
                       + (dl_db2 * bond2.stddev)**2)
      residue_virtual_bonds[resname].append(Bond(ba.atom1_name, ba.atom3name, length, stddev))
  return residue_bonds, residue_virtual_bonds, residue_bond_angles


def make_atom14_dists_bounds(overlap_tolerance: float = 1.5,
                             bond_length_tolerance_factor: float = 15.0) -> dict[str, np.ndarray]:
  """Lower/upper bounds and stddev of intra-residue atom14 distances (Suppl. 1.9.11).

  Bonded pairs (and virtual bonds closing angles) may deviate by
  `bond_length_tolerance_factor` standard deviations; other pairs must stay apart by the sum
  of their van der Waals radii minus `overlap_tolerance`. `atom14_dists_bounds_default` is
  this table at the violation-loss settings of AlphaFold's config (`clash_overlap_tolerance`
  1.5, `violation_tolerance_factor` 12).
  """
  restype_atom14_bond_lower_bound = np.zeros([21, 14, 14], np.float32)
  restype_atom14_bond_upper_bound = np.zeros([21, 14, 14], np.float32)
  restype_atom14_bond_stddev = np.zeros([21, 14, 14], np.float32)
  residue_bonds, residue_virtual_bonds, _ = load_stereo_chemical_props()
  for restype, restype_letter in enumerate(restypes):
    resname = restype_1to3[restype_letter]
    atom_list = restype_name_to_atom14_names[resname]
    for atom1_idx, atom1_name in enumerate(atom_list):
      if not atom1_name:
        continue
      atom1_radius = van_der_waals_radius[atom1_name[0]]
      for atom2_idx, atom2_name in enumerate(atom_list):
        if (not atom2_name) or atom1_idx == atom2_idx:
          continue
        atom2_radius = van_der_waals_radius[atom2_name[0]]
        lower = atom1_radius + atom2_radius - overlap_tolerance
        upper = 1e10
        restype_atom14_bond_lower_bound[restype, atom1_idx, atom2_idx] = lower
        restype_atom14_bond_lower_bound[restype, atom2_idx, atom1_idx] = lower
        restype_atom14_bond_upper_bound[restype, atom1_idx, atom2_idx] = upper
        restype_atom14_bond_upper_bound[restype, atom2_idx, atom1_idx] = upper
    for bond in residue_bonds[resname] + residue_virtual_bonds[resname]:
      atom1_idx = atom_list.index(bond.atom1_name)
      atom2_idx = atom_list.index(bond.atom2_name)
      lower = bond.length - bond_length_tolerance_factor * bond.stddev
      upper = bond.length + bond_length_tolerance_factor * bond.stddev
      for a, b in ((atom1_idx, atom2_idx), (atom2_idx, atom1_idx)):
        restype_atom14_bond_lower_bound[restype, a, b] = lower
        restype_atom14_bond_upper_bound[restype, a, b] = upper
        restype_atom14_bond_stddev[restype, a, b] = bond.stddev
  return {"lower_bound": restype_atom14_bond_lower_bound,
          "upper_bound": restype_atom14_bond_upper_bound,
          "stddev": restype_atom14_bond_stddev}


# --- Small conversions used across the package ----------------------------------------------

def sequence_to_onehot(sequence: str, mapping: Mapping[str, int],
                       map_unknown_to_x: bool = False) -> np.ndarray:
  """One-hot encodes `sequence` with `mapping` (letter -> index), AlphaFold's convention.

  Raises ValueError naming the offending letter when it is not in `mapping` (and unknowns
  are not mapped to 'X').
  """
  num_entries = max(mapping.values()) + 1
  if sorted(set(mapping.values())) != list(range(num_entries)):
    raise ValueError("The mapping must have values from 0 to num_unique_aas-1 without gaps.")
  one_hot = np.zeros((len(sequence), num_entries), dtype=np.int32)
  for position, letter in enumerate(sequence):
    if map_unknown_to_x:
      if letter.isalpha() and letter.isupper():
        index = mapping.get(letter, mapping["X"])
      else:
        raise ValueError(f"Invalid character in the sequence: {letter!r} at position {position}")
    else:
      if letter not in mapping:
        raise ValueError(f"Invalid character in the sequence: {letter!r} at position {position}")
      index = mapping[letter]
    one_hot[position, index] = 1
  return one_hot


def sequence_to_aatype(sequence: str) -> np.ndarray:
  """Maps a one-letter sequence to AlphaFold's aatype indices (unknown letters -> 20 = 'X')."""
  return np.asarray([restype_order_with_x.get(letter, unk_restype_index) for letter in sequence],
                    dtype=np.int32)


def aatype_to_sequence(aatype: Sequence[int] | np.ndarray) -> str:
  """Inverse of `sequence_to_aatype`: indices 0..20 to one-letter codes."""
  return "".join(restypes_with_x[int(index)] for index in aatype)


def atom_id_to_type(atom_id: str) -> str:
  """Element of a PDB atom name ('CA' -> 'C', 'OD1' -> 'O')."""
  assert len(atom_id) > 0
  return atom_id[0]
