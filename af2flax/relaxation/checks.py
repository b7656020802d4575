"""Structure checks around relaxation: atom14 extraction, violation report, heavy-atom RMSD.

The violation report uses AlphaFold's definitions (Jumper et al. (2021) Suppl. 1.9.11 and
`find_structural_violations`, evaluated with the violation-loss settings of the model config:
12 standard deviations of bond-length/angle tolerance, 1.5 Å clash overlap tolerance):
a residue is violating when its peptide bond or angles to a neighbour are off, when one of
its heavy atoms clashes with an atom of another residue, or when a pair of its own atoms is
outside the bounds of `residue_constants.make_atom14_dists_bounds`.
"""

from __future__ import annotations

import dataclasses
import io

import jax
import ml_collections
import numpy as np
from openmm import app as openmm_app
from openmm import unit

from af2flax.common import residue_constants
from af2flax.geometry import all_atom
from af2flax.losses import violations as violation_terms

# AlphaFold's model config (`structure_module.violation_tolerance_factor` and
# `clash_overlap_tolerance`), which its relaxation also uses to decide when to stop.
VIOLATION_TOLERANCE_FACTOR = 12.0
CLASH_OVERLAP_TOLERANCE = 1.5
# A new chain starts this far along `residue_index`, so chains never count as bonded.
CHAIN_RESIDUE_INDEX_OFFSET = 100_000


@dataclasses.dataclass(frozen=True)
class Atom14Structure:
  """Heavy atoms of a protein in AlphaFold's atom14 layout."""
  aatype: np.ndarray           # [N_res] int32
  positions: np.ndarray        # [N_res, 14, 3] Å
  atom_mask: np.ndarray        # [N_res, 14] float32, 1 where the atom is present
  residue_index: np.ndarray    # [N_res] int32, chain breaks made non-consecutive
  residue_labels: tuple[str, ...]  # 'chain:number:name', for messages

  @property
  def num_residues(self) -> int:
    return int(self.aatype.shape[0])


def atom14_from_topology(topology: openmm_app.Topology, positions: unit.Quantity,
                         source: str = "structure") -> Atom14Structure:
  """Gathers the heavy atoms of an OpenMM topology into atom14 arrays.

  Hydrogens and the terminal OXT (not part of atom14) are skipped. Raises ValueError naming
  `source` and the residue for a residue that is not one of the 20 standard amino acids.
  """
  xyz = np.asarray(positions.value_in_unit(unit.angstrom))
  residues = list(topology.residues())
  aatype = np.zeros([len(residues)], np.int32)
  atom14 = np.zeros([len(residues), 14, 3], np.float32)
  mask = np.zeros([len(residues), 14], np.float32)
  residue_index = np.zeros([len(residues)], np.int32)
  labels = []
  for row, residue in enumerate(residues):
    label = f"{residue.chain.id}:{residue.id}{residue.insertionCode.strip()}:{residue.name}"
    labels.append(label)
    one_letter = residue_constants.restype_3to1.get(residue.name)
    if one_letter is None:
      raise ValueError(f"{source}: residue {label} is not a standard amino acid")
    aatype[row] = residue_constants.restype_order[one_letter]
    names = residue_constants.restype_name_to_atom14_names[residue.name]
    for atom in residue.atoms():
      if atom.name in names and atom.name:
        slot = names.index(atom.name)
        atom14[row, slot] = xyz[atom.index]
        mask[row, slot] = 1.0
    try:
      number = int(residue.id)
    except ValueError as error:
      raise ValueError(f"{source}: residue {label} has a non-numeric id") from error
    residue_index[row] = number + CHAIN_RESIDUE_INDEX_OFFSET * residue.chain.index
  return Atom14Structure(aatype, atom14, mask, residue_index, tuple(labels))


def atom14_from_pdb_string(pdb_string: str, source: str = "structure") -> Atom14Structure:
  """`atom14_from_topology` of a PDB string (first model)."""
  pdb = openmm_app.PDBFile(io.StringIO(pdb_string))
  return atom14_from_topology(pdb.topology, pdb.positions, source)


def heavy_atom_rmsd(reference_pdb: str, moved_pdb: str) -> tuple[float, int]:
  """RMSD (Å, no superposition) over heavy atoms present in both; returns (rmsd, count).

  Atoms are matched by chain, residue id, insertion code and atom name.
  """
  def heavy_atoms(pdb_string: str) -> dict[tuple[str, ...], np.ndarray]:
    pdb = openmm_app.PDBFile(io.StringIO(pdb_string))
    xyz = pdb.getPositions(asNumpy=True).value_in_unit(unit.angstrom)
    return {(a.residue.chain.id, a.residue.id, a.residue.insertionCode, a.name): xyz[a.index]
            for a in pdb.topology.atoms() if a.element is not None and a.element.symbol != "H"}
  reference = heavy_atoms(reference_pdb)
  moved = heavy_atoms(moved_pdb)
  common = sorted(reference.keys() & moved.keys())
  if not common:
    raise ValueError("the two structures share no heavy atoms")
  deltas = np.stack([reference[key] - moved[key] for key in common])
  return float(np.sqrt(np.mean(np.sum(deltas**2, axis=-1)))), len(common)


@dataclasses.dataclass(frozen=True)
class ViolationReport:
  """Per-residue violation masks and AlphaFold's violation metrics for one structure."""
  per_residue: np.ndarray             # [N_res] bool: any violation (AF's total mask)
  between_residue_bond: np.ndarray    # [N_res] bool: peptide C-N length or CA-C-N/C-N-CA angle
  between_residue_clash: np.ndarray   # [N_res] bool: heavy-atom overlap with another residue
  within_residue: np.ndarray          # [N_res] bool: intra-residue bond, angle or clash
  clashing_atoms: np.ndarray          # [N_res, 14] bool: atoms in a between-residue clash
  extreme_ca_ca_fraction: float       # consecutive CA pairs > 3.8 + 1.5 Å apart

  @property
  def num_violating_residues(self) -> int:
    return int(self.per_residue.sum())

  def summary(self) -> dict[str, float | int]:
    """Counts and fractions of residues per kind, named after AlphaFold's metrics."""
    num = max(int(self.per_residue.shape[0]), 1)
    counts = {"residues": int(self.per_residue.shape[0]),
              "violating_residues": self.num_violating_residues,
              "between_residue_bond": int(self.between_residue_bond.sum()),
              "between_residue_clash": int(self.between_residue_clash.sum()),
              "within_residue": int(self.within_residue.sum())}
    fractions = {"violations_per_residue": self.num_violating_residues / num,
                 "violations_between_residue_bond": counts["between_residue_bond"] / num,
                 "violations_between_residue_clash": counts["between_residue_clash"] / num,
                 "violations_within_residue": counts["within_residue"] / num,
                 "violations_extreme_ca_ca_distance": self.extreme_ca_ca_fraction}
    return {**counts, **fractions}


@jax.jit
def _violations_and_metrics(batch: dict[str, jax.Array], atom14_positions: jax.Array
                            ) -> tuple[dict, dict]:
  # One compiled program per protein length: op-by-op dispatch costs seconds per call.
  config = ml_collections.ConfigDict({"violation_tolerance_factor": VIOLATION_TOLERANCE_FACTOR,
                                      "clash_overlap_tolerance": CLASH_OVERLAP_TOLERANCE})
  violations = violation_terms.find_structural_violations(batch, atom14_positions, config)
  metrics = violation_terms.compute_violation_metrics(batch, atom14_positions, violations)
  return violations, metrics


def find_violations(structure: Atom14Structure) -> ViolationReport:
  """AlphaFold's structural violations of a structure (Suppl. 1.9.11), as relax uses them.

  Evaluated with `losses.violations.find_structural_violations` at the model config's
  tolerances. Only atoms present are checked (AlphaFold's relax assumes complete residues
  and uses the ideal atom mask; for complete residues the two agree).
  """
  batch = {
      "aatype": structure.aatype,
      "residue_index": structure.residue_index,
      "atom14_atom_exists": structure.atom_mask,
      "residx_atom14_to_atom37": all_atom.RESTYPE_ATOM14_TO_ATOM37[structure.aatype],
      "seq_mask": np.ones([structure.num_residues], np.float32),
  }
  # Small arrays: keep them on the host CPU even when an accelerator is present.
  with jax.default_device(jax.local_devices(backend="cpu")[0]):
    violations, metrics = _violations_and_metrics(batch, structure.positions)
  between = violations["between_residues"]
  return ViolationReport(
      per_residue=np.asarray(violations["total_per_residue_violations_mask"]) > 0,
      between_residue_bond=np.asarray(between["connections_per_residue_violation_mask"]) > 0,
      between_residue_clash=np.asarray(between["clashes_per_atom_clash_mask"]).max(-1) > 0,
      clashing_atoms=np.asarray(between["clashes_per_atom_clash_mask"]) > 0,
      within_residue=np.asarray(violations["within_residues"]["per_atom_violations"]).max(-1) > 0,
      extreme_ca_ca_fraction=float(metrics["violations_extreme_ca_ca_distance"]))
