"""Training examples from a structure chain and its alignments; Suppl. 1.2.5 filters; naming."""

from __future__ import annotations

import numpy as np
import pytest

from af2flax.common import protein
from af2flax.data import examples, pipeline, tfrecord
from af2flax.data.examples import ChainSource, ExampleConfig, ExampleError, ExampleFilters
from af2flax.data.templates import TemplateFeaturizer
from tests.data.conftest import OPENFOLD, PDB_CHAINS


def test_mmcif_chain_with_alignments():
  path = str(OPENFOLD / "mmcifs" / "2q2k.cif")
  source = ChainSource("2q2k_A", path, "A", str(OPENFOLD / "alignments" / "2q2k_A"), 7, 3)
  config = ExampleConfig(templates=TemplateFeaturizer(str(OPENFOLD / "mmcifs")))
  features = examples.make_example(source, config)
  entry = protein.read_mmcif_entry(path)
  assert features["sequence"][0].decode() == entry.seqres["A"]
  positions, mask = entry.chain_atoms("A")
  np.testing.assert_array_equal(features["all_atom_positions"], positions)
  np.testing.assert_array_equal(features["all_atom_mask"], mask)
  assert features["msa"].shape[0] > 10 and features["msa"].shape[1] == len(entry.seqres["A"])
  np.testing.assert_array_equal(features["msa"][0],
                                pipeline.msa_rows_to_ids([entry.seqres["A"]])[0])
  assert features["resolution"].tolist() == [3.0]
  assert features["release_date"][0] == b"2008-02-05"
  assert (features["cluster_id"][0], features["cluster_size"][0]) == (7, 3)
  assert features["template_domain_names"].shape == (0,)  # no template hits for 2q2k_A
  # Pure and deterministic: the same inputs give the same bytes.
  assert tfrecord.encode_example(features) == tfrecord.encode_example(
      examples.make_example(source, config))


def test_pdb_chain_single_sequence():
  path = str(PDB_CHAINS / "2cviA.pdb.gz")
  features = examples.make_example(ChainSource("2cvi_A", path, "A"), ExampleConfig())
  num_res = len(features["aatype"])
  assert features["msa"].shape == (1, num_res) and features["num_alignments"][0] == 1
  assert features["all_atom_positions"].shape == (num_res, 37, 3)
  assert features["resolution"][0] == 0.0 and features["release_date"][0] == b""
  assert features["all_atom_mask"][:, 1].all()  # every residue of the file has a CA
  tfrecord.encode_example(features)  # fits the schema


@pytest.mark.parametrize("filters, reason", [
    (ExampleFilters(max_resolution=2.5), "resolution 3.0 A > 2.5 A"),
    (ExampleFilters(max_length=50), "length 70 > 50"),
    (ExampleFilters(min_length=100), "length 70 < 100"),
    (ExampleFilters(min_distinct_residue_types=21), "18 distinct residue types < 21"),
    (ExampleFilters(max_single_residue_fraction=0.1), "residue H makes up 13%"),
    (ExampleFilters(max_release_date="2008-01-01"), "released 2008-02-05 after 2008-01-01"),
    (ExampleFilters(min_release_date="2009-01-01"), "released 2008-02-05 before 2009-01-01"),
])
def test_filters(filters, reason):
  source = ChainSource("2q2k_A", str(OPENFOLD / "mmcifs" / "2q2k.cif"), "A")
  with pytest.raises(ExampleError, match=reason):
    examples.make_example(source, ExampleConfig(filters=filters))


def test_low_complexity_and_unknown_dates():
  with pytest.raises(ExampleError, match="residue A makes up 90%"):
    ExampleFilters().check("A" * 9 + "G", None, None)
  ExampleFilters().check("A" * 8 + "GG", None, None)
  with pytest.raises(ExampleError, match="release date unknown"):
    ExampleFilters(min_release_date="2000-01-01").check("ACDEF", None, None)


@pytest.mark.parametrize("name, parsed", [
    ("2q2k.cif", ("2q2k", None)), ("1ABC.cif.gz", ("1abc", None)),
    ("pdb1abc.ent.gz", ("1abc", None)), ("sub/1abcA.pdb.gz", ("1abc", "A")),
    ("1abc_AA.pdb", ("1abc", "AA")), ("A0A023GPI8.pdb", ("A0A023GPI8", None)),
])
def test_structure_naming(name, parsed):
  assert examples.parse_structure_name(name) == parsed


def test_alignment_dir_naming_and_clusters(tmp_path):
  (tmp_path / "1abcA").mkdir()
  (tmp_path / "2xyz_B").mkdir()
  assert examples.find_alignment_dir(str(tmp_path), "1abc", "A").endswith("1abcA")
  assert examples.find_alignment_dir(str(tmp_path), "2xyz", "B").endswith("2xyz_B")
  assert examples.find_alignment_dir(str(tmp_path), "3abc", "A") is None
  clusters = tmp_path / "clusters.txt"
  clusters.write_text("1ABC_A 2xyz_B\n3def_C\n")
  assert examples.read_clusters(str(clusters)) == {"1abc_A": (0, 2), "2xyz_B": (0, 2),
                                                   "3def_C": (1, 1)}
  clusters.write_text("1abc\n")
  with pytest.raises(ValueError, match="clusters.txt:1: cluster member '1abc'"):
    examples.read_clusters(str(clusters))
