"""Parsers: exact deletion counts, AlphaFold's Stockholm query-gap handling, HHR hits, bad files."""

from __future__ import annotations

import gzip

import numpy as np
import pytest

from af2flax.data import parsers
from tests.data.conftest import OPENFOLD

ALIGNMENTS = OPENFOLD / "alignments"

STOCKHOLM = """# STOCKHOLM 1.0
#=GS hit1/2-5 DE first hit
#=GS hit2/1-6 DE second hit

query     AC-DE
hit1/2-5  A-KDE
hit2/1-6  -CKK-

query     -F
hit1/2-5  -F
hit2/1-6  LF
#=GC RF   xx.xx.x
//
"""


def test_fasta_records_and_errors():
  sequences, descriptions = parsers.parse_fasta((OPENFOLD / "short.fasta").read_text())
  assert descriptions == ["query"]
  assert sequences[0].startswith("MAAHKGAEHH") and len(sequences[0]) == 73
  assert parsers.parse_fasta(">a x\nMK\n\nLV\n>b\nG\n") == (["MKLV", "G"], ["a x", "b"])
  with pytest.raises(parsers.ParseError, match=r"f.fa:2: sequence data before"):
    parsers.parse_fasta("\nMKV\n>a\nM\n", "f.fa")
  with pytest.raises(parsers.ParseError, match="no '>' record"):
    parsers.parse_fasta("", "empty.fa")


def test_a3m_lowercase_insertions_become_deletion_counts():
  msa = parsers.parse_a3m(">q\nMKV.LA\n>h1 desc\nMabKVcdL-\n>h2\n-K.Vx-A\n")
  assert msa.sequences == ["MKVLA", "MKVL-", "-KV-A"]
  np.testing.assert_array_equal(msa.deletion_matrix, [[0, 0, 0, 0, 0],
                                                      [0, 2, 0, 2, 0],
                                                      [0, 0, 0, 1, 0]])
  assert msa.deletion_matrix.dtype == np.int32
  assert msa.descriptions == ["q", "h1 desc", "h2"]


def test_a3m_bad_rows_name_the_line():
  with pytest.raises(parsers.ParseError,
                     match=r"x.a3m:3: record 'h' has 5 aligned columns but the query has 4"):
    parsers.parse_a3m(">q\nMKVL\n>h\nMKVLA\n", "x.a3m")
  with pytest.raises(parsers.ParseError, match=r"x.a3m:3: invalid character '1'"):
    parsers.parse_a3m(">q\nMKVL\n>h\nMK1L\n", "x.a3m")


def test_stockholm_query_gap_columns_become_deletions():
  msa = parsers.parse_stockholm(STOCKHOLM)
  # Query columns: A C D E F (columns 2 and 5 of the joined rows are query gaps).
  assert msa.sequences == ["ACDEF", "A-DEF", "-CK-F"]
  np.testing.assert_array_equal(msa.deletion_matrix, [[0, 0, 0, 0, 0],
                                                      [0, 0, 1, 0, 0],
                                                      [0, 0, 1, 0, 1]])
  assert msa.descriptions == ["query", "hit1/2-5", "hit2/1-6"]
  assert len(parsers.parse_stockholm(STOCKHOLM, max_sequences=2)) == 2


def test_stockholm_equals_its_a3m_conversion():
  alignment = parsers.parse_stockholm_alignment(
      (ALIGNMENTS / "uniref90_hits.sto").read_text(), "uniref90")
  from_sto = parsers.msa_from_stockholm(alignment)
  from_a3m = parsers.parse_a3m(parsers.stockholm_to_a3m(alignment))
  assert list(from_sto.sequences) == list(from_a3m.sequences)
  np.testing.assert_array_equal(from_sto.deletion_matrix, from_a3m.deletion_matrix)
  assert alignment.reference_annotation is not None
  reparsed = parsers.parse_stockholm_alignment(parsers.format_stockholm(alignment))
  assert reparsed.rows == alignment.rows and reparsed.names == alignment.names


def test_stockholm_dedup_and_empty_columns():
  text = "# STOCKHOLM 1.0\nq  AC-D\na  AC-D\nb  ACKD\nc  -C-D\n#=GC RF xx.x\n//\n"
  alignment = parsers.parse_stockholm_alignment(text)
  deduplicated = parsers.deduplicate_stockholm(alignment)
  assert deduplicated.names == ["q", "c"]  # a and b equal q over the query's columns
  squeezed = parsers.remove_empty_columns(deduplicated)
  assert squeezed.rows == ["ACD", "-CD"] and squeezed.reference_annotation == "xxx"


@pytest.mark.parametrize("text, message", [
    ("", "empty file"),
    (">query\nMKV\n", "not a Stockholm file"),
    ("# STOCKHOLM 1.0\nq AC\nh AC extra\n//\n", r":3: expected '<name> <aligned sequence>'"),
    ("# STOCKHOLM 1.0\nq ACD\nh AC\n//\n", "row 'h' has 2 columns"),
    ("# STOCKHOLM 1.0\nq ACD\nh ACD\n", "truncated"),
    ("# STOCKHOLM 1.0\n//\n", "no sequences"),
])
def test_bad_stockholm(text, message):
  with pytest.raises(parsers.ParseError, match=message):
    parsers.parse_stockholm(text, "bad.sto")


def test_hhr_hits():
  hits = parsers.parse_hhr((ALIGNMENTS / "pdb70_hits.hhr").read_text())
  assert len(hits) == 10
  first = hits[0]
  assert (first.index, first.name[:6], first.aligned_cols, first.sum_probs) == (
      1, "1HF9_B", 22, 13.1)
  assert first.query == "AEHHHKAAEHHEQAAKHHHAAA"
  assert first.hit_sequence == "ISHHAKEIERLQKEIERHKQSI"
  assert first.indices_query == list(range(6, 28))
  assert first.indices_hit == list(range(9, 31))
  assert [h.sum_probs for h in hits[5:7]] == [0.0, 0.0]


def test_hhr_errors():
  with pytest.raises(parsers.ParseError, match="x.hhr:1: not an HHR file"):
    parsers.parse_hhr("# STOCKHOLM 1.0\n", "x.hhr")
  text = (ALIGNMENTS / "pdb70_hits.hhr").read_text().replace("Sum_probs=13.1", "Sum_probs")
  with pytest.raises(parsers.ParseError, match=r":21: hit paragraph without"):
    parsers.parse_hhr(text, "x.hhr")


def test_hmmsearch_hits():
  text = ("# STOCKHOLM 1.0\n#=GS 1abc_A/3-7 DE mol:protein length:50  X\n"
          "#=GS 2dna_B/1-4 DE mol:na length:4  DNA\n\n"
          "1abc_A/3-7  -KVkL.A\n2dna_B/1-4  ACGT.--\n//\n")
  hits = parsers.parse_hmmsearch_sto("MKVLA", text)
  assert len(hits) == 1
  hit = hits[0]
  assert (hit.index, hit.name, hit.aligned_cols, hit.sum_probs) == (1, "1abc_A", 4, None)
  assert hit.hit_sequence == "-KVKLA"
  assert hit.indices_hit == [-1, 2, 3, 5, 6]  # the insertion 'k' (index 4) is skipped


def test_read_text_gzip(tmp_path):
  good = tmp_path / "a.a3m.gz"
  good.write_bytes(gzip.compress(b">q\nMKV\n"))
  assert parsers.read_text(good) == ">q\nMKV\n"
  truncated = tmp_path / "t.a3m.gz"
  truncated.write_bytes(gzip.compress(b">q\n" + b"MKV" * 1000)[:40])
  with pytest.raises(parsers.ParseError, match=r"t.a3m.gz: corrupt or truncated gzip"):
    parsers.read_text(truncated)
  binary = tmp_path / "b.a3m"
  binary.write_bytes(b"\xff\xfe\x00")
  with pytest.raises(parsers.ParseError, match="not a text file"):
    parsers.read_text(binary)
