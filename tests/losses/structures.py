"""Real structures for loss and metric tests: PDB chains parsed into AlphaFold's atom37 layout."""

from __future__ import annotations

import functools
import gzip

import numpy as np
import pytest

from af2flax.common import residue_constants as rc
from tests.conftest import SHARED_DATA

PDB_CHAINS = SHARED_DATA / "pdb_chains"


@functools.lru_cache(maxsize=None)
def load_chain(name: str = "1ahsA") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(aatype [N], all_atom_positions [N, 37, 3], all_atom_mask [N, 37]) of a PDB chain
  (standard residues with a CA; MSE read as MET)."""
  from Bio.PDB import PDBParser  # Test-only dependency.
  path = PDB_CHAINS / f"{name}.pdb.gz"
  if not path.exists():
    pytest.skip(f"{path} not present")
  with gzip.open(path, "rt") as handle:
    structure = PDBParser(QUIET=True).get_structure(name, handle)
  model = next(iter(structure))
  aatype, positions, masks = [], [], []
  for residue in model.get_residues():
    resname = "MET" if residue.get_resname() == "MSE" else residue.get_resname()
    if resname not in rc.restype_3to1 or "CA" not in residue:
      continue
    pos = np.zeros([37, 3], np.float32)
    mask = np.zeros([37], np.float32)
    for atom in residue:
      name_ = "SD" if (atom.get_id() == "SE" and resname == "MET") else atom.get_id()
      if name_ in rc.atom_order:
        pos[rc.atom_order[name_]] = atom.coord
        mask[rc.atom_order[name_]] = 1.0
    aatype.append(rc.restype_order[rc.restype_3to1[resname]])
    positions.append(pos)
    masks.append(mask)
  return (np.asarray(aatype, np.int32), np.stack(positions), np.stack(masks))
