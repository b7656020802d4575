"""Builds a sharded TFRecord training set from structures and (optional) per-chain alignments.

    python -m af2flax.data.build_dataset --structures DIR --alignments DIR --out DIR \
        [--workers N] [--shards N] [--clusters FILE] [--max_template_date YYYY-MM-DD]

Jumper et al. (2021) Suppl. 1.2.4-1.2.5: every protein chain of every structure file (mmCIF or
PDB, gzipped or not, found recursively) becomes one example (`af2flax.data.examples`), with its
MSAs and templates from `<alignments>/<pdbid>_<chain>/` (or `<pdbid><chain>/`; none: single
sequence). Output in --out:
  shards/examples.tfrecord-SSSSS-of-NNNNN  tf.train.Examples (`af2flax.data.tfrecord` codec)
  index.tsv        one row per example: id, length, resolution, release date, cluster, shard, ...
  failures.tsv     input, reason: every structure or chain that did not become an example
  dataset_info.json  schema, shard names, counts, options
A bad input never stops the build. Shards are fixed by the sorted input list (contiguous blocks of
files), each written to a temporary file and renamed when complete; re-running the command after
a crash or Ctrl-C builds only the missing shards, and the output is byte-identical to an
uninterrupted build. Workers parse, encode and frame the records (CRC32C); the main process
appends them to the shard files. Nothing here imports TensorFlow.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import hashlib
import json
import multiprocessing
import os
import sys
import time
from typing import Any, Sequence

from af2flax.data import examples, tfrecord
from af2flax.data.examples import ChainSource, ExampleConfig, ExampleFilters
from af2flax.data.templates import TemplateFeaturizer
from af2flax.data.tools.kalign import Kalign

SHARD_DIR = "shards"
SHARD_NAME = "examples.tfrecord-{shard:05d}-of-{num_shards:05d}"
INDEX_COLUMNS = ("id", "length", "resolution", "release_date", "cluster_id", "cluster_size",
                 "shard", "num_alignments", "num_templates", "is_distillation", "structure")
FORMAT = "af2flax-tfrecord-v1"


@dataclasses.dataclass(frozen=True)
class BuildOptions:
  structures: str
  out: str
  alignments: str | None = None
  workers: int = 2
  shards: int = 8
  compression: str | None = None     # None or 'GZIP'
  clusters: str | None = None
  is_distillation: bool = False
  filters: ExampleFilters = ExampleFilters()
  template_structures: str | None = None   # default: --structures
  max_template_date: str | None = None
  max_templates: int = 20
  kalign_binary_path: str = "kalign"
  progress: bool = True
  # Resolution (Å) recorded for structures whose file gives none (e.g. PDB files without a
  # header); None leaves it unknown (0), which AlphaFold's resolution-filtered losses skip.
  default_resolution: float | None = None


@dataclasses.dataclass
class FileResult:
  shard: int
  records: list[tuple[dict[str, Any], bytes]]   # (index row, framed TFRecord entry)
  failures: list[tuple[str, str]]                # (input, reason)
  timings: dict[str, float]


@dataclasses.dataclass(frozen=True)
class BuildSummary:
  num_examples: int
  num_failures: int
  shards_built: int
  shards_reused: int
  seconds: float
  timings: dict[str, float]


def discover_structures(root: str, exclude: str | None = None) -> list[str]:
  """Files under `root` (recursive, not inside `exclude`), as sorted paths relative to it."""
  found = []
  exclude = os.path.abspath(exclude) if exclude else None
  for directory, subdirs, files in os.walk(root):
    subdirs[:] = sorted(d for d in subdirs
                        if os.path.abspath(os.path.join(directory, d)) != exclude)
    for name in files:
      found.append(os.path.relpath(os.path.join(directory, name), root))
  return sorted(found)


def assign_shards(num_files: int, num_shards: int) -> list[int]:
  """Contiguous blocks of the sorted file list, as even as possible."""
  return [i * num_shards // num_files for i in range(num_files)]


def shard_path(out: str, shard: int, num_shards: int) -> str:
  return os.path.join(out, SHARD_DIR, SHARD_NAME.format(shard=shard, num_shards=num_shards))


def _clean(reason: str, roots: Sequence[str]) -> str:
  for root in roots:
    if root:
      reason = reason.replace(os.path.join(root, ""), "")
  return " ".join(reason.split())


# --- worker side (no TensorFlow) ----------------------------------------------------------------

_WORKER: dict[str, Any] = {}


def _init_worker(options: BuildOptions, config: ExampleConfig,
                 clusters: dict[str, tuple[int, int]]) -> None:
  _WORKER.update(options=options, config=config, clusters=clusters)


def process_file(task: tuple[int, str]) -> FileResult:
  """All chains of one structure file -> encoded examples and failures (never raises)."""
  shard, relative = task
  options, config = _WORKER["options"], _WORKER["config"]
  clusters = _WORKER["clusters"]
  path = os.path.join(options.structures, relative)
  roots = [options.structures, options.alignments or "", options.template_structures or ""]
  result = FileResult(shard, [], [], {})
  if not any(relative.lower().removesuffix(".gz").endswith(s) for s in examples.STRUCTURE_SUFFIXES):
    result.failures.append((relative, "not a structure file (expected .cif, .pdb, .ent, optionally "
                                      ".gz)"))
    return result
  entry_id, only_chain = examples.parse_structure_name(relative)
  start = time.process_time()
  try:
    chains = examples.list_chains(path)
  except Exception as e:  # StructureParseError; anything else is reported the same way
    result.failures.append((relative, _clean(f"{type(e).__name__}: {e}", roots)))
    return result
  finally:
    result.timings["parse"] = time.process_time() - start
  if only_chain is not None:
    if only_chain not in chains:
      result.failures.append((relative, f"file name names chain {only_chain}, the file has "
                                        f"{chains}"))
      return result
    chains = [only_chain]
  for chain in chains:
    example_id = examples.example_id(entry_id, chain)
    cluster_id, cluster_size = clusters.get(example_id, (-1, 0))
    source = ChainSource(example_id, path, chain,
                         examples.find_alignment_dir(options.alignments, entry_id, chain),
                         cluster_id, cluster_size, options.is_distillation)
    try:
      features = examples.make_example(source, config, result.timings)
      start = time.process_time()
      serialized = tfrecord.frame_record(tfrecord.encode_example(features))
      result.timings["encode"] = (result.timings.get("encode", 0.0)
                                  + time.process_time() - start)
    except Exception as e:  # a bad chain is reported, never fatal
      result.failures.append((f"{relative}:{chain}", _clean(f"{type(e).__name__}: {e}", roots)))
      continue
    row = {"id": example_id, "length": len(features["aatype"]),
           "resolution": f"{float(features['resolution'][0]):g}",
           "release_date": features["release_date"][0].decode(), "cluster_id": cluster_id,
           "cluster_size": cluster_size, "shard": shard,
           "num_alignments": int(features["num_alignments"][0]),
           "num_templates": len(features["template_domain_names"]),
           "is_distillation": int(options.is_distillation), "structure": relative}
    result.records.append((row, serialized))
  return result


# --- main process -------------------------------------------------------------------------------

def _write_atomically(path: str, data: bytes) -> None:
  tmp = f"{path}.tmp"
  with open(tmp, "wb") as f:
    f.write(data)
  os.replace(tmp, path)


def _tsv(rows: Sequence[Sequence[Any]]) -> bytes:
  return "".join("\t".join(str(v) for v in row) + "\n" for row in rows).encode()


def _manifest(options: BuildOptions, files: Sequence[str]) -> dict[str, Any]:
  """What determines the output: the input listing (names, sizes) and every option."""
  listing = hashlib.sha256()
  for relative in files:
    size = os.path.getsize(os.path.join(options.structures, relative))
    listing.update(f"{relative}\t{size}\n".encode())
  described = dataclasses.asdict(options)
  for key in ("workers", "progress", "out"):
    described.pop(key)
  if described["default_resolution"] is None:  # datasets built before the option resume
    described.pop("default_resolution")
  return {"format": FORMAT, "inputs_sha256": listing.hexdigest(), "num_inputs": len(files),
          "options": described}


def _example_config(options: BuildOptions) -> ExampleConfig:
  templates = TemplateFeaturizer(
      structure_dir=options.template_structures or options.structures,
      max_template_date=options.max_template_date, max_hits=options.max_templates,
      kalign=Kalign(options.kalign_binary_path, timeout_s=120))
  return ExampleConfig(filters=options.filters, templates=templates,
                       default_resolution=options.default_resolution)


class _ShardWriter:
  """Writes one shard's records to a temporary file, renamed into place when complete."""

  def __init__(self, options: BuildOptions, shard: int, num_shards: int,
               tmp_suffix: str = ".tmp"):
    self.path = shard_path(options.out, shard, num_shards)
    self.tmp = self.temporary_path(options, shard, num_shards, tmp_suffix)
    self.writer = tfrecord.TFRecordWriter(self.tmp, options.compression)
    self.rows: list[dict[str, Any]] = []
    self.failures: list[tuple[str, str]] = []

  def add(self, result: FileResult) -> None:
    for row, framed in result.records:
      self.writer.write_framed(framed)
      self.rows.append(row)
    self.failures += result.failures

  def close(self) -> None:
    self.writer.close()
    os.replace(self.tmp, self.path)
    _write_atomically(f"{self.path}.failures.tsv", _tsv(self.failures))
    # The index sidecar is written last: its presence marks the shard complete.
    _write_atomically(f"{self.path}.index.tsv",
                      _tsv([[row[c] for c in INDEX_COLUMNS] for row in self.rows]))

  @staticmethod
  def temporary_path(options: BuildOptions, shard: int, num_shards: int,
                     tmp_suffix: str = ".tmp") -> str:
    """Where a shard is written until it is complete."""
    return f"{shard_path(options.out, shard, num_shards)}{tmp_suffix}"

  def abort(self) -> None:
    self.writer.close()
    _remove_if_present(self.tmp)


def _remove_if_present(path: str) -> None:
  if os.path.exists(path):
    os.remove(path)


def prepare_build(options: BuildOptions) -> tuple[int, set[int], list[tuple[int, str]]]:
  """Checks the inputs and the manifest of `options.out` -> (num_shards, shards already complete,
  (shard, structure file) tasks of the others). Shared with `build_dataset_beam`."""
  if not os.path.isdir(options.structures):
    raise FileNotFoundError(f"--structures {options.structures}: no such directory")
  if options.alignments and not os.path.isdir(options.alignments):
    raise FileNotFoundError(f"--alignments {options.alignments}: no such directory")
  files = discover_structures(options.structures, exclude=options.out)
  if not files:
    raise FileNotFoundError(f"--structures {options.structures}: no files")
  num_shards = max(1, min(options.shards, len(files)))
  shard_of_file = assign_shards(len(files), num_shards)
  os.makedirs(os.path.join(options.out, SHARD_DIR), exist_ok=True)
  manifest = dict(_manifest(options, files), num_shards=num_shards)
  manifest_path = os.path.join(options.out, "build_manifest.json")
  manifest_bytes = json.dumps(manifest, indent=1, sort_keys=True).encode()
  if os.path.exists(manifest_path):
    with open(manifest_path, "rb") as f:
      if f.read() != manifest_bytes:
        raise ValueError(f"{options.out} holds a build of other inputs or options "
                         f"({manifest_path} differs); use a new --out directory")
  else:
    _write_atomically(manifest_path, manifest_bytes)
  done = {s for s in range(num_shards)
          if os.path.exists(shard_path(options.out, s, num_shards) + ".index.tsv")}
  tasks = [(s, f) for s, f in zip(shard_of_file, files) if s not in done]
  return num_shards, done, tasks


def build(options: BuildOptions) -> BuildSummary:
  """Builds (or completes) the dataset in `options.out`; see the module docstring."""
  start = time.perf_counter()
  num_shards, done, tasks = prepare_build(options)
  remaining = {s: sum(1 for t, _ in tasks if t == s) for s in range(num_shards) if s not in done}
  clusters = examples.read_clusters(options.clusters) if options.clusters else {}
  config = _example_config(options)
  timings: dict[str, float] = {}
  writers: dict[int, _ShardWriter] = {}
  results = _run_tasks(tasks, options, config, clusters)
  try:
    for result in results:
      if "first_result" not in timings:
        timings["first_result"] = time.perf_counter() - start  # worker start-up included
      for stage, seconds in result.timings.items():
        timings[stage] = timings.get(stage, 0.0) + seconds
      write_start = time.process_time()
      if result.shard not in writers:
        writers[result.shard] = _ShardWriter(options, result.shard, num_shards)
      writers[result.shard].add(result)
      remaining[result.shard] -= 1
      if remaining[result.shard] == 0:
        writers.pop(result.shard).close()
      timings["write"] = timings.get("write", 0.0) + time.process_time() - write_start
  except BaseException:
    for writer in writers.values():
      writer.abort()
    # An interrupt can also land while a writer is being made (its temporary file created,
    # the writer not yet registered) or closed (taken out, not yet renamed into place): no
    # unfinished shard of this run keeps a temporary file.
    for shard in remaining:
      _remove_if_present(_ShardWriter.temporary_path(options, shard, num_shards))
    raise
  finally:
    results.close()
  return _finalize(options, num_shards, len(done), timings, time.perf_counter() - start)


def _run_tasks(tasks, options: BuildOptions, config: ExampleConfig, clusters):
  """Yields FileResults in task order, from a spawned worker pool or in this process."""
  progress = None
  if options.progress:
    from tqdm import tqdm
    progress = tqdm(total=len(tasks), unit="file", desc="structures", file=sys.stderr)
  pool = None
  try:
    if options.workers > 1 and len(tasks) > 1:
      # spawn: the parent may hold TensorFlow's threads, which fork would copy in a bad state.
      pool = multiprocessing.get_context("spawn").Pool(
          options.workers, initializer=_init_worker, initargs=(options, config, clusters))
      iterator = pool.imap(process_file, tasks, chunksize=1)
    else:
      _init_worker(options, config, clusters)
      iterator = map(process_file, tasks)
    for result in iterator:
      if progress is not None:
        progress.update(1)
      yield result
    if pool is not None:
      pool.close()
      pool.join()
  finally:
    if pool is not None:
      pool.terminate()
    if progress is not None:
      progress.close()


def _finalize(options: BuildOptions, num_shards: int, reused: int, timings: dict[str, float],
              seconds: float) -> BuildSummary:
  """Merges the per-shard sidecars into index.tsv, failures.tsv and dataset_info.json."""
  index_rows, failure_rows, shard_sizes = [], [], []
  for shard in range(num_shards):
    path = shard_path(options.out, shard, num_shards)
    with open(f"{path}.index.tsv") as f:
      rows = [line.rstrip("\n").split("\t") for line in f if line.strip()]
    with open(f"{path}.failures.tsv") as f:
      failure_rows += [line.rstrip("\n").split("\t", 1) for line in f if line.strip()]
    index_rows += rows
    shard_sizes.append(len(rows))
  _write_atomically(os.path.join(options.out, "index.tsv"), _tsv([INDEX_COLUMNS] + index_rows))
  _write_atomically(os.path.join(options.out, "failures.tsv"),
                    _tsv([("input", "reason")] + failure_rows))
  duplicates = sorted(i for i, n in collections.Counter(r[0] for r in index_rows).items() if n > 1)
  info = {"format": FORMAT, "num_examples": len(index_rows), "num_failures": len(failure_rows),
          "duplicate_ids": duplicates,  # e.g. 1abc.cif and 1abcA.pdb both present
          "num_shards": num_shards, "compression": options.compression or "",
          "shards": [os.path.relpath(shard_path(options.out, s, num_shards), options.out)
                     for s in range(num_shards)],
          "examples_per_shard": shard_sizes,
          "features": {name: {"dtype": dtype, "rank": rank}
                       for name, (dtype, rank) in tfrecord.FEATURES.items()}}
  _write_atomically(os.path.join(options.out, "dataset_info.json"),
                    json.dumps(info, indent=1, sort_keys=True).encode())
  return BuildSummary(len(index_rows), len(failure_rows), num_shards - reused, reused, seconds,
                      timings)


def argument_parser() -> argparse.ArgumentParser:
  """The command's flags (also those of `build_dataset_beam`, which adds Beam's)."""
  parser = argparse.ArgumentParser(prog="python -m af2flax.data.build_dataset",
                                   description=__doc__.split("\n\n")[0])
  parser.add_argument("--structures", required=True, help="directory of mmCIF/PDB files")
  parser.add_argument("--alignments", help="directory of per-chain alignment directories")
  parser.add_argument("--out", required=True, help="output directory")
  parser.add_argument("--workers", type=int, default=2)
  parser.add_argument("--shards", type=int, default=8)
  parser.add_argument("--compression", choices=("none", "gzip"), default="none")
  parser.add_argument("--clusters",
                      help="sequence clusters: one line per cluster of <pdbid>_<chain>")
  parser.add_argument("--distillation", action="store_true", help="mark examples is_distillation")
  parser.add_argument("--template_structures",
                      help="template mmCIF directory (default --structures)")
  parser.add_argument("--max_template_date", help="YYYY-MM-DD; also query release date - 60 days")
  parser.add_argument("--max_templates", type=int, default=20)
  parser.add_argument("--kalign_binary_path", default="kalign")
  parser.add_argument("--max_resolution", type=float, default=9.0, help="Å; <= 0 disables")
  parser.add_argument("--default_resolution", type=float, default=0.0,
                      help="Å recorded for structures whose file gives no resolution (PDB "
                      "files without a header); 0 leaves it unknown, and AlphaFold's "
                      "resolution-filtered losses (pLDDT, experimentally resolved, pAE) then "
                      "skip those examples")
  parser.add_argument("--min_length", type=int)
  parser.add_argument("--max_length", type=int)
  parser.add_argument("--min_distinct_residue_types", type=int)
  parser.add_argument("--max_single_residue_fraction", type=float, default=0.8,
                      help="<= 0 disables")
  parser.add_argument("--min_release_date")
  parser.add_argument("--max_release_date")
  parser.add_argument("--no_progress", action="store_true")
  return parser


def options_from_args(args: argparse.Namespace) -> BuildOptions:
  filters = ExampleFilters(
      max_resolution=args.max_resolution if args.max_resolution > 0 else None,
      min_length=args.min_length, max_length=args.max_length,
      min_distinct_residue_types=args.min_distinct_residue_types,
      max_single_residue_fraction=(args.max_single_residue_fraction
                                   if args.max_single_residue_fraction > 0 else None),
      min_release_date=args.min_release_date, max_release_date=args.max_release_date)
  absolute = lambda p: os.path.abspath(p) if p else None
  return BuildOptions(
      structures=absolute(args.structures), out=absolute(args.out),
      alignments=absolute(args.alignments), workers=args.workers, shards=args.shards,
      compression="GZIP" if args.compression == "gzip" else None, clusters=absolute(args.clusters),
      is_distillation=args.distillation, filters=filters,
      template_structures=absolute(args.template_structures),
      max_template_date=args.max_template_date, max_templates=args.max_templates,
      kalign_binary_path=args.kalign_binary_path, progress=not args.no_progress,
      default_resolution=args.default_resolution if args.default_resolution > 0 else None)


def parse_args(argv: Sequence[str]) -> BuildOptions:
  return options_from_args(argument_parser().parse_args(argv))


def main(argv: Sequence[str] | None = None) -> int:
  options = parse_args(sys.argv[1:] if argv is None else argv)
  try:
    summary = build(options)
  except KeyboardInterrupt:
    print("interrupted: completed shards are kept; run the same command again to finish",
          file=sys.stderr)
    return 130
  print(f"{summary.num_examples} examples, {summary.num_failures} failures "
        f"(see {os.path.join(options.out, 'failures.tsv')}); shards built {summary.shards_built}, "
        f"reused {summary.shards_reused}; {summary.seconds:.1f} s")
  return 0


if __name__ == "__main__":
  sys.exit(main())
