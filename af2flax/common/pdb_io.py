"""PDB format reader and writer for `Protein` (wwPDB format v3.3, fixed columns).

Import these through `af2flax.common.protein`. The coordinate records are read by our own
fixed-column parser (so that every malformed line is reported with its line number); the
header (resolution, dates, method, REMARK 465 missing residues) by Biopython's
`parse_pdb_header`.
"""

from __future__ import annotations

import io
from typing import Sequence

import numpy as np
from Bio.PDB import parse_pdb_header

from af2flax.common import residue_constants as rc
from af2flax.common.protein_base import (AtomRecord, PathLike, Protein, ResidueRecord,
                                         StructureParseError, assemble_coordinate_residues,
                                         is_element, load_structure_text, parse_float,
                                         parse_int, protein_from_residues, residue_type,
                                         select_chain_names)

# Biopython fills absent header dates with this placeholder.
_BIOPYTHON_NO_DATE = "1909-01-08"


def read_pdb(path: PathLike, chain_id: str | Sequence[str] | None = None,
             fix_arginine: bool = True) -> Protein:
  """Reads a PDB file (plain or gzipped) into a Protein.

  Args:
    path: `.pdb`, `.ent`, optionally `.gz` (detected from the content).
    chain_id: one chain name, a list of them, or None for every protein chain.
    fix_arginine: swap NH1/NH2 where NH2 is nearer CD (AlphaFold's template convention).

  Only the first model is read. Residues listed in REMARK 465 (not located in the
  experiment) are inserted, in residue-number order, with mask 0. Raises
  StructureParseError naming the file and the problem.
  """
  return from_pdb_string(load_structure_text(path), chain_id, str(path), fix_arginine)


def from_pdb_string(text: str, chain_id: str | Sequence[str] | None = None,
                    source: str = "<string>", fix_arginine: bool = True) -> Protein:
  """Parses the text of a PDB file; see `read_pdb`."""
  lines = text.splitlines()
  residues, seqres_names = _read_coordinate_records(lines, source)
  header = _read_header(lines, source)
  chains: dict[str, list[ResidueRecord]] = {}
  for residue in residues:
    chains.setdefault(residue.chain, []).append(residue)
  if not chains:
    raise StructureParseError(f"{source}: no protein residues in ATOM/HETATM records")
  for missing in header.get("missing_residues", []):
    if missing["model"] not in (None, 1) or missing["chain"] not in chains:
      continue
    _insert_by_number(chains[missing["chain"]], ResidueRecord(
        missing["chain"], int(missing["ssseq"]), missing["insertion"] or "",
        missing["res_name"], []))
  names = select_chain_names(list(chains), chain_id, source)
  release_date = header.get("release_date")
  seqres = {name: "".join(residue_type(resname)[0] for resname in seqres_names[name])
            for name in names if name in seqres_names}
  method = header.get("structure_method")
  return protein_from_residues(
      [residue for name in names for residue in chains[name]], names, source, fix_arginine,
      resolution=header.get("resolution"),
      release_date=None if release_date == _BIOPYTHON_NO_DATE else release_date,
      structure_method=None if method == "unknown" else method, seqres=seqres)


def _read_header(lines: list[str], source: str) -> dict:
  header_lines = [line + "\n" for line in lines
                  if line[:6].strip() in ("HEADER", "EXPDTA", "REVDAT", "REMARK")]
  if not header_lines:
    return {}
  try:
    return parse_pdb_header(io.StringIO("".join(header_lines)))
  except Exception as error:  # Biopython's header regexes raise assorted types on junk.
    raise StructureParseError(f"{source}: unreadable PDB header ({type(error).__name__}: "
                              f"{error})") from error


def _read_coordinate_records(lines: list[str], source: str
                             ) -> tuple[list[ResidueRecord], dict[str, list[str]]]:
  """Amino-acid residues of the first model and the SEQRES residue names per chain."""
  seqres: dict[str, list[str]] = {}
  atoms = []
  for line_number, line in enumerate(lines, start=1):
    record = line[:6]
    if record == "SEQRES":
      seqres.setdefault(line[11:12], []).extend(line[19:].split())
    elif record.rstrip() in ("ENDMDL", "END") and atoms:
      break  # First model only.
    elif record in ("ATOM  ", "HETATM"):
      atoms.append(_parse_atom_line(line, f"line {line_number}", source))
  return assemble_coordinate_residues(atoms), seqres


def _parse_atom_line(line: str, where: str, source: str):
  record = line[:6]
  if len(line.rstrip()) < 54:
    raise StructureParseError(f"{source}: {where}: {record.strip()} record shorter than "
                              f"the 54 columns that hold coordinates")
  line = line.ljust(80)
  name = line[12:16].strip()
  resname = line[17:20].strip()
  element = line[76:78].strip()
  if not name or not resname:
    raise StructureParseError(f"{source}: {where}: blank atom or residue name")
  if element and not is_element(element):
    raise StructureParseError(f"{source}: {where}: unknown element {element!r}")
  key = (line[21], parse_int(line[22:26], f"{where}: residue number", source),
         line[26].strip())
  atom = AtomRecord(
      name, tuple(parse_float(line[c:c + 8], f"{where}: coordinate", source)
                  for c in (30, 38, 46)),
      parse_float(line[54:60], f"{where}: occupancy", source, default=1.0),
      parse_float(line[60:66], f"{where}: B-factor", source, default=0.0))
  return key, resname, record == "HETATM", atom


def _insert_by_number(chain: list[ResidueRecord], missing: ResidueRecord) -> None:
  """Inserts an unobserved residue before the first one numbered after it."""
  key = (missing.number, missing.insertion_code)
  for position, residue in enumerate(chain):
    if (residue.number, residue.insertion_code) == key:
      return  # Listed as missing but present: trust the coordinates.
    if (residue.number, residue.insertion_code) > key:
      chain.insert(position, missing)
      return
  chain.append(missing)


# --- Writer ---------------------------------------------------------------------------------

def _atom_name_field(name: str) -> str:
  # One-letter elements start in column 14 unless the name fills all four columns.
  return name if len(name) == 4 else f" {name:<3}"


def _check_writable(protein: Protein) -> None:
  for name in protein.chain_names:
    if len(name) != 1:
      raise ValueError(f"PDB chain IDs are one character; chain {name!r} cannot be written "
                       f"(write mmCIF instead)")
  observed = protein.atom_mask > 0.5
  coordinates = protein.atom_positions[observed]
  if not np.isfinite(coordinates).all():
    raise ValueError("cannot write non-finite atom positions to PDB")
  if coordinates.size and (coordinates.max() >= 1e4 or coordinates.min() <= -1e3):
    raise ValueError("atom positions outside the PDB coordinate range (-999.999, 9999.999)")
  if protein.num_res and (protein.residue_index.min() < -999 or protein.residue_index.max() > 9999):
    raise ValueError("residue numbers outside the PDB range -999..9999")
  b_factors = protein.b_factors[observed]
  if not np.isfinite(b_factors).all() or (b_factors.size and (b_factors.max() >= 1e3 or b_factors.min() <= -1e2)):
    raise ValueError("B-factors must be finite and within the PDB column range (-99.99, 999.99)")


def to_pdb(protein: Protein) -> str:
  """PDB text of a Protein: ATOM records, TER after each chain, END.

  The B-factor column holds `protein.b_factors` (put pLDDT there with
  `Protein.with_residue_b_factors`). Residue names are the parents' (MSE is written as
  MET). Residues without any atom (mask 0) are listed in REMARK 465 and every chain's
  sequence in SEQRES, so that `from_pdb_string(to_pdb(p))` gives back the same arrays.
  """
  _check_writable(protein)
  lines = []
  unobserved = protein.atom_mask.max(axis=1, initial=0) < 0.5
  if unobserved.any():
    lines += [f"REMARK 465 {text}" for text in (
        "", "MISSING RESIDUES", "THE FOLLOWING RESIDUES WERE NOT LOCATED IN THE",
        "EXPERIMENT. (M=MODEL NUMBER; RES=RESIDUE NAME; C=CHAIN",
        "IDENTIFIER; SSSEQ=SEQUENCE NUMBER; I=INSERTION CODE.)", "", "  M RES C SSSEQI")]
    for i in np.nonzero(unobserved)[0]:
      lines.append(f"REMARK 465     {rc.resnames[protein.aatype[i]]} "
                   f"{protein.chain_names[protein.chain_index[i]]} "
                   f"{protein.residue_index[i]:>5}{protein.insertion_code[i]}")
  for chain_number, chain_name in enumerate(protein.chain_names):
    resnames = [rc.resnames[a] for a in protein.aatype[protein.chain_index == chain_number]]
    for line_number, start in enumerate(range(0, len(resnames), 13), start=1):
      lines.append(f"SEQRES {line_number:>3} {chain_name} {len(resnames):>4}  "
                   + " ".join(resnames[start:start + 13]))
  serial = 1
  for chain_number, chain_name in enumerate(protein.chain_names):
    rows = np.nonzero(protein.chain_index == chain_number)[0]
    for i in rows:
      resname = rc.resnames[protein.aatype[i]]
      for atom_index in np.nonzero(protein.atom_mask[i] > 0.5)[0]:
        atom_name = rc.atom_types[atom_index]
        x, y, z = protein.atom_positions[i, atom_index]
        lines.append(
            f"ATOM  {serial % 100000:>5} {_atom_name_field(atom_name)} {resname:>3} "
            f"{chain_name}{protein.residue_index[i]:>4}{protein.insertion_code[i]:1}   "
            f"{x:8.3f}{y:8.3f}{z:8.3f}{1.0:6.2f}{protein.b_factors[i, atom_index]:6.2f}"
            f"          {atom_name[0]:>2}  ")
        serial += 1
    if len(rows):
      last = rows[-1]
      lines.append(f"TER   {serial % 100000:>5}      {rc.resnames[protein.aatype[last]]:>3} "
                   f"{chain_name}{protein.residue_index[last]:>4}{protein.insertion_code[last]:1}")
      serial += 1
  lines.append("END")
  return "\n".join(line.ljust(80) for line in lines) + "\n"
