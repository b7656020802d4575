"""Parsers for the alignment files of AlphaFold's genetic and template search.

Jumper et al. (2021) Suppl. 1.2.2 "Genetic search" (jackhmmer Stockholm, HHblits A3M) and
Suppl. 1.2.3 "Template search" (HHsearch HHR, hmmsearch Stockholm). Every parser takes the file's
text plus a `source` name and raises `ParseError` naming that source and the offending line when
the text is not what the format promises; nothing here touches the network or runs a tool.

An `Msa` holds aligned rows over the query's residues (no query gaps) and, per row and column, the
number of residues the row inserts before that column (`deletion_matrix`, AlphaFold's
`deletion_matrix_int`).
"""

from __future__ import annotations

import dataclasses
import gzip
import os
import re
import zlib
from typing import Iterable, Sequence

import numpy as np

# Characters allowed in aligned rows: residues (any letter), gaps ('-'), insert-gaps ('.').
_ALIGNED_CHARS = re.compile(r"^[A-Za-z.\-*]*$")
_LOWER = np.zeros(256, dtype=bool)
_LOWER[ord("a"):ord("z") + 1] = True


class ParseError(ValueError):
  """A file is not in the format its parser expects. The message names the file and the line."""

  def __init__(self, source: str, message: str, line: int | None = None):
    self.source = source
    self.line = line
    where = f"{source}:{line}" if line is not None else source
    super().__init__(f"{where}: {message}")


@dataclasses.dataclass(frozen=True)
class Msa:
  """A parsed alignment: rows over the query's columns, per-column insertion counts, names.

  sequences:       [num_seq] strings of length num_res (upper case letters and '-').
  deletion_matrix: [num_seq, num_res] int32, residues deleted (inserted in the row) before column j.
  descriptions:    [num_seq] the row names/description lines.
  """
  sequences: Sequence[str]
  deletion_matrix: np.ndarray
  descriptions: Sequence[str]

  def __post_init__(self):
    if not len(self.sequences) == len(self.deletion_matrix) == len(self.descriptions):
      raise ValueError(f"Msa fields disagree: {len(self.sequences)} sequences, "
                       f"{len(self.deletion_matrix)} deletion rows, "
                       f"{len(self.descriptions)} descriptions")

  def __len__(self) -> int:
    return len(self.sequences)

  @property
  def query(self) -> str:
    return self.sequences[0]

  def truncate(self, max_seqs: int) -> "Msa":
    return Msa(self.sequences[:max_seqs], self.deletion_matrix[:max_seqs],
               self.descriptions[:max_seqs])


@dataclasses.dataclass(frozen=True)
class TemplateHit:
  """One template search hit (HHR paragraph or hmmsearch row); indices are 0-based, -1 = gap."""
  index: int
  name: str
  aligned_cols: int
  sum_probs: float | None
  query: str
  hit_sequence: str
  indices_query: list[int]
  indices_hit: list[int]


# --- reading files ------------------------------------------------------------------------------

def read_text(path: str | os.PathLike) -> str:
  """Reads a text file, gunzipping `*.gz`; truncated/corrupt gzip and non-UTF-8 raise ParseError."""
  path = os.fspath(path)
  try:
    if path.endswith(".gz"):
      with gzip.open(path, "rb") as f:
        data = f.read()
    else:
      with open(path, "rb") as f:
        data = f.read()
  except (EOFError, gzip.BadGzipFile, zlib.error) as e:
    raise ParseError(path, f"corrupt or truncated gzip file ({e})") from e
  try:
    return data.decode("utf-8")
  except UnicodeDecodeError as e:
    raise ParseError(path, f"not a text file (byte {e.start} is not UTF-8)") from e


# --- FASTA and A3M ------------------------------------------------------------------------------

def parse_fasta(text: str, source: str = "<fasta>") -> tuple[list[str], list[str]]:
  """Returns (sequences, descriptions) of a FASTA/A3M text, in file order.

  Blank lines are skipped and lines are stripped, as in AlphaFold. Raises ParseError for sequence
  data before the first '>' header and for a text with no record.
  """
  sequences: list[list[str]] = []
  descriptions: list[str] = []
  for line_number, line in enumerate(text.splitlines(), start=1):
    line = line.strip()
    if line.startswith(">"):
      descriptions.append(line[1:])
      sequences.append([])
    elif line:
      if not sequences:
        raise ParseError(source, "sequence data before the first '>' header (not FASTA/A3M?)",
                         line_number)
      sequences[-1].append(line)
  if not descriptions:
    raise ParseError(source, "no '>' record found (empty or not FASTA/A3M)")
  return ["".join(parts) for parts in sequences], descriptions


def _deletions_from_lowercase(row: str) -> tuple[str, np.ndarray]:
  """A3M row -> (match columns only, insertions before each match column)."""
  codes = np.frombuffer(row.encode("ascii"), dtype=np.uint8)
  is_insert = _LOWER[codes]
  inserted_so_far = np.cumsum(is_insert)
  match_positions = np.flatnonzero(~is_insert)
  counts_at_match = inserted_so_far[match_positions]
  deletions = np.diff(counts_at_match, prepend=0).astype(np.int32)
  aligned = codes[match_positions].tobytes().decode("ascii")
  return aligned, deletions


def parse_a3m(text: str, source: str = "<a3m>") -> Msa:
  """Parses an A3M alignment (HHblits output): lower case letters are insertions.

  Suppl. 1.2.2: each lower-case run before a match column becomes that column's deletion count;
  upper case letters and '-' are the aligned columns; '.' (optional insert-gaps) are dropped.
  The first record is the query; every row must have as many aligned columns as the query.
  """
  sequences, descriptions = parse_fasta(text, source)
  header_lines = _record_header_lines(text)
  rows, deletion_rows = [], []
  for record, sequence in enumerate(sequences):
    if not _ALIGNED_CHARS.match(sequence):
      bad = next(c for c in sequence if not (c.isalpha() or c in ".-*"))
      raise ParseError(source, f"invalid character {bad!r} in record {descriptions[record]!r}",
                       header_lines[record])
    aligned, deletions = _deletions_from_lowercase(sequence.replace(".", "").replace("*", ""))
    if rows and len(aligned) != len(rows[0]):
      raise ParseError(source, f"record {descriptions[record]!r} has {len(aligned)} aligned "
                       f"columns but the query has {len(rows[0])}", header_lines[record])
    rows.append(aligned)
    deletion_rows.append(deletions)
  if not rows[0]:
    raise ParseError(source, "the query (first record) is empty", header_lines[0])
  return Msa(rows, np.stack(deletion_rows), descriptions)


def _record_header_lines(text: str) -> list[int]:
  return [i for i, line in enumerate(text.splitlines(), start=1) if line.strip().startswith(">")]


# --- Stockholm ----------------------------------------------------------------------------------

@dataclasses.dataclass
class StockholmAlignment:
  """Raw Stockholm rows (query first, query gaps kept), with descriptions and the RF annotation."""
  names: list[str]
  rows: list[str]
  descriptions: dict[str, str]
  reference_annotation: str | None = None

  def __len__(self) -> int:
    return len(self.names)


def parse_stockholm_alignment(lines: str | Iterable[str], source: str = "<stockholm>",
                              max_sequences: int | None = None) -> StockholmAlignment:
  """Reads a (possibly interleaved) Stockholm alignment as jackhmmer/hmmsearch write it.

  `max_sequences` keeps only the first that many distinct rows (the query counts), AlphaFold's
  cap on jackhmmer hits (Suppl. 1.2.2: 10,000 UniRef90, 501 MGnify); later rows are skipped while
  reading, so large files stay cheap. A missing '# STOCKHOLM' header, a malformed row, rows of
  different lengths or a missing '//' terminator (truncated file) raise ParseError.
  """
  if isinstance(lines, str):
    lines = lines.splitlines()
  rows: dict[str, list[str]] = {}
  descriptions: dict[str, str] = {}
  reference: list[str] = []
  seen_header = terminated = False
  line_number = 0
  for line_number, line in enumerate(lines, start=1):
    line = line.rstrip("\r\n")
    stripped = line.strip()
    if not stripped:
      continue
    if not seen_header:
      if not stripped.startswith("# STOCKHOLM"):
        raise ParseError(source, "not a Stockholm file (no '# STOCKHOLM 1.0' header)", line_number)
      seen_header = True
      continue
    if stripped == "//":
      terminated = True
      continue
    if stripped.startswith("#"):
      if stripped.startswith("#=GS"):
        parts = stripped.split(maxsplit=3)
        if len(parts) >= 3 and parts[2] == "DE":
          descriptions[parts[1]] = parts[3] if len(parts) == 4 else ""
      elif stripped.startswith("#=GC RF"):
        reference.append(stripped.split()[-1])
      continue
    parts = stripped.split()
    if len(parts) != 2:
      raise ParseError(source, f"expected '<name> <aligned sequence>', got {stripped[:80]!r}",
                       line_number)
    name, aligned = parts
    if not _ALIGNED_CHARS.match(aligned):
      raise ParseError(source, f"invalid character in the row of {name!r}", line_number)
    if name not in rows:
      if max_sequences is not None and len(rows) >= max_sequences:
        continue
      rows[name] = []
    rows[name].append(aligned)
  if not seen_header:
    raise ParseError(source, "empty file (no '# STOCKHOLM 1.0' header)")
  if not terminated:
    raise ParseError(source, "no '//' terminator: the file is truncated", line_number)
  if not rows:
    raise ParseError(source, "no sequences in the alignment")
  names = list(rows)
  joined = ["".join(rows[n]) for n in names]
  for name, row in zip(names, joined):
    if len(row) != len(joined[0]):
      raise ParseError(source, f"row {name!r} has {len(row)} columns, the query has "
                       f"{len(joined[0])}")
  rf = "".join(reference) or None
  return StockholmAlignment(names, joined, {n: descriptions[n] for n in names if n in descriptions},
                            rf if rf and len(rf) == len(joined[0]) else None)


def msa_from_stockholm(alignment: StockholmAlignment) -> Msa:
  """Drops the query's gap columns and counts a row's residues there as deletions (Suppl. 1.2.2).

  AlphaFold's query-gap handling: columns where the query (first row) has '-' are insert columns;
  a row's residues in them become the deletion count of the next query column.
  """
  query = np.frombuffer(alignment.rows[0].encode("ascii"), dtype=np.uint8)
  query_gap = (query == ord("-")) | (query == ord("."))
  keep = np.flatnonzero(~query_gap)
  sequences, deletion_rows = [], []
  for row in alignment.rows:
    codes = np.frombuffer(row.upper().replace(".", "-").encode("ascii"), dtype=np.uint8)
    inserted = np.cumsum(query_gap & (codes != ord("-")))
    deletion_rows.append(np.diff(inserted[keep], prepend=0).astype(np.int32))
    sequences.append(codes[keep].tobytes().decode("ascii"))
  return Msa(sequences, np.stack(deletion_rows), list(alignment.names))


def parse_stockholm(text: str | Iterable[str], source: str = "<stockholm>",
                    max_sequences: int | None = None) -> Msa:
  """Stockholm text (jackhmmer output) -> Msa, keeping at most `max_sequences` rows."""
  return msa_from_stockholm(parse_stockholm_alignment(text, source, max_sequences))


def read_stockholm(path: str | os.PathLike, max_sequences: int | None = None) -> Msa:
  """Streams a Stockholm file (gz allowed) into an Msa without holding rows past the cap."""
  path = os.fspath(path)
  if path.endswith(".gz"):
    return parse_stockholm(read_text(path), path, max_sequences)
  try:
    with open(path, encoding="utf-8") as f:
      return parse_stockholm(f, path, max_sequences)
  except UnicodeDecodeError as e:
    raise ParseError(path, f"not a text file ({e.reason})") from e


def deduplicate_stockholm(alignment: StockholmAlignment) -> StockholmAlignment:
  """Keeps the first row of each distinct sequence over the query's columns (AlphaFold's order)."""
  query = alignment.rows[0]
  keep_columns = [i for i, c in enumerate(query) if c != "-"]
  seen, names, rows = set(), [], []
  for name, row in zip(alignment.names, alignment.rows):
    key = "".join(row[i] for i in keep_columns)
    if key not in seen:
      seen.add(key)
      names.append(name)
      rows.append(row)
  return StockholmAlignment(names, rows, {n: alignment.descriptions[n] for n in names
                                          if n in alignment.descriptions},
                            alignment.reference_annotation)


def remove_empty_columns(alignment: StockholmAlignment) -> StockholmAlignment:
  """Drops columns that are '-' in every row (the RF annotation follows)."""
  width = len(alignment.rows[0])
  used = [any(row[j] != "-" for row in alignment.rows) for j in range(width)]
  squeeze = lambda s: "".join(c for c, u in zip(s, used) if u)
  rf = alignment.reference_annotation
  return StockholmAlignment(list(alignment.names), [squeeze(r) for r in alignment.rows],
                            dict(alignment.descriptions), squeeze(rf) if rf else None)


def stockholm_to_a3m(alignment: StockholmAlignment, remove_first_row_gaps: bool = True) -> str:
  """Writes the alignment as A3M (query-gap columns become lower-case insertions)."""
  query_non_gap = [c != "-" for c in alignment.rows[0]]
  chunks = []
  for name, row in zip(alignment.names, alignment.rows):
    row = row.replace(".", "")
    if remove_first_row_gaps:
      row = "".join(c if keep else c.lower() for c, keep in zip(row, query_non_gap)
                    if keep or c != "-")
    chunks.append(f">{name} {alignment.descriptions.get(name, '')}\n{row}")
  return "\n".join(chunks) + "\n"


def format_stockholm(alignment: StockholmAlignment) -> str:
  """Writes the alignment back as single-block Stockholm (with '#=GC RF' when known)."""
  width = max(len(n) for n in alignment.names + ["#=GC RF"]) + 1
  lines = ["# STOCKHOLM 1.0", ""]
  lines += [f"#=GS {n} DE {alignment.descriptions[n]}" for n in alignment.names
            if n in alignment.descriptions]
  lines += [""] + [f"{n:<{width}}{r}" for n, r in zip(alignment.names, alignment.rows)]
  if alignment.reference_annotation:
    lines.append(f"{'#=GC RF':<{width}}{alignment.reference_annotation}")
  return "\n".join(lines + ["//"]) + "\n"


# --- template hits ------------------------------------------------------------------------------

_HHR_SUMMARY = re.compile(
    r"Probab=(\S+)\s+E-value=(\S+)\s+Score=(\S+)\s+Aligned_cols=(\S+)\s+Identities=(\S+)%\s+"
    r"Similarity=(\S+)\s+Sum_probs=(\S+)\s+Template_Neff=(\S+)")
_HHR_QUERY_ROW = re.compile(r"[\t ]*(\d+) ([A-Z-]*)[\t ]*(\d+) \(\d+\)")
_HHR_ANNOTATION_ROWS = ("ss_dssp", "ss_pred", "Consensus")


def _indices(aligned: str, start: int) -> list[int]:
  """Residue index (from `start`) for each aligned position; -1 for gaps."""
  out, counter = [], start
  for c in aligned:
    if c == "-":
      out.append(-1)
    else:
      out.append(counter)
      counter += 1
  return out


def _parse_hhr_paragraph(lines: Sequence[str], first_line: int, source: str) -> TemplateHit:
  """One 'No N' paragraph of an HHR file -> TemplateHit (Suppl. 1.2.3)."""
  try:
    number = int(lines[0].split()[-1])
    name = lines[1][1:]
    summary = _HHR_SUMMARY.match(lines[2])
  except (IndexError, ValueError):
    summary = None
  if summary is None:
    raise ParseError(source, "hit paragraph without the 'Probab=... Sum_probs=...' summary line",
                     first_line)
  aligned_cols, sum_probs = int(float(summary.group(4))), float(summary.group(7))
  query, hit_sequence = [], []
  indices_query: list[int] = []
  indices_hit: list[int] = []
  block_length = None
  for offset, line in enumerate(lines[3:], start=3):
    kind = line[:2]
    if kind not in ("Q ", "T ") or line[2:].startswith(_HHR_ANNOTATION_ROWS):
      continue
    # The first 17 characters are 'Q <name padded to 15> '; the rest is 'start SEQ end (length)'.
    match = _HHR_QUERY_ROW.match(line[17:])
    if match is None:
      raise ParseError(source, f"unreadable alignment row {line[:60]!r}", first_line + offset)
    start, segment = int(match.group(1)) - 1, match.group(2)
    if kind == "Q ":
      end = int(match.group(3))
      block_length = end - start + segment.count("-")
      if block_length != len(segment):
        raise ParseError(source, "query row length disagrees with its start/end indices",
                         first_line + offset)
      query.append(segment)
      indices_query += _indices(segment, start)
    else:
      if block_length != len(segment):
        raise ParseError(source, "template row length differs from its query row",
                         first_line + offset)
      hit_sequence.append(segment)
      indices_hit += _indices(segment, start)
  return TemplateHit(number, name, aligned_cols, sum_probs, "".join(query), "".join(hit_sequence),
                     indices_query, indices_hit)


def parse_hhr(text: str, source: str = "<hhr>") -> list[TemplateHit]:
  """Parses an HHsearch/HHblits result file into its hits, in file order."""
  lines = text.splitlines()
  if not lines or not lines[0].startswith("Query"):
    raise ParseError(source, "not an HHR file (first line does not start with 'Query')", 1)
  starts = [i for i, line in enumerate(lines) if line.startswith("No ")] + [len(lines)]
  return [_parse_hhr_paragraph(lines[a:b], a + 1, source) for a, b in zip(starts, starts[1:])]


_HMMSEARCH_NAME = re.compile(r"^([a-z0-9]+)_(\w+)/([0-9]+)-([0-9]+)$")
_PROTEIN_LENGTH = re.compile(r"mol:protein length:([0-9]+)")


def parse_hmmsearch_sto(query_sequence: str, text: str,
                        source: str = "<hmmsearch>") -> list[TemplateHit]:
  """hmmsearch Stockholm output against pdb_seqres -> TemplateHits (Suppl. 1.2.3).

  Row names are `<pdbid>_<chain>/<start>-<end>`; '#=GS ... DE mol:protein length:N' marks protein
  chains (others are skipped). Match states (upper case, '-') are the query's residues in order.
  """
  alignment = parse_stockholm_alignment(text, source)
  indices_query = list(range(len(query_sequence)))
  hits = []
  for number, (name, row) in enumerate(zip(alignment.names, alignment.rows), start=1):
    description = alignment.descriptions.get(name, "")
    if "mol:protein" not in description:
      continue
    name_match = _HMMSEARCH_NAME.match(name)
    if name_match is None or _PROTEIN_LENGTH.search(description) is None:
      raise ParseError(source, f"cannot read hit name/description {name!r} {description!r}")
    row = row.replace(".", "")
    indices_hit, counter = [], int(name_match.group(3)) - 1
    for c in row:
      if c == "-":
        indices_hit.append(-1)
      elif c.islower():
        counter += 1
      else:
        indices_hit.append(counter)
        counter += 1
    hits.append(TemplateHit(number, f"{name_match.group(1)}_{name_match.group(2)}",
                            sum(c.isupper() for c in row), None, query_sequence, row.upper(),
                            indices_query, indices_hit))
  return hits
