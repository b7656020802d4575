"""What `python -m af2flax.predict` and `python -m af2flax.distill` share: flags for models and
features, model preparation, logging, and the errors that mean "skip this input"."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
from typing import Any, Sequence

from af2flax.inference import feature_processing, model_loading
from af2flax.inference.queries import QueryError
from af2flax.inference.runner import ModelRunner, inference_config

DEFAULT_MAX_LENGTH = 2500


@dataclasses.dataclass
class PreparedModel:
  """A model ready to run: its runner and the feature settings its inputs need."""
  name: str
  runner: ModelRunner
  feature_config: feature_processing.FeatureConfig


def split_list(value: str | None) -> list[str]:
  """'a, b,,c' -> ['a', 'b', 'c']."""
  return [item.strip() for item in value.split(",") if item.strip()] if value else []


def add_model_flags(parser: argparse.ArgumentParser, required: bool = True) -> None:
  """Where the parameters come from; `required=False` for commands with a route without a
  model (`distill --from_predictions`), which then check the flags themselves."""
  params = parser.add_mutually_exclusive_group(required=required)
  params.add_argument("--checkpoint", help="training run directory(ies) or params "
                      "checkpoint(s) of convert_params, comma-separated")
  params.add_argument("--af2_params", help="AlphaFold params_model_*.npz, or a directory of them")
  parser.add_argument("--models", help="model names, comma-separated (AlphaFold presets such "
                      "as model_1_ptm; with --checkpoint: one name per checkpoint)")
  parser.add_argument("--model_config", help="JSON of an AlphaFold model_config tree that "
                      "replaces the presets' (e.g. a reference dump's config.json)")
  parser.add_argument("--checkpoint_step", type=int, help="step of the training checkpoints "
                      "(default: latest)")


def add_run_flags(parser: argparse.ArgumentParser) -> None:
  """Recycling, precision, memory and feature-size flags."""
  parser.add_argument("--num_recycle", type=int, help="recycling iterations (default: the "
                      "model config's, 3)")
  parser.add_argument("--recycle_tolerance", type=float, help="stop recycling when the Cα "
                      "distance-matrix RMS change falls below this (Å); default: never")
  parser.add_argument("--chunk_size", type=int, default=0, help="run attention and transitions "
                      "in chunks of this many rows (less memory for long sequences); 0: off")
  parser.add_argument("--dtype", choices=("bfloat16", "float32"), help="activation dtype "
                      "(default: the model config's)")
  parser.add_argument("--max_msa_clusters", type=int, help="MSA cluster centres per iteration "
                      "(default 512, AlphaFold's inference value)")
  parser.add_argument("--max_extra_msa", type=int, help="extra MSA rows (default: the preset's)")
  parser.add_argument("--pad_to_multiple", type=int, default=0, help="pad residues to a "
                      "multiple of this and MSA rows to their caps, so that sequences of "
                      "similar length share one compilation; 0: off")
  parser.add_argument("--template_mmcif_dir", help="mmCIF files of template hits (templates "
                      "are used only with this)")
  parser.add_argument("--max_template_date", help="YYYY-MM-DD: latest template release date")
  parser.add_argument("--kalign_binary_path", default="kalign")
  parser.add_argument("--seed", type=int, default=0, help="MSA sampling and masking seed")


def setup_logging(out_dir: str, name: str) -> logging.Handler:
  """INFO to stderr (once per process) and to `<out>/<name>.log`; returns the file handler,
  which the caller removes and closes when done."""
  root = logging.getLogger("af2flax")
  root.setLevel(logging.INFO)
  if not any(getattr(h, "af2flax_console", False) for h in root.handlers):
    console = logging.StreamHandler(sys.stderr)
    console.af2flax_console = True
    console.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    root.addHandler(console)
  file_handler = logging.FileHandler(os.path.join(out_dir, f"{name}.log"))
  file_handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
  root.addHandler(file_handler)
  return file_handler


def load_models(args: argparse.Namespace) -> list[model_loading.LoadedModel]:
  names = split_list(args.models)
  if args.af2_params:
    return model_loading.load_alphafold_models(args.af2_params, names, args.model_config)
  return model_loading.load_checkpoint_models(split_list(args.checkpoint), names,
                                              args.model_config, args.checkpoint_step)


def prepare_models(loaded: Sequence[model_loading.LoadedModel],
                   args: argparse.Namespace) -> list[PreparedModel]:
  """Inference configs, runners and feature settings from the flags of `add_run_flags`."""
  prepared = []
  for model in loaded:
    config = inference_config(model.config, num_recycle=args.num_recycle,
                              chunk_size=args.chunk_size or None, dtype=args.dtype)
    overrides: dict[str, Any] = {"num_res_multiple": args.pad_to_multiple,
                                 "pad_msa_rows": args.pad_to_multiple > 0}
    if args.max_msa_clusters:
      overrides["max_msa_clusters"] = args.max_msa_clusters
    if args.max_extra_msa is not None:
      overrides["max_extra_msa"] = args.max_extra_msa
    feature_config = feature_processing.feature_config_from_model(config, model.data_settings,
                                                                  **overrides)
    prepared.append(PreparedModel(model.name, ModelRunner(model.name, config, model.params),
                                  feature_config))
  return prepared


def input_errors() -> tuple[type[BaseException], ...]:
  """Exceptions that mean "this input is bad": the query is skipped with the message."""
  from af2flax.data import parsers, pipeline  # pylint: disable=import-outside-toplevel
  from af2flax.data.tools.utils import ToolError  # pylint: disable=import-outside-toplevel
  return (QueryError, parsers.ParseError, pipeline.FeatureError, ToolError, OSError)
