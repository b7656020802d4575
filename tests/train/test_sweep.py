"""Sweeps: grid expansion into runs with their own workdirs, dry-run commands, bad sweep files."""

import shlex
import subprocess
import sys
import textwrap

import pytest

from af2flax import sweep as sweep_lib
from tests.conftest import REPO_ROOT

PRESET = textwrap.dedent('''
    import ml_collections
    def get_config():
      return ml_collections.ConfigDict({
          "num_train_steps": 10, "batch_size": 2,
          "optimizer": {"learning_rate": 1e-3, "clip_norm": 0.1},
          "data": {"train": {"crop_size": 256}}})
''')


def _write(tmp_path, sweep_body):
  (tmp_path / "preset.py").write_text(PRESET)
  (tmp_path / "sweep.py").write_text(textwrap.dedent(sweep_body).replace(
      "PRESET", str(tmp_path / "preset.py")))
  return tmp_path / "sweep.py"


GRID_SWEEP = '''
    def get_sweep():
      return {"config": "PRESET",
              "grid": {"optimizer.learning_rate": [1e-3, 3e-4],
                       "data.train.crop_size": [128, 256, 384]},
              "fixed": {"num_train_steps": 50}}
'''


def test_dry_run_prints_one_command_per_grid_point(tmp_path):
  sweep_file = _write(tmp_path, GRID_SWEEP)
  result = subprocess.run([sys.executable, "-m", "af2flax.sweep", f"--sweep={sweep_file}",
                           f"--workdir={tmp_path / 'runs'}", "--dry_run", "--python=python3"],
                          cwd=REPO_ROOT, capture_output=True, text=True, check=True)
  commands = [shlex.split(line) for line in result.stdout.strip().splitlines()]
  assert len(commands) == 6
  workdirs = set()
  for command in commands:
    assert command[:3] == ["python3", "-m", "af2flax.train"]
    flags = dict(arg.split("=", 1) for arg in command[3:])
    assert flags["--config"] == str(tmp_path / "preset.py")
    assert flags["--config.num_train_steps"] == "50"
    name = f"learning_rate={flags['--config.optimizer.learning_rate']}," \
           f"crop_size={flags['--config.data.train.crop_size']}"
    assert flags["--workdir"] == str(tmp_path / "runs" / name)
    workdirs.add(flags["--workdir"])
  assert len(workdirs) == 6
  assert {c[-2] for c in commands} == {"--config.optimizer.learning_rate=0.001",
                                       "--config.optimizer.learning_rate=0.0003"}
  assert not (tmp_path / "runs").exists()  # a dry run creates nothing


def test_unknown_config_key_is_rejected(tmp_path):
  sweep_file = _write(tmp_path, '''
      def get_sweep():
        return {"config": "PRESET", "grid": {"optimizer.learnig_rate": [1e-3]}}
  ''')
  sweep = sweep_lib.load_sweep(sweep_file)
  preset = sweep_lib._load_preset(sweep["config"])
  with pytest.raises(sweep_lib.SweepError, match="optimizer.learnig_rate"):
    sweep_lib.expand(sweep, "/tmp/x", preset_config=preset, sweep_path=str(sweep_file))


@pytest.mark.parametrize("body, message", [
    ("def get_sweep():\n  return {'config': 'x.py', 'grid': {}}\n", "non-empty grid"),
    ("def get_sweep():\n  return {'config': 'x.py', 'grid': {'a': 3}}\n", "non-empty list"),
    ("x = 1\n", "no get_sweep"),
])
def test_bad_sweep_files_name_the_problem(tmp_path, body, message):
  path = tmp_path / "bad.py"
  path.write_text(body)
  with pytest.raises(sweep_lib.SweepError, match=message) as error:
    sweep_lib.load_sweep(path)
  assert str(path) in str(error.value)


def test_shipped_sweeps_expand():
  for path in sorted((REPO_ROOT / "configs" / "sweeps").glob("*.py")):
    sweep = sweep_lib.load_sweep(path)
    runs = sweep_lib.expand(sweep, "/tmp/sweep")
    assert len(runs) >= 2 and (REPO_ROOT / sweep["config"]).is_file()
