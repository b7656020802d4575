"""AlphaFold's iterative, violation-informed Amber relaxation.

Jumper et al. (2021) Suppl. 1.8.6 "Amber relaxation": a predicted structure is cleaned and
protonated, then minimised under Amber99sb with its heavy atoms restrained to where they
started. After each round the structure is checked for violations (Suppl. 1.9.11); residues
that still violate are freed from their restraints and the round is repeated, until no
violations remain or `max_outer_iterations` rounds have run. Hydrogens are placed afresh
before every round. The relaxed structure keeps the input's chain and residue ids, and its
B-factor column carries each residue's input B-factor (pLDDT for predictions).
"""

from __future__ import annotations

import dataclasses
import io
import logging
import os
import time
from typing import Sequence

import numpy as np
from openmm import app as openmm_app
from openmm import unit

from af2flax.common import protein
from af2flax.common import residue_constants
from af2flax.relaxation import amber_minimize
from af2flax.relaxation import checks
from af2flax.relaxation import cleanup

logger = logging.getLogger(__name__)

# AlphaFold's settings in `run_alphafold.py` (RELAX_*).
DEFAULT_MAX_ITERATIONS = 0           # L-BFGS steps per round; 0 = until converged
DEFAULT_TOLERANCE = 2.39             # kcal/mol/nm
DEFAULT_STIFFNESS = 10.0             # kcal/mol/Å²
DEFAULT_MAX_OUTER_ITERATIONS = 3


class RelaxationError(ValueError):
  """The structure cannot be relaxed; the message names the input and the problem."""


@dataclasses.dataclass(frozen=True)
class RoundSummary:
  """One outer round: restrained minimisation, then a violation check."""
  initial_energy: float          # kcal/mol, force field + restraints
  final_energy: float            # kcal/mol
  num_restrained: int
  num_excluded_residues: int
  num_violating_residues: int
  seconds: float


@dataclasses.dataclass(frozen=True)
class RelaxResult:
  """The relaxed structure and what happened on the way."""
  pdb_string: str                       # all atoms incl. hydrogens, B-factors from the input
  violations_before: checks.ViolationReport
  violations_after: checks.ViolationReport
  heavy_atom_rmsd: float                # Å, input vs relaxed, no superposition
  rounds: tuple[RoundSummary, ...]
  cleanup: cleanup.CleanupReport
  seconds: float

  @property
  def initial_energy(self) -> float:
    return self.rounds[0].initial_energy

  @property
  def final_energy(self) -> float:
    return self.rounds[-1].final_energy

  def to_protein(self) -> protein.Protein:
    """The relaxed heavy atoms as a Protein (hydrogens dropped, B-factors kept)."""
    return protein.from_pdb_string(self.pdb_string, source="relaxed structure")

  def summary(self) -> dict[str, object]:
    """Plain numbers for logs and JSON files."""
    return {
        "violations_before": self.violations_before.summary(),
        "violations_after": self.violations_after.summary(),
        "initial_energy_kcal_mol": self.initial_energy,
        "final_energy_kcal_mol": self.final_energy,
        "heavy_atom_rmsd_angstrom": self.heavy_atom_rmsd,
        "rounds": [dataclasses.asdict(summary) for summary in self.rounds],
        "seconds": self.seconds,
    }


def strip_hydrogens(pdb_string: str) -> str:
  """The same PDB without hydrogen atoms (ids kept)."""
  pdb = openmm_app.PDBFile(io.StringIO(pdb_string))
  modeller = openmm_app.Modeller(pdb.topology, pdb.positions)
  modeller.delete([atom for atom in modeller.topology.atoms()
                   if atom.element is not None and atom.element.symbol == "H"])
  handle = io.StringIO()
  openmm_app.PDBFile.writeFile(modeller.topology, modeller.positions, handle, keepIds=True)
  return handle.getvalue()


def set_b_factors(pdb_string: str, b_factors: dict[tuple[str, str], float]) -> str:
  """Writes each residue's B-factor into columns 61-66 of its ATOM/HETATM records.

  Args:
    b_factors: (chain id, residue number + insertion code) -> B-factor; residues missing
      from it keep 0.
  """
  lines = []
  for line in pdb_string.splitlines():
    if line.startswith(("ATOM  ", "HETATM")):
      key = (line[21], line[22:27].strip())
      line = f"{line[:60].ljust(60)}{b_factors.get(key, 0.0):6.2f}{line[66:]}"
    lines.append(line)
  return "\n".join(lines) + "\n"


def residue_b_factors(prot: protein.Protein) -> dict[tuple[str, str], float]:
  """Each residue's B-factor (its CA's, as AlphaFold takes it), keyed like `set_b_factors`."""
  ca = residue_constants.atom_order["CA"]
  values = {}
  for i in range(prot.num_res):
    present = np.flatnonzero(prot.atom_mask[i] > 0.5)
    column = ca if prot.atom_mask[i, ca] > 0.5 or present.size == 0 else present[0]
    key = (prot.chain_names[prot.chain_index[i]],
           f"{prot.residue_index[i]}{prot.insertion_code[i]}")
    values[key] = float(prot.b_factors[i, column])
  return values


@dataclasses.dataclass
class AmberRelaxation:
  """Jumper et al. (2021) Suppl. 1.8.6 "Amber relaxation", iterated as AlphaFold does.

  Attributes:
    max_iterations: L-BFGS iteration limit per round; 0 means no limit.
    tolerance: minimiser tolerance, kcal/mol/nm (RMS force; OpenMM's default).
    stiffness: heavy-atom restraint spring constant, kcal/mol/Å².
    exclude_residues: zero-based residue indices never restrained.
    max_outer_iterations: most rounds; relaxation stops earlier once nothing violates.
    use_gpu: minimise on OpenMM's CUDA platform instead of the CPU.
    max_attempts: retries of a failing minimisation within one round.
  """
  max_iterations: int = DEFAULT_MAX_ITERATIONS
  tolerance: float = DEFAULT_TOLERANCE
  stiffness: float = DEFAULT_STIFFNESS
  exclude_residues: Sequence[int] = ()
  max_outer_iterations: int = DEFAULT_MAX_OUTER_ITERATIONS
  use_gpu: bool = False
  max_attempts: int = 10

  def __post_init__(self):
    if self.max_outer_iterations < 1:
      raise ValueError(f"max_outer_iterations must be >= 1, got {self.max_outer_iterations}")
    if self.max_iterations < 0 or self.stiffness < 0 or self.tolerance <= 0:
      raise ValueError("max_iterations and stiffness must be >= 0 and tolerance > 0")

  def process(self, prot: protein.Protein) -> RelaxResult:
    """Relaxes a protein (a prediction: pLDDT in `b_factors`); see `RelaxResult`.

    Raises RelaxationError, naming `prot.source`, for a protein Amber cannot take: no
    residues, an unknown residue type (UNK), a residue without atoms, a gap in a chain's
    residue numbering, a chain id longer than PDB's one character.
    """
    source = prot.source or "<protein>"
    if prot.num_res == 0:
      raise RelaxationError(f"{source}: no protein residues to relax")
    labels = [f"{prot.chain_names[c]}:{r}{i}" for c, r, i in
              zip(prot.chain_index, prot.residue_index, prot.insertion_code)]
    unknown = np.flatnonzero(prot.aatype >= residue_constants.restype_num)
    if unknown.size:
      raise RelaxationError(
          f"{source}: residue {labels[unknown[0]]} is of unknown type (UNK); Amber has no "
          f"template for it, relaxation needs the 20 standard amino acids")
    empty = np.flatnonzero(prot.atom_mask.max(axis=-1) < 0.5)
    if empty.size:
      raise RelaxationError(
          f"{source}: residue {labels[empty[0]]} has no atom coordinates (unobserved); "
          f"relaxation needs every residue located, as AlphaFold's does")
    # OpenMM bonds consecutive residues of a chain whatever their distance, so a numbering gap
    # would be pulled shut by a stretched peptide bond.
    same_chain = prot.chain_index[1:] == prot.chain_index[:-1]
    step = np.diff(prot.residue_index)
    inserted = prot.insertion_code[1:] != ""
    gaps = np.flatnonzero(same_chain & ~((step == 1) | ((step == 0) & inserted)))
    if gaps.size:
      raise RelaxationError(
          f"{source}: chain gap between residues {labels[gaps[0]]} and {labels[gaps[0] + 1]}; "
          f"OpenMM would bond across it. Relax complete chains (split a chain at its gaps)")
    try:
      pdb_string = protein.to_pdb(prot)
    except ValueError as error:
      raise RelaxationError(f"{source}: cannot be written as PDB for OpenMM: {error}") from error
    return self._relax(pdb_string, residue_b_factors(prot), source)

  def relax_pdb_string(self, pdb_string: str, source: str = "<string>") -> RelaxResult:
    """Reads a PDB string with `protein.from_pdb_string` (all protein chains) and relaxes it."""
    try:
      prot = protein.from_pdb_string(pdb_string, source=source)
    except protein.StructureParseError as error:
      raise RelaxationError(str(error)) from error
    return self.process(prot)

  def relax_file(self, path: str | os.PathLike) -> RelaxResult:
    """Reads a PDB or mmCIF file (gzipped or not; all protein chains) and relaxes it."""
    try:
      prot = protein.read_structure(path)
    except protein.StructureParseError as error:
      raise RelaxationError(str(error)) from error
    return self.process(prot)

  def _relax(self, pdb_string: str, b_factors: dict[tuple[str, str], float],
             source: str) -> RelaxResult:
    """The outer loop on a heavy-atom PDB of standard residues (`protein.to_pdb` output)."""
    start = time.perf_counter()
    pdb = openmm_app.PDBFile(io.StringIO(pdb_string))
    try:
      before = checks.atom14_from_topology(pdb.topology, pdb.positions, source)
    except ValueError as error:
      raise RelaxationError(str(error)) from error
    violations_before = checks.find_violations(before)

    try:
      cleaned, cleanup_report = cleanup.clean_pdb(pdb_string)
    except Exception as error:  # PDBFixer and OpenMM raise bare Exceptions.
      raise RelaxationError(f"{source}: clean-up failed: {error}") from error
    excluded = set(int(i) for i in self.exclude_residues)
    rounds = []
    for _ in range(self.max_outer_iterations):
      round_start = time.perf_counter()
      try:
        minimized = amber_minimize.minimize(
            cleaned, stiffness=self.stiffness, tolerance=self.tolerance,
            max_iterations=self.max_iterations, exclude_residues=excluded,
            use_gpu=self.use_gpu, max_attempts=self.max_attempts)
      except amber_minimize.MinimizationError as error:
        raise RelaxationError(f"{source}: {error}") from error
      relaxed_pdb = minimized.pdb_string
      violations_after = checks.find_violations(checks.atom14_from_topology(
          minimized.topology, minimized.final_positions * unit.angstrom, source))
      violating = np.flatnonzero(violations_after.per_residue)
      rounds.append(RoundSummary(
          initial_energy=minimized.initial_energy, final_energy=minimized.final_energy,
          num_restrained=minimized.num_restrained, num_excluded_residues=len(excluded),
          num_violating_residues=int(violating.size),
          seconds=time.perf_counter() - round_start))
      logger.info("%s: round %d, energy %.1f -> %.1f kcal/mol, %d violating residues, %d "
                  "unrestrained", source, len(rounds), minimized.initial_energy,
                  minimized.final_energy, violating.size, len(excluded))
      if violating.size == 0 or len(rounds) == self.max_outer_iterations:
        break
      excluded |= set(int(i) for i in violating)
      # Fresh hydrogens for the next round, as AlphaFold does (its default).
      cleaned, _ = cleanup.clean_pdb(strip_hydrogens(relaxed_pdb))

    rmsd, _ = checks.heavy_atom_rmsd(pdb_string, relaxed_pdb)
    return RelaxResult(
        pdb_string=set_b_factors(relaxed_pdb, b_factors),
        violations_before=violations_before, violations_after=violations_after,
        heavy_atom_rmsd=rmsd, rounds=tuple(rounds), cleanup=cleanup_report,
        seconds=time.perf_counter() - start)
