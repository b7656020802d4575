"""Shared test set-up: CPU-only JAX, paths to the shared reference data."""

import os
import pathlib

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import pytest  # noqa: E402

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
SHARED = REPO_ROOT.parent / "shared"
REFERENCE = SHARED / "reference"
SHARED_DATA = SHARED / "data"
SAMPLES = REPO_ROOT / "data" / "samples"


@pytest.fixture(scope="session")
def shared_dir() -> pathlib.Path:
  if not SHARED.is_dir():
    pytest.skip(f"{SHARED} not present (tests read ../shared beside the checkout)")
  return SHARED
