"""Restrained energy minimisation with OpenMM and the Amber99sb force field.

Jumper et al. (2021) Suppl. 1.8.6 "Amber relaxation": the cleaned, protonated structure is
minimised with L-BFGS under Amber99sb (`amber99sb.xml`, bonds to hydrogen constrained,
no solvent) plus harmonic restraints `0.5 k |x - x0|^2` that hold every heavy atom near its
starting position (k = 10 kcal/mol/Å²). Residues named in `exclude_residues` (those that
still had violations in an earlier round) are left unrestrained.

Units at this boundary are AlphaFold's: kcal/mol for energies, Å for positions and restraint
lengths, and kcal/mol/nm for the minimiser's tolerance. The tolerance of OpenMM's
`minimizeEnergy` is a force: minimisation stops once the root-mean-square force component
falls below it; AlphaFold's 2.39 kcal/mol/nm is OpenMM's default of 10 kJ/mol/nm.
"""

from __future__ import annotations

import dataclasses
import io
import logging
import time
from typing import Collection

import numpy as np
import openmm
from openmm import app as openmm_app
from openmm import unit

ENERGY = unit.kilocalories_per_mole
LENGTH = unit.angstroms
FORCE_FIELD = "amber99sb.xml"
RESTRAINT_SETS = ("non_hydrogen", "c_alpha")

logger = logging.getLogger(__name__)


class MinimizationError(RuntimeError):
  """OpenMM could not set up or finish the minimisation."""


@dataclasses.dataclass(frozen=True)
class MinimizationResult:
  """One restrained minimisation. Positions cover every atom, hydrogens included."""
  initial_energy: float               # kcal/mol, force field + restraints
  final_energy: float                 # kcal/mol
  initial_positions: np.ndarray       # [num_atoms, 3] Å
  final_positions: np.ndarray         # [num_atoms, 3] Å
  pdb_string: str                     # minimised structure, chain and residue ids kept
  topology: openmm_app.Topology       # of `pdb_string`
  num_restrained: int                 # atoms held by the position restraint
  attempts: int
  seconds: float


def select_platform(use_gpu: bool) -> openmm.Platform:
  """OpenMM's CPU platform, or CUDA when `use_gpu` (an error naming what exists if absent)."""
  name = "CUDA" if use_gpu else "CPU"
  available = [openmm.Platform.getPlatform(i).getName()
               for i in range(openmm.Platform.getNumPlatforms())]
  if name not in available:
    hint = (" Install OpenMM's CUDA plugin (pip install openmm[cuda12]) or relax on the CPU."
            if use_gpu else "")
    raise MinimizationError(
        f"OpenMM platform {name} is not available (available: {', '.join(available)}).{hint}")
  return openmm.Platform.getPlatformByName(name)


def will_restrain(atom: openmm_app.topology.Atom, restraint_set: str) -> bool:
  """Whether `atom` belongs to the restrained set ('non_hydrogen' or 'c_alpha')."""
  if restraint_set == "non_hydrogen":
    return atom.element is not None and atom.element.symbol != "H"
  if restraint_set == "c_alpha":
    return atom.name == "CA"
  raise ValueError(f"restraint_set must be one of {RESTRAINT_SETS}, got {restraint_set!r}")


def add_position_restraints(system: openmm.System, topology: openmm_app.Topology,
                            reference_positions: np.ndarray, stiffness: float,
                            restraint_set: str, exclude_residues: Collection[int]) -> int:
  """Adds `0.5 k |x - x0|^2` on the restrained atoms; returns how many atoms it holds.

  Args:
    reference_positions: [num_atoms, 3] x0, Å.
    stiffness: k in kcal/mol/Å².
    exclude_residues: zero-based residue indices (topology order) left unrestrained.
  """
  force = openmm.CustomExternalForce("0.5 * k * ((x-x0)^2 + (y-y0)^2 + (z-z0)^2)")
  stiffness_md = (stiffness * ENERGY / LENGTH**2).value_in_unit_system(unit.md_unit_system)
  force.addGlobalParameter("k", stiffness_md)
  for name in ("x0", "y0", "z0"):
    force.addPerParticleParameter(name)
  reference_nm = np.asarray(reference_positions, np.float64) * (LENGTH / unit.nanometer)
  excluded = set(exclude_residues)
  for atom in topology.atoms():
    if atom.residue.index in excluded or not will_restrain(atom, restraint_set):
      continue
    force.addParticle(atom.index, list(reference_nm[atom.index]))
  system.addForce(force)
  return force.getNumParticles()


def _pdb_string(topology: openmm_app.Topology, positions: unit.Quantity) -> str:
  handle = io.StringIO()
  openmm_app.PDBFile.writeFile(topology, positions, handle, keepIds=True)
  return handle.getvalue()


def _minimize_once(positions: np.ndarray, system_xml: str, max_iterations: int,
                   tolerance: float, platform: openmm.Platform) -> tuple[float, float, np.ndarray]:
  """Builds a fresh context and minimises; returns initial, final energy and final positions."""
  system = openmm.XmlSerializer.deserialize(system_xml)
  # Temperature 0 and no stepping: the integrator only exists because a Context needs one.
  integrator = openmm.LangevinIntegrator(0.0, 0.01, 0.0)
  context = openmm.Context(system, integrator, platform)
  context.setPositions(positions * LENGTH)
  initial = context.getState(getEnergy=True).getPotentialEnergy().value_in_unit(ENERGY)
  openmm.LocalEnergyMinimizer.minimize(
      context, (tolerance * ENERGY / unit.nanometer).value_in_unit_system(unit.md_unit_system),
      max_iterations)
  state = context.getState(getEnergy=True, getPositions=True)
  final = state.getPotentialEnergy().value_in_unit(ENERGY)
  positions = state.getPositions(asNumpy=True).value_in_unit(LENGTH)
  if not (np.isfinite(final) and np.all(np.isfinite(positions))):
    raise MinimizationError(f"minimisation diverged (final energy {final})")
  return initial, final, np.asarray(positions)


def minimize(pdb_string: str, *, stiffness: float = 10.0, tolerance: float = 2.39,
             max_iterations: int = 0, exclude_residues: Collection[int] = (),
             restraint_set: str = "non_hydrogen", use_gpu: bool = False,
             max_attempts: int = 10) -> MinimizationResult:
  """Restrained Amber99sb minimisation of a cleaned, protonated PDB (Suppl. 1.8.6).

  Args:
    pdb_string: output of `cleanup.clean_pdb` (all atoms, hydrogens included).
    stiffness: restraint spring constant, kcal/mol/Å²; 0 switches restraints off.
    tolerance: minimiser tolerance, kcal/mol/nm (root-mean-square force).
    max_iterations: L-BFGS iteration limit; 0 means no limit.
    exclude_residues: zero-based residue indices left unrestrained.
    restraint_set: 'non_hydrogen' (AlphaFold's) or 'c_alpha'.
    use_gpu: run on OpenMM's CUDA platform instead of CPU.
    max_attempts: how many times a failing minimisation (OpenMM error or NaN, which GPU runs
      occasionally hit) is retried before giving up.
  """
  if max_attempts < 1:
    raise ValueError(f"max_attempts must be >= 1, got {max_attempts}")
  platform = select_platform(use_gpu)
  pdb = openmm_app.PDBFile(io.StringIO(pdb_string))
  start_positions = np.asarray(pdb.getPositions(asNumpy=True).value_in_unit(LENGTH))
  # Force-field errors (a residue without template) are deterministic: no retry.
  try:
    system = openmm_app.ForceField(FORCE_FIELD).createSystem(
        pdb.topology, constraints=openmm_app.HBonds)
  except ValueError as error:
    raise MinimizationError(f"{FORCE_FIELD} cannot parameterise the structure: {error}") from error
  num_restrained = 0
  if stiffness > 0:
    num_restrained = add_position_restraints(system, pdb.topology, start_positions, stiffness,
                                             restraint_set, exclude_residues)
  logger.info("Restraining %d / %d atoms.", num_restrained, system.getNumParticles())
  system_xml = openmm.XmlSerializer.serialize(system)

  start = time.perf_counter()
  last_error: Exception | None = None
  for attempt in range(1, max_attempts + 1):
    try:
      initial, final, positions = _minimize_once(start_positions, system_xml, max_iterations,
                                                 tolerance, platform)
      break
    except (openmm.OpenMMException, MinimizationError) as error:
      logger.info("Minimisation attempt %d of %d failed: %s", attempt, max_attempts, error)
      last_error = error
  else:
    raise MinimizationError(f"minimisation failed after {max_attempts} attempts: {last_error}")
  seconds = time.perf_counter() - start

  return MinimizationResult(
      initial_energy=initial, final_energy=final,
      initial_positions=start_positions, final_positions=positions,
      pdb_string=_pdb_string(pdb.topology, positions * LENGTH), topology=pdb.topology,
      num_restrained=num_restrained, attempts=attempt, seconds=seconds)
