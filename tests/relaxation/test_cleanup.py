"""PDBFixer clean-up (Suppl. 1.8.6): what it adds, removes and must leave in place."""

import io
import random

import numpy as np
import pytest
from openmm import app as openmm_app
from openmm.app.internal.pdbstructure import PdbStructure

from af2flax.relaxation import cleanup
from tests.conftest import SHARED_DATA

TESTDATA = SHARED_DATA / "alphafold_testdata"


def _atom_line(serial, name, resname, chain, resseq, xyz, element):
  x, y, z = xyz
  return (f"ATOM  {serial:>5} {name:<4} {resname:>3} {chain}{resseq:>4}    "
          f"{x:8.3f}{y:8.3f}{z:8.3f}  1.00  0.00          {element:>2}")


def _residue_atoms(pdb_string):
  pdb = openmm_app.PDBFile(io.StringIO(pdb_string))
  return {(residue.name, residue.id): sorted(atom.name for atom in residue.atoms())
          for residue in pdb.topology.residues()}


def test_missing_heavy_atoms_terminals_and_hydrogens_are_added():
  # A lone CA of a proline, as AlphaFold's cleanup test: everything else must be built.
  lines = [_atom_line(1, " CA", "PRO", "A", 1, (1.0, 1.0, 1.0), "C")]
  fixed = cleanup.fix_pdb("\n".join(lines) + "\n", report := cleanup.CleanupReport())
  atoms = _residue_atoms(fixed)[("PRO", "1")]
  heavy = ["C", "CA", "CB", "CD", "CG", "N", "O", "OXT"]
  hydrogens = ["H2", "H3", "HA", "HB2", "HB3", "HD2", "HD3", "HG2", "HG3"]
  assert atoms == sorted(heavy + hydrogens)
  assert sorted(report.missing_heavy_atoms["A:1:PRO"]) == ["C", "CB", "CD", "CG", "N", "O"]
  assert report.missing_terminals == {"A:1:PRO": ["OXT"]}


def test_heterogens_removed_and_nonstandard_residues_replaced():
  lines = [_atom_line(1, " CA", "GLY", "A", 1, (0.0, 0.0, 0.0), "C"),
           _atom_line(2, " CA", "DAL", "A", 2, (3.8, 0.0, 0.0), "C"),
           _atom_line(3, " O", "HOH", "A", 3, (9.0, 9.0, 9.0), "O")]
  report = cleanup.CleanupReport()
  fixed = cleanup.fix_pdb("\n".join(lines) + "\n", report)
  assert [name for name, _ in _residue_atoms(fixed)] == ["GLY", "ALA"]
  assert report.removed_heterogens == ["HOH"]
  assert report.nonstandard_residues == ["A:2:DAL->ALA"]


def test_chain_gaps_are_reported_not_built():
  # SEQRES says CYS GLY LEU; GLY has no coordinates: relax must not model it.
  lines = ["SEQRES   1 C    3  CYS GLY LEU",
           _atom_line(1, " N", "CYS", "C", 1, (-12.262, 20.115, 60.959), "N"),
           _atom_line(2, " CA", "CYS", "C", 1, (-11.065, 20.934, 60.773), "C"),
           _atom_line(3, " C", "CYS", "C", 1, (-10.002, 20.742, 61.844), "C"),
           _atom_line(4, " O", "CYS", "C", 1, (-10.284, 20.225, 62.929), "O"),
           _atom_line(5, " N", "LEU", "C", 3, (-7.688, 18.700, 62.045), "N"),
           _atom_line(6, " CA", "LEU", "C", 3, (-7.256, 17.320, 62.234), "C"),
           _atom_line(7, " C", "LEU", "C", 3, (-6.380, 16.864, 61.070), "C"),
           _atom_line(8, " O", "LEU", "C", 3, (-6.551, 17.332, 59.947), "O")]
  report = cleanup.CleanupReport()
  fixed = cleanup.fix_pdb("\n".join(lines) + "\n", report)
  assert [key for key in _residue_atoms(fixed)] == [("CYS", "1"), ("LEU", "3")]
  assert len(report.missing_residues) == 1 and "GLY" in report.missing_residues[0]


def test_met_selenium_becomes_sulfur():
  lines = [_atom_line(1, " SD", "MET", "A", 1, (0.0, 0.0, 0.0), "Se")]
  structure = PdbStructure(io.StringIO("\n".join(lines) + "\n"))
  report = cleanup.CleanupReport()
  cleanup.replace_met_selenium(structure, report)
  (atom,) = list(structure.iter_atoms())
  assert atom.element_symbol == "S"
  assert report.selenium_in_met == ["A:1:MET"]


def test_single_residue_chains_removed():
  lines = [_atom_line(1, " CA", "GLY", "A", 1, (0.0, 0.0, 0.0), "C"),
           "TER",
           _atom_line(2, " CA", "GLY", "B", 1, (10.0, 0.0, 0.0), "C"),
           _atom_line(3, " CA", "ALA", "B", 2, (13.8, 0.0, 0.0), "C")]
  structure = PdbStructure(io.StringIO("\n".join(lines) + "\n"))
  report = cleanup.CleanupReport()
  cleanup.remove_single_residue_chains(structure, report)
  assert [chain.chain_id for chain in structure.iter_chains()] == ["B"]
  assert report.removed_chains == ["A"]


def test_clean_pdb_keeps_heavy_atoms_and_disulfides(shared_dir):
  text = (TESTDATA / "multiple_disulfides_target.pdb").read_text()
  cleaned, _ = cleanup.clean_pdb(text)  # check=True: raises if a heavy atom moved
  pdb = openmm_app.PDBFile(io.StringIO(cleaned))
  bonded = {atom.residue.id for bond in pdb.topology.bonds()
            if bond[0].name == "SG" and bond[1].name == "SG" for atom in bond}
  cysteines = [r for r in pdb.topology.residues() if r.name == "CYS"]
  # 13 SG-SG bridges in the model (SG-SG < 3 Å); bridged cysteines get no thiol hydrogen.
  assert len(bonded) == 26
  for residue in cysteines:
    names = {atom.name for atom in residue.atoms()}
    assert ("HG" in names) == (residue.id not in bonded), residue.id
  assert np.isclose(len(cysteines), 32)


def test_check_heavy_atoms_unchanged_detects_a_move(shared_dir):
  text = (TESTDATA / "model_output.pdb").read_text()
  cleaned, _ = cleanup.clean_pdb(text)
  moved = cleaned.replace("   1.921 -46.152   7.786", "   1.999 -46.152   7.786", 1)
  assert moved != cleaned
  with pytest.raises(cleanup.CleanupError, match="moved atom"):
    cleanup.check_heavy_atoms_unchanged(moved, text)


def test_clean_pdb_is_reproducible_and_leaves_global_random_alone(shared_dir):
  text = (TESTDATA / "model_output.pdb").read_text()
  bare = "".join(line + "\n" for line in text.splitlines() if line[76:78].strip() != "H")
  random.seed(123)
  expected_next = random.random()
  random.seed(123)
  first, _ = cleanup.clean_pdb(bare)
  assert random.random() == expected_next
  second, _ = cleanup.clean_pdb(bare)
  # Same atoms at the same positions: the placement minimisations run on the Reference
  # platform (the multithreaded CPU platform once gave 0.02 Å apart under load).
  assert first == second
