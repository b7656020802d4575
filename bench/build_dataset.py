"""Benchmark of the dataset builder: chains/s, peak memory and time per stage on the 40-chain set.

    python bench/build_dataset.py [--workers 2] [--work_dir /tmp/af2flax_bench_build]

The 40 chains of ../shared/data/pdb_chains get real alignments first (cached in --work_dir):
jackhmmer against a FASTA database of the 40 sequences (uniref90_hits.sto), HHblits against an
HH-suite database of them (bfd_uniclust_hits.a3m), and HHsearch with the jackhmmer MSA against the
same HH-suite database (pdb70_hits.hhr, AlphaFold's template search recipe), so every builder stage
(structure parsing, MSA features, templates read from the pdb_chains files, encoding, writing)
does real work. Then `af2flax.data.build_dataset.build` runs on them and the table shows:
wall time, chains/s, CPU time, peak resident memory (main process + workers, sampled every 50 ms)
and each stage's CPU seconds (summed over workers) and share. CPU time, unlike wall time, does not
depend on what else runs on the machine.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import resource
import shutil
import sys
import threading
import time

import psutil

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from af2flax.common import protein  # noqa: E402
from af2flax.data import build_dataset, parsers  # noqa: E402
from af2flax.data.tools import HHBlits, HHSearch, Jackhmmer  # noqa: E402
from af2flax.data.tools import hhsuite_db  # noqa: E402

PDB_CHAINS = REPO.parent / "shared" / "data" / "pdb_chains"
STAGES = ("parse", "msa", "templates", "encode", "write")


def chain_sequences() -> dict[str, str]:
  """`<pdbid>_<chain>` -> sequence of each pdb_chains file, read with af2flax.common.protein."""
  sequences = {}
  for path in sorted(PDB_CHAINS.glob("*.pdb.gz")):
    structure = protein.read_structure(str(path))
    sequences[f"{path.name[:4]}_{path.name[4]}"] = structure.sequence
  return sequences


def make_alignments(work: pathlib.Path, sequences: dict[str, str]) -> tuple[pathlib.Path, dict]:
  """Runs AlphaFold's search recipe for every chain (once; reused when present)."""
  alignments = work / "alignments"
  seconds = {"jackhmmer": 0.0, "hhblits": 0.0, "hhsearch": 0.0}
  if (alignments / "done").exists():
    return alignments, {}
  shutil.rmtree(work, ignore_errors=True)
  (work / "db").mkdir(parents=True)
  fasta = work / "db" / "seqres.fasta"
  fasta.write_text("".join(f">{n} mol:protein length:{len(s)}\n{s}\n"
                           for n, s in sequences.items()))
  hhdb = hhsuite_db.build_hhsuite_database({n: f">{n}\n{s}\n" for n, s in sequences.items()},
                                           str(work / "db" / "pdb_mini"))
  jackhmmer = Jackhmmer(database_path=str(fasta), n_cpu=2)
  hhblits = HHBlits(databases=(hhdb,), n_cpu=2, n_iter=2)
  hhsearch = HHSearch(databases=(hhdb,), cpu=2)
  for name, sequence in sequences.items():
    directory = alignments / name
    directory.mkdir(parents=True)
    query = directory / "query.fasta"
    query.write_text(f">{name}\n{sequence}\n")
    start = time.perf_counter()
    sto = jackhmmer.query(str(query)).sto
    seconds["jackhmmer"] += time.perf_counter() - start
    (directory / "uniref90_hits.sto").write_text(sto)
    start = time.perf_counter()
    (directory / "bfd_uniclust_hits.a3m").write_text(hhblits.query(str(query)))
    seconds["hhblits"] += time.perf_counter() - start
    alignment = parsers.remove_empty_columns(parsers.deduplicate_stockholm(
        parsers.parse_stockholm_alignment(sto, name)))
    start = time.perf_counter()
    (directory / "pdb70_hits.hhr").write_text(hhsearch.query(parsers.stockholm_to_a3m(alignment)))
    seconds["hhsearch"] += time.perf_counter() - start
    query.unlink()
  (alignments / "done").write_text("")
  return alignments, seconds


def _cpu_seconds() -> float:
  """User + system CPU of this process and its finished children (the joined workers)."""
  own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(
      resource.RUSAGE_CHILDREN)
  return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


class PeakMemory:
  """Samples the summed RSS of this process and its children."""

  def __init__(self, interval_s: float = 0.05):
    self.interval_s, self.peak, self._stop = interval_s, 0, threading.Event()
    self._thread = threading.Thread(target=self._run, daemon=True)

  def _run(self):
    me = psutil.Process()
    while not self._stop.is_set():
      total = 0
      for process in [me] + me.children(recursive=True):
        try:
          total += process.memory_info().rss
        except psutil.Error:
          pass
      self.peak = max(self.peak, total)
      time.sleep(self.interval_s)

  def __enter__(self):
    self._thread.start()
    return self

  def __exit__(self, *exc):
    self._stop.set()
    self._thread.join()


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--workers", type=int, default=2)
  parser.add_argument("--shards", type=int, default=4)
  parser.add_argument("--work_dir", default="/tmp/af2flax_bench_build")
  args = parser.parse_args()
  work = pathlib.Path(args.work_dir)
  sequences = chain_sequences()
  alignments, search_seconds = make_alignments(work, sequences)
  out = work / "out"
  shutil.rmtree(out, ignore_errors=True)
  options = build_dataset.BuildOptions(structures=str(PDB_CHAINS), alignments=str(alignments),
                                       out=str(out), workers=args.workers, shards=args.shards,
                                       progress=False)
  load_before = os.getloadavg()[0]
  cpu_before = _cpu_seconds()
  with PeakMemory() as memory:
    summary = build_dataset.build(options)
  cpu = _cpu_seconds() - cpu_before
  index = (out / "index.tsv").read_text().splitlines()[1:]
  msa_rows = [int(line.split("\t")[7]) for line in index]
  templates = [int(line.split("\t")[8]) for line in index]
  total = sum(summary.timings.get(s, 0.0) for s in STAGES)
  print(f"\n## build_dataset: {summary.num_examples} chains, {args.workers} workers, "
        f"{args.shards} shards")
  print(f"inputs: MSA rows per chain median {sorted(msa_rows)[len(msa_rows) // 2]} "
        f"(max {max(msa_rows)}), templates per chain mean {sum(templates) / len(templates):.2f}, "
        f"failures {summary.num_failures}")
  if search_seconds:
    print("search (made the alignments, not part of the build): " + ", ".join(
        f"{tool} {s / len(sequences):.2f} s/chain" for tool, s in search_seconds.items()))
  print("| metric | value |\n|---|---|")
  print(f"| wall time | {summary.seconds:.2f} s |")
  print(f"| chains / s | {summary.num_examples / summary.seconds:.2f} |")
  print(f"| start-up (spawn workers, first file) | {summary.timings['first_result']:.2f} s |")
  print(f"| CPU time (main + workers, user + sys) | {cpu:.2f} s = {cpu / summary.num_examples:.3f}"
        " s/chain |")
  print(f"| peak RSS (main + workers) | {memory.peak / 2**20:.0f} MiB |")
  print(f"| machine load average before the run (other processes) | {load_before:.1f} |")
  print(f"| output size | {sum(p.stat().st_size for p in (out / 'shards').iterdir()) / 2**20:.1f}"
        " MiB |")
  print("\n| stage | CPU seconds | share |\n|---|---|---|")
  for stage in STAGES:
    seconds = summary.timings.get(stage, 0.0)
    print(f"| {stage} | {seconds:.2f} | {100 * seconds / total:.1f}% |")


if __name__ == "__main__":
  main()
