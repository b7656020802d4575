"""The search recipe without Beam: the same searches, cache and output, in one process.

The plain path that `bench/search.py` compares the Beam pipeline with, and a fallback for a
single machine. Identical sequences share one search and cached searches are not re-run, exactly
as in `beam_pipeline`; sequences run concurrently on `workers` threads (the tools are separate
processes, so threads suffice).
"""

from __future__ import annotations

import collections
import concurrent.futures
import time

from apache_beam.io.filesystems import FileSystems

from af2flax.data.search import config as search_config
from af2flax.data.search import searches
from af2flax.data.search.config import SearchPlan


def search_sequence(searcher: searches.Searcher, sequence: str) -> list[searches.SearchOutcome]:
  """All searches of one sequence: the MSA searches, then those that need the UniRef90 MSA."""
  plan = searcher.plan
  outcomes = [searcher.run(sequence, spec.name) for spec in plan.msa_searches]
  succeeded = {o.search for o in outcomes if o.status != searches.FAILED}
  outcomes += [searcher.run(sequence, spec.name) for spec in plan.template_searches
               if spec.upstream in succeeded or not plan.runs_upstream_of(spec)]
  return outcomes


def search_locally(fasta: str, plan: SearchPlan, out_dir: str,
                   workers: int = 1) -> searches.SearchSummary:
  """Searches every chain of `fasta` and writes `<out_dir>/<chain>/...` and `failures.tsv`."""
  start = time.perf_counter()
  chains, failures = searches.read_fasta_chains(fasta)
  members = collections.defaultdict(list)
  sequence_of = {}
  for chain_id, sequence in chains:
    key = search_config.sequence_id(sequence)
    members[key].append(chain_id)
    sequence_of[key] = sequence
  summary = searches.SearchSummary(chains=len(chains), unique_sequences=len(members),
                                   input_failures=len(failures))
  searcher = searches.Searcher(plan)
  keys = sorted(members)
  with concurrent.futures.ThreadPoolExecutor(max(1, workers)) as pool:
    results = list(pool.map(lambda k: search_sequence(searcher, sequence_of[k]), keys))
  for key, outcomes in zip(keys, results):
    for outcome in outcomes:
      summary.add(outcome)
    reason = searches.group_failure(plan.searches, outcomes)
    for chain_id in sorted(members[key]):
      if reason:
        failures.append((chain_id, reason))
        summary.chains_failed += 1
      else:
        searches.write_chain_outputs(plan, out_dir, chain_id, outcomes)
        summary.chains_written += 1
  searches.write_atomically(FileSystems.join(out_dir, "failures.tsv"),
                            searches.failures_tsv(failures))
  summary.seconds = time.perf_counter() - start
  return summary
