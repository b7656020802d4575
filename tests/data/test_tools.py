"""The tool wrappers run the real binaries on small databases built from ../shared/data."""

from __future__ import annotations

import os
import tempfile

import pytest

from af2flax.data import parsers
from af2flax.data.tools import (HHBlits, HHSearch, Hmmbuild, Hmmsearch, Jackhmmer, Kalign,
                                ToolError)
from af2flax.data.tools import utils

QUERY = "2cvi_A"


@pytest.fixture
def query_fasta(tmp_path, chain_sequences):
  path = tmp_path / "query.fasta"
  path.write_text(f">{QUERY}\n{chain_sequences[QUERY]}\n")
  return path


@pytest.fixture
def private_tmp(tmp_path, monkeypatch):
  """Routes the wrappers' temp dirs into an empty folder, to check that they are removed."""
  folder = tmp_path / "tool_tmp"
  folder.mkdir()
  monkeypatch.setattr(tempfile, "tempdir", str(folder))
  return folder


def test_jackhmmer_finds_the_query_itself(query_fasta, sequence_db, chain_sequences, private_tmp):
  result = Jackhmmer(database_path=str(sequence_db), n_cpu=1, get_tblout=True).query(
      str(query_fasta))
  msa = parsers.parse_stockholm(result.sto, "jackhmmer output")
  assert msa.sequences[0] == chain_sequences[QUERY]
  assert any(d.startswith(QUERY) for d in msa.descriptions[1:])
  assert QUERY in result.tblout
  assert msa.deletion_matrix.shape == (len(msa), len(chain_sequences[QUERY]))
  assert list(private_tmp.iterdir()) == []


def test_jackhmmer_error_carries_stderr(tmp_path, sequence_db, private_tmp):
  bad = tmp_path / "bad.fasta"
  bad.write_text(">bad\nMKT123\n")
  with pytest.raises(ToolError, match="illegal character") as error:
    Jackhmmer(database_path=str(sequence_db), n_cpu=1).query(str(bad))
  assert error.value.returncode == 1
  assert list(private_tmp.iterdir()) == []


def test_missing_database_and_binary(tmp_path, sequence_db, query_fasta):
  with pytest.raises(ToolError, match="not found"):
    Jackhmmer(database_path=str(tmp_path / "nope.fasta"))
  with pytest.raises(ToolError, match="not found"):
    HHBlits(databases=(str(tmp_path / "nope"),))
  with pytest.raises(ToolError, match="not found"):
    Jackhmmer(database_path=str(sequence_db), binary_path="no_such_jackhmmer").query(
        str(query_fasta))


def test_timeout_kills_the_tool(query_fasta, hhsuite_db, private_tmp):
  # hhblits is a dispatch script with the real binary as its child: the whole group must go.
  with pytest.raises(ToolError, match="timed out"):
    HHBlits(databases=(hhsuite_db,), n_cpu=1, timeout_s=0.01).query(str(query_fasta))
  with pytest.raises(ToolError, match="timed out"):
    utils.run("sleep", ["sleep", "5"], timeout_s=0.2)
  assert list(private_tmp.iterdir()) == []


def test_hhblits_a3m_output(query_fasta, hhsuite_db, chain_sequences):
  # -all: keep the hit although it is identical to the query (the default filter drops it).
  a3m = HHBlits(databases=(hhsuite_db,), n_cpu=1, n_iter=2, all_seqs=True).query(str(query_fasta))
  msa = parsers.parse_a3m(a3m, "hhblits output")
  assert msa.sequences[0] == chain_sequences[QUERY]
  assert len(msa) >= 2  # the query and its own database entry


def test_hhsearch_finds_the_query_entry(hhsuite_db, chain_sequences):
  searcher = HHSearch(databases=(hhsuite_db,), cpu=1)
  hhr = searcher.query(f">{QUERY}\n{chain_sequences[QUERY]}\n")
  hits = searcher.get_template_hits(hhr, chain_sequences[QUERY])
  assert hits[0].name.startswith(QUERY)
  assert hits[0].sum_probs > 10
  assert hits[0].hit_sequence.replace("-", "") in chain_sequences[QUERY]
  assert len(hits[0].indices_query) == len(hits[0].indices_hit) == len(hits[0].query)


def test_hmmbuild_and_hmmsearch(query_fasta, sequence_db, chain_sequences):
  sto = Jackhmmer(database_path=str(sequence_db), n_cpu=1).query(str(query_fasta)).sto
  alignment = parsers.remove_empty_columns(parsers.deduplicate_stockholm(
      parsers.parse_stockholm_alignment(sto)))
  hmm = Hmmbuild().build_profile_from_sto(parsers.format_stockholm(alignment), "hand")
  assert hmm.startswith("HMMER3")
  assert f"LENG  {len(chain_sequences[QUERY])}" in hmm
  searcher = Hmmsearch(database_path=str(sequence_db), cpu=1)
  hits = searcher.get_template_hits(searcher.query_with_hmm(hmm), chain_sequences[QUERY])
  assert hits[0].name == QUERY
  assert "".join(c for c in hits[0].hit_sequence if c != "-") in chain_sequences[QUERY]
  hmm_a3m = Hmmbuild().build_profile_from_a3m(parsers.stockholm_to_a3m(alignment))
  assert hmm_a3m.startswith("HMMER3")


def test_kalign_realigns_and_rejects_short_sequences():
  a3m = Kalign().align(["MKTAYIAKQRQISFVKSHFSRQ", "MKTAYIAKQRISFVKSHFSRQLEERLG"])
  old, new = parsers.parse_a3m(a3m, "kalign output").sequences
  assert old.replace("-", "") == "MKTAYIAKQRQISFVKSHFSRQ"
  assert new.replace("-", "") == "MKTAYIAKQRISFVKSHFSRQLEERLG"
  assert len(old) == len(new)
  with pytest.raises(ValueError, match="at least 6"):
    Kalign().align(["MKTAY", "MKTAYIAKQ"])
