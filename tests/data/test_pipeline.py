"""Sequence and MSA features equal AlphaFold's own (features.npz) for the `query` target."""

from __future__ import annotations

import numpy as np
import pytest

from af2flax.data import parsers, pipeline
from tests.conftest import REFERENCE
from tests.data.conftest import OPENFOLD

ALIGNMENTS = OPENFOLD / "alignments"


@pytest.fixture(scope="module")
def reference(shared_dir):
  with np.load(REFERENCE / "pipeline_query" / "features.npz", allow_pickle=False) as f:
    return dict(f)


def test_sequence_features_equal_alphafolds(reference):
  sequence = str(reference["sequence"][0])
  features = pipeline.make_sequence_features(sequence, "query")
  for name in ("aatype", "between_segment_residues", "residue_index", "seq_length"):
    assert features[name].dtype == reference[name].dtype, name
    np.testing.assert_array_equal(features[name], reference[name], err_msg=name)
  assert [s.decode() for s in features["sequence"]] == list(reference["sequence"])
  assert [s.decode() for s in features["domain_name"]] == list(reference["domain_name"])


def test_msa_features_equal_alphafolds(reference):
  sequence = str(reference["sequence"][0])
  files = pipeline.list_alignment_files(ALIGNMENTS)
  assert [p.name for p in map(__import__("pathlib").Path, files.msas)] == [
      "uniref90_hits.sto", "bfd_uniclust_hits.a3m", "mgnify_hits.sto"]
  features = pipeline.make_msa_features_from_dir(sequence, ALIGNMENTS)
  for name in ("msa", "deletion_matrix_int", "num_alignments"):
    assert features[name].dtype == reference[name].dtype, name
    np.testing.assert_array_equal(features[name], reference[name], err_msg=name)
  assert features["msa"].shape == (1136, 73)
  assert len(features["msa_species_identifiers"]) == 1136


def test_dedup_keeps_the_first_copy_in_database_order():
  def msa(rows, deletions, names):
    return parsers.Msa(rows, np.array(deletions, np.int32), names)
  first = msa(["ACD", "AC-", "GCD"], [[0, 0, 0], [0, 1, 0], [0, 0, 0]], ["q", "a", "b"])
  second = msa(["ACD", "GCD", "WCD"], [[0, 0, 0], [0, 0, 5], [1, 0, 0]],
               ["q", "c", "tr|A0A1B2C3D4|A0A1B2C3D4_HUMAN/3-5"])
  features = pipeline.make_msa_features([first, second])
  np.testing.assert_array_equal(features["msa"], [[0, 1, 2], [0, 1, 21], [5, 1, 2], [18, 1, 2]])
  np.testing.assert_array_equal(features["deletion_matrix_int"][2], [0, 0, 0])  # b, not c
  assert list(features["msa_species_identifiers"]) == [b"", b"", b"", b"HUMAN"]
  np.testing.assert_array_equal(features["num_alignments"], [4, 4, 4])


def test_single_sequence_and_jackhmmer_caps(tmp_path):
  features = pipeline.make_msa_features_from_dir("MKV", None)
  np.testing.assert_array_equal(features["msa"], [[10, 8, 17]])
  rows = "".join(f"hit{i} MKV\n" for i in range(10))
  (tmp_path / "mgnify_hits.sto").write_text(f"# STOCKHOLM 1.0\nquery MKV\n{rows}//\n")
  capped = pipeline.make_msa_features_from_dir("MKV", tmp_path, {"mgnify_hits": 4})
  assert pipeline.read_msa(str(tmp_path / "mgnify_hits.sto"), {"mgnify_hits": 4}).descriptions == [
      "query", "hit0", "hit1", "hit2"]
  assert capped["msa"].shape == (1, 3)  # identical rows collapse to the query


def test_alignment_of_another_sequence_is_rejected(tmp_path):
  (tmp_path / "bfd_uniclust_hits.a3m").write_text(">q\nMKVL\n>h\nMK-L\n")
  with pytest.raises(pipeline.FeatureError, match="bfd_uniclust_hits.a3m: alignment query has 4 "
                     "residues, the chain has 3"):
    pipeline.make_msa_features_from_dir("MKV", tmp_path)
  with pytest.raises(pipeline.FeatureError, match="differs from the chain sequence at 1 positions"):
    pipeline.make_msa_features_from_dir("MKVA", tmp_path)
  # 'X' in either sequence matches anything (non-standard residues).
  assert pipeline.make_msa_features_from_dir("MKXL", tmp_path)["msa"].shape == (2, 4)


def test_alignment_directory_order(tmp_path):
  for name in ("mgnify_hits.sto.gz", "zeta.a3m", "uniref90_hits.sto", "uniprot_hits.sto",
               "bfd_uniclust_hits.a3m", "pdb70_hits.hhr", "pdb_hits.sto", "notes.txt"):
    (tmp_path / name).write_text("")
  files = pipeline.list_alignment_files(tmp_path)
  assert [p.rsplit("/", 1)[1] for p in files.msas] == [
      "uniref90_hits.sto", "bfd_uniclust_hits.a3m", "mgnify_hits.sto.gz", "zeta.a3m"]
  assert [p.rsplit("/", 1)[1] for p in files.hhr] == ["pdb70_hits.hhr"]
  assert [p.rsplit("/", 1)[1] for p in files.hmmsearch] == ["pdb_hits.sto"]
