"""Violation report and RMSD used by relax, checked against AlphaFold's own expectations."""

import numpy as np
import pytest

from af2flax.common import residue_constants
from af2flax.relaxation import checks
from tests.conftest import SHARED_DATA

TESTDATA = SHARED_DATA / "alphafold_testdata"

# AlphaFold's `amber_minimize_test.test_find_violations` for multiple_disulfides_target.pdb:
# (residue, atom14 slot) of every atom in a between-residue clash.
AF_CLASH_ATOMS = [
    (8, 4), (8, 5), (13, 3), (14, 1), (14, 4), (26, 4), (26, 5), (31, 8), (31, 10), (39, 0),
    (39, 1), (39, 2), (39, 3), (39, 4), (42, 5), (42, 6), (42, 7), (42, 8), (47, 7), (47, 8),
    (47, 9), (47, 10), (64, 4), (85, 5), (102, 4), (102, 5), (109, 13), (111, 5), (118, 6),
    (118, 7), (118, 8), (124, 4), (124, 5), (131, 5), (139, 7), (147, 4), (152, 7)]


def test_violations_match_alphafold_on_disulfide_target(shared_dir):
  structure = checks.atom14_from_pdb_string(
      (TESTDATA / "multiple_disulfides_target.pdb").read_text())
  report = checks.find_violations(structure)
  assert structure.num_residues == 191
  np.testing.assert_array_equal(np.flatnonzero(report.between_residue_bond), [135, 136])
  expected_clashes = np.zeros([191, 14], bool)
  expected_clashes[tuple(np.array(AF_CLASH_ATOMS).T)] = True
  np.testing.assert_array_equal(report.clashing_atoms, expected_clashes)
  assert not report.within_residue.any()
  summary = report.summary()
  assert summary["violating_residues"] == len({r for r, _ in AF_CLASH_ATOMS} | {135, 136})
  assert summary["violations_per_residue"] == pytest.approx(summary["violating_residues"] / 191)


def test_atom14_layout_follows_residue_constants(shared_dir):
  text = (TESTDATA / "model_output.pdb").read_text()
  structure = checks.atom14_from_pdb_string(text)
  resnames = list(dict.fromkeys((line[22:26], line[17:20]) for line in text.splitlines()
                                if line.startswith("ATOM")))
  assert [residue_constants.resnames[a] for a in structure.aatype] == [n for _, n in resnames]
  # Every heavy atom of the file lands in its atom14 slot; hydrogens are not in atom14.
  for line in text.splitlines():
    if not line.startswith("ATOM") or line[76:78].strip() == "H":
      continue
    row = int(line[22:26]) - 1
    names = residue_constants.restype_name_to_atom14_names[line[17:20]]
    slot = names.index(line[12:16].strip())
    assert structure.atom_mask[row, slot] == 1
    np.testing.assert_allclose(structure.positions[row, slot],
                               [float(line[30:38]), float(line[38:46]), float(line[46:54])],
                               atol=1e-3)
  assert structure.atom_mask.sum() == sum(
      1 for line in text.splitlines() if line.startswith("ATOM") and line[76:78].strip() != "H")


def test_heavy_atom_rmsd_of_a_translation(shared_dir):
  text = (TESTDATA / "model_output.pdb").read_text()
  shifted = []
  for line in text.splitlines():
    if line.startswith("ATOM"):
      x, y, z = (float(line[30:38]) + 0.3, float(line[38:46]), float(line[46:54]) - 0.4)
      line = f"{line[:30]}{x:8.3f}{y:8.3f}{z:8.3f}{line[54:]}"
    shifted.append(line)
  rmsd, count = checks.heavy_atom_rmsd(text, "\n".join(shifted) + "\n")
  assert rmsd == pytest.approx(0.5, abs=1e-3)
  assert count == checks.atom14_from_pdb_string(text).atom_mask.sum()


def test_non_standard_residue_is_named():
  line = ("ATOM      1  CA  DAL A   7       0.000   0.000   0.000  1.00  0.00           C\n"
          "END\n")
  with pytest.raises(ValueError, match=r"model\.pdb: residue A:7:DAL is not a standard amino acid"):
    checks.atom14_from_pdb_string(line, "model.pdb")
