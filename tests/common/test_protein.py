"""Structure I/O on the bundled samples: conventions, metadata, round trips, bad input."""

import gzip
import io
import json
import pathlib

import numpy as np
import pytest
from Bio.PDB import MMCIFParser, PDBParser
from Bio.PDB.MMCIF2Dict import MMCIF2Dict

from af2flax.common import protein
from af2flax.common import residue_constants as rc
from tests.conftest import SAMPLES

PDB_CHAINS = sorted((SAMPLES / "pdb_chains").glob("*.pdb.gz"))
MMCIF_SAMPLES = [SAMPLES / "mmcif" / "2q2k.cif", SAMPLES / "mmcif" / "1YJP.cif",
                 SAMPLES / "mmcif" / "5PTI.cif.gz", SAMPLES / "query" / "4zey.cif.gz"]
ATOM = rc.atom_order


def pdb_atom_line(serial, name, resname, chain, number, xyz, icode=" ", altloc=" ",
                  occupancy=1.0, b_factor=10.0, record="ATOM", element=None):
  element = element or name[0]
  padded = name if len(name) == 4 else f" {name:<3}"
  return (f"{record:<6}{serial:>5} {padded}{altloc}{resname:>3} {chain}{number:>4}{icode}   "
          f"{xyz[0]:8.3f}{xyz[1]:8.3f}{xyz[2]:8.3f}{occupancy:6.2f}{b_factor:6.2f}          "
          f"{element:>2}  ")


def glycine_lines(start_serial, chain, number, origin, icode=" ", resname="GLY", record="ATOM"):
  names = ("N", "CA", "C", "O")
  offsets = np.asarray([[0, 0, 0], [1.46, 0, 0], [2.0, 1.4, 0], [1.3, 2.4, 0]])
  return [pdb_atom_line(start_serial + k, name, resname, chain, number, origin + offsets[k],
                        icode=icode, record=record) for k, name in enumerate(names)]


def assert_same_arrays(actual: protein.Protein, expected: protein.Protein, b_atol=0.0):
  np.testing.assert_array_equal(actual.aatype, expected.aatype)
  np.testing.assert_array_equal(actual.atom_mask, expected.atom_mask)
  np.testing.assert_allclose(actual.atom_positions, expected.atom_positions, atol=5e-4, rtol=0)
  np.testing.assert_allclose(actual.b_factors * actual.atom_mask,
                             expected.b_factors * expected.atom_mask, atol=b_atol + 1e-6, rtol=0)
  np.testing.assert_array_equal(actual.residue_index, expected.residue_index)
  np.testing.assert_array_equal(actual.insertion_code, expected.insertion_code)
  np.testing.assert_array_equal(actual.chain_index, expected.chain_index)
  assert actual.chain_names == expected.chain_names


# --- Readers ---------------------------------------------------------------------------------

def test_sample_files_exist():
  assert len(PDB_CHAINS) >= 12
  for path in MMCIF_SAMPLES:
    assert path.is_file(), path


def test_pdb_chain_first_atom_and_numbering():
  prot = protein.read_structure(SAMPLES / "pdb_chains" / "1ahsA.pdb.gz")
  first = gzip.decompress((SAMPLES / "pdb_chains" / "1ahsA.pdb.gz").read_bytes()).decode().splitlines()[0]
  assert first.startswith("ATOM      1  N   THR A 126")
  assert prot.chain_names == ("A",) and prot.num_res == 126
  assert prot.sequence[0] == "T" and prot.residue_index[0] == 126
  np.testing.assert_array_equal(prot.residue_index, np.arange(126, 126 + 126))
  np.testing.assert_allclose(prot.atom_positions[0, ATOM["N"]], [45.850, 10.934, 17.530])
  assert prot.atom_positions.dtype == np.float32 and prot.aatype.dtype == np.int32
  # Every residue has its backbone and no atom outside its residue type's heavy atoms.
  assert prot.atom_mask[:, :3].all()
  allowed = rc.STANDARD_ATOM_MASK[prot.aatype].astype(bool)
  allowed[:, ATOM["OXT"]] = True
  assert not (prot.atom_mask.astype(bool) & ~allowed).any()


@pytest.mark.parametrize("path", PDB_CHAINS, ids=lambda p: p.name)
def test_pdb_chains_match_biopython(path):
  """Every atom37 atom equals Biopython's atom of the same residue and name (without the
  arginine renaming, which Biopython does not do)."""
  prot = protein.read_pdb(path, fix_arginine=False)
  with gzip.open(path, "rt") as handle:
    structure = PDBParser(QUIET=True).get_structure("x", handle)
  residues = [r for r in next(structure.get_models()).get_residues() if r.id[0] == " "]
  assert len(residues) == prot.num_res
  for i, residue in enumerate(residues):
    assert residue.id[1] == prot.residue_index[i]
    assert rc.restype_3to1.get(residue.get_resname(), "X") == prot.sequence[i]
    names = {atom.get_id() for atom in residue} & set(rc.atom_types)
    assert {rc.atom_types[k] for k in np.nonzero(prot.atom_mask[i])[0]} == names
    for name in names:
      np.testing.assert_allclose(prot.atom_positions[i, ATOM[name]], residue[name].coord, atol=1e-6)


def test_mmcif_2q2k_matches_openfold_cache_record():
  """SEQRES, release date, resolution and chains equal OpenFold's cache record of 2q2k."""
  record = json.loads((SAMPLES / "mmcif" / "train_mmcifs_cache.json").read_text())["2q2k"]
  entry = protein.read_mmcif_entry(SAMPLES / "mmcif" / "2q2k.cif")
  assert entry.file_id == "2Q2K"
  assert list(entry.chain_ids) == record["chain_ids"]  # DNA chain F is not a protein chain.
  assert [entry.seqres[c] for c in entry.chain_ids] == record["seqs"]
  assert entry.release_date == record["release_date"]
  assert entry.resolution == record["resolution"]
  assert entry.structure_method == "x-ray diffraction"
  for chain_id in entry.chain_ids:
    positions, mask = entry.chain_atoms(chain_id)
    assert positions.shape == (len(entry.seqres[chain_id]), 37, 3) and mask.shape == (70, 37)
    observed = mask.max(axis=1) > 0
    # The His tag is disordered: unobserved residues stay in the sequence with mask 0.
    assert 0 < observed.sum() < 70 and not observed[:10].any()
    np.testing.assert_array_equal(positions[~observed], 0.0)
  chain_a = entry.chain("A")
  assert chain_a.sequence == record["seqs"][0]
  np.testing.assert_array_equal(chain_a.residue_index, np.arange(-18, 52))
  with pytest.raises(protein.StructureParseError, match="2q2k.cif.*'F'"):
    entry.chain("F")


def test_mmcif_atoms_equal_atom_site_rows():
  """Each atom37 entry of 2q2k chain A is the `_atom_site` row of that residue and name."""
  tables = MMCIF2Dict(str(SAMPLES / "mmcif" / "2q2k.cif"))
  prot = protein.read_mmcif(SAMPLES / "mmcif" / "2q2k.cif", chain_id="A")
  expected = {}
  for row in range(len(tables["_atom_site.id"])):
    if tables["_atom_site.auth_asym_id"][row] == "A" and tables["_atom_site.label_seq_id"][row] != ".":
      key = (int(tables["_atom_site.label_seq_id"][row]) - 1, tables["_atom_site.label_atom_id"][row])
      expected[key] = [float(tables[f"_atom_site.Cartn_{a}"][row]) for a in "xyz"]
  got = {(i, rc.atom_types[k]): prot.atom_positions[i, k] for i, k in zip(*np.nonzero(prot.atom_mask))}
  assert got.keys() == {key for key in expected if key[1] in rc.atom_types}
  for key, value in got.items():
    np.testing.assert_allclose(value, expected[key], atol=1e-6)


def test_mse_read_as_met_with_selenium_in_sd():
  path = SAMPLES / "query" / "4zey.cif.gz"
  tables = MMCIF2Dict(io.StringIO(gzip.decompress(path.read_bytes()).decode()))
  selenium = {int(tables["_atom_site.label_seq_id"][row]) - 1:
              [float(tables[f"_atom_site.Cartn_{a}"][row]) for a in "xyz"]
              for row in range(len(tables["_atom_site.id"]))
              if tables["_atom_site.label_comp_id"][row] == "MSE"
              and tables["_atom_site.label_atom_id"][row] == "SE"}
  prot = protein.read_mmcif(path)
  assert len(selenium) >= 2
  for index, xyz in selenium.items():
    assert prot.sequence[index] == "M"
    assert prot.atom_mask[index, ATOM["SD"]] == 1
    np.testing.assert_allclose(prot.atom_positions[index, ATOM["SD"]], xyz, atol=1e-6)


def test_alternate_locations_keep_highest_occupancy_mmcif():
  """5PTI has alternate locations: each atom is the row of highest occupancy (first on ties)."""
  path = SAMPLES / "mmcif" / "5PTI.cif.gz"
  tables = MMCIF2Dict(io.StringIO(gzip.decompress(path.read_bytes()).decode()))
  best = {}
  altlocs = 0
  for row in range(len(tables["_atom_site.id"])):
    if tables["_atom_site.label_seq_id"][row] == "." or tables["_atom_site.label_atom_id"][row] not in ATOM:
      continue
    altlocs += tables["_atom_site.label_alt_id"][row] != "."
    key = (int(tables["_atom_site.label_seq_id"][row]) - 1, tables["_atom_site.label_atom_id"][row])
    occupancy = float(tables["_atom_site.occupancy"][row])
    if key not in best or occupancy > best[key][0]:
      best[key] = (occupancy, [float(tables[f"_atom_site.Cartn_{a}"][row]) for a in "xyz"])
  assert altlocs > 10
  prot = protein.read_mmcif(path)
  assert prot.release_date == "1984-10-29" and prot.resolution == 1.0
  for (index, name), (_, xyz) in best.items():
    np.testing.assert_allclose(prot.atom_positions[index, ATOM[name]], xyz, atol=1e-6)


def test_alternate_locations_pdb_and_ties():
  lines = glycine_lines(1, "A", 1, np.zeros(3))
  lines.append(pdb_atom_line(5, "CA", "ALA", "A", 2, [5, 5, 5], altloc="A", occupancy=0.3))
  lines.append(pdb_atom_line(6, "CA", "ALA", "A", 2, [6, 6, 6], altloc="B", occupancy=0.7))
  lines.append(pdb_atom_line(7, "CB", "ALA", "A", 2, [7, 7, 7], altloc="A", occupancy=0.5))
  lines.append(pdb_atom_line(8, "CB", "ALA", "A", 2, [8, 8, 8], altloc="B", occupancy=0.5))
  prot = protein.from_pdb_string("\n".join(lines))
  np.testing.assert_allclose(prot.atom_positions[1, ATOM["CA"]], [6, 6, 6])
  np.testing.assert_allclose(prot.atom_positions[1, ATOM["CB"]], [7, 7, 7])


def test_insertion_codes_are_separate_residues():
  lines = []
  for k, (number, icode) in enumerate([(52, " "), (52, "A"), (52, "B"), (53, " ")]):
    lines += glycine_lines(4 * k + 1, "H", number, np.asarray([4.0 * k, 0, 0]), icode=icode)
  prot = protein.from_pdb_string("\n".join(lines))
  assert prot.num_res == 4
  np.testing.assert_array_equal(prot.residue_index, [52, 52, 52, 53])
  np.testing.assert_array_equal(prot.insertion_code, ["", "A", "B", ""])
  np.testing.assert_allclose(prot.atom_positions[:, ATOM["N"], 0], [0, 4, 8, 12])


def test_remark_465_residues_kept_with_zero_mask():
  remark = ["REMARK 465   M RES C SSSEQI", "REMARK 465     MET A     1",
            "REMARK 465     LYS A     3", "REMARK 465     GLU A     6"]
  lines = remark + glycine_lines(1, "A", 2, np.zeros(3)) + glycine_lines(5, "A", 4, np.ones(3)) \
      + glycine_lines(9, "A", 5, 2 * np.ones(3))
  prot = protein.from_pdb_string("\n".join(lines))
  np.testing.assert_array_equal(prot.residue_index, [1, 2, 3, 4, 5, 6])
  assert prot.sequence == "MGKGGE"
  np.testing.assert_array_equal(prot.atom_mask.max(axis=1), [0, 1, 0, 1, 1, 0])


def test_nonstandard_residues_waters_and_ligands():
  lines = glycine_lines(1, "A", 1, np.zeros(3))
  lines += glycine_lines(5, "A", 2, np.ones(3), resname="SEP", record="HETATM")   # -> SER
  lines += glycine_lines(9, "A", 3, 2 * np.ones(3), resname="XYZ")                # -> UNK
  lines += glycine_lines(13, "A", 4, 3 * np.ones(3), resname="MSE", record="HETATM")
  lines.append(pdb_atom_line(17, "SE", "MSE", "A", 4, [9, 9, 9], record="HETATM", element="SE"))
  lines.append(pdb_atom_line(18, "FE", "HEM", "A", 101, [1, 2, 3], record="HETATM", element="FE"))
  lines.append(pdb_atom_line(19, "O", "HOH", "A", 201, [3, 2, 1], record="HETATM"))
  lines.append(pdb_atom_line(20, "P", "DA", "B", 1, [0, 0, 9], element="P"))
  prot = protein.from_pdb_string("\n".join(lines))
  assert prot.sequence == "GSXM" and prot.chain_names == ("A",)
  np.testing.assert_allclose(prot.atom_positions[3, ATOM["SD"]], [9, 9, 9])
  assert prot.atom_mask[2, [ATOM[n] for n in ("N", "CA", "C", "O")]].all()  # UNK keeps its backbone.


def test_arginine_nh1_nh2_fixed_as_alphafold():
  positions = {"N": [0, 0, 0], "CA": [1.5, 0, 0], "C": [2, 1.4, 0], "CB": [2, -1, 0],
               "CG": [3.5, -1, 0], "CD": [4, -2.4, 0], "NE": [5.4, -2.4, 0], "CZ": [6.1, -3.5, 0],
               "NH1": [7.4, -3.4, 0], "NH2": [5.6, -4.7, 0]}  # NH2 nearer CD: misnamed.
  lines = [pdb_atom_line(k + 1, name, "ARG", "A", 1, xyz) for k, (name, xyz) in enumerate(positions.items())]
  fixed = protein.from_pdb_string("\n".join(lines))
  raw = protein.from_pdb_string("\n".join(lines), fix_arginine=False)
  np.testing.assert_allclose(fixed.atom_positions[0, ATOM["NH1"]], positions["NH2"])
  np.testing.assert_allclose(raw.atom_positions[0, ATOM["NH1"]], positions["NH1"])


def test_pdb_first_model_only():
  lines = ["MODEL        1"] + glycine_lines(1, "A", 1, np.zeros(3)) + ["ENDMDL", "MODEL        2"] \
      + glycine_lines(5, "A", 1, np.ones(3)) + glycine_lines(9, "A", 2, np.ones(3)) + ["ENDMDL", "END"]
  prot = protein.from_pdb_string("\n".join(lines))
  assert prot.num_res == 1
  np.testing.assert_allclose(prot.atom_positions[0, ATOM["N"]], [0, 0, 0])


def test_chain_selection():
  entry_protein = protein.read_structure(SAMPLES / "mmcif" / "2q2k.cif")
  assert entry_protein.chain_names == ("A", "B") and entry_protein.num_res == 140
  chain_b = protein.read_structure(SAMPLES / "mmcif" / "2q2k.cif", chain_id="B")
  assert_same_arrays(chain_b, entry_protein.chain("B"))
  both = protein.read_structure(SAMPLES / "mmcif" / "2q2k.cif", chain_id=["B", "A"])
  assert both.chain_names == ("B", "A")
  np.testing.assert_array_equal(both.chain_id[:70], "B")
  with pytest.raises(protein.StructureParseError, match=r"1ahsA.pdb.gz.*'Z'.*\['A'\]"):
    protein.read_structure(SAMPLES / "pdb_chains" / "1ahsA.pdb.gz", chain_id="Z")


# --- Writers and round trips -----------------------------------------------------------------

ROUND_TRIP = PDB_CHAINS[:4] + MMCIF_SAMPLES


@pytest.mark.parametrize("path", ROUND_TRIP, ids=lambda p: p.name)
def test_pdb_round_trip(path):
  prot = protein.read_structure(path)
  text = protein.to_pdb(prot)
  assert all(len(line) == 80 for line in text.splitlines())
  assert text.rstrip().endswith("END") and text.count("TER ") == len(prot.chain_names)
  assert_same_arrays(protein.from_pdb_string(text), prot, b_atol=5e-3)
  # Biopython reads the same atoms with elements.
  structure = PDBParser(QUIET=True).get_structure("x", io.StringIO(text))
  atoms = list(structure.get_atoms())
  assert len(atoms) == prot.atom_mask.sum()
  assert {atom.element for atom in atoms} <= {"C", "N", "O", "S"}


@pytest.mark.parametrize("path", ROUND_TRIP, ids=lambda p: p.name)
def test_mmcif_round_trip(path):
  prot = protein.read_structure(path)
  text = protein.to_mmcif(prot, entry_id="test")
  back = protein.from_mmcif_string(text)
  assert_same_arrays(back, prot, b_atol=5e-3)
  assert back.resolution == prot.resolution and back.release_date == prot.release_date
  assert back.seqres == {name: prot.chain(name).sequence for name in prot.chain_names}
  structure = MMCIFParser(QUIET=True).get_structure("x", io.StringIO(text))
  assert len(list(structure.get_atoms())) == prot.atom_mask.sum()
  tables = MMCIF2Dict(io.StringIO(text))
  assert len(tables["_entity_poly_seq.mon_id"]) == prot.num_res


def test_write_structure_by_suffix(tmp_path):
  prot = protein.read_structure(PDB_CHAINS[0])
  for name in ("out.pdb", "out.pdb.gz", "out.cif", "out.cif.gz"):
    protein.write_structure(prot, tmp_path / name)
    assert_same_arrays(protein.read_structure(tmp_path / name), prot, b_atol=5e-3)
  # Content decides when the suffix does not.
  (tmp_path / "noext").write_text(protein.to_mmcif(prot))
  assert_same_arrays(protein.read_structure(tmp_path / "noext"), prot, b_atol=5e-3)
  with pytest.raises(ValueError, match="suffix"):
    protein.write_structure(prot, tmp_path / "out.xyz")


def test_writers_refuse_unwritable_values():
  prot = protein.read_structure(PDB_CHAINS[0])
  bad = protein.Protein(**{**_fields(prot), "atom_positions": prot.atom_positions * np.nan})
  with pytest.raises(ValueError, match="non-finite"):
    protein.to_pdb(bad)
  with pytest.raises(ValueError, match="non-finite"):
    protein.to_mmcif(bad)
  with pytest.raises(ValueError, match="one character"):
    protein.to_pdb(protein.Protein(**{**_fields(prot), "chain_names": ("AB",)}))


def _fields(prot):
  return {name: getattr(prot, name) for name in ("aatype", "atom_positions", "atom_mask",
                                                 "residue_index", "chain_index", "b_factors",
                                                 "chain_names", "insertion_code")}


def test_protein_validates_shapes():
  prot = protein.read_structure(PDB_CHAINS[0])
  with pytest.raises(ValueError, match="atom_mask"):
    protein.Protein(**{**_fields(prot), "atom_mask": prot.atom_mask[:, :14]})
  with pytest.raises(ValueError, match="chain_index"):
    protein.Protein(**{**_fields(prot), "chain_index": prot.chain_index + 1})


# --- From model outputs ----------------------------------------------------------------------

def test_from_prediction_writes_plddt_and_reads_back():
  truth = protein.read_structure(PDB_CHAINS[1])
  mask = protein.ideal_atom_mask(truth.aatype) * truth.atom_mask.max(axis=1, keepdims=True)
  positions = truth.atom_positions + 0.25  # Any coordinates; masked atoms are zeroed.
  plddt = np.linspace(10.0, 95.0, truth.num_res).astype(np.float32)
  pred = protein.from_prediction(truth.aatype, positions, mask, plddt=plddt)
  np.testing.assert_array_equal(pred.residue_index, np.arange(1, truth.num_res + 1))
  assert pred.chain_names == ("A",)
  text = protein.to_pdb(pred)
  back = protein.from_pdb_string(text, fix_arginine=False)
  np.testing.assert_allclose(back.atom_positions, positions * mask[..., None], atol=5e-4)
  per_residue = np.asarray([back.b_factors[i][back.atom_mask[i] > 0].mean() for i in range(back.num_res)])
  np.testing.assert_allclose(per_residue, plddt, atol=5e-3)


def test_from_model_output_with_batch_axis_and_chains():
  truth = protein.read_structure(SAMPLES / "mmcif" / "2q2k.cif")
  n = truth.num_res
  batch = {"aatype": np.stack([truth.aatype] * 2), "residue_index": np.stack([np.arange(n)] * 2),
           "asym_id": np.stack([truth.chain_index + 1] * 2)}
  outputs = {"structure_module": {"final_atom_positions": truth.atom_positions,
                                  "final_atom_mask": truth.atom_mask},
             "plddt": np.full(n, 50.0)}
  pred = protein.from_model_output(batch, outputs)
  np.testing.assert_array_equal(pred.aatype, truth.aatype)
  np.testing.assert_array_equal(pred.residue_index, np.arange(1, n + 1))
  assert pred.chain_names == ("A", "B")
  np.testing.assert_array_equal(pred.chain_index, truth.chain_index)
  np.testing.assert_allclose(pred.b_factors, 50.0)
  # pLDDT from the head's logits when no per-residue value is given: one-hot logits on bin
  # b of 50 give 100 * (b + 0.5) / 50.
  bins = np.arange(n) % 50
  logits = np.where(np.arange(50)[None] == bins[:, None], 1e4, 0.0).astype(np.float32)
  outputs = {"structure_module": outputs["structure_module"], "predicted_lddt": {"logits": logits}}
  pred = protein.from_model_output(batch, outputs)
  np.testing.assert_allclose(pred.b_factors[:, 1], 100 * (bins + 0.5) / 50, atol=1e-3)


# --- Bad input ---------------------------------------------------------------------------------

def test_invalid_mmcif_sample_raises_naming_file_and_problem():
  path = SAMPLES / "mmcif" / "1YJP_invalid.cif.gz"
  with pytest.raises(protein.StructureParseError, match=r"1YJP_invalid\.cif\.gz.*group_PDB.*WRONG"):
    protein.read_structure(path)
  assert issubclass(protein.StructureParseError, ValueError)


@pytest.mark.parametrize("case", ["truncated_gz", "empty", "fasta_as_cif", "fasta_as_pdb",
                                  "text_as_cif", "pdb_as_cif", "missing_file", "short_atom_line"])
def test_bad_files_raise_structure_parse_error(tmp_path, case):
  fasta = (SAMPLES / "query" / "query.fasta").read_text()
  gz = (SAMPLES / "mmcif" / "5PTI.cif.gz").read_bytes()
  pdb_text = gzip.decompress(PDB_CHAINS[0].read_bytes()).decode()
  name, content, pattern = {
      "truncated_gz": ("t.cif.gz", gz[: len(gz) // 2], "gzip"),
      "empty": ("e.cif", b"", "empty"),
      "fasta_as_cif": ("f.cif", fasta.encode(), "not a readable mmCIF|data_"),
      "fasta_as_pdb": ("f.pdb", fasta.encode(), "no protein residues"),
      "text_as_cif": ("x.cif", b"data_x\n_cell.length_a 1.0\n", "no _atom_site"),
      "pdb_as_cif": ("p.cif", pdb_text.encode(), "data_"),
      "missing_file": (None, None, "cannot read"),
      "short_atom_line": ("s.pdb", b"ATOM      1  N   THR A 126      45.850  10.934\n", "line 1"),
  }[case]
  path = tmp_path / (name or "does_not_exist.pdb")
  if content is not None:
    path.write_bytes(content)
  with pytest.raises(protein.StructureParseError, match=pattern) as info:
    protein.read_structure(path)
  assert str(path) in str(info.value)
