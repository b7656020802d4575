"""FASTA records -> queries: bad records are skipped with a message naming them, others kept."""

from __future__ import annotations

import pytest

from af2flax.inference import queries


def read(tmp_path, text, **kwargs):
  path = tmp_path / "in.fasta"
  path.write_text(text)
  return queries.read_queries(path, **kwargs)


def test_good_records_are_read_in_order_and_cleaned(tmp_path):
  found, failures = read(tmp_path, ">sp|P1|ONE_HUMAN first\nmkta\nyiak*\n\n>two\nGGX\n")
  assert failures == []
  assert [(q.name, q.sequence) for q in found] == [("sp_P1_ONE_HUMAN", "MKTAYIAK"),
                                                   ("two", "GGX")]
  assert found[0].description == "sp|P1|ONE_HUMAN first"


@pytest.mark.parametrize("record, expected", [
    (">u\nMKUC\n", "'U' at 3 (selenocysteine: use C)"),
    (">b\nMKB1\n", "'1' at 4"),
    (">g\nMK-A\n", "'-' at 3 (a gap"),
    (">e\n\n", "empty sequence"),
    (">   \nMKT\n", "empty header"),
])
def test_bad_records_are_skipped_with_the_reason(tmp_path, record, expected):
  found, failures = read(tmp_path, f">ok\nMKT\n{record}>ok2\nMKV\n")
  assert [q.name for q in found] == ["ok", "ok2"]
  assert len(failures) == 1
  assert expected in failures[0].reason
  assert str(tmp_path / "in.fasta") in failures[0].reason


def test_too_long_and_duplicate_names_are_refused(tmp_path):
  found, failures = read(tmp_path, ">a\nMKTAYIAK\n>b\nMKT\n>b\nMKV\n", max_length=5)
  assert [q.name for q in found] == ["b"]
  reasons = " | ".join(f.reason for f in failures)
  assert "8 residues, longer than --max_length 5" in reasons
  assert "also record 2" in reasons


def test_a_file_that_is_not_fasta_is_one_failure(tmp_path):
  found, failures = read(tmp_path, "MKTAYIAK\n")
  assert found == [] and len(failures) == 1
  assert "not a readable FASTA file" in failures[0].reason
  missing, failures = queries.read_queries(tmp_path / "nope.fasta")
  assert missing == [] and "not a readable FASTA file" in failures[0].reason


def test_failure_log_is_complete_after_every_addition(tmp_path):
  log = queries.FailureLog(tmp_path / "failures.tsv")
  assert (tmp_path / "failures.tsv").read_text() == "input\treason\n"
  log.add(queries.Failure("x", "bad\tthing\nhere"))
  lines = (tmp_path / "failures.tsv").read_text().splitlines()
  assert lines == ["input\treason", "x\tbad thing here"]
