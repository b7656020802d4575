r"""Predicts structures for the sequences of a FASTA file with one or several models.

    python -m af2flax.predict --fasta seqs.fasta --out predictions \
        --af2_params params/ --models model_1_ptm,model_2_ptm \
        [--alignments msas/ | --run_search --uniref90_database_path ... ] \
        [--template_mmcif_dir pdb_mmcif/ --max_template_date 2021-11-01] \
        [--num_recycle 3] [--recycle_tolerance 0.5] [--chunk_size 128] \
        [--relax [best|all]] [--max_length 2500] [--seed 0]

    python -m af2flax.predict --fasta seqs.fasta --out predictions --checkpoint runs/finetune

Parameters: `--checkpoint` (our training run: its EMA parameters; or a params checkpoint of
`python -m af2flax.tools.convert_params`, comma-separated for several) or `--af2_params`
(DeepMind's params_model_*.npz file, or a directory of them with `--models`). Inputs per
sequence: `--alignments DIR/<name>/` (AlphaFold/OpenFold layout), a fresh search
(`--run_search`), or the sequence alone. Every model predicts every sequence (recycling
`--num_recycle` times, or until the Cα distance-matrix change is below `--recycle_tolerance`
Å); models are ranked by pTM (all models _ptm) or mean pLDDT. Outputs per sequence in
`<out>/<name>/` are listed in `af2flax.inference.outputs` and `af2flax.inference.plots`.

A bad input (not FASTA, unknown residue letters, longer than --max_length, a missing or
mismatched alignment directory, a failing search) skips that sequence with a message in the
log and in `<out>/failures.tsv`; the others are predicted. Exit status: 0 all predicted,
1 some skipped, 2 nothing could start (bad flags, unusable parameters).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
import traceback
from typing import Any, Sequence

from af2flax.inference import cli, feature_processing, inputs, model_loading, outputs, plots
from af2flax.inference.queries import Failure, FailureLog, Query, read_queries
from af2flax.inference.runner import Prediction

logger = logging.getLogger("af2flax.predict")


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog="python -m af2flax.predict",
                                   description=__doc__.split("\n\n")[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--fasta", required=True, help="FASTA file of one or more sequences")
  parser.add_argument("--out", required=True, help="output directory (one subdirectory per "
                      "sequence)")
  cli.add_model_flags(parser)
  msa = parser.add_mutually_exclusive_group()
  msa.add_argument("--alignments", help="directory with one alignment directory per sequence")
  msa.add_argument("--run_search", action="store_true", help="search the databases below")
  for name in ("uniref90", "mgnify", "bfd", "uniref30", "pdb70"):
    parser.add_argument(f"--{name}_database_path")
  for tool in ("jackhmmer", "hhblits", "hhsearch"):
    parser.add_argument(f"--{tool}_binary_path", default=tool)
  parser.add_argument("--n_cpu", type=int, default=8, help="threads per search tool")
  cli.add_run_flags(parser)
  parser.add_argument("--relax", nargs="?", const="best", choices=("best", "all"),
                      help="Amber-relax the top-ranked model (best, the default) or all models")
  parser.add_argument("--relax_use_gpu", action="store_true")
  parser.add_argument("--max_length", type=int, default=cli.DEFAULT_MAX_LENGTH,
                      help="longer sequences are skipped")
  parser.add_argument("--no_plots", action="store_true", help="skip the PNG plots")
  return parser


def make_relaxer(args: argparse.Namespace) -> Any | None:
  if not args.relax:
    return None
  try:
    from af2flax.relaxation import relax as relax_lib  # pylint: disable=import-outside-toplevel
  except ImportError as error:
    raise model_loading.ModelLoadError(f"--relax needs af2flax.relaxation and OpenMM ({error})")
  return relax_lib.AmberRelaxation(use_gpu=args.relax_use_gpu)


def relax_models(out_dir: str, query_name: str, names: Sequence[str], proteins: dict,
                 relaxer: Any, failures: FailureLog, timings: dict[str, float]) -> dict[str, str]:
  """Amber-relaxes the models `names` (Suppl. 1.8.6); writes relaxed_<model>.pdb and
  relax_<model>.json (violations before/after, energies, RMSD). Returns model -> relaxed PDB.

  A structure that cannot be relaxed (unknown residues, a minimisation that fails on a very
  poor model) is recorded in failures.tsv; its unrelaxed structure stays in the ranking.
  """
  relaxed: dict[str, str] = {}
  for name in names:
    start = time.perf_counter()
    try:
      result = relaxer.process(proteins[name])
    except ValueError as error:  # relax.RelaxationError
      failures.add(Failure(f"{query_name}:relax_{name}", f"not relaxed: {error}"))
      continue
    relaxed[name] = result.pdb_string
    outputs.write_text(os.path.join(out_dir, f"relaxed_{name}.pdb"), result.pdb_string)
    outputs.write_json(os.path.join(out_dir, f"relax_{name}.json"), result.summary())
    timings[f"relax_{name}"] = time.perf_counter() - start
    logger.info("%s %s: relaxed in %.1f s, %d violating residues left", query_name, name,
                timings[f"relax_{name}"],
                result.summary()["violations_after"]["violating_residues"])
  return relaxed


def predict_query(query: Query, models: Sequence[cli.PreparedModel], args: argparse.Namespace,
                  template_featurizer: Any, search_config: inputs.SearchConfig | None,
                  relaxer: Any, failures: FailureLog) -> list[Prediction]:
  """Every model on one query; writes all its files. Raises for a bad input (skipped)."""
  out_dir = os.path.join(args.out, query.name)
  timings: dict[str, float] = {}
  start = time.perf_counter()
  alignment_dir = None
  if args.alignments:
    alignment_dir = inputs.find_alignment_dir(args.alignments, query)
  elif search_config is not None:
    alignment_dir = inputs.run_search(query, os.path.join(out_dir, "msas"), search_config)
  raw, report = inputs.make_raw_features(query, alignment_dir, template_featurizer)
  os.makedirs(out_dir, exist_ok=True)   # only now: a skipped input leaves no directory
  timings["features"] = time.perf_counter() - start
  logger.info("%s: %d residues, %d MSA rows, %d templates", query.name, len(query.sequence),
              report["num_alignments"], report["num_templates"])
  if not args.no_plots:
    plots.plot_msa_coverage(raw["msa"], os.path.join(out_dir, "msa_coverage.png"), query.name)

  aatype = feature_processing.canonical_inputs(raw)["aatype"]
  residue_index = raw["residue_index"]
  predictions: list[Prediction] = []
  proteins = {}
  for model_index, model in enumerate(models):
    step_start = time.perf_counter()
    batch = feature_processing.process_features(raw, model.feature_config,
                                                seed=args.seed * len(models) + model_index)
    timings[f"process_features_{model.name}"] = time.perf_counter() - step_start
    prediction = model.runner.predict(batch, num_res=len(query.sequence),
                                      recycle_tolerance=args.recycle_tolerance)
    timings[f"predict_and_compile_{model.name}"] = prediction.seconds
    outputs.write_model_files(out_dir, prediction, aatype, residue_index)
    proteins[model.name] = outputs.to_protein(prediction, aatype, residue_index)
    predictions.append(prediction)
    logger.info("%s %s: mean pLDDT %.2f%s, %d recycles, %.1f s", query.name, model.name,
                prediction.mean_plddt, "" if prediction.ptm is None else
                f", pTM {prediction.ptm:.4f}", prediction.num_recycles, prediction.seconds)

  order, ranking_debug = outputs.rank(predictions)
  outputs.write_json(os.path.join(out_dir, "ranking_debug.json"), ranking_debug)
  relaxed = {}
  if relaxer is not None:
    to_relax = order[:1] if args.relax == "best" else order
    relaxed = relax_models(out_dir, query.name, to_relax, proteins, relaxer, failures, timings)
  outputs.write_ranked(out_dir, order, proteins, relaxed)
  if not args.no_plots:
    by_rank = [next(p for p in predictions if p.model_name == name) for name in order]
    plots.plot_plddt(by_rank, os.path.join(out_dir, "plddt.png"), query.name)
    plots.plot_pae(by_rank, os.path.join(out_dir, "pae.png"))
  timings["total"] = time.perf_counter() - start
  outputs.write_json(os.path.join(out_dir, "timings.json"),
                     {key: round(value, 3) for key, value in timings.items()})
  logger.info("%s: ranking by %s: %s", query.name, ranking_debug["ranking_metric"],
              ", ".join(order))
  return predictions


def search_config_from(args: argparse.Namespace) -> inputs.SearchConfig | None:
  if not args.run_search:
    return None
  config = inputs.SearchConfig(
      uniref90_database_path=args.uniref90_database_path,
      mgnify_database_path=args.mgnify_database_path,
      bfd_database_path=args.bfd_database_path,
      uniref30_database_path=args.uniref30_database_path,
      pdb70_database_path=args.pdb70_database_path,
      jackhmmer_binary_path=args.jackhmmer_binary_path,
      hhblits_binary_path=args.hhblits_binary_path,
      hhsearch_binary_path=args.hhsearch_binary_path, n_cpu=args.n_cpu)
  config.check()
  return config


def main(argv: Sequence[str] | None = None) -> int:
  parser = build_parser()
  args = parser.parse_args(sys.argv[1:] if argv is None else argv)
  if args.alignments and not os.path.isdir(args.alignments):
    parser.error(f"--alignments {args.alignments}: no such directory")
  os.makedirs(args.out, exist_ok=True)
  log_handler = cli.setup_logging(args.out, "predict")
  try:
    failures = FailureLog(os.path.join(args.out, "failures.tsv"))
    queries, bad_records = read_queries(args.fasta, args.max_length)
    failures.extend(bad_records)
    if not queries:
      logger.error("no sequence to predict in %s (see %s)", args.fasta, failures.path)
      return 1
    try:
      search_config = search_config_from(args)
      template_featurizer = inputs.make_template_featurizer(
          args.template_mmcif_dir, args.max_template_date, args.kalign_binary_path)
      relaxer = make_relaxer(args)
      models = cli.prepare_models(cli.load_models(args), args)
    except (model_loading.ModelLoadError, ValueError) as error:
      logger.error("%s", error)
      print(f"predict: {error}", file=sys.stderr)
      return 2
    logger.info("%d sequences, models %s", len(queries), ", ".join(m.name for m in models))
    done = 0
    input_errors = cli.input_errors()
    for query in queries:
      try:
        predict_query(query, models, args, template_featurizer, search_config, relaxer, failures)
        done += 1
      except input_errors as error:
        failures.add(Failure(query.name, str(error)))
      except Exception as error:  # noqa: BLE001 - one bad sequence must not stop the others
        logger.error("%s: unexpected error\n%s", query.name, traceback.format_exc())
        failures.add(Failure(query.name, f"unexpected error: {type(error).__name__}: {error}"))
    skipped = len(failures.failures)
    print(f"predicted {done} of {len(queries) + len(bad_records)} sequences into {args.out}"
          + (f"; {skipped} problems listed in {failures.path}" if skipped else ""))
    return 0 if done == len(queries) and not bad_records else 1
  finally:
    logging.getLogger("af2flax").removeHandler(log_handler)
    log_handler.close()


if __name__ == "__main__":
  sys.exit(main())
