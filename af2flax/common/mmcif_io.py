"""mmCIF reader and writer for `Protein`, and the per-chain SEQRES view templates need.

Import these through `af2flax.common.protein`. Biopython's `MMCIF2Dict` tokenizes the
file; the tables are interpreted here with AlphaFold's conventions (its
`data/mmcif_parsing.py`):

* only the first model is read (the model number of the first `_atom_site` row);
* protein chains are the polymer entities with a peptide monomer (`_chem_comp.type`
  containing "peptide"; `_entity_poly.type` "polypeptide" when `_chem_comp` is absent);
* a chain's residues are its `_entity_poly_seq` entries, matched to atoms through
  `_atom_site.label_seq_id`; unobserved residues stay with mask 0;
* chains are named by `auth_asym_id` (as in the PDB format and in AlphaFold's templates);
* release date = the earliest `_pdbx_audit_revision_history.revision_date`, resolution =
  the first number among `_refine.ls_d_res_high`, `_em_3d_reconstruction.resolution`,
  `_reflns.d_resolution_high`.

Files without `_entity_poly_seq` (coordinate-only mmCIFs written by other tools) are read
like PDB files: every amino-acid residue with coordinates.
"""

from __future__ import annotations

import collections
import dataclasses
import io
import re
from typing import Mapping, Sequence

import numpy as np
from Bio.PDB.MMCIF2Dict import MMCIF2Dict
from Bio.PDB.mmcifio import MMCIFIO

from af2flax.common import residue_constants as rc
from af2flax.common.protein_base import (AtomRecord, PathLike, Protein, ResidueRecord,
                                         StructureParseError, assemble_coordinate_residues,
                                         check_chain_name, is_element, load_structure_text, most_occupied,
                                         parse_float, parse_int, protein_from_residues,
                                         residue_type, select_chain_names)

_UNSET = ("?", ".")
_DATE = re.compile(r"^\d{4}-\d\d-\d\d$")
_RESOLUTION_KEYS = ("_refine.ls_d_res_high", "_em_3d_reconstruction.resolution",
                    "_reflns.d_resolution_high")
_ATOM_SITE_REQUIRED = ("group_PDB", "label_atom_id", "label_comp_id", "label_asym_id",
                       "label_seq_id", "Cartn_x", "Cartn_y", "Cartn_z")


@dataclasses.dataclass(frozen=True, eq=False)
class MmcifEntry:
  """One parsed mmCIF file, chain by chain, aligned to SEQRES (`_entity_poly_seq`).

  This is what the template featurizer needs (AlphaFold's `MmcifObject` +
  `_get_atom_positions`): for every protein chain, keyed by author chain id,
  `seqres[chain]` is the full deposited sequence and `chains[chain]` a one-chain Protein
  with exactly `len(seqres[chain])` residues, residue i of the Protein being SEQRES
  position i (atom_mask 0 where unobserved). Parse once, then query many chains.
  """

  file_id: str                # `_entry.id` (upper case), e.g. '2Q2K'
  source: str                 # path or '<string>'
  release_date: str | None    # 'YYYY-MM-DD'
  resolution: float | None    # Å; None when absent (AlphaFold writes 0.0 then)
  structure_method: str | None  # e.g. 'x-ray diffraction'
  seqres: Mapping[str, str]   # chain -> one-letter sequence (CCD parent letter, 'X' unknown)
  chains: Mapping[str, Protein]  # chain -> Protein aligned to seqres

  @property
  def chain_ids(self) -> tuple[str, ...]:
    return tuple(self.chains)

  def chain_atoms(self, chain_id: str) -> tuple[np.ndarray, np.ndarray]:
    """(atom_positions [L, 37, 3] float32, atom_mask [L, 37] float32) of a chain, row i
    = SEQRES position i."""
    chain = self.chain(chain_id)
    return chain.atom_positions, chain.atom_mask

  def chain(self, chain_id: str) -> Protein:
    if chain_id not in self.chains:
      raise StructureParseError(
          f"{self.source}: no protein chain {chain_id!r}; protein chains are {list(self.chains)}")
    return self.chains[chain_id]

  def to_protein(self, chain_id: str | Sequence[str] | None = None) -> Protein:
    """The chosen chains (default all) concatenated into one Protein."""
    names = select_chain_names(list(self.chains), chain_id, self.source)
    parts = [self.chains[name] for name in names]
    if not parts:
      raise StructureParseError(f"{self.source}: no protein chains")
    cat = lambda field: np.concatenate([getattr(p, field) for p in parts])
    return dataclasses.replace(
        parts[0], aatype=cat("aatype"), atom_positions=cat("atom_positions"),
        atom_mask=cat("atom_mask"), residue_index=cat("residue_index"),
        b_factors=cat("b_factors"), insertion_code=cat("insertion_code"),
        chain_index=np.concatenate([np.full(p.num_res, i, np.int32) for i, p in enumerate(parts)]),
        chain_names=tuple(names), seqres={name: self.seqres[name] for name in names})


def read_mmcif(path: PathLike, chain_id: str | Sequence[str] | None = None,
               fix_arginine: bool = True) -> Protein:
  """Reads an mmCIF file (plain or gzipped) into a Protein: one chain, several, or all
  protein chains (None). See the module docstring for the conventions."""
  return read_mmcif_entry(path, fix_arginine=fix_arginine).to_protein(chain_id)


def from_mmcif_string(text: str, chain_id: str | Sequence[str] | None = None,
                      source: str = "<string>", fix_arginine: bool = True) -> Protein:
  return mmcif_entry_from_string(text, source, fix_arginine=fix_arginine).to_protein(chain_id)


def read_mmcif_entry(path: PathLike, fix_arginine: bool = True) -> MmcifEntry:
  """Parses an mmCIF file into per-chain SEQRES-aligned arrays (see `MmcifEntry`).

  Raises StructureParseError naming the file and the problem.
  """
  return mmcif_entry_from_string(load_structure_text(path), str(path), fix_arginine)


def mmcif_entry_from_string(text: str, source: str = "<string>",
                            fix_arginine: bool = True) -> MmcifEntry:
  tables = _tokenize(text, source)
  metadata = _header(tables)
  atom_site = _table(tables, "_atom_site", _ATOM_SITE_REQUIRED, source)
  if atom_site is None:
    raise StructureParseError(f"{source}: no _atom_site table (no coordinates)")
  atoms = _first_model_atoms(atom_site, source)
  if "_entity_poly_seq.mon_id" in tables:
    chains, seqres = _chains_from_entity_poly_seq(tables, atoms, source)
  else:
    residues = assemble_coordinate_residues(
        ((a.chain, a.number, a.icode), a.comp, a.is_hetatm, a.atom) for a in atoms)
    chains = collections.defaultdict(list)
    for residue in residues:
      chains[residue.chain].append(residue)
    seqres = {name: "".join(residue_type(r.resname)[0] for r in chain)
              for name, chain in chains.items()}
  if not chains:
    raise StructureParseError(f"{source}: no protein chain with coordinates")
  proteins = {name: protein_from_residues(residues, [name], source, fix_arginine,
                                          seqres={name: seqres[name]}, **metadata)
              for name, residues in chains.items()}
  file_id = (tables.get("_entry.id") or tables.get("data_") or ["?"])[0].upper()
  return MmcifEntry(file_id=file_id, source=source, seqres=seqres, chains=proteins, **metadata)


# --- Parsing steps --------------------------------------------------------------------------

def _tokenize(text: str, source: str) -> dict[str, list[str]]:
  try:
    raw = MMCIF2Dict(io.StringIO(text))
  except Exception as error:  # Biopython's tokenizer raises assorted types on malformed text.
    raise StructureParseError(f"{source}: not a readable mmCIF file ({type(error).__name__}: "
                              f"{error})") from error
  if "data_" not in raw:
    raise StructureParseError(f"{source}: not an mmCIF file (no data_ block)")
  return {key: value if isinstance(value, list) else [value] for key, value in raw.items()}


def _table(tables: Mapping[str, list[str]], category: str, required: Sequence[str],
           source: str) -> dict[str, list[str]] | None:
  """Columns of one category, None when absent; all columns must have the same length."""
  prefix = category + "."
  columns = {key[len(prefix):]: value for key, value in tables.items() if key.startswith(prefix)}
  if not columns:
    return None
  missing = [name for name in required if name not in columns]
  if missing:
    raise StructureParseError(f"{source}: {category} lacks {', '.join(missing)}")
  lengths = {len(value) for value in columns.values()}
  if len(lengths) != 1:
    raise StructureParseError(f"{source}: {category} columns have different lengths "
                              f"{sorted(lengths)} (a row has missing or extra values)")
  return columns


def _header(tables: Mapping[str, list[str]]) -> dict:
  dates = [d for d in tables.get("_pdbx_audit_revision_history.revision_date", []) if _DATE.match(d)]
  for fallback in ("_database_PDB_rev.date", "_pdbx_database_status.recvd_initial_deposition_date"):
    if not dates:
      dates = [d for d in tables.get(fallback, []) if _DATE.match(d)]
  resolution = None
  for key in _RESOLUTION_KEYS:
    try:
      resolution = float(tables.get(key, ["?"])[0])
    except ValueError:
      continue
    if np.isfinite(resolution):
      break
    resolution = None
  methods = [m.lower() for m in tables.get("_exptl.method", []) if m not in _UNSET]
  return {"release_date": min(dates) if dates else None, "resolution": resolution,
          "structure_method": ",".join(methods) or None}


@dataclasses.dataclass
class _Atom:
  asym: str         # label_asym_id
  seq_num: int | None  # label_seq_id (None for non-polymer atoms)
  chain: str        # auth_asym_id
  number: int       # auth_seq_id
  icode: str
  comp: str
  is_hetatm: bool
  atom: AtomRecord


def _first_model_atoms(site: dict[str, list[str]], source: str) -> list[_Atom]:
  num_rows = len(site["group_PDB"])
  column = lambda name, default: site.get(name, [default] * num_rows)
  models = column("pdbx_PDB_model_num", "1")
  elements = column("type_symbol", "?")
  occupancies, b_factors = column("occupancy", "?"), column("B_iso_or_equiv", "?")
  auth_asym, auth_seq = column("auth_asym_id", None), column("auth_seq_id", None)
  icodes = column("pdbx_PDB_ins_code", "?")
  atoms = []
  for row in range(num_rows):
    if models[row] != models[0]:
      continue
    where = f"_atom_site row {row + 1}"
    group = site["group_PDB"][row]
    if group not in ("ATOM", "HETATM"):
      raise StructureParseError(f"{source}: {where}: group_PDB is {group!r}, not ATOM/HETATM")
    if elements[row] not in _UNSET and not is_element(elements[row]):
      raise StructureParseError(f"{source}: {where}: unknown element {elements[row]!r}")
    label_seq = site["label_seq_id"][row]
    seq_num = None if label_seq in _UNSET else parse_int(label_seq, f"{where}: label_seq_id", source)
    number_text = auth_seq[row] if auth_seq[row] not in (None, *_UNSET) else label_seq
    number = (parse_int(number_text, f"{where}: auth_seq_id", source)
              if number_text not in _UNSET else 0)
    atom = AtomRecord(
        site["label_atom_id"][row],
        tuple(parse_float(site[f"Cartn_{axis}"][row], f"{where}: Cartn_{axis}", source)
              for axis in "xyz"),
        parse_float(occupancies[row], f"{where}: occupancy", source, default=1.0),
        parse_float(b_factors[row], f"{where}: B_iso_or_equiv", source, default=0.0))
    asym = check_chain_name(site["label_asym_id"][row], f"{where}: label_asym_id", source)
    chain = asym if auth_asym[row] in (None, *_UNSET) else auth_asym[row]
    atoms.append(_Atom(asym, seq_num, check_chain_name(chain, f"{where}: auth_asym_id", source),
                       number, "" if icodes[row] in _UNSET else icodes[row],
                       site["label_comp_id"][row], group == "HETATM", atom))
  return atoms


def _protein_entities(tables: Mapping[str, list[str]], source: str
                      ) -> dict[str, list[tuple[int, list[str]]]]:
  """Protein entity id -> [(num, monomer names at that position)], in sequence order."""
  poly_seq = _table(tables, "_entity_poly_seq", ("entity_id", "num", "mon_id"), source)
  polymers: dict[str, dict[int, list[str]]] = collections.defaultdict(dict)
  for entity, num, mon in zip(poly_seq["entity_id"], poly_seq["num"], poly_seq["mon_id"]):
    # Several monomers at one position (microheterogeneity) share one residue.
    polymers[entity].setdefault(parse_int(num, "_entity_poly_seq.num", source), []).append(mon)
  chem_comp = _table(tables, "_chem_comp", ("id", "type"), source) or {"id": [], "type": []}
  chem_type = dict(zip(chem_comp["id"], (t.lower() for t in chem_comp["type"])))
  entity_poly = _table(tables, "_entity_poly", ("entity_id", "type"), source)
  poly_type = dict(zip(entity_poly["entity_id"], entity_poly["type"])) if entity_poly else {}
  proteins = {}
  for entity, positions in polymers.items():
    monomers = [mon for mons in positions.values() for mon in mons]
    if any(mon in chem_type for mon in monomers):
      is_protein = any("peptide" in chem_type.get(mon, "") for mon in monomers)
    else:
      is_protein = "polypeptide" in poly_type.get(entity, "")
    if is_protein:
      proteins[entity] = list(positions.items())
  return proteins


def _chains_from_entity_poly_seq(tables: Mapping[str, list[str]], atoms: list[_Atom],
                                 source: str):
  """Residues of every protein chain with coordinates, aligned to `_entity_poly_seq`."""
  entities = _protein_entities(tables, source)
  struct_asym = _table(tables, "_struct_asym", ("id", "entity_id"), source)
  asym_entity = dict(zip(struct_asym["id"], struct_asym["entity_id"])) if struct_asym else {}
  if "_atom_site.label_entity_id" in tables:  # Fills chains missing from _struct_asym.
    for asym, entity in zip(tables["_atom_site.label_asym_id"], tables["_atom_site.label_entity_id"]):
      asym_entity.setdefault(asym, entity)
  scheme = _table(tables, "_pdbx_poly_seq_scheme", ("asym_id", "seq_id", "pdb_seq_num"), source)
  scheme_numbers = {}
  if scheme is not None:
    icodes = scheme.get("pdb_ins_code", ["."] * len(scheme["asym_id"]))
    for asym, seq_id, number, icode in zip(scheme["asym_id"], scheme["seq_id"],
                                           scheme["pdb_seq_num"], icodes):
      if re.fullmatch(r"-?\d+", seq_id) and re.fullmatch(r"-?\d+", number):
        scheme_numbers.setdefault((asym, int(seq_id)), (int(number), "" if icode in _UNSET else icode))

  observed: dict[tuple[str, int], dict[str, ResidueRecord]] = {}
  asym_names: dict[str, str] = {}
  for atom in atoms:
    if atom.seq_num is None or asym_entity.get(atom.asym) not in entities:
      continue
    if atom.asym not in asym_names:
      name = atom.chain if atom.chain not in asym_names.values() else f"{atom.chain}_{atom.asym}"
      asym_names[atom.asym] = name
    variants = observed.setdefault((atom.asym, atom.seq_num), {})
    if atom.comp not in variants:
      variants[atom.comp] = ResidueRecord(asym_names[atom.asym], atom.number, atom.icode,
                                          atom.comp, [])
    variants[atom.comp].atoms.append(atom.atom)

  chains, seqres = {}, {}
  for asym, name in asym_names.items():
    positions = entities[asym_entity[asym]]
    known = {num for num, _ in positions}
    stray = sorted(num for a, num in observed if a == asym and num not in known)
    if stray:
      raise StructureParseError(f"{source}: chain {name}: label_seq_id {stray[0]} has atoms but "
                                f"is not in _entity_poly_seq")
    residues = []
    for num, monomers in positions:
      variants = observed.get((asym, num))
      if variants:
        listed = [r for comp, r in variants.items() if comp in monomers]
        residues.append(most_occupied(listed or list(variants.values())))
      else:
        number, icode = scheme_numbers.get((asym, num), (None, ""))
        residues.append(ResidueRecord(name, number, icode, monomers[0], []))
    _number_unobserved(residues)
    chains[name] = residues
    seqres[name] = "".join(residue_type(r.resname)[0] for r in residues)
  return chains, seqres


def _number_unobserved(residues: list[ResidueRecord]) -> None:
  """Numbers unobserved residues that `_pdbx_poly_seq_scheme` did not, by counting from
  the nearest numbered residue before them (after them for a leading segment)."""
  numbered = [i for i, r in enumerate(residues) if r.number is not None]
  for i, residue in enumerate(residues):
    if residue.number is None:
      before = [j for j in numbered if j < i]
      j = before[-1] if before else numbered[0]
      residue.number = residues[j].number + (i - j)


# --- Writer ---------------------------------------------------------------------------------

def to_mmcif(protein: Protein, entry_id: str = "af2flax") -> str:
  """A minimal valid mmCIF of a Protein: one entity per chain, `_entity_poly_seq` with every
  residue (unobserved ones included), `_pdbx_poly_seq_scheme` with their numbers,
  `_chem_comp`, `_atom_site` (B-factor column = `protein.b_factors`), and the resolution,
  release date and method when the Protein has them. Residue names are the parents'.
  Chain names mmCIF cannot hold (blank, '?', '.', with whitespace or quotes) are written
  as the first unused letters A, B, ...
  """
  chain_names = _writable_chain_names(protein.chain_names)
  observed = protein.atom_mask > 0.5
  if not np.isfinite(protein.atom_positions[observed]).all():
    raise ValueError("cannot write non-finite atom positions to mmCIF")
  if not np.isfinite(protein.b_factors[observed]).all():
    raise ValueError("cannot write non-finite B-factors to mmCIF")
  cif: dict[str, object] = collections.defaultdict(list)
  cif["data_"] = entry_id
  cif["_entry.id"] = entry_id
  if protein.structure_method:
    cif["_exptl.entry_id"] = entry_id
    cif["_exptl.method"] = protein.structure_method.upper()
  if protein.resolution is not None:
    cif["_refine.entry_id"] = entry_id
    cif["_refine.ls_d_res_high"] = f"{protein.resolution:g}"
  if protein.release_date:
    for key, value in (("ordinal", "1"), ("data_content_type", "Structure model"),
                       ("major_revision", "1"), ("minor_revision", "0"),
                       ("revision_date", protein.release_date)):
      cif[f"_pdbx_audit_revision_history.{key}"] = value
  used = sorted(set(int(a) for a in protein.aatype))
  for aatype in used:
    cif["_chem_comp.id"].append(rc.resnames[aatype])
    cif["_chem_comp.type"].append("peptide linking" if rc.resnames[aatype] == "GLY"
                                  else "L-peptide linking")
  serial = 1
  for chain_number, name in enumerate(chain_names):
    entity = str(chain_number + 1)
    cif["_entity.id"].append(entity)
    cif["_entity.type"].append("polymer")
    cif["_entity_poly.entity_id"].append(entity)
    cif["_entity_poly.type"].append("polypeptide(L)")
    cif["_entity_poly.pdbx_strand_id"].append(name)
    cif["_struct_asym.id"].append(name)
    cif["_struct_asym.entity_id"].append(entity)
    for seq_id, i in enumerate(np.nonzero(protein.chain_index == chain_number)[0], start=1):
      resname, number = rc.resnames[protein.aatype[i]], str(protein.residue_index[i])
      icode = protein.insertion_code[i] or "?"
      for key, value in (("entity_id", entity), ("num", str(seq_id)), ("mon_id", resname),
                         ("hetero", "n")):
        cif[f"_entity_poly_seq.{key}"].append(value)
      for key, value in (("asym_id", name), ("entity_id", entity), ("seq_id", str(seq_id)),
                         ("mon_id", resname), ("pdb_seq_num", number),
                         ("auth_seq_num", number if observed[i].any() else "?"),
                         ("pdb_mon_id", resname), ("pdb_strand_id", name),
                         ("pdb_ins_code", "." if icode == "?" else icode), ("hetero", "n")):
        cif[f"_pdbx_poly_seq_scheme.{key}"].append(value)
      for atom_index in np.nonzero(observed[i])[0]:
        atom_name = rc.atom_types[atom_index]
        x, y, z = protein.atom_positions[i, atom_index]
        for key, value in (
            ("group_PDB", "ATOM"), ("id", str(serial)), ("type_symbol", atom_name[0]),
            ("label_atom_id", atom_name), ("label_alt_id", "."), ("label_comp_id", resname),
            ("label_asym_id", name), ("label_entity_id", entity), ("label_seq_id", str(seq_id)),
            ("pdbx_PDB_ins_code", icode), ("Cartn_x", f"{x:.3f}"), ("Cartn_y", f"{y:.3f}"),
            ("Cartn_z", f"{z:.3f}"), ("occupancy", "1.00"),
            ("B_iso_or_equiv", f"{protein.b_factors[i, atom_index]:.2f}"),
            ("auth_seq_id", number), ("auth_comp_id", resname), ("auth_asym_id", name),
            ("auth_atom_id", atom_name), ("pdbx_PDB_model_num", "1")):
          cif[f"_atom_site.{key}"].append(value)
        serial += 1
  writer = MMCIFIO()
  writer.set_dict(dict(cif))
  handle = io.StringIO()
  writer.save(handle)
  return handle.getvalue()


def _writable_chain_names(names: Sequence[str]) -> list[str]:
  valid = lambda name: (bool(name) and name not in _UNSET and name[0] not in "_#$;["
                        and not any(c.isspace() or c in "'\"" or not c.isprintable() for c in name))
  spare = (chr(c) for c in range(ord("A"), ord("Z") + 1) if chr(c) not in names)
  spare = iter(list(spare) + [f"X{i}" for i in range(len(names))])
  return [name if valid(name) else next(spare) for name in names]
