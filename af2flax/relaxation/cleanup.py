"""Prepares a protein PDB for OpenMM: PDBFixer clean-up plus AlphaFold's two extra fixes.

Jumper et al. (2021) Suppl. 1.8.6 "Amber relaxation": before minimisation the structure is
made complete and force-field ready. PDBFixer replaces non-standard residues by their
standard parents, removes heterogens (water included), adds missing heavy atoms (seeded, so
the result is reproducible) and adds hydrogens at pH 7. Two cases PDBFixer leaves alone are
then fixed on OpenMM's `PdbStructure`: selenium in a MET that is not marked as MSE becomes
sulfur, and chains of a single residue (both N- and C-terminus, for which Amber has no
template) are dropped.

The existing heavy atoms must come out of the clean-up exactly where they went in;
`clean_pdb` checks that.
"""

from __future__ import annotations

import dataclasses
import io
import random

import numpy as np
import openmm
import pdbfixer
from openmm import app as openmm_app
from openmm import unit
from openmm.app import element as openmm_element
from openmm.app.internal.pdbstructure import PdbStructure

# pH at which PDBFixer chooses protonation states (AlphaFold's choice).
HYDROGEN_PH = 7.0
# Seeds of PDBFixer's placement of missing heavy atoms and of hydrogens (reproducibility).
MISSING_ATOMS_SEED = 0
HYDROGEN_SEED = 0


class CleanupError(ValueError):
  """The structure cannot be made ready for OpenMM."""


@dataclasses.dataclass
class CleanupReport:
  """What the clean-up changed. Residues are named `chain:number:name`."""
  nonstandard_residues: list[str] = dataclasses.field(default_factory=list)  # 'A:12:MSE->MET'
  removed_heterogens: list[str] = dataclasses.field(default_factory=list)     # residue names
  missing_residues: list[str] = dataclasses.field(default_factory=list)
  missing_heavy_atoms: dict[str, list[str]] = dataclasses.field(default_factory=dict)
  missing_terminals: dict[str, list[str]] = dataclasses.field(default_factory=dict)
  selenium_in_met: list[str] = dataclasses.field(default_factory=list)
  removed_chains: list[str] = dataclasses.field(default_factory=list)


def _residue_label(residue: openmm_app.topology.Residue) -> str:
  return f"{residue.chain.id}:{residue.id}:{residue.name}"


def fix_pdb(pdb_string: str, report: CleanupReport) -> str:
  """Runs PDBFixer on a PDB string; returns the fixed PDB string (ids kept).

  Steps, in AlphaFold's order: replace non-standard residues; remove heterogens and water;
  report residues that SEQRES lists but the coordinates lack (they are not built: AlphaFold's
  relax never sees SEQRES, so it never fills a gap either); add missing heavy atoms and
  terminal atoms; add hydrogens at `HYDROGEN_PH`.
  """
  # The short minimisations that place added atoms run on OpenMM's Reference platform: the
  # multithreaded CPU platform sums forces in thread order, so two clean-ups of one input
  # differed by up to 0.02 Å in hydrogen positions on a loaded 2-core machine.
  fixer = pdbfixer.PDBFixer(pdbfile=io.StringIO(pdb_string),
                            platform=openmm.Platform.getPlatformByName("Reference"))
  fixer.findNonstandardResidues()
  report.nonstandard_residues = [f"{_residue_label(residue)}->{replacement}"
                                 for residue, replacement in fixer.nonstandardResidues]
  fixer.replaceNonstandardResidues()

  names_before = {residue.name for residue in fixer.topology.residues()}
  fixer.removeHeterogens(keepWater=False)
  names_after = {residue.name for residue in fixer.topology.residues()}
  report.removed_heterogens = sorted(names_before - names_after)

  fixer.findMissingResidues()
  report.missing_residues = [f"chain {chain_index} before residue {position}: {' '.join(names)}"
                             for (chain_index, position), names in fixer.missingResidues.items()]
  # Relaxation refines the residues it is given: a chain gap (SEQRES residues without
  # coordinates) is left open, never modelled, so residue ids and counts stay as in the input.
  fixer.missingResidues = {}
  fixer.findMissingAtoms()
  report.missing_heavy_atoms = {_residue_label(residue): [atom.name for atom in atoms]
                                for residue, atoms in fixer.missingAtoms.items()}
  report.missing_terminals = {_residue_label(residue): list(names)
                              for residue, names in fixer.missingTerminals.items()}
  fixer.addMissingAtoms(seed=MISSING_ATOMS_SEED)
  # OpenMM's Modeller starts hydrogens at positions drawn from Python's global `random`, then
  # minimises them briefly: seeding it (and the Reference platform) makes clean-up, and so
  # relaxation, reproducible (AlphaFold's is not; its tests allow for that). The caller's
  # random state is restored.
  random_state = random.getstate()
  random.seed(HYDROGEN_SEED)
  try:
    fixer.addMissingHydrogens(HYDROGEN_PH)
  finally:
    random.setstate(random_state)

  handle = io.StringIO()
  openmm_app.PDBFile.writeFile(fixer.topology, fixer.positions, handle, keepIds=True)
  return handle.getvalue()


def replace_met_selenium(structure: PdbStructure, report: CleanupReport) -> None:
  """Turns the SD selenium of MET residues (unmarked selenomethionine) into sulfur."""
  for chain in structure.iter_chains():
    for residue in chain.iter_residues():
      if residue.get_name_with_spaces().strip() != "MET" or "SD" not in residue:
        continue
      sd_atom = residue.get_atom("SD")
      if sd_atom.element_symbol == "Se":
        sd_atom.element_symbol = "S"
        sd_atom.element = openmm_element.get_by_symbol("S")
        report.selenium_in_met.append(f"{chain.chain_id}:{residue.number}:MET")


def remove_single_residue_chains(structure: PdbStructure, report: CleanupReport) -> None:
  """Drops chains of one residue: Amber has no template for a residue that is both termini."""
  for model in structure.iter_models():
    single = [chain.chain_id for chain in model.iter_chains() if len(chain) <= 1]
    model.chains = [chain for chain in model.iter_chains() if len(chain) > 1]
    for chain_id in single:
      model.chains_by_id.pop(chain_id, None)
    report.removed_chains.extend(single)


def _heavy_atom_positions(pdb_file: openmm_app.PDBFile) -> dict[tuple[str, ...], np.ndarray]:
  """Maps (chain, residue id, insertion code, atom name) of each heavy atom to its position (Å)."""
  positions = pdb_file.getPositions(asNumpy=True).value_in_unit(unit.angstrom)
  return {(atom.residue.chain.id, atom.residue.id, atom.residue.insertionCode, atom.name):
          positions[atom.index]
          for atom in pdb_file.topology.atoms()
          if atom.element is not None and atom.element.symbol != "H"}


def check_heavy_atoms_unchanged(cleaned_pdb: str, reference_pdb: str) -> None:
  """Raises CleanupError if clean-up moved a heavy atom that was present before.

  Atoms are matched by chain, residue id and name; atoms that clean-up removed (heterogens,
  non-standard parts, single-residue chains) are not compared.
  """
  cleaned = _heavy_atom_positions(openmm_app.PDBFile(io.StringIO(cleaned_pdb)))
  reference = _heavy_atom_positions(openmm_app.PDBFile(io.StringIO(reference_pdb)))
  for key, position in cleaned.items():
    if key in reference and not np.array_equal(position, reference[key]):
      raise CleanupError(f"clean-up moved atom {key}: {reference[key]} -> {position}")


def clean_pdb(pdb_string: str, check: bool = True) -> tuple[str, CleanupReport]:
  """Makes a protein PDB string force-field ready (Suppl. 1.8.6); returns it and a report.

  Args:
    pdb_string: heavy-atom protein PDB (typically `protein.to_pdb` output).
    check: verify that the heavy atoms already present did not move.
  """
  report = CleanupReport()
  fixed = fix_pdb(pdb_string, report)
  structure = PdbStructure(io.StringIO(fixed))
  replace_met_selenium(structure, report)
  remove_single_residue_chains(structure, report)
  if not any(True for _ in structure.iter_residues()):
    raise CleanupError("no chain of two or more residues: Amber has no template for a lone "
                       "residue (N- and C-terminus at once)")
  as_file = openmm_app.PDBFile(structure)
  handle = io.StringIO()
  openmm_app.PDBFile.writeFile(as_file.getTopology(), as_file.getPositions(), handle,
                               keepIds=True)
  cleaned = handle.getvalue()
  if check:
    check_heavy_atoms_unchanged(cleaned, pdb_string)
  return cleaned, report
