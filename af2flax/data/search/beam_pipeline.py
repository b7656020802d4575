"""AlphaFold's search recipe as Apache Beam transforms (Jumper et al. 2021, Suppl. 1.2.2-1.2.3).

    FASTA --ReadChains--> (chain, sequence) --group identical sequences--> sequence
      --one element per (sequence, MSA search), reshuffled--> RunSearch (jackhmmer UniRef90,
        jackhmmer MGnify, hhblits BFD+Uniclust30 | jackhmmer small BFD)
      --UniRef90 done--> RunSearch (hhsearch PDB70 | hmmsearch pdb_seqres)
      --all outcomes + the sequence's chains (CoGroupByKey)--> WriteChains: <out>/<chain>/<file>
    input and search failures --> <out>/failures.tsv

Each search of each distinct sequence is one element, so a runner spreads the slow tools over
all workers; the cache (`searches.Searcher`) makes every step idempotent: a retried bundle finds
the result its first attempt cached, or runs the tool again and writes the same files. Counters
(namespace `af2flax.search`): chains, unique_sequences, searched, cached, failed (per search too,
e.g. `searched_uniref90`), chains_written, chains_failed, input_failures; distributions
`tool_ms_<search>` of the tools' wall time.
"""

from __future__ import annotations

import time
from typing import Any, Iterator

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics import Metrics
from apache_beam.metrics.metric import MetricsFilter

from af2flax.data.search import config as search_config
from af2flax.data.search import searches
from af2flax.data.search.config import SearchPlan

NAMESPACE = "af2flax.search"
FAILURES = "failures"


def _count(name: str, value: int = 1) -> None:
  Metrics.counter(NAMESPACE, name).inc(value)


class ReadChains(beam.DoFn):
  """A FASTA path -> (chain id, sequence); unusable records go to the `failures` output."""

  def process(self, path: str) -> Iterator[Any]:
    chains, failures = searches.read_fasta_chains(path)
    _count("chains", len(chains))
    _count("input_failures", len(failures))
    yield from chains
    for failure in failures:
      yield beam.pvalue.TaggedOutput(FAILURES, failure)


class RunSearch(beam.DoFn):
  """(sequence, search name) -> SearchOutcome, from the cache or by running the tool."""

  def __init__(self, plan: SearchPlan):
    self.plan = plan
    self.searcher = None

  def setup(self) -> None:
    # Checks the binaries and databases once per worker: a missing one fails the job early.
    self.searcher = searches.Searcher(self.plan)

  def process(self, task: tuple[str, str]) -> Iterator[searches.SearchOutcome]:
    sequence, search = task
    outcome = self.searcher.run(sequence, search)
    _count(outcome.status)
    _count(f"{outcome.status}_{search}")
    if outcome.status == searches.SEARCHED:
      Metrics.distribution(NAMESPACE, f"tool_ms_{search}").update(
          int(1000 * outcome.tool_seconds))
    yield outcome


class WriteChains(beam.DoFn):
  """(sequence id, {chains, outcomes}) -> each chain's files, or a failure row per chain."""

  def __init__(self, plan: SearchPlan, out_dir: str):
    self.plan, self.out_dir = plan, out_dir

  def process(self, element: tuple[str, dict[str, Any]]) -> Iterator[Any]:
    _, grouped = element
    chain_ids = sorted(c for group in grouped["chains"] for c in group)
    outcomes = list(grouped["outcomes"])
    reason = searches.group_failure(self.plan.searches, outcomes)
    for chain_id in chain_ids:
      if reason:
        _count("chains_failed")
        yield beam.pvalue.TaggedOutput(FAILURES, (chain_id, reason))
      else:
        searches.write_chain_outputs(self.plan, self.out_dir, chain_id, outcomes)
        _count("chains_written")
        yield chain_id


def _template_tasks(plan: SearchPlan, outcome: searches.SearchOutcome) -> list[tuple[str, str]]:
  if outcome.status == searches.FAILED:
    return []
  return [(outcome.sequence, spec.name) for spec in plan.template_searches
          if spec.upstream == outcome.search]


def _write_failures(rows: list[tuple[str, str]], path: str) -> None:
  searches.write_atomically(path, searches.failures_tsv(rows))


class SearchChains(beam.PTransform):
  """FASTA path(s) -> alignments of every chain in `out_dir`; returns the written chain ids."""

  def __init__(self, plan: SearchPlan, out_dir: str):
    super().__init__()
    self.plan, self.out_dir = plan, out_dir

  def expand(self, fasta_paths: beam.PCollection) -> beam.PCollection:
    plan = self.plan
    read = fasta_paths | "ReadChains" >> beam.ParDo(ReadChains()).with_outputs(
        FAILURES, main="chains")
    by_sequence = (read.chains
                   | "KeyBySequence" >> beam.Map(
                       lambda c: (search_config.sequence_id(c[1]), c))
                   | "GroupIdentical" >> beam.GroupByKey())
    chain_ids = by_sequence | "ChainIds" >> beam.MapTuple(
        lambda key, members: (key, sorted(chain for chain, _ in members)))
    sequences = by_sequence | "Sequence" >> beam.MapTuple(
        lambda key, members: next(iter(members))[1])
    _ = sequences | "CountUnique" >> beam.Map(lambda _: _count("unique_sequences"))
    msa_outcomes = (sequences
                    | "MsaTasks" >> beam.FlatMap(
                        lambda s: [(s, spec.name) for spec in plan.msa_searches])
                    # One element per search, spread over workers (no fusion with the read).
                    | "SpreadMsaTasks" >> beam.Reshuffle()
                    | "MsaSearch" >> beam.ParDo(RunSearch(plan)))
    # A template search follows its UniRef90 search, or reads it from the cache of an earlier
    # run when this one does not search UniRef90 (config 'searches').
    chained = msa_outcomes | "TemplateTasks" >> beam.FlatMap(lambda o: _template_tasks(plan, o))
    unchained = sequences | "CachedUpstreamTasks" >> beam.FlatMap(
        lambda s: [(s, spec.name) for spec in plan.template_searches
                   if not plan.runs_upstream_of(spec)])
    template_outcomes = ((chained, unchained)
                         | "AllTemplateTasks" >> beam.Flatten()
                         | "SpreadTemplateTasks" >> beam.Reshuffle()
                         | "TemplateSearch" >> beam.ParDo(RunSearch(plan)))
    outcomes = ((msa_outcomes, template_outcomes)
                | "AllOutcomes" >> beam.Flatten()
                | "KeyOutcomes" >> beam.Map(lambda o: (o.sequence_id, o)))
    written = ({"chains": chain_ids, "outcomes": outcomes}
               | "JoinChains" >> beam.CoGroupByKey()
               | "WriteChains" >> beam.ParDo(WriteChains(plan, self.out_dir)).with_outputs(
                   FAILURES, main="written"))
    failures_path = FileSystems.join(self.out_dir, "failures.tsv")
    _ = ((read.failures, written.failures)
         | "AllFailures" >> beam.Flatten()
         | "CollectFailures" >> beam.combiners.ToList()
         | "WriteFailures" >> beam.Map(_write_failures, failures_path))
    return written.written


def summary_from_metrics(result: Any, seconds: float = 0.0) -> searches.SearchSummary:
  """The run's SearchSummary from its Beam counters (committed values, else attempted)."""
  metrics = result.metrics().query(MetricsFilter().with_namespace(NAMESPACE))
  totals: dict[str, float] = {}
  for counter in metrics["counters"]:
    value = counter.committed if counter.committed is not None else counter.attempted
    totals[counter.key.metric.name] = totals.get(counter.key.metric.name, 0) + (value or 0)
  tool_ms: dict[str, float] = {}
  for distribution in metrics["distributions"]:
    value = distribution.committed or distribution.attempted
    name = distribution.key.metric.name.removeprefix("tool_ms_")
    if value is not None:
      tool_ms[name] = tool_ms.get(name, 0) + value.sum
  summary = searches.SearchSummary(
      chains=int(totals.get("chains", 0)), unique_sequences=int(totals.get("unique_sequences", 0)),
      input_failures=int(totals.get("input_failures", 0)), seconds=seconds,
      chains_written=int(totals.get("chains_written", 0)),
      chains_failed=int(totals.get("chains_failed", 0)))
  for status in (searches.SEARCHED, searches.CACHED, searches.FAILED):
    setattr(summary, status, int(totals.get(status, 0)))
  names = {k.split("_", 1)[1] for k in totals if k.split("_", 1)[0] in
           (searches.SEARCHED, searches.CACHED, searches.FAILED) and "_" in k}
  for name in names:
    summary.by_search[name] = {s: totals.get(f"{s}_{name}", 0)
                               for s in (searches.SEARCHED, searches.CACHED, searches.FAILED)}
    summary.by_search[name]["tool_seconds"] = tool_ms.get(name, 0) / 1000
  return summary


def run_search(fasta: str, plan: SearchPlan, out_dir: str,
               options: beam.options.pipeline_options.PipelineOptions) -> searches.SearchSummary:
  """Runs the search pipeline to completion with `options` (runner etc.); returns its summary."""
  start = time.perf_counter()
  pipeline = beam.Pipeline(options=options)
  _ = (pipeline
       | "Fasta" >> beam.Create([fasta])
       | "Search" >> SearchChains(plan, out_dir))
  result = pipeline.run()
  result.wait_until_finish()
  return summary_from_metrics(result, time.perf_counter() - start)
