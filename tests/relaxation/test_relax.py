"""AmberRelaxation (Suppl. 1.8.6) on AlphaFold's relax test structures.

Default tests use the two structures AlphaFold's own tests fully relax in one round
(model_output.pdb, 5 residues; with_violations.pdb, 148 residues); the 191-residue disulfide
target and the CASP14 model with unresolvable violations run under `-m slow`.
"""

import dataclasses
import io
import time

import numpy as np
import pytest
from openmm import app as openmm_app

from af2flax.common import protein
from af2flax.common import residue_constants
from af2flax.relaxation import checks
from af2flax.relaxation import relax
from tests.conftest import SHARED_DATA

TESTDATA = SHARED_DATA / "alphafold_testdata"
# Restrained relaxation moves heavy atoms little: our runs give 0.17 (model_output), 0.28
# (with_violations) and 0.32 Å (disulfide target); the CASP14 model, whose violating residues
# are freed for two more rounds, 0.6 Å.
MAX_HEAVY_ATOM_RMSD = 0.5


def _relax(name, **kwargs):
  text = (TESTDATA / name).read_text()
  start = time.perf_counter()
  result = relax.AmberRelaxation(**kwargs).relax_pdb_string(text, name)
  print(f"{name}: {time.perf_counter() - start:.1f} s, {result.summary()}")
  return text, result


def _atoms(pdb_string):
  """(chain, residue id, residue name) -> {atom name: (element, B-factor)}."""
  atoms = {}
  for line in pdb_string.splitlines():
    if line.startswith("ATOM"):
      key = (line[21], line[22:27].strip(), line[17:20])
      atoms.setdefault(key, {})[line[12:16].strip()] = (line[76:78].strip(), float(line[60:66]))
  return atoms


def _disulfide_pairs(pdb_string, max_distance=2.5):
  """Pairs of cysteine residue ids whose SG atoms are within `max_distance` Å -> distance."""
  pdb = openmm_app.PDBFile(io.StringIO(pdb_string))
  xyz = pdb.getPositions(asNumpy=True)._value * 10.0
  sulfurs = sorted(((a.residue.id, xyz[a.index]) for a in pdb.topology.atoms()
                    if a.residue.name == "CYS" and a.name == "SG"), key=lambda s: int(s[0]))
  distances = {(r1, r2): float(np.linalg.norm(x1 - x2))
               for i, (r1, x1) in enumerate(sulfurs) for r2, x2 in sulfurs[i + 1:]}
  return {pair: d for pair, d in distances.items() if d < max_distance}


@pytest.fixture(scope="module")
def relaxed_model_output(shared_dir):
  return _relax("model_output.pdb")


def test_model_output_is_relaxed_in_place(relaxed_model_output):
  text, result = relaxed_model_output
  assert result.violations_before.num_violating_residues == 0
  assert result.violations_after.num_violating_residues == 0
  assert len(result.rounds) == 1
  assert result.final_energy < result.initial_energy
  assert 0.0 < result.heavy_atom_rmsd < MAX_HEAVY_ATOM_RMSD


def test_model_output_keeps_residues_atoms_and_b_factors(relaxed_model_output):
  text, result = relaxed_model_output
  before, after = _atoms(text), _atoms(result.pdb_string)
  assert list(after) == list(before)  # same residues, ids and order
  for key, atoms_in in before.items():
    heavy_in = {name for name, (element, _) in atoms_in.items() if element != "H"}
    heavy_out = {name for name, (element, _) in after[key].items() if element != "H"}
    assert heavy_out - {"OXT"} == heavy_in, key
    assert any(element == "H" for element, _ in after[key].values()), key
    # Every atom of the residue, hydrogens included, carries the input CA's B-factor (pLDDT).
    assert {b for _, b in after[key].values()} == {atoms_in["CA"][1]}, key
  assert "OXT" in after[list(after)[-1]]


def test_with_violations_relaxed_to_zero_violations(shared_dir):
  # AlphaFold's amber_minimize_test.test_iterative_relax: no residue violations remain.
  text, result = _relax("with_violations.pdb")
  assert result.violations_before.num_violating_residues > 0
  assert result.violations_after.num_violating_residues == 0
  assert result.final_energy < result.initial_energy
  assert result.heavy_atom_rmsd < MAX_HEAVY_ATOM_RMSD
  after = checks.find_violations(checks.atom14_from_pdb_string(result.pdb_string))
  assert after.num_violating_residues == 0  # the returned PDB itself, re-read


@pytest.mark.slow
def test_disulfides_kept_and_violations_resolved(shared_dir):
  text, result = _relax("multiple_disulfides_target.pdb")
  # OpenMM bonds each SG to its nearest free partner within 3 Å (here 13 bridges; C177's SG,
  # 2.97 Å from the C155-C175 bridge, stays a free thiol).
  topology = openmm_app.PDBFile(io.StringIO(text)).topology
  bridges = {tuple(sorted((a.residue.id, b.residue.id), key=int))
             for a, b in topology.bonds() if a.name == "SG" and b.name == "SG"}
  assert len(bridges) == 13
  relaxed_bridges = _disulfide_pairs(result.pdb_string)
  assert set(relaxed_bridges) == bridges
  # Amber99sb's S-S bond is 2.038 Å; the 1.1-2.9 Å input bridges all end up near it.
  np.testing.assert_allclose(list(relaxed_bridges.values()), 2.04, atol=0.1)
  bridged = {residue for pair in bridges for residue in pair}
  for (chain, residue_id, name), atoms in _atoms(result.pdb_string).items():
    if name == "CYS":
      assert ("HG" in atoms) == (residue_id not in bridged), residue_id
  # Our seeded run relaxes it to zero violations in one round (0.32 Å). Without the hydrogen
  # seed, 2 of 3 runs kept within-residue violations in TYR43 and ARG48, whose side chains
  # interpenetrate in the input, after 3 rounds (0.54 Å): only those two may remain.
  after = result.violations_after
  assert result.violations_before.num_violating_residues == 21
  assert not after.between_residue_bond.any() and not after.between_residue_clash.any()
  assert set(np.flatnonzero(after.per_residue)) <= {42, 47}
  assert result.heavy_atom_rmsd < 0.75


@pytest.mark.slow
def test_casp14_model_adds_no_violations(shared_dir):
  # AlphaFold's relax_test.test_unresolved_violations (one round): these residues may still
  # violate afterwards (threaded side chains that minimisation cannot untangle); no others may.
  allowed = np.zeros([148], bool)
  allowed[[39, 40, 42, 43, 44, 45, 46, 47, 48, 49, 50, 58, 93, 127, 130, 131, 132, 141, 142]] = True
  for rounds in (1, relax.DEFAULT_MAX_OUTER_ITERATIONS):
    _, result = _relax("with_violations_casp14.pdb", max_outer_iterations=rounds)
    assert np.all(result.violations_after.per_residue <= allowed)
    assert (result.violations_after.num_violating_residues
            < result.violations_before.num_violating_residues)
    assert result.heavy_atom_rmsd < 1.0


def test_process_takes_a_protein_and_returns_it(shared_dir):
  prot = protein.read_pdb(TESTDATA / "model_output.pdb")
  plddt = np.linspace(30.0, 90.0, prot.num_res)
  result = relax.AmberRelaxation(max_iterations=50).process(prot.with_residue_b_factors(plddt))
  relaxed = result.to_protein()
  np.testing.assert_array_equal(relaxed.aatype, prot.aatype)
  np.testing.assert_array_equal(relaxed.residue_index, prot.residue_index)
  oxt = residue_constants.atom_order["OXT"]
  np.testing.assert_array_equal(np.delete(relaxed.atom_mask, oxt, axis=1),
                                np.delete(prot.atom_mask, oxt, axis=1))
  ca = residue_constants.atom_order["CA"]
  np.testing.assert_allclose(relaxed.b_factors[:, ca], plddt, atol=0.005)


@pytest.mark.parametrize("name, text, message", [
    ("notes.pdb", "hello\nthis is not a PDB file\n", "notes.pdb: no protein residues"),
    ("empty.pdb", "", "empty.pdb: no protein residues"),
    ("ligand.pdb",
     "HETATM    1  C1  LIG A   1       0.000   0.000   0.000  1.00  0.00           C\nEND\n",
     "ligand.pdb: no protein residues"),
    ("lone.pdb",
     "ATOM      1  CA  ALA A   7       0.000   0.000   0.000  1.00  0.00           C\nEND\n",
     "lone.pdb: clean-up failed: no chain of two or more residues"),
])
def test_bad_input_names_the_file(name, text, message):
  with pytest.raises(relax.RelaxationError, match=message):
    relax.AmberRelaxation().relax_pdb_string(text, name)


def test_truncated_file_names_the_file_and_line(shared_dir, tmp_path):
  text = (TESTDATA / "model_output.pdb").read_text()
  path = tmp_path / "truncated.pdb"
  path.write_text(text[:len(text) // 2])  # cut in the middle of an ATOM record
  with pytest.raises(relax.RelaxationError, match=r"truncated\.pdb: line \d+"):
    relax.AmberRelaxation().relax_file(path)
  empty = tmp_path / "empty.pdb"
  empty.write_text("")
  with pytest.raises(relax.RelaxationError, match=r"empty\.pdb: the file is empty"):
    relax.AmberRelaxation().relax_file(empty)


def test_unknown_unlocated_and_gapped_residues_rejected(shared_dir):
  prot = protein.read_pdb(TESTDATA / "model_output.pdb")
  unknown = dataclasses.replace(prot, aatype=np.where(np.arange(prot.num_res) == 2, 20,
                                                      prot.aatype))
  with pytest.raises(relax.RelaxationError, match=r"model_output\.pdb: residue A:3 .*UNK"):
    relax.AmberRelaxation().process(unknown)
  mask = prot.atom_mask.copy()
  mask[1] = 0.0
  with pytest.raises(relax.RelaxationError, match=r"residue A:2 has no atom coordinates"):
    relax.AmberRelaxation().process(dataclasses.replace(prot, atom_mask=mask))
  renumbered = prot.residue_index + (np.arange(prot.num_res) >= 3) * 10
  with pytest.raises(relax.RelaxationError, match=r"chain gap between residues A:3 and A:14"):
    relax.AmberRelaxation().process(dataclasses.replace(prot, residue_index=renumbered))
  # Separate chains may be numbered as they like.
  two_chains = dataclasses.replace(prot, residue_index=renumbered, chain_names=("A", "B"),
                                   chain_index=(np.arange(prot.num_res) >= 3).astype(np.int32))
  result = relax.AmberRelaxation(max_iterations=20).process(two_chains)
  assert [key[:2] for key in _atoms(result.pdb_string)] == [
      ("A", "1"), ("A", "2"), ("A", "3"), ("B", "14"), ("B", "15")]


def test_invalid_settings_rejected():
  with pytest.raises(ValueError, match="max_outer_iterations"):
    relax.AmberRelaxation(max_outer_iterations=0)
  with pytest.raises(ValueError, match="tolerance"):
    relax.AmberRelaxation(tolerance=0.0)
