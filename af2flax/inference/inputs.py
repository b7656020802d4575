"""Raw features of a query: its sequence, MSAs (precomputed, searched now, or none), templates.

Jumper et al. (2021) Suppl. 1.2.2-1.2.3. Three ways to get MSAs:
  * `--alignments DIR`: `DIR/<name>/` in AlphaFold/OpenFold's layout (`*.a3m`, `*.sto`,
    `*.hhr`, gzipped or not; read by `af2flax.data.pipeline`); a missing directory is an error
    for that query (a typo must not silently give a single-sequence prediction);
  * `--run_search`: jackhmmer (UniRef90, MGnify), HHblits (BFD + UniRef30) and HHsearch (PDB70)
    with AlphaFold's settings (`af2flax.data.tools`); the alignments are written to
    `<out>/<name>/msas/` in the same layout and reused when the run is repeated;
  * neither: the query alone (single-sequence mode).
Templates come from the template hits (`*.hhr`, or hmmsearch's `pdb_hits.sto`) when a template
mmCIF directory is given (`af2flax.data.templates`), else no templates.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any

import numpy as np

from af2flax.data import parsers, pipeline
from af2flax.inference.queries import Query, QueryError

logger = logging.getLogger(__name__)
FeatureDict = dict[str, np.ndarray]


@dataclasses.dataclass(frozen=True)
class SearchConfig:
  """Databases and binaries of `--run_search` (AlphaFold's run_alphafold.py flags)."""
  uniref90_database_path: str | None = None
  mgnify_database_path: str | None = None
  bfd_database_path: str | None = None
  uniref30_database_path: str | None = None
  pdb70_database_path: str | None = None
  jackhmmer_binary_path: str = "jackhmmer"
  hhblits_binary_path: str = "hhblits"
  hhsearch_binary_path: str = "hhsearch"
  n_cpu: int = 8

  def check(self) -> None:
    """At least one MSA database; every given path exists (HH-suite: its `_*` files)."""
    if not (self.uniref90_database_path or self.mgnify_database_path or self.bfd_database_path):
      raise ValueError("--run_search needs at least one of --uniref90_database_path, "
                       "--mgnify_database_path, --bfd_database_path")
    for flag in ("uniref90_database_path", "mgnify_database_path"):
      path = getattr(self, flag)
      if path and not os.path.exists(path):
        raise ValueError(f"--{flag} {path}: no such file")


def run_search(query: Query, msa_dir: str, config: SearchConfig) -> str:
  """Searches the databases for `query`, writing AlphaFold's files into `msa_dir`.

  Files already present (an earlier run) are reused, as AlphaFold's `use_precomputed_msas`.
  Returns `msa_dir`. Tool failures raise `af2flax.data.tools.utils.ToolError`.
  """
  # Imported here: only searches need the tool wrappers.
  from af2flax.data.tools import hhblits, hhsearch, jackhmmer  # pylint: disable=g-import-not-at-top

  os.makedirs(msa_dir, exist_ok=True)
  fasta_path = os.path.join(msa_dir, "query.fasta")
  with open(fasta_path, "w") as handle:
    handle.write(f">{query.name}\n{query.sequence}\n")

  def jackhmmer_search(database: str, stem: str) -> str:
    path = os.path.join(msa_dir, f"{stem}.sto")
    if not os.path.exists(path):
      logger.info("%s: jackhmmer against %s", query.name, database)
      result = jackhmmer.Jackhmmer(database, binary_path=config.jackhmmer_binary_path,
                                   n_cpu=config.n_cpu).query(fasta_path)
      _write_atomically(path, result.sto)
    return path

  uniref90_path = None
  if config.uniref90_database_path:
    uniref90_path = jackhmmer_search(config.uniref90_database_path, "uniref90_hits")
  if config.mgnify_database_path:
    jackhmmer_search(config.mgnify_database_path, "mgnify_hits")
  hh_databases = tuple(p for p in (config.bfd_database_path, config.uniref30_database_path) if p)
  bfd_path = os.path.join(msa_dir, "bfd_uniref_hits.a3m")
  if hh_databases and not os.path.exists(bfd_path):
    logger.info("%s: hhblits against %s", query.name, ", ".join(hh_databases))
    a3m = hhblits.HHBlits(hh_databases, binary_path=config.hhblits_binary_path,
                          n_cpu=config.n_cpu).query(fasta_path)
    _write_atomically(bfd_path, a3m)
  hhr_path = os.path.join(msa_dir, "pdb70_hits.hhr")
  if config.pdb70_database_path and uniref90_path and not os.path.exists(hhr_path):
    # AlphaFold searches PDB70 with the de-duplicated UniRef90 alignment (Suppl. 1.2.3).
    alignment = parsers.parse_stockholm_alignment(parsers.read_text(uniref90_path), uniref90_path,
                                                  max_sequences=pipeline.DEFAULT_MAX_HITS[
                                                      "uniref90_hits"])
    alignment = parsers.remove_empty_columns(parsers.deduplicate_stockholm(alignment))
    logger.info("%s: hhsearch against %s", query.name, config.pdb70_database_path)
    hhr = hhsearch.HHSearch((config.pdb70_database_path,),
                            binary_path=config.hhsearch_binary_path,
                            cpu=config.n_cpu).query(parsers.stockholm_to_a3m(alignment))
    _write_atomically(hhr_path, hhr)
  os.remove(fasta_path)
  return msa_dir


def _write_atomically(path: str, text: str) -> None:
  tmp = f"{path}.tmp"
  with open(tmp, "w") as handle:
    handle.write(text)
  os.replace(tmp, path)


def find_alignment_dir(alignments_root: str, query: Query) -> str:
  """`<root>/<name>` (or `<root>/<first word of the header>`); QueryError when missing."""
  words = query.description.split()
  for name in dict.fromkeys([query.name] + words[:1]):
    path = os.path.join(alignments_root, name)
    if os.path.isdir(path):
      return path
  expected = os.path.join(alignments_root, query.name)
  raise QueryError(f"{query.name}: no alignment directory {expected}"
                   " (--alignments expects one directory per sequence, named like its FASTA "
                   "record; leave out --alignments for single-sequence mode)")


def make_raw_features(query: Query, alignment_dir: str | None,
                      template_featurizer: Any | None = None) -> tuple[FeatureDict, dict]:
  """AlphaFold's raw feature dict of `query` and a small report (MSA depth, templates).

  Raises parsers.ParseError / pipeline.FeatureError (bad or mismatched alignment files) with the
  file named; those skip the query.
  """
  features: FeatureDict = dict(pipeline.make_sequence_features(query.sequence, query.name))
  features.update(pipeline.make_msa_features_from_dir(query.sequence, alignment_dir))
  report: dict[str, Any] = {"num_alignments": int(features["msa"].shape[0]),
                            "alignment_dir": alignment_dir, "num_templates": 0}
  if template_featurizer is not None and alignment_dir:
    hits = pipeline.read_template_hits(query.sequence,
                                       pipeline.list_alignment_files(alignment_dir))
    if hits:
      result = template_featurizer.get_templates(query.sequence, hits)
      features.update(result.features)
      report["num_templates"] = int(result.features["template_aatype"].shape[0])
      report["rejected_templates"] = len(result.rejected)
  return features, report


def make_template_featurizer(template_mmcif_dir: str | None, max_template_date: str | None,
                             kalign_binary_path: str = "kalign") -> Any | None:
  """`af2flax.data.templates.TemplateFeaturizer` over `template_mmcif_dir`, or None."""
  if not template_mmcif_dir:
    return None
  if not os.path.isdir(template_mmcif_dir):
    raise ValueError(f"--template_mmcif_dir {template_mmcif_dir}: no such directory")
  from af2flax.data import templates  # pylint: disable=import-outside-toplevel
  from af2flax.data.tools.kalign import Kalign  # pylint: disable=import-outside-toplevel
  return templates.TemplateFeaturizer(structure_dir=template_mmcif_dir,
                                      max_template_date=max_template_date,
                                      kalign=Kalign(kalign_binary_path))
