"""Runs the training input (and optionally the training loop) with TensorFlow impossible to import.

    python -m tests.data.no_tensorflow_worker WORKDIR [--train_steps N]

With --train_steps it then runs the training command itself (`python -m af2flax.train
--config=configs/tiny.py --config.data.backend=numpy ...`, in this process) for N steps.
A meta-path finder hides tensorflow, tensorflow_datasets and clu, as on a GPU image without
them: `import tensorflow` raises ModuleNotFoundError and `importlib.util.find_spec` returns None
(etils and others probe with it). The input comes from `create_input` with config.data.backend 'auto',
which must resolve to the numpy backend. Prints one JSON line with what it checked.
"""

from __future__ import annotations

import argparse
import importlib.abc
import importlib.machinery
import json
import pathlib
import runpy
import sys

BLOCKED = ("tensorflow", "tensorflow_datasets", "clu")


class _HideBlocked(importlib.abc.MetaPathFinder):
  """The path finder, except that BLOCKED packages are not found (as if not installed)."""

  def __init__(self, finder):
    self._finder = finder

  def find_spec(self, fullname, path=None, target=None):  # noqa: D102
    if fullname.split(".")[0] in BLOCKED:
      return None
    return self._finder.find_spec(fullname, path, target)

  def invalidate_caches(self) -> None:  # noqa: D102
    self._finder.invalidate_caches()


def block_imports() -> None:
  """Hides BLOCKED from every later import in this process."""
  sys.meta_path[:] = [_HideBlocked(finder) if finder is importlib.machinery.PathFinder
                      else finder for finder in sys.meta_path]
  for name in list(sys.modules):
    if name.split(".")[0] in BLOCKED:
      raise RuntimeError(f"{name} was imported before block_imports()")


def _loaded_blocked_modules() -> list[str]:
  return sorted(name for name, module in sys.modules.items()
                if module is not None and name.split(".")[0] in BLOCKED)


def _write_dataset(directory: pathlib.Path) -> str:
  """4 real PDB chains with synthetic MSAs in 2 shards (the tests' record helpers)."""
  import numpy as np  # pylint: disable=import-outside-toplevel
  from tests.conftest import SHARED_DATA  # pylint: disable=import-outside-toplevel
  from tests.data import pipeline_helpers  # pylint: disable=import-outside-toplevel
  rng = np.random.default_rng(0)
  paths = sorted((SHARED_DATA / "pdb_chains").glob("*.pdb.gz"))[:4]
  examples = [pipeline_helpers.raw_example(path.name[:5], *pipeline_helpers.load_pdb_chain(path),
                                           num_msa=40, num_templates=2, rng=rng)
              for path in paths]
  directory.mkdir(parents=True, exist_ok=True)
  pipeline_helpers.write_shards(directory, examples, num_shards=2)
  return str(directory)


def _event_scalars(logdir: pathlib.Path) -> dict[str, list[float]]:
  """tag -> values of the scalars in the TensorBoard event files under `logdir`."""
  from tensorboard.compat.proto import event_pb2  # pylint: disable=import-outside-toplevel
  from af2flax.data import tfrecord  # pylint: disable=import-outside-toplevel
  scalars: dict[str, list[float]] = {}
  for path in sorted(logdir.glob("**/events.out.tfevents*")):
    for record in tfrecord.read_tfrecord(str(path)):
      for value in event_pb2.Event.FromString(record).summary.value:
        scalars.setdefault(value.tag, []).append(value.simple_value)
  return scalars


def training_config(train_dirs: str):
  """initial_training with the tiny test model, tiny input sizes and a few steps."""
  sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2]))
  from configs import initial_training  # pylint: disable=import-outside-toplevel
  from tests.model.helpers import tiny_config  # pylint: disable=import-outside-toplevel
  config = initial_training.get_config()
  heads = config.model.heads
  config.model = tiny_config("model_1_ptm")
  config.model.heads.update({name: heads[name] for name in heads if name in config.model.heads})
  data = config.data
  data.common.num_recycle = config.model.num_recycle = 1
  data.train.crop_size = 32
  data.train.max_msa_clusters = 4
  data.common.max_extra_msa = 8
  data.train.max_templates = 2
  data.pipeline.workers = 2
  config.dataset.train_dirs = train_dirs
  config.dataset.num_eval_examples = 1
  config.dataset.eval_batch_size = 1
  config.batch_size = 1
  config.optimizer.warmup_steps = 1
  config.checkpoint.every_steps = 2
  config.checkpoint.async_save = False
  config.log_every_steps = 1
  config.eval_every_steps = 3
  return config


def main() -> None:
  parser = argparse.ArgumentParser()
  parser.add_argument("workdir")
  parser.add_argument("--train_steps", type=int, default=0)
  args = parser.parse_args()
  block_imports()
  workdir = pathlib.Path(args.workdir)

  import numpy as np  # pylint: disable=import-outside-toplevel
  from af2flax.data import input_pipeline  # pylint: disable=import-outside-toplevel
  from af2flax.data import train_input  # pylint: disable=import-outside-toplevel
  config = training_config(_write_dataset(workdir / "records"))
  assert input_pipeline.resolve_backend(config.data) == "numpy"
  report = {}
  inputs = train_input.create_input(config, workdir=str(workdir), local_batch_size=1,
                                     process_index=0, process_count=1)
  batches = [next(inputs.train) for _ in range(2)]
  state = inputs.train.get_state()
  inputs.train.close()
  resumed = train_input.create_input(config, workdir=str(workdir), local_batch_size=1,
                                      process_index=0, process_count=1).train
  resumed.set_state(state | {"step": 1})
  again = next(resumed)
  resumed.close()
  report["resumed_equal"] = all(np.array_equal(again[key], batches[1][key]) for key in again)
  eval_batches = list(inputs.eval_batches())
  report["msa_feat_shape"] = list(batches[0]["msa_feat"].shape)
  report["eval_batches"] = len(eval_batches)
  report["backend"] = inputs.train.backend

  # The loop's own input module (af2flax/train/input.py) on the same records.
  from af2flax.train import input as loop_input  # pylint: disable=import-outside-toplevel
  loop_inputs = loop_input.create_input(config, str(workdir / "loop_input"), 1)
  report["loop_input_msa_feat_shape"] = list(next(loop_inputs.train)["msa_feat"].shape)
  report["loop_input_eval_batches"] = len(list(loop_inputs.eval_batches()))
  loop_inputs.train.close()

  if args.train_steps:
    train_dir = workdir / "train"
    sys.argv = ["af2flax.train", "--config=configs/tiny.py", f"--workdir={train_dir}",
                "--config.data.backend=numpy", f"--config.num_train_steps={args.train_steps}",
                "--config.eval_every_steps=2", "--config.checkpoint.every_steps=2",
                "--config.log_every_steps=1"]
    try:
      runpy.run_module("af2flax.train", run_name="__main__", alter_sys=True)
    except SystemExit as stop:
      if stop.code not in (None, 0):
        raise
    scalars = _event_scalars(train_dir)
    report["train_loss"] = scalars.get("train/loss", [])
    report["val_lddt_ca"] = scalars.get("val/lddt_ca", [])
    report["checkpoint_dirs"] = sorted(path.name for path in (train_dir / "checkpoints").iterdir())
  report["blocked_modules_loaded"] = _loaded_blocked_modules()
  print(json.dumps(report), flush=True)


if __name__ == "__main__":
  main()
