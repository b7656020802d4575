"""Training examples: one protein chain -> AlphaFold's raw features plus its ground truth.

Jumper et al. (2021) Suppl. 1.2.4 "Training data" and 1.2.5 "Filtering": an example is a PDB chain
(or a self-distillation prediction) with its MSAs and templates (Suppl. 1.2.2-1.2.3) and the
experimental atom37 coordinates. The input pipeline derives atom14/frames/torsions from
`all_atom_positions`/`all_atom_mask` (`af2flax/data/targets.py`); examples store the raw arrays.

`make_example(source, config)` is a pure function of the files it names: the same inputs give
the same arrays, so a build can be retried or distributed (Beam) and write the same bytes.

Naming (see `parse_structure_name`): an example id is `<pdbid>_<chain>` with the PDB id in lower
case and the author chain id as written, e.g. `2q2k_A`. Its alignments are looked up in
`<alignments>/<pdbid>_<chain>/` (OpenFold's layout) or `<alignments>/<pdbid><chain>/`.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import functools
import os
import re
import time
from typing import Iterator, Mapping, MutableMapping

import numpy as np

from af2flax.common import protein
from af2flax.data import parsers, pipeline
from af2flax.data.templates import TemplateFeaturizer, empty_template_features

STRUCTURE_SUFFIXES = (".cif", ".mmcif", ".pdb", ".ent")


class ExampleError(ValueError):
  """A chain cannot become an example; the message is the reason written to failures.tsv."""


@dataclasses.dataclass(frozen=True)
class ExampleFilters:
  """Suppl. 1.2.5 training-set filters. None switches a filter off.

  Unknown resolution (NMR, PDB files without a header) passes `max_resolution`; an unknown
  release date fails a release-date window.
  """
  max_resolution: float | None = 9.0          # Å
  min_length: int | None = None
  max_length: int | None = None
  min_distinct_residue_types: int | None = None
  max_single_residue_fraction: float | None = 0.8
  min_release_date: str | None = None         # 'YYYY-MM-DD', inclusive
  max_release_date: str | None = None         # 'YYYY-MM-DD', inclusive

  def check(self, sequence: str, resolution: float | None, release_date: str | None) -> None:
    """Raises ExampleError naming the first filter the chain fails."""
    length = len(sequence)
    if self.max_resolution is not None and resolution and resolution > self.max_resolution:
      raise ExampleError(f"filtered: resolution {resolution} A > {self.max_resolution} A")
    if self.min_length is not None and length < self.min_length:
      raise ExampleError(f"filtered: length {length} < {self.min_length}")
    if self.max_length is not None and length > self.max_length:
      raise ExampleError(f"filtered: length {length} > {self.max_length}")
    counts = collections.Counter(sequence)
    minimum_types = self.min_distinct_residue_types
    if minimum_types is not None and len(counts) < minimum_types:
      raise ExampleError(f"filtered: {len(counts)} distinct residue types < {minimum_types}")
    if self.max_single_residue_fraction is not None and length:
      letter, count = counts.most_common(1)[0]
      if count / length > self.max_single_residue_fraction:
        raise ExampleError(f"filtered: residue {letter} makes up {count / length:.0%} of the "
                           f"sequence (> {self.max_single_residue_fraction:.0%})")
    if self.min_release_date or self.max_release_date:
      if not release_date:
        raise ExampleError("filtered: release date unknown (a release-date window is set)")
      if self.min_release_date and release_date < self.min_release_date:
        raise ExampleError(f"filtered: released {release_date} before {self.min_release_date}")
      if self.max_release_date and release_date > self.max_release_date:
        raise ExampleError(f"filtered: released {release_date} after {self.max_release_date}")


@dataclasses.dataclass(frozen=True)
class ChainSource:
  """The inputs of one example."""
  example_id: str               # '<pdbid>_<chain>'
  structure_path: str
  chain_id: str                 # author chain id in the structure file
  alignment_dir: str | None = None
  cluster_id: int = -1
  cluster_size: int = 0
  is_distillation: bool = False


@dataclasses.dataclass(frozen=True)
class ExampleConfig:
  filters: ExampleFilters = ExampleFilters()
  msa_max_hits: Mapping[str, int] = dataclasses.field(
      default_factory=lambda: dict(pipeline.DEFAULT_MAX_HITS))
  templates: TemplateFeaturizer | None = None   # None: no template features (T = 0)
  # Å recorded where the structure file gives no resolution; None: unknown (0).
  default_resolution: float | None = None


@dataclasses.dataclass(frozen=True)
class ChainStructure:
  """A chain read from its file: SEQRES-aligned residues, sequence and header."""
  sequence: str
  positions: np.ndarray   # [N, 37, 3] float32
  mask: np.ndarray        # [N, 37] float32
  resolution: float | None
  release_date: str | None


def parse_structure_name(path: str) -> tuple[str, str | None]:
  """File name -> (entry id, chain or None for every chain of the file).

  `1abc.cif[.gz]`, `pdb1abc.ent.gz` -> ('1abc', None); `1abc_A.pdb`, `1abcA.pdb.gz` (chain of
  one or two characters) -> ('1abc', 'A'); any other stem (e.g. a distillation set's UniProt id)
  is the entry id itself, with every chain.
  """
  stem = os.path.basename(path)
  if stem.endswith(".gz"):
    stem = stem[:-3]
  stem = os.path.splitext(stem)[0]
  if re.fullmatch(r"pdb[0-9][a-zA-Z0-9]{3}", stem):
    stem = stem[3:]
  match = re.fullmatch(r"([0-9][a-zA-Z0-9]{3})(?:_([a-zA-Z0-9]{1,4})|([a-zA-Z0-9]{1,2}))?", stem)
  if match:
    return match.group(1).lower(), match.group(2) or match.group(3)
  return stem, None


def example_id(entry_id: str, chain_id: str) -> str:
  return f"{entry_id}_{chain_id}"


def find_alignment_dir(alignment_root: str | None, entry_id: str, chain_id: str) -> str | None:
  """`<root>/<id>_<chain>` or `<root>/<id><chain>`, if either exists."""
  if not alignment_root:
    return None
  for name in (f"{entry_id}_{chain_id}", f"{entry_id}{chain_id}"):
    path = os.path.join(alignment_root, name)
    if os.path.isdir(path):
      return path
  return None


@functools.lru_cache(maxsize=4)
def _read_entry(path: str):
  """The parsed structure file (cached: an mmCIF's chains become several examples)."""
  if ".cif" in os.path.basename(path).lower():
    return protein.read_mmcif_entry(path)
  return protein.read_structure(path)


def list_chains(path: str) -> list[str]:
  """Protein chains of a structure file, in file order (StructureParseError if unreadable)."""
  entry = _read_entry(path)
  return list(entry.chain_ids if isinstance(entry, protein.MmcifEntry) else entry.chain_names)


def read_chain(path: str, chain_id: str) -> ChainStructure:
  """One chain of an mmCIF (SEQRES from `_entity_poly_seq`) or PDB file (observed residues)."""
  entry = _read_entry(path)
  if isinstance(entry, protein.MmcifEntry):
    chain = entry.chain(chain_id)
    sequence = entry.seqres[chain_id]
  else:
    if chain_id not in entry.chain_names:
      raise ExampleError(f"no protein chain {chain_id!r}; chains are {list(entry.chain_names)}")
    chain = entry.chain(chain_id)
    seqres = entry.seqres.get(chain_id, "")
    sequence = seqres if len(seqres) == chain.num_res else chain.sequence
  if len(sequence) != chain.num_res:
    raise ExampleError(f"chain {chain_id}: SEQRES has {len(sequence)} residues, the structure "
                       f"{chain.num_res}")
  return ChainStructure(sequence, chain.atom_positions.astype(np.float32),
                        chain.atom_mask.astype(np.float32), entry.resolution, entry.release_date)


@contextlib.contextmanager
def _timed(timings: MutableMapping[str, float] | None, stage: str) -> Iterator[None]:
  start = time.process_time()
  yield
  if timings is not None:
    timings[stage] = timings.get(stage, 0.0) + time.process_time() - start


def make_example(source: ChainSource, config: ExampleConfig = ExampleConfig(),
                 timings: MutableMapping[str, float] | None = None) -> dict[str, np.ndarray]:
  """The feature dict of one chain (schema: `af2flax.data.tfrecord.FEATURES`).

  Raises ExampleError (filtered, inconsistent), parsers.ParseError (bad alignment file),
  protein.StructureParseError (bad structure) or pipeline.FeatureError; each message names the
  input. `timings`, if given, accumulates this process's CPU seconds per stage ('parse', 'msa',
  'templates').
  """
  with _timed(timings, "parse"):
    chain = read_chain(source.structure_path, source.chain_id)
  if not chain.mask.any():
    raise ExampleError(f"chain {source.chain_id} has no atom coordinates")
  config.filters.check(chain.sequence, chain.resolution, chain.release_date)
  sequence = chain.sequence
  with _timed(timings, "msa"):
    features = pipeline.make_sequence_features(sequence, source.example_id)
    features.update(pipeline.make_msa_features_from_dir(sequence, source.alignment_dir,
                                                        config.msa_max_hits))
  with _timed(timings, "templates"):
    files = (pipeline.list_alignment_files(source.alignment_dir) if source.alignment_dir
             else None)
    hits = pipeline.read_template_hits(sequence, files) if files else []
    if config.templates is not None and hits:
      pdb_id = source.example_id.split("_")[0]
      features.update(config.templates.get_templates(sequence, hits, pdb_id,
                                                     chain.release_date).features)
    else:
      features.update(empty_template_features(len(sequence)))
  features.update({
      "all_atom_positions": chain.positions,
      "all_atom_mask": chain.mask,
      "resolution": np.array([chain.resolution or config.default_resolution or 0.0],
                             np.float32),
      "release_date": np.array([(chain.release_date or "").encode()], object),
      "chain_id": np.array([source.example_id.encode()], object),
      "cluster_id": np.array([source.cluster_id], np.int32),
      "cluster_size": np.array([source.cluster_size], np.int32),
      "is_distillation": np.array([float(source.is_distillation)], np.float32),
  })
  return features


def read_clusters(path: str) -> dict[str, tuple[int, int]]:
  """A cluster file (one cluster per line, whitespace-separated `<pdbid>_<chain>` members) ->
  member -> (cluster id = line number from 0, cluster size). PDB ids are matched case-blind."""
  clusters = {}
  text = parsers.read_text(path)
  for line_number, line in enumerate(text.splitlines()):
    members = line.split()
    for member in members:
      entry, _, chain = member.partition("_")
      if not chain:
        raise parsers.ParseError(path, f"cluster member {member!r} is not <pdbid>_<chain>",
                                 line_number + 1)
      clusters[example_id(entry.lower(), chain)] = (line_number, len(members))
  return clusters
