"""Benchmark of the alignment search: tool cost per search, Beam pipeline against the plain path.

    python bench/search.py [--work_dir /tmp/af2flax_bench_search] [--unique 16] [--duplicates 8]

Databases (built once in --work_dir) from ../shared/data: a FASTA database of the 40 pdb_chains
sequences and an HH-suite database of them ("small"), and larger ones ("large"): the FASTA of the
40 chains, the ~1,150 real hit sequences of the openfold_testdata alignments and residue-shuffled
copies of them (~4 MB; real databases are mostly non-homologues, which the filters discard the
same way), and an HH-suite database of the 40 chains plus all those hit sequences.

1. Tool cost: CPU seconds (user + system of the tool processes, RUSAGE_CHILDREN, one search at a
   time) and wall seconds per search for jackhmmer (the UniRef90/MGnify recipe), HHblits (BFD +
   Uniclust30 recipe, 3 iterations; the database given twice like the two real ones) and HHsearch
   (PDB70 recipe, input the UniRef90 MSA), on 8 queries, for both database sizes; a line through
   the two points gives each tool's start-up cost and its cost per database byte, which
   docs/data_at_scale.md extrapolates to the real databases.
2. Throughput: --unique distinct chains plus --duplicates copies of some of them under other ids
   (as the PDB has identical chains), on the small databases with AlphaFold's settings and one CPU
   per tool: the plain path (`af2flax.data.search.local`, 1 and 2 threads) against the Beam pipeline
   on DirectRunner with 2 workers, cold (empty cache), warm (the same chains again) and half new.
   Chains/s is wall time on this machine; the cache hit rate is cached / (searched + cached).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import random
import resource
import shutil
import sys
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from apache_beam.options.pipeline_options import PipelineOptions  # noqa: E402

from af2flax.common import protein  # noqa: E402
from af2flax.data import parsers  # noqa: E402
from af2flax.data.search import Searcher, beam_pipeline, local, make_config, make_plan  # noqa: E402
from af2flax.data.search import searches  # noqa: E402
from af2flax.data.tools import hhsuite_db  # noqa: E402

SHARED = REPO.parent / "shared" / "data"
PDB_CHAINS = SHARED / "pdb_chains"
ALIGNMENTS = SHARED / "openfold_testdata" / "alignments"
LARGE_FASTA_BYTES = 4_000_000
COST_QUERIES = 8


def chain_sequences() -> dict[str, str]:
  return {f"{p.name[:4]}_{p.name[4]}": protein.read_structure(str(p)).sequence
          for p in sorted(PDB_CHAINS.glob("*.pdb.gz"))}


def hit_sequences() -> list[str]:
  """Distinct ungapped rows (>= 30 residues) of the openfold_testdata alignments, sorted."""
  found = set()
  for path in sorted(ALIGNMENTS.rglob("*")):
    if path.suffix == ".sto":
      rows = parsers.parse_stockholm_alignment(path.read_text(), str(path)).rows
    elif path.suffix == ".a3m":
      rows = parsers.parse_fasta(path.read_text(), str(path))[0]
    else:
      continue
    for row in rows:
      residues = "".join(c for c in row if c.isalpha()).upper()
      if len(residues) >= 30:
        found.add(residues)
  return sorted(found)


def fasta_text(records: list[tuple[str, str]]) -> str:
  return "".join(f">{name} mol:protein length:{len(seq)}  BENCH\n{seq}\n" for name, seq in records)


def build_databases(work: pathlib.Path, chains: dict[str, str]) -> dict[str, str]:
  """The small and large FASTA and HH-suite databases (each built once, reused from --work_dir)."""
  db = work / "db"
  db.mkdir(parents=True, exist_ok=True)
  paths = {"fasta_small": db / "small.fasta", "fasta_large": db / "large.fasta",
           "hh_small": db / "hh_small", "hh_large": db / "hh_large"}
  records = list(chains.items())
  hits = hit_sequences()
  if not paths["fasta_small"].exists():
    paths["fasta_small"].write_text(fasta_text(records))
  if not paths["fasta_large"].exists():
    large = records + [(f"hit{i:05d}_A", s) for i, s in enumerate(hits)]
    rng = random.Random(0)
    copy, total = 0, len(fasta_text(large))
    while total < LARGE_FASTA_BYTES:
      residues = list(hits[copy % len(hits)])
      rng.shuffle(residues)
      large.append((f"shuf{copy:06d}_A", "".join(residues)))
      total += len(fasta_text(large[-1:]))
      copy += 1
    paths["fasta_large"].write_text(fasta_text(large))
  entries = {"hh_small": dict(records),
             "hh_large": {**chains, **{f"hit{i:05d}_A": s for i, s in enumerate(hits)}}}
  for name, sequences in entries.items():
    if not pathlib.Path(f"{paths[name]}_cs219.ffindex").exists():
      hhsuite_db.build_hhsuite_database({n: f">{n}\n{s}\n" for n, s in sequences.items()},
                                        str(paths[name]))
  return {k: str(v) for k, v in paths.items()}


def database_bytes(path: str) -> int:
  if os.path.isfile(path):
    return os.path.getsize(path)
  folder, prefix = os.path.split(path)
  return sum(os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder)
             if f.startswith(prefix + "_"))


def recipe(fasta: str, hh: str, **overrides) -> dict:
  return make_config(uniref90_database_path=fasta, mgnify_database_path=fasta,
                     bfd_database_path=hh, uniclust30_database_path=hh, pdb70_database_path=hh,
                     msa_tools_n_cpu=1, **overrides)


def _children_cpu() -> float:
  usage = resource.getrusage(resource.RUSAGE_CHILDREN)
  return usage.ru_utime + usage.ru_stime


def tool_cost(config: dict, search: str, queries: list[str], cache: pathlib.Path) -> tuple[float,
                                                                                          float]:
  """(CPU s, wall s) per search of `search`, one search at a time, with a cold cache."""
  shutil.rmtree(cache, ignore_errors=True)
  searcher = Searcher(make_plan(config, str(cache)))
  upstream = searcher.plan.spec(search).upstream
  for query in queries:
    if upstream:
      searcher.run(query, upstream)
  cpu, wall = _children_cpu(), time.perf_counter()
  for query in queries:
    outcome = searcher.run(query, search)
    assert outcome.status == searches.SEARCHED, outcome.reason
  return (_children_cpu() - cpu) / len(queries), (time.perf_counter() - wall) / len(queries)


def beam_options(workers: int, mode: str) -> PipelineOptions:
  return PipelineOptions(["--runner=DirectRunner", f"--direct_num_workers={workers}",
                          f"--direct_running_mode={mode}"])


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--work_dir", default="/tmp/af2flax_bench_search")
  parser.add_argument("--unique", type=int, default=16)
  parser.add_argument("--duplicates", type=int, default=8)
  parser.add_argument("--direct_running_mode", default="multi_threading",
                      choices=("multi_threading", "multi_processing"))
  parser.add_argument("--json", help="also write the results here")
  args = parser.parse_args()
  work = pathlib.Path(args.work_dir)
  chains = chain_sequences()
  dbs = build_databases(work, chains)
  results = {"load_average_start": os.getloadavg()[0], "databases": {
      k: database_bytes(v) for k, v in dbs.items()}}

  # 1. Tool cost per search on both database sizes.
  queries = [chains[n] for n in list(chains)[:COST_QUERIES]]
  results["query_mean_length"] = sum(map(len, queries)) / len(queries)
  cost = {}
  for size in ("small", "large"):
    config = recipe(dbs[f"fasta_{size}"], dbs[f"hh_{size}"])
    for search, label in (("uniref90", "jackhmmer"), ("bfd", "hhblits"), ("pdb70", "hhsearch")):
      cost[f"{label}/{size}"] = tool_cost(config, search, queries, work / "cost_cache")
  results["tool_cost"] = cost
  print(f"\nTool cost per search ({len(queries)} queries, mean length "
        f"{results['query_mean_length']:.0f}; load average {results['load_average_start']:.1f})")
  print(f"{'tool':<10}{'database':<34}{'bytes':>11}{'CPU s':>8}{'wall s':>8}")
  db_of = {"jackhmmer": ("fasta", 1), "hhblits": ("hh", 2), "hhsearch": ("hh", 1)}
  for key, (cpu, wall) in cost.items():
    tool, size = key.split("/")
    kind, copies = db_of[tool]
    size_bytes = copies * results["databases"][f"{kind}_{size}"]
    what = f"{size} {kind}" + (" (given twice)" if copies == 2 else "")
    print(f"{tool:<10}{what:<34}{size_bytes:>11,}{cpu:>8.3f}{wall:>8.3f}")

  # 2. Throughput: plain path against Beam on DirectRunner, 2 workers.
  names = list(chains)[:args.unique]
  records = [(n, chains[n]) for n in names]
  records += [(f"{n[:4]}_{chr(ord('a') + i % 26)}{i}", chains[n])
              for i, n in enumerate(names[:args.duplicates])]
  fasta = work / "chains.fasta"
  fasta.write_text("".join(f">{n}\n{s}\n" for n, s in records))
  more = work / "more.fasta"
  extra = [(n, chains[n]) for n in list(chains)[args.unique:args.unique + args.unique // 2]]
  more.write_text("".join(f">{n}\n{s}\n" for n, s in records[:len(records) // 2] + extra))
  config = recipe(dbs["fasta_small"], dbs["hh_small"])
  rows = []

  def run(label: str, fasta_path: pathlib.Path, cache: str, fresh: bool, beam: bool,
          workers: int) -> None:
    if fresh:
      shutil.rmtree(work / cache, ignore_errors=True)
    out = work / f"out_{label.replace(' ', '_')}"
    shutil.rmtree(out, ignore_errors=True)
    plan = make_plan(config, str(work / cache))
    if beam:
      summary = beam_pipeline.run_search(str(fasta_path), plan, str(out),
                                         beam_options(workers, args.direct_running_mode))
    else:
      summary = local.search_locally(str(fasta_path), plan, str(out), workers=workers)
    rows.append({"run": label, "chains": summary.chains, "unique": summary.unique_sequences,
                 "searched": summary.searched, "cached": summary.cached,
                 "failed": summary.failed, "seconds": summary.seconds,
                 "chains_per_s": summary.chains / summary.seconds,
                 "hit_rate": summary.cache_hit_rate})

  run("plain 1 thread, cold", fasta, "cache_plain1", True, False, 1)
  run("plain 2 threads, cold", fasta, "cache_plain2", True, False, 2)
  run("beam 2 workers, cold", fasta, "cache_beam", True, True, 2)
  run("beam 2 workers, warm", fasta, "cache_beam", False, True, 2)
  run("beam 2 workers, half new", more, "cache_beam", False, True, 2)
  run("plain 1 thread, warm", fasta, "cache_plain1", False, False, 1)
  results["throughput"] = rows
  results["load_average_end"] = os.getloadavg()[0]
  print(f"\nThroughput ({args.unique} distinct + {args.duplicates} duplicate chains; DirectRunner "
        f"{args.direct_running_mode}; load average {results['load_average_end']:.1f})")
  print(f"{'run':<28}{'chains':>7}{'distinct':>9}{'searched':>9}{'cached':>7}{'failed':>7}"
        f"{'wall s':>8}{'chains/s':>9}{'hit rate':>9}")
  for r in rows:
    print(f"{r['run']:<28}{r['chains']:>7}{r['unique']:>9}{r['searched']:>9}{r['cached']:>7}"
          f"{r['failed']:>7}{r['seconds']:>8.1f}{r['chains_per_s']:>9.2f}{r['hit_rate']:>9.0%}")
  if args.json:
    pathlib.Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
  main()
