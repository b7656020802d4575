"""Restrained Amber99sb minimisation (Suppl. 1.8.6): restraints, energies, platforms, errors."""

import io

import numpy as np
import openmm
import pytest
from openmm import app as openmm_app

from af2flax.relaxation import amber_minimize
from af2flax.relaxation import cleanup
from af2flax.relaxation import relax
from tests.conftest import SHARED_DATA

TESTDATA = SHARED_DATA / "alphafold_testdata"


@pytest.fixture(scope="module")
def cleaned_model(shared_dir) -> str:
  """model_output.pdb (5 residues), hydrogens re-placed by the clean-up."""
  text = relax.strip_hydrogens((TESTDATA / "model_output.pdb").read_text())
  return cleanup.clean_pdb(text)[0]


def _topology(pdb_string):
  return openmm_app.PDBFile(io.StringIO(pdb_string)).topology


def test_restraints_hold_heavy_atoms_except_excluded_residues(cleaned_model):
  topology = _topology(cleaned_model)
  heavy_per_residue = [sum(a.element.symbol != "H" for a in r.atoms()) for r in topology.residues()]
  result = amber_minimize.minimize(cleaned_model)
  assert result.num_restrained == sum(heavy_per_residue)
  excluded = amber_minimize.minimize(cleaned_model, exclude_residues=[1, 3])
  assert excluded.num_restrained == (sum(heavy_per_residue) - heavy_per_residue[1]
                                     - heavy_per_residue[3])
  c_alpha = amber_minimize.minimize(cleaned_model, restraint_set="c_alpha")
  assert c_alpha.num_restrained == len(heavy_per_residue)
  assert amber_minimize.minimize(cleaned_model, stiffness=0.0).num_restrained == 0


def test_minimisation_lowers_energy_and_restraints_limit_motion(cleaned_model):
  restrained = amber_minimize.minimize(cleaned_model, stiffness=10.0)
  free = amber_minimize.minimize(cleaned_model, stiffness=0.0)
  for result in (restrained, free):
    assert result.final_energy < result.initial_energy
    assert result.final_positions.shape == result.initial_positions.shape
    assert np.all(np.isfinite(result.final_positions))
  heavy = np.array([a.element.symbol != "H" for a in _topology(cleaned_model).atoms()])
  def heavy_rmsd(result):
    delta = result.final_positions[heavy] - result.initial_positions[heavy]
    return np.sqrt(np.mean(np.sum(delta**2, -1)))
  assert 0.0 < heavy_rmsd(restrained) < 0.5
  assert heavy_rmsd(restrained) < heavy_rmsd(free)


def test_pdb_output_keeps_ids_and_atoms(cleaned_model):
  result = amber_minimize.minimize(cleaned_model, max_iterations=5)
  def residues(pdb_string):
    return [(r.chain.id, r.id, r.name, len(list(r.atoms())))
            for r in _topology(pdb_string).residues()]
  assert residues(result.pdb_string) == residues(cleaned_model)


def test_cuda_request_without_cuda_names_the_platforms():
  names = [openmm.Platform.getPlatform(i).getName()
           for i in range(openmm.Platform.getNumPlatforms())]
  if "CUDA" in names:
    assert amber_minimize.select_platform(True).getName() == "CUDA"
    return
  with pytest.raises(amber_minimize.MinimizationError, match="CUDA is not available.*CPU"):
    amber_minimize.select_platform(True)
  assert amber_minimize.select_platform(False).getName() == "CPU"


def test_structure_without_hydrogens_fails_with_a_force_field_message(shared_dir):
  # Amber templates need the hydrogens the clean-up adds: an uncleaned model cannot be set up.
  bare = relax.strip_hydrogens((TESTDATA / "model_output.pdb").read_text())
  with pytest.raises(amber_minimize.MinimizationError, match="amber99sb.xml cannot parameterise"):
    amber_minimize.minimize(bare)


def test_invalid_arguments_rejected(cleaned_model):
  with pytest.raises(ValueError, match="restraint_set"):
    amber_minimize.minimize(cleaned_model, restraint_set="backbone")
  with pytest.raises(ValueError, match="max_attempts"):
    amber_minimize.minimize(cleaned_model, max_attempts=0)
