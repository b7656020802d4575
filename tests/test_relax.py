"""`python -m af2flax.relax`: writes a relaxed PDB that our reader and Biopython parse back,
and fails with a message naming the file on bad input."""

import json
import os
import subprocess
import sys

import numpy as np
from Bio.PDB import PDBParser

from af2flax.common import protein
from af2flax.common import residue_constants
from tests.conftest import REPO_ROOT, SHARED_DATA

MODEL = SHARED_DATA / "alphafold_testdata" / "model_output.pdb"


def _run_cli(*args):
  env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), JAX_PLATFORMS="cpu")
  return subprocess.run([sys.executable, "-m", "af2flax.relax", *args], cwd=REPO_ROOT, env=env,
                        capture_output=True, text=True, timeout=300)


def test_cli_relaxes_and_writes_parsable_outputs(shared_dir, tmp_path):
  out, report = tmp_path / "out" / "relaxed.pdb", tmp_path / "relaxed.json"
  run = _run_cli("--in", str(MODEL), "--out", str(out), "--report", str(report))
  assert run.returncode == 0, run.stderr
  assert "violations after:  0/5 residues" in run.stdout

  relaxed, original = protein.read_pdb(out), protein.read_pdb(MODEL)
  np.testing.assert_array_equal(relaxed.aatype, original.aatype)
  ca = residue_constants.atom_order["CA"]
  np.testing.assert_allclose(relaxed.b_factors[:, ca], original.b_factors[:, ca], atol=0.005)
  shift = relaxed.atom_positions[:, ca] - original.atom_positions[:, ca]
  assert 0.0 < np.sqrt(np.mean(np.sum(shift**2, -1))) < 0.5

  structure = PDBParser(QUIET=True).get_structure("relaxed", str(out))
  atoms = list(structure.get_atoms())
  assert len(list(structure.get_residues())) == original.num_res
  assert any(atom.element == "H" for atom in atoms)

  summary = json.loads(report.read_text())
  assert summary["violations_after"]["violating_residues"] == 0
  assert summary["final_energy_kcal_mol"] < summary["initial_energy_kcal_mol"]
  assert 0.0 < summary["heavy_atom_rmsd_angstrom"] < 0.5


def test_cli_bad_input_exits_with_the_file_named(tmp_path):
  bad = tmp_path / "not_a_structure.pdb"
  bad.write_text("this is not a PDB file\n")
  run = _run_cli("--in", str(bad), "--out", str(tmp_path / "out.pdb"))
  assert run.returncode == 1
  assert f"{bad}: no protein residues" in run.stderr
  assert not (tmp_path / "out.pdb").exists()
  missing = _run_cli("--in", str(tmp_path / "missing.pdb"), "--out", str(tmp_path / "o.pdb"))
  assert missing.returncode == 1 and "missing.pdb: cannot read the file" in missing.stderr
