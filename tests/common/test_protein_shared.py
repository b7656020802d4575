"""Structure I/O on every structure of ../shared/data: all parse, and agree with Biopython."""

import gzip
import io

import numpy as np
import pytest
from Bio.PDB import MMCIFParser, PDBParser
from Bio.PDB.MMCIF2Dict import MMCIF2Dict

from af2flax.common import protein
from af2flax.common import residue_constants as rc
from tests.conftest import SHARED_DATA

INVALID = {"1YJP_invalid.cif.gz"}


def _structures():
  if not SHARED_DATA.is_dir():
    return []
  folders = ["openfold_testdata/mmcifs", "mmcif_misc", "pdb_chains", "alphafold_testdata"]
  return sorted(p for folder in folders for p in (SHARED_DATA / folder).iterdir()
                if p.name not in INVALID)


STRUCTURES = _structures()
MMCIFS = [p for p in STRUCTURES if ".cif" in p.name]
pytestmark = pytest.mark.skipif(not STRUCTURES, reason=f"{SHARED_DATA} not present")


def _text(path):
  data = path.read_bytes()
  return (gzip.decompress(data) if data[:2] == b"\x1f\x8b" else data).decode()


@pytest.mark.parametrize("path", STRUCTURES, ids=lambda p: p.name)
def test_every_shared_structure_parses(path):
  prot = protein.read_structure(path)
  assert prot.num_res > 0
  observed = prot.atom_mask.max(axis=1) > 0
  assert observed.sum() > 0
  assert np.isfinite(prot.atom_positions).all()
  np.testing.assert_array_equal(prot.atom_positions[prot.atom_mask == 0], 0.0)
  # Every residue with coordinates has a CA (no fragment of a ligand slipped in).
  assert prot.atom_mask[observed, rc.atom_order["CA"]].mean() > 0.98
  for name in prot.seqres:
    assert len(prot.seqres[name]) == prot.chain(name).num_res or ".pdb" in path.name


def test_invalid_shared_mmcif_raises():
  path = SHARED_DATA / "mmcif_misc" / "1YJP_invalid.cif.gz"
  with pytest.raises(protein.StructureParseError, match="1YJP_invalid"):
    protein.read_structure(path)


def _biopython_residue(chain, number, icode):
  for residue in chain:
    if residue.id[1] == number and residue.id[2].strip() == icode:
      return residue
  raise AssertionError(f"Biopython has no residue {number}{icode} in chain {chain.id}")


@pytest.mark.parametrize("path", MMCIFS, ids=lambda p: p.name)
def test_mmcif_atoms_match_biopython_structure(path):
  """Observed residues and their atoms equal Biopython's first model (highest-occupancy
  alternate locations, MSE selenium in SD), residue by (author number, insertion code)."""
  prot = protein.read_structure(path, fix_arginine=False)
  model = next(MMCIFParser(QUIET=True).get_structure("x", io.StringIO(_text(path))).get_models())
  checked = 0
  for i in np.nonzero(prot.atom_mask.max(axis=1) > 0)[0]:
    chain = model[prot.chain_names[prot.chain_index[i]]]
    residue = _biopython_residue(chain, prot.residue_index[i], prot.insertion_code[i])
    if residue.is_disordered() == 2:  # Point mutation: Biopython's choice may differ.
      continue
    atoms = {("SD" if a.get_id() == "SE" and residue.get_resname() == "MSE" else a.get_id()): a
             for a in residue}
    for k in np.nonzero(prot.atom_mask[i])[0]:
      np.testing.assert_allclose(prot.atom_positions[i, k], atoms[rc.atom_types[k]].coord, atol=1e-6)
      assert prot.b_factors[i, k] == pytest.approx(atoms[rc.atom_types[k]].bfactor, abs=1e-4)
      checked += 1
    expected = {name for name in atoms if name in rc.atom_order and rc.STANDARD_ATOM_MASK[
        prot.aatype[i], rc.atom_order[name]]}
    assert expected <= {rc.atom_types[k] for k in np.nonzero(prot.atom_mask[i])[0]}
  assert checked > 0


def test_nmr_mmcif_reads_first_model_only():
  path = SHARED_DATA / "openfold_testdata" / "mmcifs" / "2crb.cif"
  tables = MMCIF2Dict(str(path))
  assert len(set(tables["_atom_site.pdbx_PDB_model_num"])) > 1
  prot = protein.read_structure(path)
  assert prot.resolution is None and prot.structure_method == "solution nmr"
  ca = {int(tables["_atom_site.label_seq_id"][row]) - 1: [float(tables[f"_atom_site.Cartn_{a}"][row]) for a in "xyz"]
        for row in range(len(tables["_atom_site.id"]))
        if tables["_atom_site.pdbx_PDB_model_num"][row] == "1" and tables["_atom_site.label_atom_id"][row] == "CA"}
  assert len(ca) == prot.num_res
  for index, xyz in ca.items():
    np.testing.assert_allclose(prot.atom_positions[index, rc.atom_order["CA"]], xyz, atol=1e-6)


def test_insertion_codes_in_real_mmcif():
  prot = protein.read_structure(SHARED_DATA / "mmcif_misc" / "1BD2.cif.gz")
  inserted = np.nonzero(prot.insertion_code != "")[0]
  assert len(inserted) > 0
  for i in inserted:  # An inserted residue follows one with the same number.
    assert prot.residue_index[i - 1] == prot.residue_index[i]
    assert prot.chain_index[i - 1] == prot.chain_index[i]
  keys = list(zip(prot.chain_index, prot.residue_index, prot.insertion_code))
  assert len(set(keys)) == len(keys)


def test_pdb_header_missing_residues_and_mse():
  """2rbg: REMARK 465 lists MSE 1 and PRO 2 of both chains; MSE is read as MET."""
  prot = protein.read_structure(SHARED_DATA / "alphafold_testdata" / "2rbg.pdb")
  assert prot.resolution == 1.75 and prot.release_date == "2008-09-30"
  assert prot.structure_method == "x-ray diffraction"
  for name in ("A", "B"):
    chain = prot.chain(name)
    np.testing.assert_array_equal(chain.residue_index[:3], [1, 2, 3])
    np.testing.assert_array_equal(chain.atom_mask[:2].max(axis=1), [0, 0])
    assert chain.sequence[:2] == "MP"
    assert chain.seqres[name] == chain.sequence
  met = prot.aatype == rc.restype_order["M"]
  observed_met = met & (prot.atom_mask.max(axis=1) > 0)
  assert observed_met.sum() >= 2 and prot.atom_mask[observed_met, rc.atom_order["SD"]].all()


def test_pdb_files_match_biopython_pdbparser():
  for path in [SHARED_DATA / "alphafold_testdata" / name for name in ("5nmu.pdb", "glucagon.pdb")]:
    prot = protein.read_structure(path, fix_arginine=False)
    model = next(PDBParser(QUIET=True).get_structure("x", str(path)).get_models())
    residues = [(c.id, r) for c in model for r in c if r.id[0] == " "]
    assert len(residues) == prot.num_res
    for i, (chain_id, residue) in enumerate(residues):
      assert prot.chain_id[i] == chain_id and prot.residue_index[i] == residue.id[1]
      np.testing.assert_allclose(prot.atom_positions[i, 1], residue["CA"].coord, atol=1e-6)
