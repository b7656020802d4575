"""Input features of one chain: sequence, MSA and template features in AlphaFold's raw layout.

Jumper et al. (2021) Suppl. 1.2.2 "Genetic search" (MSAs from UniRef90, BFD/Uniclust30 and MGnify,
merged and de-duplicated in that order), Suppl. 1.2.3 "Template search" and Suppl. 1.2.9
"Featurization". Feature names, dtypes and shapes are those of AlphaFold's data pipeline
(`aatype` [N, 21] one-hot int32, `msa` [S, N] int32 in HHblits' alphabet, `deletion_matrix_int`,
`num_alignments`, `template_*`), so that `../reference/pipeline_query/features.npz` and our output
compare array for array.

Alignment directory layout (OpenFold's, one directory per chain):
  uniref90_hits.{sto,a3m}   bfd_uniclust_hits.a3m | bfd_uniref_hits.a3m | small_bfd_hits.sto
  mgnify_hits.{sto,a3m}     any other *.a3m / *.sto (after the known ones, sorted by name)
  *.hhr (HHsearch) or pdb_hits.sto / hmm_output.sto (hmmsearch): template hits
  uniprot_hits.sto is multimer-only (species pairing) and is not read. Files may be gzipped.
"""

from __future__ import annotations

import dataclasses
import os
import re
from typing import Mapping, MutableMapping, Sequence

import numpy as np

from af2flax.common import residue_constants
from af2flax.data import parsers

FeatureDict = MutableMapping[str, np.ndarray]

# AlphaFold's merge order (Suppl. 1.2.2; `make_msa_features((uniref90, bfd, mgnify))`).
MSA_FILE_ORDER: tuple[str, ...] = ("uniref90_hits", "bfd_uniclust_hits", "bfd_uniref_hits",
                                   "small_bfd_hits", "uniclust30_hits", "mgnify_hits")
# AlphaFold's jackhmmer caps (`uniref_max_hits`, `mgnify_max_hits`); the query counts.
DEFAULT_MAX_HITS: Mapping[str, int] = {"uniref90_hits": 10_000, "mgnify_hits": 501}
NOT_MSA_FILES = frozenset({"uniprot_hits", "pdb_hits", "hmm_output"})
HMMSEARCH_HIT_FILES = ("pdb_hits", "hmm_output")

_HHBLITS_LOOKUP = np.full(256, -1, dtype=np.int32)
for _letter, _index in residue_constants.HHBLITS_AA_TO_ID.items():
  _HHBLITS_LOOKUP[ord(_letter)] = _index

# UniProt entry names `tr|ACCESSION|NAME_SPECIES` (AlphaFold's msa_identifiers): the species code.
_UNIPROT_SPECIES = re.compile(
    r"^(?:tr|sp)\|[A-Za-z0-9]{6,10}(?:_\d)?\|[A-Za-z0-9]+_([A-Za-z0-9]{1,5})(?:_\d+)?$")


class FeatureError(ValueError):
  """Inputs are readable but inconsistent (e.g. an MSA of another sequence); names the file."""


def make_sequence_features(sequence: str, description: str) -> FeatureDict:
  """Sequence features of AlphaFold's pipeline (Suppl. 1.2.9): one-hot aatype with 'X', indices."""
  num_res = len(sequence)
  return {
      "aatype": residue_constants.sequence_to_onehot(
          sequence, residue_constants.restype_order_with_x, map_unknown_to_x=True),
      "between_segment_residues": np.zeros((num_res,), dtype=np.int32),
      "domain_name": np.array([description.encode("utf-8")], dtype=object),
      "residue_index": np.arange(num_res, dtype=np.int32),
      "seq_length": np.full((num_res,), num_res, dtype=np.int32),
      "sequence": np.array([sequence.encode("utf-8")], dtype=object),
  }


def species_identifier(description: str) -> str:
  """UniProt species mnemonic of an MSA row ('' when the row is not a UniProt entry)."""
  words = description.split()
  if not words:
    return ""
  match = _UNIPROT_SPECIES.match(words[0].partition("/")[0])
  return match.group(1) if match else ""


def msa_rows_to_ids(sequences: Sequence[str], source: str = "<msa>") -> np.ndarray:
  """Aligned rows (equal length) -> [S, N] int32 in HHblits' 22-letter alphabet (21 = gap)."""
  if not sequences:
    return np.zeros((0, 0), dtype=np.int32)
  codes = np.frombuffer("".join(sequences).encode("ascii"), dtype=np.uint8)
  ids = _HHBLITS_LOOKUP[codes].reshape(len(sequences), -1)
  if (ids < 0).any():
    row = int(np.argwhere(ids < 0)[0, 0])
    raise FeatureError(f"{source}: row {row} has a character outside HHblits' alphabet: "
                       f"{sequences[row]!r}")
  return ids


def make_msa_features(msas: Sequence[parsers.Msa]) -> FeatureDict:
  """Merges MSAs in the given order, keeping the first copy of each aligned row (Suppl. 1.2.2).

  Returns `msa` [S, N] int32, `deletion_matrix_int` [S, N] int32, `num_alignments` [N] int32 (= S)
  and `msa_species_identifiers` [S] bytes, as AlphaFold's `make_msa_features`.
  """
  if not msas:
    raise ValueError("At least one MSA is needed (the query alone for a single-sequence example).")
  rows: list[str] = []
  deletions: list[np.ndarray] = []
  species: list[bytes] = []
  seen: set[str] = set()
  for msa_index, msa in enumerate(msas):
    if not len(msa):
      raise ValueError(f"MSA {msa_index} has no sequence.")
    for row, sequence in enumerate(msa.sequences):
      if sequence in seen:
        continue
      seen.add(sequence)
      rows.append(sequence)
      deletions.append(msa.deletion_matrix[row])
      species.append(species_identifier(msa.descriptions[row]).encode("utf-8"))
  num_res = len(msas[0].sequences[0])
  return {
      "deletion_matrix_int": np.stack(deletions).astype(np.int32),
      "msa": msa_rows_to_ids(rows),
      "num_alignments": np.full((num_res,), len(rows), dtype=np.int32),
      "msa_species_identifiers": np.array(species, dtype=object),
  }


def single_sequence_msa(sequence: str, description: str = "query") -> parsers.Msa:
  """The query alone, for chains without alignments."""
  return parsers.Msa([sequence], np.zeros((1, len(sequence)), dtype=np.int32), [description])


def _stem_and_format(filename: str) -> tuple[str, str] | None:
  name = filename[:-3] if filename.endswith(".gz") else filename
  stem, dot, extension = name.rpartition(".")
  return (stem, extension) if dot and extension in ("a3m", "sto", "hhr") else None


@dataclasses.dataclass(frozen=True)
class AlignmentFiles:
  """What a chain's alignment directory holds: MSA files in merge order and template hit files."""
  msas: tuple[str, ...]
  hhr: tuple[str, ...]
  hmmsearch: tuple[str, ...]


def list_alignment_files(alignment_dir: str | os.PathLike) -> AlignmentFiles:
  """Finds the MSA and template-hit files of a chain's directory, in AlphaFold's order."""
  alignment_dir = os.fspath(alignment_dir)
  known, extra, hhr, hmmsearch = {}, [], [], []
  for filename in sorted(os.listdir(alignment_dir)):
    parsed = _stem_and_format(filename)
    if parsed is None:
      continue
    stem, extension = parsed
    path = os.path.join(alignment_dir, filename)
    if extension == "hhr":
      hhr.append(path)
    elif stem in HMMSEARCH_HIT_FILES:
      hmmsearch.append(path)
    elif stem in NOT_MSA_FILES:
      continue
    elif stem in MSA_FILE_ORDER:
      known.setdefault(stem, path)
    else:
      extra.append(path)
  ordered = [known[s] for s in MSA_FILE_ORDER if s in known and s != "mgnify_hits"]
  ordered += [known["mgnify_hits"]] if "mgnify_hits" in known else []
  return AlignmentFiles(tuple(ordered + extra), tuple(hhr), tuple(hmmsearch))


def read_msa(path: str, max_hits: Mapping[str, int] = DEFAULT_MAX_HITS) -> parsers.Msa:
  """Reads one MSA file (A3M or Stockholm, gz allowed), capped at AlphaFold's hit limit by name."""
  stem, extension = _stem_and_format(os.path.basename(path))
  cap = max_hits.get(stem)
  if extension == "sto":
    return parsers.read_stockholm(path, max_sequences=cap)
  msa = parsers.parse_a3m(parsers.read_text(path), path)
  return msa.truncate(cap) if cap else msa


def check_query(msa: parsers.Msa, sequence: str, source: str) -> None:
  """The first row of every alignment must be the chain's sequence ('X' matches anything)."""
  query = msa.sequences[0]
  if len(query) != len(sequence):
    raise FeatureError(f"{source}: alignment query has {len(query)} residues, the chain has "
                       f"{len(sequence)} (alignment of another sequence?)")
  mismatches = [i for i, (a, b) in enumerate(zip(query, sequence)) if a != b and "X" not in (a, b)]
  if mismatches:
    raise FeatureError(f"{source}: alignment query differs from the chain sequence at "
                       f"{len(mismatches)} positions (first: {mismatches[0]})")


def make_msa_features_from_dir(sequence: str, alignment_dir: str | os.PathLike | None,
                               max_hits: Mapping[str, int] = DEFAULT_MAX_HITS) -> FeatureDict:
  """MSA features from a chain's alignment directory, or the query alone when there is none."""
  files = list_alignment_files(alignment_dir) if alignment_dir else AlignmentFiles((), (), ())
  msas = []
  for path in files.msas:
    msa = read_msa(path, max_hits)
    check_query(msa, sequence, path)
    msas.append(msa)
  return make_msa_features(msas or [single_sequence_msa(sequence)])


def read_template_hits(sequence: str, files: AlignmentFiles) -> list[parsers.TemplateHit]:
  """Template hits of a chain: all HHR files, else the hmmsearch Stockholm output."""
  hits: list[parsers.TemplateHit] = []
  for path in files.hhr:
    file_hits = parsers.parse_hhr(parsers.read_text(path), path)
    for hit in file_hits:
      stray = [i for i in hit.indices_query if i >= len(sequence)]
      if stray:
        raise FeatureError(f"{path}: hit {hit.index} aligns query residue {stray[0] + 1} but the "
                           f"chain has {len(sequence)} residues (hits of another sequence?)")
    hits += file_hits
  if not hits:
    for path in files.hmmsearch:
      hits += parsers.parse_hmmsearch_sto(sequence, parsers.read_text(path), path)
  return hits
