"""The dataset builder as an Apache Beam pipeline: same flags, same output, byte for byte.

    python -m af2flax.data.build_dataset_beam --structures DIR --alignments DIR --out DIR \
        [--shards N] [build_dataset's other flags] [--runner DataflowRunner ...] [beam options]

Jumper et al. (2021) Suppl. 1.2.4-1.2.5, at scale. Every step is the single-machine builder's
(`af2flax.data.build_dataset`): `prepare_build` lists the structure files, assigns them to shards
and checks the output's manifest; Beam runs the builder's per-file function `process_file`
(every chain of one structure file -> encoded examples and failures, via
`examples.make_example`) on any worker; results are grouped by shard, put back in file order and
written by the builder's shard writer (a temporary file renamed when complete, the `.index.tsv`
sidecar last); `_finalize` then writes index.tsv, failures.tsv and dataset_info.json. So the
shards are identical, record for record, to `build_dataset`'s on the same inputs and options.

Idempotent: a retried bundle recomputes the same records and renames the same bytes into place
(each attempt writes its own temporary file). A re-run after a crash builds only the shards that
have no `.index.tsv`, and either builder can finish the other's output. `--workers` is ignored
(the runner chooses); the structure, alignment and output directories must be paths every worker
sees (a shared filesystem: NFS, Filestore, gcsfuse). A shard's records meet in one worker's
memory: choose --shards so that a shard stays well under a worker's RAM (docs/data_at_scale.md).
"""

from __future__ import annotations

import json
import os
import sys
import time
import uuid
from typing import Any, Iterator, Sequence

import apache_beam as beam
from apache_beam.metrics import Metrics
from apache_beam.metrics.metric import MetricsFilter
from apache_beam.options.pipeline_options import PipelineOptions

from af2flax.data import build_dataset, examples
from af2flax.data.build_dataset import BuildOptions, BuildSummary

NAMESPACE = "af2flax.build"


class ProcessFile(beam.DoFn):
  """(shard, structure file) -> (shard, (file, FileResult)) with the builder's `process_file`."""

  def __init__(self, options: BuildOptions):
    self.options = options

  def setup(self) -> None:
    # The builder's worker initialiser: template featurizer, kalign, cluster table, once per worker.
    clusters = examples.read_clusters(self.options.clusters) if self.options.clusters else {}
    build_dataset._init_worker(self.options, build_dataset._example_config(self.options), clusters)

  def process(self, task: tuple[int, str]) -> Iterator[tuple[int, tuple[str, Any]]]:
    result = build_dataset.process_file(task)
    Metrics.counter(NAMESPACE, "files").inc()
    Metrics.counter(NAMESPACE, "examples").inc(len(result.records))
    Metrics.counter(NAMESPACE, "failures").inc(len(result.failures))
    for stage, seconds in result.timings.items():
      Metrics.counter(NAMESPACE, f"cpu_ms_{stage}").inc(int(1000 * seconds))
    yield result.shard, (task[1], result)


class WriteShard(beam.DoFn):
  """(shard, [(file, FileResult)]) -> the shard file and its sidecars, in the builder's order."""

  def __init__(self, options: BuildOptions, num_shards: int):
    self.options, self.num_shards = options, num_shards

  def process(self, element: tuple[int, Any]) -> Iterator[int]:
    shard, results = element
    # A private temporary name per attempt: a retried or speculative bundle never shares a file.
    writer = build_dataset._ShardWriter(self.options, shard, self.num_shards,
                                        tmp_suffix=f".tmp-{uuid.uuid4().hex[:12]}")
    try:
      # discover_structures sorts the files, so file order within a shard is name order.
      for _, result in sorted(results, key=lambda item: item[0]):
        writer.add(result)
      writer.close()
    except BaseException:
      writer.abort()
      raise
    Metrics.counter(NAMESPACE, "shards_written").inc()
    yield shard


def _finalize(_: int, options: BuildOptions, num_shards: int, reused: int) -> None:
  build_dataset._finalize(options, num_shards, reused, {}, 0.0)


def build_with_beam(options: BuildOptions, pipeline_options: PipelineOptions) -> BuildSummary:
  """Builds (or completes) the dataset in `options.out` on the runner of `pipeline_options`."""
  start = time.perf_counter()
  num_shards, done, tasks = build_dataset.prepare_build(options)
  pipeline = beam.Pipeline(options=pipeline_options)
  written = (pipeline
             | "Files" >> beam.Create(tasks)
             | "Spread" >> beam.Reshuffle()
             | "ProcessFile" >> beam.ParDo(ProcessFile(options))
             | "GroupByShard" >> beam.GroupByKey()
             | "WriteShard" >> beam.ParDo(WriteShard(options, num_shards)))
  _ = (written
       | "CountShards" >> beam.combiners.Count.Globally()
       | "Finalize" >> beam.Map(_finalize, options, num_shards, len(done)))
  result = pipeline.run()
  result.wait_until_finish()
  timings = {}
  for counter in result.metrics().query(MetricsFilter().with_namespace(NAMESPACE))["counters"]:
    stage = counter.key.metric.name.removeprefix("cpu_ms_")
    if stage != counter.key.metric.name:
      value = counter.committed if counter.committed is not None else counter.attempted
      timings[stage] = timings.get(stage, 0.0) + (value or 0) / 1000
  with open(os.path.join(options.out, "dataset_info.json")) as f:
    info = json.load(f)
  return BuildSummary(info["num_examples"], info["num_failures"], num_shards - len(done),
                      len(done), time.perf_counter() - start, timings)


def main(argv: Sequence[str] | None = None) -> int:
  parser = build_dataset.argument_parser()
  parser.prog = "python -m af2flax.data.build_dataset_beam"
  args, beam_args = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
  options = build_dataset.options_from_args(args)
  summary = build_with_beam(options, PipelineOptions(beam_args))
  print(f"{summary.num_examples} examples, {summary.num_failures} failures "
        f"(see {os.path.join(options.out, 'failures.tsv')}); shards built {summary.shards_built}, "
        f"reused {summary.shards_reused}; {summary.seconds:.1f} s")
  return 0


if __name__ == "__main__":
  sys.exit(main())
