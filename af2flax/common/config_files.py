"""Loading `get_config()` from a config file by path (configs/*.py are files, not a package)."""

from __future__ import annotations

import importlib.util
import os
import pathlib
from typing import Any


def load_config_file(path: str | os.PathLike, module_name: str | None = None) -> Any:
  """`get_config()` of the Python file at `path`; FileNotFoundError if there is none."""
  path = pathlib.Path(path)
  if not path.is_file():
    raise FileNotFoundError(f"{path}: config file not found")
  spec = importlib.util.spec_from_file_location(
      module_name or f"af2flax_config_{path.stem}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def sibling_config(file: str, name: str) -> Any:
  """`get_config()` of `<name>.py` in the folder of `file` (a preset built on another one;
  works from any working directory)."""
  return load_config_file(pathlib.Path(file).resolve().parent / f"{name}.py",
                          f"af2flax_configs_{name}")
