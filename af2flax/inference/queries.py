"""Prediction queries from a FASTA file, checked one by one, and the record of skipped inputs.

A FASTA file may hold many sequences; one bad record (unknown residue letters, too long, an
unusable name, a duplicate) is skipped with a message naming the file, the record and the fix,
and the others go on. A file that is not FASTA at all (or cannot be read) is one failure for the
whole file. Every skipped input is written to `failures.tsv` and to the log
(`FailureLog`), so a long run over many sequences never stops for one bad input.

Residue letters: the 20 standard amino acids and 'X' (unknown; AlphaFold's aatype 20), upper
or lower case. Other letters (B, Z, J, U, O), digits, gaps and symbols are refused: AlphaFold
silently turns them into 'X', which hides typos and selenocysteines from the user. A final '*'
(stop codon) is dropped.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import threading
from typing import Iterable, Sequence

from af2flax.common import residue_constants
from af2flax.data import parsers

logger = logging.getLogger(__name__)

ALLOWED_LETTERS = frozenset(residue_constants.restypes) | {"X"}
_NAME_CHARS = re.compile(r"[^A-Za-z0-9._-]")
# Readable hints for the letters people meet most often.
_LETTER_HINTS = {
    "U": "selenocysteine: use C", "O": "pyrrolysine: use K", "B": "D or N: use X or the residue",
    "Z": "E or Q: use X or the residue", "J": "I or L: use X or the residue",
    "-": "a gap: give the ungapped sequence", ".": "a gap: give the ungapped sequence",
}


@dataclasses.dataclass(frozen=True)
class Query:
  """One sequence to predict."""
  name: str            # file-system safe, unique in the run; names the output directory
  sequence: str        # upper-case one-letter codes, 20 amino acids + 'X'
  description: str     # the FASTA header without '>'


@dataclasses.dataclass(frozen=True)
class Failure:
  """An input that was skipped, with the reason (one line)."""
  input: str
  reason: str


class QueryError(ValueError):
  """A FASTA record that cannot be predicted; the message names it and says what to fix."""


def query_name(description: str) -> str:
  """The output name of a record: the first word of its header with unsafe characters as '_'.

  UniProt-style headers `sp|P69905|HBA_HUMAN ...` give `sp_P69905_HBA_HUMAN`.
  """
  words = description.split()
  return _NAME_CHARS.sub("_", words[0]) if words else ""


def clean_sequence(sequence: str, where: str, max_length: int | None = None) -> str:
  """Upper-cased `sequence` without a final '*'; raises QueryError for anything unusable."""
  sequence = sequence.strip().upper()
  if sequence.endswith("*"):
    sequence = sequence[:-1]
  if not sequence:
    raise QueryError(f"{where}: empty sequence")
  bad = sorted({letter for letter in sequence if letter not in ALLOWED_LETTERS})
  if bad:
    details = []
    for letter in bad:
      positions = [i + 1 for i, c in enumerate(sequence) if c == letter]
      shown = ", ".join(str(p) for p in positions[:5]) + (", ..." if len(positions) > 5 else "")
      hint = _LETTER_HINTS.get(letter)
      details.append(f"{letter!r} at {shown}" + (f" ({hint})" if hint else ""))
    raise QueryError(f"{where}: unknown residue letters {'; '.join(details)}. Allowed: the 20 "
                     "amino acids ACDEFGHIKLMNPQRSTVWY and X for an unknown residue")
  if max_length is not None and len(sequence) > max_length:
    raise QueryError(f"{where}: {len(sequence)} residues, longer than --max_length "
                     f"{max_length}; raise --max_length (more memory and time) or split the "
                     "sequence")
  return sequence


def read_queries(path: str | os.PathLike, max_length: int | None = None,
                 min_length: int = 1) -> tuple[list[Query], list[Failure]]:
  """Reads every record of a FASTA file; returns (usable queries, skipped records).

  Never raises for bad content: an unreadable or non-FASTA file becomes one Failure. Names
  must be unique (a repeated name is skipped: its outputs would overwrite the first's).
  """
  path = os.fspath(path)
  try:
    sequences, descriptions = parsers.parse_fasta(parsers.read_text(path), path)
  except (parsers.ParseError, OSError) as error:
    return [], [Failure(path, f"not a readable FASTA file: {error}")]
  queries: list[Query] = []
  failures: list[Failure] = []
  seen: dict[str, int] = {}
  for index, (sequence, description) in enumerate(zip(sequences, descriptions), start=1):
    name = query_name(description)
    where = f"{path}: record {index} ({name or 'no name'})"
    try:
      if not name:
        raise QueryError(f"{path}: record {index} has an empty header; give each record a "
                         "name ('>name ...')")
      if name in seen:
        raise QueryError(f"{where}: the name {name!r} is also record {seen[name]}; names must "
                         "be unique (they name the output directories)")
      seen[name] = index
      cleaned = clean_sequence(sequence, where, max_length)
      if len(cleaned) < min_length:
        raise QueryError(f"{where}: {len(cleaned)} residues, fewer than {min_length}")
      queries.append(Query(name, cleaned, description))
    except QueryError as error:
      failures.append(Failure(f"{path}:{name or index}", str(error)))
  return queries, failures


class FailureLog:
  """`failures.tsv` of a run (input, reason), appended as failures happen, and the log.

  Thread-safe; the file is rewritten whole on each addition (runs have few failures), so it is
  always complete even if the run is killed.
  """

  def __init__(self, path: str | os.PathLike, header: Sequence[str] = ("input", "reason")):
    self.path = os.fspath(path)
    self._header = tuple(header)
    self._rows: list[tuple[str, str]] = []
    self._lock = threading.Lock()
    self._write()

  @property
  def failures(self) -> list[Failure]:
    return [Failure(*row) for row in self._rows]

  def add(self, failure: Failure) -> None:
    logger.error("skipped %s: %s", failure.input, failure.reason)
    with self._lock:
      self._rows.append((failure.input, " ".join(failure.reason.split())))
      self._write()

  def extend(self, failures: Iterable[Failure]) -> None:
    for failure in failures:
      self.add(failure)

  def _write(self) -> None:
    text = "".join("\t".join(row) + "\n" for row in [self._header] + self._rows)
    tmp = f"{self.path}.tmp"
    with open(tmp, "w") as handle:
      handle.write(text)
    os.replace(tmp, self.path)
