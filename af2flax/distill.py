r"""Builds a self-distillation training set from predictions: made now, or published ones.

    python -m af2flax.distill --fasta uniclust_reps.fasta --alignments msas/ \
        --checkpoint runs/initial --out distillation/ \
        [--min_mean_plddt 80] [--mask_below 50] [--num_recycle 3] [--max_length 1024] \
        [--shards 64] [--pad_to_multiple 64] [--template_mmcif_dir pdb_mmcif/]
    python -m af2flax.distill --from_predictions afdb/ [--alignments msas/] --out distillation/ \
        [--min_mean_plddt 80] [--mask_below 50] [--shards 64] [--template_mmcif_dir pdb_mmcif/]

Jumper et al. (2021) Suppl. 1.3: every sequence is predicted with its MSA (`<alignments>/<name>/`,
AlphaFold/OpenFold layout), by our model's EMA parameters (`--checkpoint`) or AlphaFold's
(`--af2_params`); with several models the best-ranked prediction is used. Predictions that pass
the confidence filter (`af2flax.inference.distillation`) become examples with
`is_distillation = 1`, low-confidence residues masked out of the structural losses, written in
the dataset builder's format (`python -m af2flax.data.build_dataset`): `shards/`, `index.tsv`,
`failures.tsv` (filtered and bad inputs, with the reason), `dataset_info.json`; the predicted
structures (pLDDT in the B-factors) go to `structures/<name>.pdb`. Train on it with
`--config.dataset.train_dirs=<pdb set>,<this directory>`.

`--from_predictions DIR` needs no model: the predicted structures are files (mmCIF or PDB,
gzipped or not, found recursively) with pLDDT in the B-factor column, e.g. downloaded from the
AlphaFold Protein Structure Database (`AF-<UniProt>-F1-model_v4.cif.gz` gives the id
`<UniProt>`; `af2flax.inference.prediction_files` says which files are refused and why). Their
alignments are read from `<alignments>/<id>/` as the dataset builder reads a chain's; a missing
directory (or no --alignments) gives a single-sequence example, as in the builder. The same
filter, masking and writer as for our own predictions apply (`stage_prediction`); the index's
`structure` column names the input file.

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
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from af2flax.common import protein
from af2flax.inference import (cli, distillation, feature_processing, inputs, outputs,
                                prediction_files)
from af2flax.inference.queries import Query, read_queries

logger = logging.getLogger("af2flax.distill")


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog="python -m af2flax.distill",
                                   description=__doc__.split("\n\n")[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  source = parser.add_mutually_exclusive_group(required=True)
  source.add_argument("--fasta", help="unlabelled sequences to predict (needs --alignments and "
                      "--checkpoint or --af2_params)")
  source.add_argument("--from_predictions", help="directory of predicted structures with pLDDT "
                      "in the B-factors (e.g. AlphaFold DB files); no model is run")
  parser.add_argument("--alignments", help="directory with one alignment directory per "
                      "sequence (optional with --from_predictions: single sequence without)")
  parser.add_argument("--out", required=True, help="output dataset directory")
  cli.add_model_flags(parser, required=False)
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
                     source: str, input_name: str | None = None) -> str:
  """Filters one predicted structure and stages its example or its rejection; returns 'kept'
  or 'filtered'. Every route to the set (our predictions, published ones) ends here.
  `input_name` names the input in failures.tsv (default: `example_id`)."""
  rejection = distillation_filter.rejection(plddt)
  logger.info("%s: %s mean pLDDT %.2f%s", example_id, source, float(plddt.mean()),
              f" -> {rejection}" if rejection else " -> kept")
  if rejection:
    writer.add_failure(example_id, input_name or example_id, rejection)
    return "filtered"
  example = distillation.make_example(raw, example_id, positions, atom_mask, plddt,
                                      distillation_filter)
  writer.add_example(example_id, example, structure)
  return "kept"


def distill_prediction_file(prediction: prediction_files.PredictionFile,
                            args: argparse.Namespace, template_featurizer: Any,
                            distillation_filter: distillation.DistillationFilter,
                            writer: distillation.DistillationWriter) -> str:
  """Reads one published prediction and stages its example or failure ('kept'/'filtered')."""
  structure = prediction_files.read_prediction(
      os.path.join(args.from_predictions, prediction.path))
  length = len(structure.sequence)
  if length < args.min_length or (args.max_length and length > args.max_length):
    raise prediction_files.PredictionFileError(
        f"filtered: {length} residues, outside --min_length {args.min_length} .. "
        f"--max_length {args.max_length}")
  query = Query(prediction.example_id, structure.sequence, prediction.path)
  alignment_dir = prediction_files.find_alignment_dir(args.alignments, prediction)
  if args.alignments and alignment_dir is None:
    logger.info("%s: no alignment directory in %s: single sequence", prediction.example_id,
                args.alignments)
  raw, _ = inputs.make_raw_features(query, alignment_dir, template_featurizer)
  return stage_prediction(writer, distillation_filter, raw, prediction.example_id,
                          structure.atom_positions, structure.atom_mask, structure.plddt,
                          prediction.path, prediction.source, input_name=prediction.path)


def _stage_inputs(writer: distillation.DistillationWriter, todo: Sequence[tuple[str, str]],
                  stage: Callable[[int], str], roots: Sequence[str] = ()) -> dict[str, int]:
  """Stages every input (`todo`: (example id, input name); `stage(i)` does the i-th and
  returns 'kept' or 'filtered'); a bad input becomes a failure row and never stops the set.
  Failure reasons name files relative to `roots` (the input directories)."""

  def reason(error: BaseException) -> str:
    text = str(error)
    for root in roots:
      text = text.replace(os.path.join(root, ""), "")
    return text

  input_errors = cli.input_errors() + (protein.StructureParseError,
                                       prediction_files.PredictionFileError)
  counts = {"kept": 0, "filtered": 0, "failed": 0}
  for index, (example_id, input_name) in enumerate(todo):
    start = time.perf_counter()
    try:
      counts[stage(index)] += 1
    except input_errors as error:
      counts["failed"] += 1
      logger.error("skipped %s: %s", input_name, error)
      writer.add_failure(example_id, input_name, reason(error))
    except Exception as error:  # noqa: BLE001 - one bad input must not stop the set
      counts["failed"] += 1
      logger.error("%s: unexpected error\n%s", input_name, traceback.format_exc())
      writer.add_failure(example_id, input_name,
                         f"unexpected error: {type(error).__name__}: {reason(error)}")
    logger.info("%s done in %.1f s", example_id, time.perf_counter() - start)
  return counts


def _finish(writer: distillation.DistillationWriter, extra_failures: Sequence[tuple[str, str]],
            counts: Mapping[str, int], out: str) -> int:
  summary = writer.finalize(extra_failures)
  if summary is None:
    missing = [i for i in writer.ids if not writer.is_done(i)]
    print(f"distill: the set is incomplete ({len(missing)} inputs not done, e.g. "
          f"{missing[:3]}); run the same command again", file=sys.stderr)
    return 1
  print(f"{summary['num_examples']} distillation examples, {summary['num_failures']} "
        f"filtered or failed (see {os.path.join(out, 'failures.tsv')}); this run: "
        f"{counts['kept']} kept, {counts['filtered']} filtered, {counts['failed']} failed")
  return 0


def _make_writer(args: argparse.Namespace, ids: Sequence[str],
                 manifest: Mapping[str, Any]) -> distillation.DistillationWriter | None:
  try:
    return distillation.DistillationWriter(args.out, ids, args.shards, manifest,
                                           "GZIP" if args.compression == "gzip" else None)
  except ValueError as error:
    print(f"distill: {error}", file=sys.stderr)
    return None


def _distill_fasta(args: argparse.Namespace) -> int:
  """The set from our (or DeepMind's) predictions of the FASTA's sequences."""
  queries, bad_records = read_queries(args.fasta, args.max_length, args.min_length)
  for failure in bad_records:
    logger.error("skipped %s: %s", failure.input, failure.reason)
  distillation_filter = distillation.DistillationFilter(
      args.min_mean_plddt, args.mask_below, args.min_unmasked_residues)
  writer = _make_writer(args, [q.name for q in queries], _manifest(args))
  if writer is None:
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
    counts = _stage_inputs(
        writer, [(q.name, q.name) for q in todo],
        lambda i: distill_query(todo[i], models, args, template_featurizer, distillation_filter,
                                writer))
  return _finish(writer, [(f.input, f.reason) for f in bad_records], counts, args.out)


def _predictions_manifest(args: argparse.Namespace, files: Sequence[str]) -> dict[str, Any]:
  """What decides the set's content: the listing (names, sizes) and the options."""
  listing = hashlib.sha256()
  for relative in files:
    size = os.path.getsize(os.path.join(args.from_predictions, relative))
    listing.update(f"{relative}\t{size}\n".encode())
  return {"route": "from_predictions", "inputs_sha256": listing.hexdigest(),
          "alignments": bool(args.alignments), "min_mean_plddt": args.min_mean_plddt,
          "mask_below": args.mask_below, "min_unmasked_residues": args.min_unmasked_residues,
          "min_length": args.min_length, "max_length": args.max_length,
          "templates": bool(args.template_mmcif_dir), "max_template_date": args.max_template_date}


def _distill_predictions(args: argparse.Namespace) -> int:
  """The set from published predicted structures (`--from_predictions`)."""
  from af2flax.data import build_dataset  # pylint: disable=import-outside-toplevel
  files = build_dataset.discover_structures(args.from_predictions, exclude=args.out)
  selection = prediction_files.select_predictions(files)
  for path, reason in selection.rejected:
    logger.error("skipped %s: %s", path, reason)
  distillation_filter = distillation.DistillationFilter(
      args.min_mean_plddt, args.mask_below, args.min_unmasked_residues)
  writer = _make_writer(args, [f.example_id for f in selection.files],
                        _predictions_manifest(args, files))
  if writer is None:
    return 2
  todo = [f for f in selection.files if not writer.is_done(f.example_id)]
  logger.info("%d files, %d predictions: %d already done, %d to read", len(files),
              len(selection.files), len(selection.files) - len(todo), len(todo))
  counts = {"kept": 0, "filtered": 0, "failed": 0}
  if todo:
    try:
      template_featurizer = inputs.make_template_featurizer(
          args.template_mmcif_dir, args.max_template_date, args.kalign_binary_path)
    except ValueError as error:
      print(f"distill: {error}", file=sys.stderr)
      return 2
    counts = _stage_inputs(
        writer, [(f.example_id, f.path) for f in todo],
        lambda i: distill_prediction_file(todo[i], args, template_featurizer,
                                          distillation_filter, writer),
        roots=[args.from_predictions] + ([args.alignments] if args.alignments else []))
  return _finish(writer, selection.rejected, counts, args.out)


# What only the --fasta route reads (the model run); refused with --from_predictions.
_MODEL_RUN_FLAGS = ("checkpoint", "af2_params", "models", "model_config", "checkpoint_step",
                    "num_recycle", "recycle_tolerance", "chunk_size", "dtype",
                    "max_msa_clusters", "max_extra_msa", "pad_to_multiple", "seed")


def main(argv: Sequence[str] | None = None) -> int:
  parser = build_parser()
  args = parser.parse_args(sys.argv[1:] if argv is None else argv)
  if args.alignments and not os.path.isdir(args.alignments):
    parser.error(f"--alignments {args.alignments}: no such directory")
  if args.from_predictions:
    if not os.path.isdir(args.from_predictions):
      parser.error(f"--from_predictions {args.from_predictions}: no such directory")
    given = [f"--{name}" for name in _MODEL_RUN_FLAGS
             if getattr(args, name) != parser.get_default(name)]
    if given:
      parser.error(f"{', '.join(given)}: only for --fasta (--from_predictions runs no model)")
    args.from_predictions = os.path.abspath(args.from_predictions)
    args.alignments = os.path.abspath(args.alignments) if args.alignments else None
    run = _distill_predictions
  else:
    if not os.path.isfile(args.fasta):
      parser.error(f"--fasta {args.fasta}: no such file")
    if not args.alignments:
      parser.error("--fasta needs --alignments")
    if not (args.checkpoint or args.af2_params):
      parser.error("--fasta needs --checkpoint or --af2_params")
    run = _distill_fasta
  os.makedirs(args.out, exist_ok=True)
  log_handler = cli.setup_logging(args.out, "distill")
  try:
    return run(args)
  finally:
    logging.getLogger("af2flax").removeHandler(log_handler)
    log_handler.close()


if __name__ == "__main__":
  sys.exit(main())
