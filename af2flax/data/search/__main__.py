"""`python -m af2flax.data.search`: the search pipeline's command line (see the package docstring).

Flags this module does not know (`--runner`, `--direct_num_workers`, `--project`, `--region`,
`--temp_location`, `--flink_master`, `--spark_master_url`, ...) are Beam pipeline options.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Sequence

from apache_beam.io.filesystems import FileSystems
from apache_beam.options.pipeline_options import PipelineOptions

from af2flax.data.search import beam_pipeline, searches
from af2flax.data.search.config import SearchConfigError, load_config, make_plan


def _absolute(path: str) -> str:
  return path if "://" in path else os.path.abspath(path)


def main(argv: Sequence[str] | None = None) -> int:
  # No abbreviations: every flag this parser does not know exactly is Beam's.
  parser = argparse.ArgumentParser(prog="python -m af2flax.data.search", allow_abbrev=False,
                                   description=__doc__.split("\n\n")[0])
  parser.add_argument("--fasta", required=True, help="FASTA of chains (id = first word)")
  parser.add_argument("--databases", required=True,
                      help="search config: file.py[:arg] with get_config(), or file.json")
  parser.add_argument("--out", required=True, help="alignment directory (one folder per chain)")
  parser.add_argument("--cache", help="search cache (default <out>/.cache); share it between runs")
  args, beam_args = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
  out_dir = _absolute(args.out)
  cache_dir = _absolute(args.cache) if args.cache else FileSystems.join(out_dir, ".cache")
  try:
    plan = make_plan(load_config(args.databases), cache_dir)
  except SearchConfigError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  summary = beam_pipeline.run_search(_absolute(args.fasta), plan, out_dir,
                                     PipelineOptions(beam_args))
  print(summary.table())
  searches.write_atomically(FileSystems.join(out_dir, "search_summary.json"),
                            json.dumps(summary.__dict__, indent=1, sort_keys=True).encode())
  return 0


if __name__ == "__main__":
  sys.exit(main())
