"""One search of the recipe for one sequence, with its cache; chain output and FASTA input.

Jumper et al. (2021) Suppl. 1.2.2-1.2.3. Every search result is validated (parsed, query row equal
to the sequence) before it is cached, so a crash, a timeout, an empty or corrupt output is a
failure with a reason and never a cache entry. Cache layout, one entry per search key
(`config.search_key`):
  <cache>/<search>/<key[:2]>/<key>.<sto|a3m|hhr>   the result, written atomically (tmp + rename)
  <cache>/<search>/<key[:2]>/<key>.json            its metadata (tool seconds, sequence length)
The result file's presence marks the entry complete. Files go through Beam's `FileSystems`, so the
cache and the output may be local paths or gs://, hdfs://, s3:// URLs.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import time
import uuid
from typing import Any, Mapping

from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems

from af2flax.data import parsers, pipeline
from af2flax.data.search import config as search_config
from af2flax.data.search.config import SearchPlan, SearchSpec
from af2flax.data.tools import HHBlits, HHSearch, Hmmsearch, Jackhmmer, utils

SEARCHED, CACHED, FAILED = "searched", "cached", "failed"
# Chain ids become directory names of the alignment layout.
CHAIN_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,199}$")
QUERY_NAME = "query"   # the FASTA name tools see: identical chains share the search
MAX_REASON_CHARS = 500


class MissingUpstreamError(ValueError):
  """A template search ran without its UniRef90 alignment in the cache."""


@dataclasses.dataclass(frozen=True)
class SearchOutcome:
  """What one search of one sequence gave: a cache entry, or a failure with its reason."""
  sequence_id: str
  sequence: str
  search: str
  status: str            # SEARCHED | CACHED | FAILED
  cache_path: str = ""
  reason: str = ""
  tool_seconds: float = 0.0   # the tool's wall time (recorded when it ran; also for cached)


# --- files --------------------------------------------------------------------------------------

def read_bytes(path: str) -> bytes:
  with FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED) as f:
    return f.read()


def write_atomically(path: str, data: bytes) -> None:
  """Writes to a temporary name and renames, so readers never see a partial file."""
  tmp = f"{path}.tmp-{uuid.uuid4().hex}"
  with FileSystems.create(tmp, compression_type=CompressionTypes.UNCOMPRESSED) as f:
    f.write(data)
  FileSystems.rename([tmp], [path])


def cache_paths(plan: SearchPlan, spec: SearchSpec, key: str) -> tuple[str, str]:
  extension = spec.output_filename.rsplit(".", 1)[1]
  folder = FileSystems.join(plan.cache_dir, spec.name, key[:2])
  return FileSystems.join(folder, f"{key}.{extension}"), FileSystems.join(folder, f"{key}.json")


def one_line(error: BaseException, search: str = "") -> str:
  """A failure reason on one line: the message's first line and, for tools, stderr's last line."""
  lines = [line.strip() for line in str(error).splitlines() if line.strip()]
  reason = f"{type(error).__name__}: {lines[0] if lines else ''}"
  stderr = [line.strip() for line in getattr(error, "stderr", "").splitlines() if line.strip()]
  if stderr:
    reason += f" | stderr: {stderr[-1]}"
  reason = f"{search}: {reason}" if search else reason
  return " ".join(reason.split())[:MAX_REASON_CHARS]


# --- input --------------------------------------------------------------------------------------

def read_fasta_chains(path: str) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
  """A FASTA of chains -> ([(chain id, sequence)], [(input, reason)] for unusable records).

  The chain id is the description's first word (`>1abc_A mol:protein ...` -> '1abc_A'); it names
  the chain's alignment directory. Sequences are upper-cased; a record with an unsafe or repeated
  id, or a sequence with characters other than letters, is a failure.
  """
  text = read_bytes(path).decode("utf-8")
  sequences, descriptions = parsers.parse_fasta(text, path)
  chains, failures, first_record = [], [], {}
  for number, (description, sequence) in enumerate(zip(descriptions, sequences), start=1):
    words = description.split()
    chain_id = words[0] if words else ""
    where = chain_id or f"{os.path.basename(path)}:record {number}"
    sequence = sequence.upper()
    if not CHAIN_ID.match(chain_id):
      failures.append((where, f"record {number}: chain id {chain_id!r} is not a safe directory "
                              "name (letters, digits, '_.:-'; first a letter or digit)"))
    elif chain_id in first_record:
      failures.append((where, f"record {number}: chain id repeats record {first_record[chain_id]}"))
    elif not sequence or not sequence.isalpha() or not sequence.isascii():
      failures.append((where, f"record {number}: sequence is empty or has non-letters"))
    else:
      first_record[chain_id] = number
      chains.append((chain_id, sequence))
  return chains, failures


# --- running one search -------------------------------------------------------------------------

def make_tool(config: Mapping[str, Any], spec: SearchSpec) -> Any:
  """The wrapper of `spec.tool` with the config's databases and settings (checks they exist)."""
  paths = tuple(search_config.database_path(config, d) for d in spec.databases)
  settings = dict(config[spec.tool])
  timeout = settings.pop("timeout_s") or None
  n_cpu = config["msa_tools_n_cpu"]
  if spec.tool == "jackhmmer":
    settings["z_value"] = settings["z_value"] or None
    return Jackhmmer(database_path=paths[0], binary_path=config["jackhmmer_binary_path"],
                     n_cpu=n_cpu, timeout_s=timeout, **settings)
  if spec.tool == "hhblits":
    return HHBlits(databases=paths, binary_path=config["hhblits_binary_path"], n_cpu=n_cpu,
                   timeout_s=timeout, **settings)
  if spec.tool == "hhsearch":
    return HHSearch(databases=paths, binary_path=config["hhsearch_binary_path"], cpu=n_cpu,
                    timeout_s=timeout, **settings)
  if spec.tool == "hmmsearch":
    return Hmmsearch(database_path=paths[0], binary_path=config["hmmsearch_binary_path"],
                     hmmbuild_binary_path=config["hmmbuild_binary_path"],
                     flags=tuple(settings["flags"]), cpu=n_cpu, timeout_s=timeout)
  raise ValueError(f"unknown tool {spec.tool!r}")


def _cap_stockholm(text: str, max_hits: int, source: str) -> tuple[str, parsers.Msa]:
  """Keeps the first `max_hits` rows (AlphaFold's uniref/mgnify_max_hits) -> (text, its Msa).

  The tool's text is kept verbatim when it is within the cap; else it is rewritten with the first
  rows, which `pipeline.read_msa` reads as the same MSA as the full file under the same cap.
  """
  alignment = parsers.parse_stockholm_alignment(text, source, max_hits + 1 if max_hits else None)
  if max_hits and len(alignment) > max_hits:
    names = alignment.names[:max_hits]
    alignment = parsers.StockholmAlignment(
        names, alignment.rows[:max_hits],
        {n: alignment.descriptions[n] for n in names if n in alignment.descriptions},
        alignment.reference_annotation)
    text = parsers.format_stockholm(alignment)
  return text, parsers.msa_from_stockholm(alignment)


def template_query(uniref90_sto: str, source: str) -> parsers.StockholmAlignment:
  """The template search's input (Suppl. 1.2.3): UniRef90 MSA, de-duplicated, empty columns gone."""
  return parsers.remove_empty_columns(parsers.deduplicate_stockholm(
      parsers.parse_stockholm_alignment(uniref90_sto, source)))


class Searcher:
  """Runs the plan's searches with the cache; the tool wrappers are built once (per worker)."""

  def __init__(self, plan: SearchPlan):
    self.plan = plan
    self.tools = {spec.name: make_tool(plan.config, spec) for spec in plan.searches}

  def run(self, sequence: str, search: str) -> SearchOutcome:
    """Cached result of `search` for `sequence`, else runs the tool and caches a valid result.

    A template search needs its upstream (UniRef90) result in the cache. Tool failures and bad
    outputs are returned as FAILED outcomes; cache I/O errors propagate (a runner retries them).
    """
    spec = self.plan.spec(search)
    key = search_config.search_key(self.plan, sequence, spec)
    result_path, meta_path = cache_paths(self.plan, spec, key)
    sequence_id = search_config.sequence_id(sequence)
    if FileSystems.exists(result_path):
      seconds = 0.0
      if FileSystems.exists(meta_path):
        seconds = float(json.loads(read_bytes(meta_path)).get("tool_seconds", 0.0))
      return SearchOutcome(sequence_id, sequence, search, CACHED, result_path,
                           tool_seconds=seconds)
    start = time.perf_counter()
    try:
      text = self._search(sequence, spec, key)
    except (utils.ToolError, ValueError) as e:  # ParseError, FeatureError are ValueErrors
      return SearchOutcome(sequence_id, sequence, search, FAILED, reason=one_line(e, search),
                           tool_seconds=time.perf_counter() - start)
    seconds = time.perf_counter() - start
    meta = {"key": key, "search": search, "tool": spec.tool, "sequence_length": len(sequence),
            "tool_seconds": round(seconds, 3), "databases": [self.plan.fingerprints[d]
                                                             for d in spec.databases]}
    write_atomically(meta_path, json.dumps(meta, sort_keys=True).encode())
    write_atomically(result_path, text.encode("utf-8"))
    return SearchOutcome(sequence_id, sequence, search, SEARCHED, result_path, tool_seconds=seconds)

  def _search(self, sequence: str, spec: SearchSpec, key: str) -> str:
    tool = self.tools[spec.name]
    source = f"{spec.tool} {spec.name} output (key {key[:12]})"
    if spec.tool in ("jackhmmer", "hhblits"):
      with utils.temp_dir() as tmp:
        fasta = os.path.join(tmp, "query.fasta")
        with open(fasta, "w") as f:
          f.write(f">{QUERY_NAME}\n{sequence}\n")
        output = tool.query(fasta)
      if spec.tool == "jackhmmer":
        text, msa = _cap_stockholm(output.sto, spec.max_hits, source)
      else:
        text, msa = output, parsers.parse_a3m(output, source)
      pipeline.check_query(msa, sequence, source)
      return text
    upstream = self.plan.spec(spec.upstream)
    upstream_path, _ = cache_paths(self.plan, upstream,
                                   search_config.search_key(self.plan, sequence, upstream))
    if not FileSystems.exists(upstream_path):
      raise MissingUpstreamError(f"the {upstream.name} alignment it searches with is not in the "
                                 f"cache; run the {upstream.name} search first")
    alignment = template_query(read_bytes(upstream_path).decode("utf-8"), upstream_path)
    if spec.tool == "hhsearch":
      text = tool.query(parsers.stockholm_to_a3m(alignment))
      hits = parsers.parse_hhr(text, source)
      for hit in hits:
        if any(i >= len(sequence) for i in hit.indices_query):
          raise pipeline.FeatureError(f"{source}: hit {hit.index} aligns past the query's end")
      return text
    text = tool.query(parsers.format_stockholm(alignment))
    parsers.parse_hmmsearch_sto(sequence, text, source)
    return text


# --- output -------------------------------------------------------------------------------------

def group_failure(searches: tuple[SearchSpec, ...],
                  outcomes: list[SearchOutcome]) -> str | None:
  """Why a sequence's chains get no output ('' = all searches succeeded)."""
  by_search = {o.search: o for o in outcomes}
  reasons = [o.reason for o in outcomes if o.status == FAILED]
  if reasons:
    return "; ".join(sorted(reasons))[:2 * MAX_REASON_CHARS]
  missing = [s.name for s in searches if s.name not in by_search]
  return f"no result for {', '.join(missing)}" if missing else ""


def write_chain_outputs(plan: SearchPlan, out_dir: str, chain_id: str,
                        outcomes: list[SearchOutcome]) -> None:
  """Copies a chain's search results into `<out>/<chain>/<file>` (build_dataset's layout)."""
  for outcome in sorted(outcomes, key=lambda o: o.search):
    spec = plan.spec(outcome.search)
    write_atomically(FileSystems.join(out_dir, chain_id, spec.output_filename),
                     read_bytes(outcome.cache_path))


def failures_tsv(rows: list[tuple[str, str]]) -> bytes:
  """failures.tsv as build_dataset writes it: a header, then (input, reason) rows sorted."""
  clean = lambda s: " ".join(str(s).split())
  return "".join(f"{clean(a)}\t{clean(b)}\n"
                 for a, b in [("input", "reason")] + sorted(rows)).encode("utf-8")


# --- summary ------------------------------------------------------------------------------------

@dataclasses.dataclass
class SearchSummary:
  """Counts of one run (searches are sequence x database; chains share their sequence's)."""
  chains: int = 0
  unique_sequences: int = 0
  input_failures: int = 0
  searched: int = 0
  cached: int = 0
  failed: int = 0
  chains_written: int = 0
  chains_failed: int = 0
  seconds: float = 0.0
  by_search: dict[str, dict[str, float]] = dataclasses.field(default_factory=dict)

  def add(self, outcome: SearchOutcome) -> None:
    setattr(self, outcome.status, getattr(self, outcome.status) + 1)
    row = self.by_search.setdefault(outcome.search, {SEARCHED: 0, CACHED: 0, FAILED: 0,
                                                     "tool_seconds": 0.0})
    row[outcome.status] += 1
    if outcome.status == SEARCHED:
      row["tool_seconds"] += outcome.tool_seconds

  @property
  def cache_hit_rate(self) -> float:
    done = self.searched + self.cached
    return self.cached / done if done else 0.0

  def table(self) -> str:
    lines = [f"chains {self.chains} ({self.unique_sequences} distinct sequences), "
             f"written {self.chains_written}, failed {self.chains_failed + self.input_failures}",
             f"searches: searched {self.searched}, cached {self.cached}, failed {self.failed} "
             f"(cache hit rate {self.cache_hit_rate:.0%}); {self.seconds:.1f} s",
             f"{'search':<12}{'searched':>10}{'cached':>10}{'failed':>10}{'s/search':>10}"]
    for name, row in sorted(self.by_search.items()):
      per = row["tool_seconds"] / row[SEARCHED] if row[SEARCHED] else float("nan")
      lines.append(f"{name:<12}{row[SEARCHED]:>10.0f}{row[CACHED]:>10.0f}{row[FAILED]:>10.0f}"
                   f"{per:>10.2f}")
    return "\n".join(lines)
