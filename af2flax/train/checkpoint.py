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
import orbax.checkpoint as ocp

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
