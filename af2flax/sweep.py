"""Hyper-parameter sweeps: a grid over config keys expanded into training runs.

    python -m af2flax.sweep --sweep=configs/sweeps/tiny_lr.py --workdir=/tmp/sweep [--dry_run]

A sweep file defines `get_sweep()` returning a dict:
  config   the preset to start from, e.g. 'configs/tiny.py' (relative to the current
           directory, like --config of af2flax.train);
  grid     {dotted config key: [values]}: every combination is one run;
  fixed    optional {dotted config key: value} applied to every run.
Each run trains with `python -m af2flax.train` in `<workdir>/<run name>`, where the run name
lists its grid values (`learning_rate=0.001,clip_norm=0.1`); that folder name is also the run's
name in `tensorboard --logdir <workdir>`. `--dry_run` prints the commands, one per line, for a
cluster scheduler instead of running them here; `sweep.json` in the workdir lists the runs.
"""

from __future__ import annotations

import importlib.util
import itertools
import json
import os
import pathlib
import shlex
import subprocess
import sys
from typing import Any, Mapping, Sequence

from absl import app
from absl import flags

from af2flax.common import config_files

FLAGS = flags.FLAGS
flags.DEFINE_string("sweep", None, "Sweep file (configs/sweeps/*.py) with get_sweep().")
flags.DEFINE_string("workdir", None, "Parent directory: each run writes to workdir/<run name>.")
flags.DEFINE_bool("dry_run", False, "Print the training commands instead of running them.")
flags.DEFINE_string("python", sys.executable, "Python interpreter written into the commands.")


class SweepError(ValueError):
  """A sweep file that cannot be expanded (the message names the file and the problem)."""


def load_sweep(path: str | os.PathLike) -> dict[str, Any]:
  """`get_sweep()` of the sweep file at `path`, checked for the expected keys."""
  path = pathlib.Path(path)
  if not path.is_file():
    raise SweepError(f"{path}: sweep file not found")
  spec = importlib.util.spec_from_file_location(f"af2flax_sweep_{path.stem}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  if not hasattr(module, "get_sweep"):
    raise SweepError(f"{path}: defines no get_sweep()")
  sweep = dict(module.get_sweep())
  unknown = set(sweep) - {"config", "grid", "fixed"}
  if unknown or "config" not in sweep or not sweep.get("grid"):
    raise SweepError(f"{path}: get_sweep() must return {{'config', 'grid'[, 'fixed']}} with a "
                     f"non-empty grid; got keys {sorted(sweep)}")
  for key, values in sweep["grid"].items():
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence) or not values:
      raise SweepError(f"{path}: grid[{key!r}] must be a non-empty list of values")
  return sweep


def _format_value(value: Any) -> str:
  """A value as `--config.key=` of ml_collections' config_flags parses it back."""
  return value if isinstance(value, str) else repr(value)


def _check_keys(config: Any, keys: Sequence[str], sweep_path: str) -> None:
  for key in keys:
    node = config
    for part in key.split("."):
      try:
        node = node[part]
      except (KeyError, TypeError, AttributeError):
        raise SweepError(f"{sweep_path}: config key {key!r} is not in the preset") from None


def expand(sweep: Mapping[str, Any], workdir: str, python: str = sys.executable,
           preset_config: Any = None, sweep_path: str = "sweep") -> list[dict[str, Any]]:
  """The runs of `sweep`: [{'name', 'workdir', 'overrides', 'command'}], in grid order.

  If `preset_config` (the preset's ConfigDict) is given, every key is checked against it.
  """
  grid, fixed = dict(sweep["grid"]), dict(sweep.get("fixed", {}))
  if preset_config is not None:
    _check_keys(preset_config, list(grid) + list(fixed), sweep_path)
  runs = []
  for values in itertools.product(*grid.values()):
    point = dict(zip(grid, values))
    name = ",".join(f"{key.split('.')[-1]}={_format_value(v)}" for key, v in point.items())
    name = name.replace("/", "_").replace(" ", "")
    run_dir = os.path.join(workdir, name)
    overrides = {**fixed, **point}
    command = [python, "-m", "af2flax.train", f"--config={sweep['config']}",
               f"--workdir={run_dir}"]
    command += [f"--config.{key}={_format_value(v)}" for key, v in overrides.items()]
    runs.append({"name": name, "workdir": run_dir, "overrides": overrides, "command": command})
  names = [run["name"] for run in runs]
  if len(set(names)) != len(names):
    raise SweepError(f"{sweep_path}: two grid points give the same run name; make the last "
                     "components of the grid keys distinct")
  return runs


def _load_preset(path: str) -> Any:
  if not pathlib.Path(path).is_file():
    raise SweepError(f"{path}: preset config file not found")
  return config_files.load_config_file(path, "af2flax_sweep_preset")


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  sweep = load_sweep(FLAGS.sweep)
  runs = expand(sweep, FLAGS.workdir, FLAGS.python, _load_preset(sweep["config"]), FLAGS.sweep)
  if FLAGS.dry_run:
    for run in runs:
      print(shlex.join(run["command"]))
    return
  os.makedirs(FLAGS.workdir, exist_ok=True)
  with open(os.path.join(FLAGS.workdir, "sweep.json"), "w", encoding="utf-8") as f:
    json.dump({"sweep": FLAGS.sweep, "runs": runs}, f, indent=2, default=str)
  failed = []
  for i, run in enumerate(runs):
    print(f"[{i + 1}/{len(runs)}] {run['name']}", flush=True)
    if subprocess.run(run["command"], check=False).returncode != 0:
      failed.append(run["name"])
  print(f"{len(runs) - len(failed)}/{len(runs)} runs finished; "
        f"tensorboard --logdir {FLAGS.workdir}", flush=True)
  if failed:
    print("failed: " + ", ".join(failed), file=sys.stderr)
    sys.exit(1)


if __name__ == "__main__":
  flags.mark_flags_as_required(["sweep", "workdir"])
  app.run(main)
