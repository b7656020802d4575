"""The models a prediction run uses: configs and parameters from our checkpoints or AlphaFold's.

Three sources of parameters:
  * a training run of ours (`python -m af2flax.train --workdir DIR`): its `config.json` gives
    the model config, and the EMA parameters (Suppl. 1.11.7, what AlphaFold evaluates) of the
    latest (or a chosen) step of `DIR/checkpoints` are restored without the optimizer state;
    `DIR/checkpoints` or one step directory `DIR/checkpoints/<step>` work too;
  * an Orbax params checkpoint from `python -m af2flax.tools.convert_params` ({'params': tree});
    its preset comes from `--models` (or `--model_config`);
  * DeepMind's `params_model_*.npz` files, converted on the fly by `af2flax.model.import_af2`
    and checked name by name and shape by shape against the model.
A `--model_config` JSON (an AlphaFold `model_config` tree, e.g. a reference dump's config.json)
replaces the preset's config (tests use it for tiny models).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import re
from typing import Any, Mapping, Sequence

import jax
import ml_collections
import numpy as np

from af2flax.model import batch_spec
from af2flax.model import config as config_lib
from af2flax.model import import_af2
from af2flax.model.alphafold import AlphaFold

logger = logging.getLogger(__name__)
PyTree = Any

_STEP_DIR = re.compile(r"^\d+$")
_PARAMS_FILE = re.compile(r"^params_(?P<name>.+)\.npz$")


class ModelLoadError(ValueError):
  """A checkpoint or parameter file cannot be used; the message names it and the fix."""


@dataclasses.dataclass(frozen=True)
class LoadedModel:
  """A model's name, config (as trained; `runner.inference_config` adapts it), parameters
  ({'alphafold_iteration': ...}) and the data settings its features need."""
  name: str
  config: ml_collections.ConfigDict
  params: PyTree
  data_settings: Mapping[str, Any]
  source: str

  @property
  def is_ptm(self) -> bool:
    heads = self.config.heads
    return "predicted_aligned_error" in heads and bool(heads.predicted_aligned_error.weight)


# --- configs -----------------------------------------------------------------------------------

def preset_config(name: str) -> ml_collections.ConfigDict:
  """AlphaFold preset `name` ('model_1' ... 'model_5_ptm')."""
  try:
    return config_lib.model_config(name)
  except ValueError as error:
    raise ModelLoadError(f"{error}; with another name give --model_config") from error


def preset_data_settings(name: str) -> dict[str, Any]:
  """AlphaFold's per-preset data settings (`max_extra_msa`, template rows), {} if none."""
  return dict(config_lib.DATA_SETTINGS.get(name, {}))


def config_from_json(path: str | os.PathLike) -> ml_collections.ConfigDict:
  """A model config from JSON: an AlphaFold `model_config` tree, or a file holding one under
  'model_config' (reference dumps) or 'model' (our training runs' config.json)."""
  try:
    with open(path) as handle:
      tree = json.load(handle)
  except (OSError, json.JSONDecodeError) as error:
    raise ModelLoadError(f"{path}: cannot read the model config JSON ({error})") from error
  if isinstance(tree, dict) and "model_config" in tree:
    tree = tree["model_config"]
  try:
    return config_lib.from_alphafold_dict(tree)
  except ValueError as error:
    raise ModelLoadError(f"{path}: {error}") from error


def _train_data_settings(path: str) -> dict[str, Any]:
  """`data.common` MSA settings of a training run's config.json ({} if it has none)."""
  try:
    with open(path) as handle:
      common = json.load(handle).get("data", {}).get("common", {})
  except (OSError, json.JSONDecodeError, AttributeError):
    return {}
  keys = ("max_extra_msa", "reduce_msa_clusters_by_max_templates", "use_templates")
  return {key: common[key] for key in keys if key in common}


def abstract_params(config: ml_collections.ConfigDict) -> PyTree:
  """The model's parameter tree as ShapeDtypeStructs (no computation, no memory)."""
  return _abstract_params(json.dumps(config.to_dict(), sort_keys=True, default=str))


@functools.lru_cache(maxsize=8)
def _abstract_params(config_json: str) -> PyTree:
  """Cached by config: tracing the model's init takes seconds."""
  config = ml_collections.ConfigDict(json.loads(config_json))
  template = config.embeddings_and_evoformer.template
  shapes = batch_spec.feature_shapes(num_res=8, num_msa=2, num_extra_msa=2,
                                     num_templates=int(template.max_templates), num_slices=1)
  model = AlphaFold(config)
  rngs = {"params": jax.random.PRNGKey(0), "dropout": jax.random.PRNGKey(0)}
  return jax.eval_shape(lambda batch: model.init(rngs, batch, deterministic=True),
                        shapes)["params"]


# --- AlphaFold's parameter files ---------------------------------------------------------------

def load_alphafold_params(path: str | os.PathLike, config: ml_collections.ConfigDict) -> PyTree:
  """A DeepMind `params_model_*.npz` as our parameter tree, checked against `config`'s model."""
  try:
    flat = import_af2.load_alphafold_npz(path)
    return import_af2.flax_from_haiku(flat, expected=abstract_params(config),
                                      source=str(path))["params"]
  except (FileNotFoundError, import_af2.ParameterMismatchError) as error:
    raise ModelLoadError(f"{error}\n(are --models / --model_config the preset these parameters "
                         "were trained with?)") from error


def load_alphafold_models(params_path: str, model_names: Sequence[str] | None,
                          model_config_path: str | None = None) -> list[LoadedModel]:
  """Models from `--af2_params`: one .npz file, or a directory of `params_<model>.npz`.

  A file's model name is `--models` (one name) or its `params_<name>.npz` file name; a
  directory needs `--models`.
  """
  if os.path.isdir(params_path):
    if not model_names:
      found = sorted(m.group("name") for m in map(_PARAMS_FILE.match, os.listdir(params_path))
                     if m)
      raise ModelLoadError(f"--af2_params {params_path} is a directory: choose models with "
                           f"--models (found: {', '.join(found) or 'no params_*.npz'})")
    paths = {name: os.path.join(params_path, f"params_{name}.npz") for name in model_names}
  else:
    match = _PARAMS_FILE.match(os.path.basename(params_path))
    if model_names and len(model_names) != 1:
      raise ModelLoadError(f"--af2_params {params_path} is one file but --models names "
                           f"{len(model_names)} models; give a directory of params_<model>.npz")
    name = model_names[0] if model_names else (match.group("name") if match else None)
    if name is None:
      raise ModelLoadError(f"--af2_params {params_path}: cannot tell the model from the file "
                           "name; give --models (e.g. model_1_ptm)")
    paths = {name: params_path}
  models = []
  for name, path in paths.items():
    config = config_from_json(model_config_path) if model_config_path else preset_config(name)
    logger.info("loading AlphaFold parameters %s as %s", path, name)
    models.append(LoadedModel(name, config, load_alphafold_params(path, config),
                              preset_data_settings(name), str(path)))
  return models


# --- our checkpoints ---------------------------------------------------------------------------

def _steps(checkpoints_dir: str) -> list[int]:
  return sorted(int(entry) for entry in os.listdir(checkpoints_dir)
                if _STEP_DIR.match(entry) and os.path.isdir(os.path.join(checkpoints_dir, entry,
                                                                         "state")))


def find_training_state(path: str, step: int | None = None) -> tuple[str, str, int] | None:
  """(state item directory, config.json path, step) of a training run, a run's `checkpoints`
  directory or one step directory; None when `path` is none of these."""
  path = os.path.abspath(path)
  candidates = [(os.path.join(path, "checkpoints"), os.path.join(path, "config.json")),
                (path, os.path.join(os.path.dirname(path), "config.json"))]
  for checkpoints, config_json in candidates:
    if os.path.isdir(checkpoints) and _steps(checkpoints):
      steps = _steps(checkpoints)
      chosen = steps[-1] if step is None else step
      if chosen not in steps:
        raise ModelLoadError(f"{checkpoints}: no checkpoint of step {chosen} (steps: "
                             f"{', '.join(map(str, steps))})")
      return os.path.join(checkpoints, str(chosen), "state"), config_json, chosen
  if _STEP_DIR.match(os.path.basename(path)) and os.path.isdir(os.path.join(path, "state")):
    config_json = os.path.join(os.path.dirname(os.path.dirname(path)), "config.json")
    return os.path.join(path, "state"), config_json, int(os.path.basename(path))
  return None


def restore_ema_params(state_dir: str) -> PyTree:
  """The EMA parameters of a saved TrainState, read without its optimizer state.

  The target shapes come from the checkpoint's own metadata, placed on one device, so a
  checkpoint written on a multi-device mesh restores on any machine. Falls back to the raw
  `params` (with a warning) for a state without `ema_params`.
  """
  import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel  # slow import
  checkpointer = ocp.StandardCheckpointer()
  try:
    tree = checkpointer.metadata(state_dir).item_metadata.tree
  except Exception as error:  # noqa: BLE001 - Orbax raises many kinds for a bad directory
    raise ModelLoadError(f"{state_dir}: not a readable Orbax checkpoint ({error})") from error
  key = "ema_params" if "ema_params" in tree else "params"
  if key not in tree:
    raise ModelLoadError(f"{state_dir}: the checkpoint holds neither ema_params nor params "
                         f"(keys: {', '.join(sorted(tree))})")
  if key == "params":
    logger.warning("%s has no EMA parameters; using the raw training parameters", state_dir)
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  target = {key: jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
                              tree[key])}
  restore_args = jax.tree.map(lambda _: ocp.ArrayRestoreArgs(sharding=device), target)
  pytree_checkpointer = ocp.PyTreeCheckpointer()
  try:
    restored = pytree_checkpointer.restore(state_dir, args=ocp.args.PyTreeRestore(
        item=target, restore_args=restore_args, partial_restore=True))
  except TypeError:  # Orbax without partial_restore: read everything, keep one subtree
    restored = checkpointer.restore(state_dir)
  params = restored[key]
  return params["params"] if set(params) == {"params"} else params


def load_checkpoint_models(checkpoint_paths: Sequence[str], model_names: Sequence[str] | None,
                           model_config_path: str | None = None,
                           step: int | None = None) -> list[LoadedModel]:
  """Models from `--checkpoint` (comma-separated): training runs or params checkpoints.

  Names: `--models` (one per checkpoint) if given, else `<run directory name>_step<step>`.
  """
  if model_names and len(model_names) != len(checkpoint_paths):
    raise ModelLoadError(f"--models names {len(model_names)} models for "
                         f"{len(checkpoint_paths)} --checkpoint paths; give one name per path")
  models = []
  for index, path in enumerate(checkpoint_paths):
    if not os.path.exists(path):
      raise ModelLoadError(f"--checkpoint {path}: no such directory")
    given_name = model_names[index] if model_names else None
    found = find_training_state(path, step)
    if found is not None:
      state_dir, config_json, found_step = found
      if model_config_path:
        config = config_from_json(model_config_path)
      elif os.path.isfile(config_json):
        config = config_from_json(config_json)
      else:
        raise ModelLoadError(f"{path}: training checkpoint without {config_json}; give the "
                             "model config with --model_config")
      run_dir = os.path.dirname(os.path.dirname(os.path.dirname(state_dir)))
      name = given_name or f"{os.path.basename(run_dir)}_step{found_step}"
      logger.info("loading EMA parameters of %s as %s", state_dir, name)
      params = restore_ema_params(state_dir)
      data_settings = _train_data_settings(config_json)
      source = state_dir
    else:
      if not (given_name or model_config_path):
        raise ModelLoadError(f"--checkpoint {path} is a params checkpoint (convert_params); "
                             "name its preset with --models (e.g. model_1_ptm)")
      name = given_name or os.path.basename(os.path.normpath(path))
      config = config_from_json(model_config_path) if model_config_path else preset_config(name)
      try:
        params = import_af2.restore_params(path)["params"]
      except Exception as error:  # noqa: BLE001 - Orbax raises many kinds for a bad directory
        raise ModelLoadError(f"--checkpoint {path}: neither a training run nor an Orbax params "
                             f"checkpoint ({type(error).__name__}: {error})") from error
      data_settings = preset_data_settings(given_name) if given_name else {}
      source = path
    _check_tree(params, config, source)
    models.append(LoadedModel(name, config, jax.tree.map(np.asarray, params), data_settings,
                              source))
  return models


def _check_tree(params: PyTree, config: ml_collections.ConfigDict, source: str) -> None:
  """Same paths and shapes as `config`'s model, or ModelLoadError naming the differences."""
  try:
    import_af2.check_against(import_af2.haiku_from_flax(params), abstract_params(config), source)
  except import_af2.ParameterMismatchError as error:
    raise ModelLoadError(f"{error}\n(does the model config match the checkpoint?)") from error
