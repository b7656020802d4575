"""Checkpoints with Orbax: the whole train state plus every host's input-iterator position.

One `ocp.CheckpointManager` under `<workdir>/checkpoints`; each step directory holds two items:
  state   the `TrainState` (params, optimizer state, EMA, step, RNG, skip counters), saved with
          `ocp.args.StandardSave` and restored straight into its sharding;
  input   one JSON file per process with that process's input-iterator state.
Saves are asynchronous (training continues while the arrays are written) and atomic: Orbax
writes into a temporary directory and renames it when complete, so a kill during a save leaves
the previous checkpoint as the latest restorable one (leftovers are cleaned up on the next
start). Retention keeps the last `keep` checkpoints plus the `keep_best` best by a validation
metric (lDDT-Cα by default). Only the stable `ocp.CheckpointManager` + `ocp.args` API is used
(checked with orbax-checkpoint 0.12.4 and 0.12.8).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import threading
from typing import Any

from absl import logging
from etils import epath
import jax
from jax.experimental import multihost_utils
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from flax import traverse_util

PyTree = Any


class IteratorStateHandler(ocp.CheckpointHandler):
  """Saves each process's input-iterator state (a JSON-serialisable value) to its own file."""

  def save(self, directory: epath.Path, args: "IteratorStateSave") -> None:
    path = epath.Path(directory) / f"process_{jax.process_index()}.json"
    path.write_text(json.dumps({"process_count": jax.process_count(), "state": args.state}))

  def restore(self, directory: epath.Path, args: "IteratorStateRestore | None" = None) -> Any:
    """The state this process saved, or None if the checkpoint has none for this process."""
    del args
    path = epath.Path(directory) / f"process_{jax.process_index()}.json"
    if not path.exists():
      return None
    saved = json.loads(path.read_text())
    if saved.get("process_count") != jax.process_count():
      logging.warning("%s was written by %s processes, this run has %d: input positions are "
                      "not restored", path, saved.get("process_count"), jax.process_count())
      return None
    return saved["state"]

  def metadata(self, directory: epath.Path) -> None:
    del directory
    return None


@ocp.args.register_with_handler(IteratorStateHandler, for_save=True)
@dataclasses.dataclass
class IteratorStateSave(ocp.args.CheckpointArgs):
  state: Any


@ocp.args.register_with_handler(IteratorStateHandler, for_restore=True)
@dataclasses.dataclass
class IteratorStateRestore(ocp.args.CheckpointArgs):
  pass


def _metric_or_missing(metric_name: str):
  def get(metrics: PyTree) -> float:
    value = (metrics or {}).get(metric_name)
    return -math.inf if value is None or not math.isfinite(value) else float(value)
  return get


class Checkpointer:
  """Periodic, preemption-safe checkpoints of a training run (`config.checkpoint`).

  Config keys: `every_steps` (save interval), `keep` (last K kept), `keep_best` (best N by
  `best_metric`, 0 to disable), `best_metric` (a key of the validation metrics),
  `best_mode` ('max' or 'min'), `async_save`.
  """

  def __init__(self, directory: str | os.PathLike, config: ml_collections.ConfigDict):
    self.every_steps = int(config.every_steps)
    policies = [ocp.checkpoint_managers.LatestN(n=int(config.keep))]
    if int(config.get("keep_best", 0)) > 0:
      policies.append(ocp.checkpoint_managers.BestN(
          get_metric_fn=_metric_or_missing(config.best_metric),
          reverse=config.get("best_mode", "max") == "min",
          n=int(config.keep_best),
          keep_checkpoints_without_metrics=False))
    # Saving is decided here (`save`), not by Orbax's default policies (which would also
    # save the first step of every run).
    options = ocp.CheckpointManagerOptions(
        save_interval_steps=1,
        preservation_policy=ocp.checkpoint_managers.AnyPreservationPolicy(policies),
        enable_async_checkpointing=bool(config.get("async_save", True)),
        cleanup_tmp_directories=True,
        create=True,
    )
    self.manager = ocp.CheckpointManager(
        epath.Path(directory).absolute(), options=options,
        item_handlers={"state": ocp.StandardCheckpointHandler(),
                       "input": IteratorStateHandler()})

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state: PyTree, input_state: Any, *,
           metrics: dict[str, float] | None = None, force: bool = False) -> bool:
    """Starts an asynchronous save of `step` if it is due (or `force`); True if started.

    Due: every `every_steps` steps. A step that is already saved is not saved again.
    """
    if not (force or step % self.every_steps == 0):
      return False
    if step in self.manager.all_steps():
      return False
    args = ocp.args.Composite(state=ocp.args.StandardSave(state),
                              input=IteratorStateSave(input_state))
    return self.manager.save(step, args=args, metrics=metrics, force=True)

  def restore(self, step: int, abstract_state: PyTree) -> tuple[PyTree, Any]:
    """(state, input_state) of `step`, the arrays placed as in `abstract_state`.

    `abstract_state` is a tree of `jax.ShapeDtypeStruct`s with shardings (from
    `jax.eval_shape` plus `sharding.infer_sharding`), so each host reads only its shards.
    """
    restored = self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state), input=IteratorStateRestore()))
    return restored["state"], restored["input"]

  def wait_until_finished(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.close()


class PreemptionWatcher:
  """Tells the loop when to save and stop because the job is being preempted (SIGTERM).

  One process: a SIGTERM handler sets a flag that the loop reads after each step. Several
  processes: JAX's preemption sync service (started by `jax.distributed.initialize`) receives
  the notice on any host and makes every host agree on the same step to stop at, so that all
  of them take part in the final save.
  """

  def __init__(self):
    self._event = threading.Event()
    self._multi_process = jax.process_count() > 1
    self._previous_handler = None
    if not self._multi_process and threading.current_thread() is threading.main_thread():
      self._previous_handler = signal.signal(signal.SIGTERM, self._on_sigterm)

  def _on_sigterm(self, signum, frame):
    del signum, frame
    logging.warning("SIGTERM received: saving a checkpoint and stopping after this step")
    self._event.set()

  def should_stop(self, step: int) -> bool:
    if self._multi_process:
      try:
        return multihost_utils.reached_preemption_sync_point(step)
      except RuntimeError:  # preemption service disabled in this JAX configuration
        return False
    return self._event.is_set()

  def close(self) -> None:
    if self._previous_handler is not None:
      signal.signal(signal.SIGTERM, self._previous_handler)
      self._previous_handler = None


def _restore_as_numpy(manager_or_path: Any, step: int | None = None) -> PyTree:
  """A checkpoint's arrays as host numpy arrays, shapes from its own metadata."""
  if isinstance(manager_or_path, ocp.CheckpointManager):
    metadata = manager_or_path.item_metadata(step)["state"]
    target = jax.tree.map(lambda m: np.zeros(m.shape, m.dtype), dict(metadata))
    return manager_or_path.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(target)))["state"]
  checkpointer = ocp.StandardCheckpointer()
  metadata = checkpointer.metadata(manager_or_path)
  metadata = getattr(metadata, "item_metadata", metadata)
  target = jax.tree.map(lambda m: np.zeros(m.shape, m.dtype), dict(metadata))
  return checkpointer.restore(manager_or_path, target)


def read_pretrained_params(path: str | os.PathLike) -> dict[str, Any]:
  """Parameters (nested dict of numpy arrays) from one of:

  * DeepMind's published parameter file (`params_model_1_ptm.npz`): Haiku names mapped to our
    tree by `af2flax.model.import_af2.haiku_to_flax` (MODEL_CONTRACT section 1);
  * a training workdir of ours (it has `checkpoints/`): the EMA parameters of its latest
    checkpoint, e.g. to fine-tune after initial training;
  * an Orbax checkpoint of a parameter tree (`python -m af2flax.tools.convert_params`), with or
    without a top-level 'params' key.
  """
  path = epath.Path(path)
  if path.suffix == ".npz":
    from af2flax.model import import_af2  # pylint: disable=g-import-not-at-top
    if not path.exists():
      raise FileNotFoundError(f"{path}: parameter file not found")
    with path.open("rb") as f:
      flat = dict(np.load(f, allow_pickle=False))
    return import_af2.haiku_to_flax(flat)
  if (path / "checkpoints").is_dir():
    manager = ocp.CheckpointManager((path / "checkpoints").absolute(), item_handlers={
        "state": ocp.StandardCheckpointHandler(), "input": IteratorStateHandler()})
    step = manager.latest_step()
    if step is None:
      raise FileNotFoundError(f"{path / 'checkpoints'}: no complete checkpoint to start from")
    state = _restore_as_numpy(manager, step)
    manager.close()
    logging.info("init_from: EMA parameters of %s step %d", path, step)
    return state["ema_params"]
  if not path.is_dir():
    raise FileNotFoundError(f"{path}: not a .npz parameter file, a training workdir or an "
                            "Orbax checkpoint directory")
  tree = _restore_as_numpy(path.absolute())
  return tree["params"] if "params" in tree else tree


def merge_pretrained_params(init_params: PyTree, pretrained: PyTree, source: str) -> PyTree:
  """`init_params` with every parameter that `pretrained` has replaced by its value.

  Parameters only in the model (e.g. a head added for fine-tuning) keep their initial values;
  parameters only in `pretrained` are ignored; both are logged. A shape mismatch, or no
  parameter in common at all, is an error naming `source`.
  """
  flat_init = traverse_util.flatten_dict(init_params, sep="/")
  flat_loaded = traverse_util.flatten_dict(pretrained, sep="/")
  merged, taken = {}, 0
  for name, value in flat_init.items():
    if name in flat_loaded:
      loaded = np.asarray(flat_loaded[name])
      if loaded.shape != tuple(value.shape):
        raise ValueError(f"{source}: parameter {name} has shape {loaded.shape}, the model "
                         f"expects {tuple(value.shape)} (a different model config?)")
      merged[name] = loaded.astype(value.dtype)
      taken += 1
    else:
      merged[name] = value
  if taken == 0:
    raise ValueError(f"{source}: none of its {len(flat_loaded)} parameters matches the "
                     f"model's {len(flat_init)} (e.g. {next(iter(flat_init), None)})")
  missing = sorted(set(flat_init) - set(flat_loaded))
  unused = sorted(set(flat_loaded) - set(flat_init))
  logging.info("init_from %s: %d parameters loaded, %d kept at initialisation %s, %d unused %s",
               source, taken, len(missing), missing[:5], len(unused), unused[:5])
  return traverse_util.unflatten_dict(merged, sep="/")


def load_pretrained_params(path: str | os.PathLike, init_params: PyTree) -> PyTree:
  """`merge_pretrained_params` of `read_pretrained_params(path)`, placed like `init_params`."""
  merged = merge_pretrained_params(init_params, read_pretrained_params(path), str(path))
  shardings = jax.tree.map(lambda x: x.sharding, init_params)
  return jax.tree.map(jax.device_put, merged, shardings)
