"""Shared helpers of the bench scripts' tests."""

import importlib.util
import types

from tests.conftest import REPO_ROOT


def bench_module(name: str) -> types.ModuleType:
  """bench/NAME.py loaded as a module (bench/ holds scripts, not a package)."""
  spec = importlib.util.spec_from_file_location(f"bench_{name}", REPO_ROOT / "bench" / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module
