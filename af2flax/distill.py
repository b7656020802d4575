r"""Builds a self-distillation training set by predicting unlabelled sequences.

    python -m af2flax.distill --fasta uniclust_reps.fasta --alignments msas/ \
        --checkpoint runs/initial --out distillation/ \
        [--min_mean_plddt 80] [--mask_below 50] [--num_recycle 3] [--max_length 1024] \
        [--shards 64] [--pad_to_multiple 64] [--template_mmcif_dir pdb_mmcif/]

Jumper et al. (2021) Suppl. 1.3: every sequence is predicted with its MSA (`<alignments>/<name>/`,
AlphaFold/OpenFold layout), by our model's EMA parameters (`--checkpoint`) or AlphaFold's
(`--af2_params`); with several models the best-ranked prediction is used. Predictions that pass
the confidence filter (`af2flax.inference.distillation`) become examples with
`is_distillation = 1`, low-confidence residues masked out of the structural losses, written in
the dataset builder's format (`python -m af2flax.data.build_dataset`): `shards/`, `index.tsv`,
`failures.tsv` (filtered and bad inputs, with the reason), `dataset_info.json`; the predicted
structures (pLDDT in the B-factors) go to `structures/<name>.pdb`. Train on it with
`--config.dataset.train_dirs=<pdb set>,<this directory>`.

Resumable: a re-run of the same command skips every finished sequence and completes the set;
a directory holding another run's output is refused. Needs no TensorFlow (GPU machines). Exit
status: 0 when the set is complete, 1 when it is not (run again), 2 for unusable flags.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import os
import sys
import time
import traceback
from typing import Any, Mapping, Sequence

import numpy as np

from af2flax.common import protein
from af2flax.inference import cli, distillation, feature_processing, inputs, outputs
from af2flax.inference.queries import Query, read_queries

logger = logging.getLogger("af2flax.distill")


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog="python -m af2flax.distill",
                                   description=__doc__.split("\n\n")[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--fasta", required=True, help="unlabelled sequences")
  parser.add_argument("--alignments", required=True,
                      help="directory with one alignment directory per sequence")
  parser.add_argument("--out", required=True, help="output dataset directory")
  cli.add_model_flags(parser)
  parser.add_argument("--min_mean_plddt", type=float,
                      default=distillation.DistillationFilter.min_mean_plddt,
                      help="drop predictions with a lower mean pLDDT")
  parser.add_argument("--mask_below", type=float,
                      default=distillation.DistillationFilter.mask_below,
                      help="residues with a lower pLDDT are masked out of the structural losses")
  parser.add_argument("--min_unmasked_residues", type=int, default=1,
                      help="drop predictions with fewer confident residues")
  parser.add_argument("--min_length", type=int, default=1)
  parser.add_argument("--max_length", type=int, default=cli.DEFAULT_MAX_LENGTH)
  cli.add_run_flags(parser)
  parser.add_argument("--shards", type=int, default=8)
  parser.add_argument("--compression", choices=("none", "gzip"), default="none")
  return parser


def _manifest(args: argparse.Namespace) -> dict[str, Any]:
  """What decides the set's content (paths excluded: a run may be finished elsewhere)."""
  with open(args.fasta, "rb") as handle:
    fasta_sha = hashlib.sha256(handle.read()).hexdigest()
  sources = cli.split_list(args.checkpoint or args.af2_params)
  return {"fasta_sha256": fasta_sha, "models": args.models or "",
          "parameters": [os.path.basename(os.path.normpath(s)) for s in sources],
          "checkpoint_step": args.checkpoint_step, "min_mean_plddt": args.min_mean_plddt,
          "mask_below": args.mask_below, "min_unmasked_residues": args.min_unmasked_residues,
          "min_length": args.min_length, "max_length": args.max_length,
          "num_recycle": args.num_recycle, "recycle_tolerance": args.recycle_tolerance,
          "max_msa_clusters": args.max_msa_clusters, "max_extra_msa": args.max_extra_msa,
          "templates": bool(args.template_mmcif_dir), "seed": args.seed}


def distill_query(query: Query, models: Sequence[cli.PreparedModel], args: argparse.Namespace,
                  template_featurizer: Any,
                  distillation_filter: distillation.DistillationFilter,
                  writer: distillation.DistillationWriter) -> str:
  """Predicts one sequence and stages its example or failure; returns 'kept' / 'filtered'."""
  alignment_dir = inputs.find_alignment_dir(args.alignments, query)
  raw, _ = inputs.make_raw_features(query, alignment_dir, template_featurizer)
  predictions = []
  for model_index, model in enumerate(models):
    batch = feature_processing.process_features(raw, model.feature_config,
                                                seed=args.seed * len(models) + model_index)
    predictions.append(model.runner.predict(batch, num_res=len(query.sequence),
                                            recycle_tolerance=args.recycle_tolerance))
  order, _ = outputs.rank(predictions)
  best = next(p for p in predictions if p.model_name == order[0])
  aatype = feature_processing.canonical_inputs(raw)["aatype"]
  structure = os.path.join(distillation.STRUCTURES_DIR, f"{query.name}.pdb")
  outputs.write_text(os.path.join(args.out, structure),
                     protein.to_pdb(outputs.to_protein(best, aatype, raw["residue_index"])))
  return stage_prediction(writer, distillation_filter, raw, query.name,
                          best.final_atom_positions, best.final_atom_mask, best.plddt,
                          structure, best.model_name)


def stage_prediction(writer: distillation.DistillationWriter,
                     distillation_filter: distillation.DistillationFilter,
                     raw: Mapping[str, np.ndarray], example_id: str, positions: np.ndarray,
                     atom_mask: np.ndarray, plddt: np.ndarray, structure: str,
                     source: str) -> str:
  """Filters one predicted structure and stages its example or its rejection; returns 'kept'
  or 'filtered'. Every route to the set (our predictions, published ones) ends here."""
  rejection = distillation_filter.rejection(plddt)
  logger.info("%s: %s mean pLDDT %.2f%s", example_id, source, float(plddt.mean()),
              f" -> {rejection}" if rejection else " -> kept")
  if rejection:
    writer.add_failure(example_id, example_id, rejection)
    return "filtered"
  example = distillation.make_example(raw, example_id, positions, atom_mask, plddt,
                                      distillation_filter)
  writer.add_example(example_id, example, structure)
  return "kept"


def main(argv: Sequence[str] | None = None) -> int:
  parser = build_parser()
  args = parser.parse_args(sys.argv[1:] if argv is None else argv)
  if not os.path.isdir(args.alignments):
    parser.error(f"--alignments {args.alignments}: no such directory")
  if not os.path.isfile(args.fasta):
    parser.error(f"--fasta {args.fasta}: no such file")
  os.makedirs(args.out, exist_ok=True)
  log_handler = cli.setup_logging(args.out, "distill")
  try:
    queries, bad_records = read_queries(args.fasta, args.max_length, args.min_length)
    for failure in bad_records:
      logger.error("skipped %s: %s", failure.input, failure.reason)
    distillation_filter = distillation.DistillationFilter(
        args.min_mean_plddt, args.mask_below, args.min_unmasked_residues)
    try:
      writer = distillation.DistillationWriter(
          args.out, [q.name for q in queries], args.shards, _manifest(args),
          "GZIP" if args.compression == "gzip" else None)
    except ValueError as error:
      print(f"distill: {error}", file=sys.stderr)
      return 2
    todo = [q for q in queries if not writer.is_done(q.name)]
    logger.info("%d sequences: %d already done, %d to predict", len(queries),
                len(queries) - len(todo), len(todo))
    counts = {"kept": 0, "filtered": 0, "failed": 0}
    if todo:
      try:
        template_featurizer = inputs.make_template_featurizer(
            args.template_mmcif_dir, args.max_template_date, args.kalign_binary_path)
        models = cli.prepare_models(cli.load_models(args), args)
      except ValueError as error:  # ModelLoadError included
        print(f"distill: {error}", file=sys.stderr)
        return 2
      input_errors = cli.input_errors()
      for query in todo:
        start = time.perf_counter()
        try:
          counts[distill_query(query, models, args, template_featurizer, distillation_filter,
                               writer)] += 1
        except input_errors as error:
          counts["failed"] += 1
          logger.error("skipped %s: %s", query.name, error)
          writer.add_failure(query.name, query.name, str(error))
        except Exception as error:  # noqa: BLE001 - one bad sequence must not stop the set
          counts["failed"] += 1
          logger.error("%s: unexpected error\n%s", query.name, traceback.format_exc())
          writer.add_failure(query.name, query.name,
                             f"unexpected error: {type(error).__name__}: {error}")
        logger.info("%s done in %.1f s", query.name, time.perf_counter() - start)
    summary = writer.finalize([(f.input, f.reason) for f in bad_records])
    if summary is None:
      missing = [q.name for q in queries if not writer.is_done(q.name)]
      print(f"distill: the set is incomplete ({len(missing)} sequences not done, e.g. "
            f"{missing[:3]}); run the same command again", file=sys.stderr)
      return 1
    print(f"{summary['num_examples']} distillation examples, {summary['num_failures']} "
          f"filtered or failed (see {os.path.join(args.out, 'failures.tsv')}); this run: "
          f"{counts['kept']} kept, {counts['filtered']} filtered, {counts['failed']} failed")
    return 0
  finally:
    logging.getLogger("af2flax").removeHandler(log_handler)
    log_handler.close()


if __name__ == "__main__":
  sys.exit(main())
