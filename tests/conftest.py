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


def load_af2_tiny_training():
  """(model config, Flax parameters, batch with its recycle axis, outputs) of the af2_tiny
  fixture, as the training tests use it (DeepMind's config, its parameters imported)."""
  import json  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from af2flax.model import config as model_config_lib  # pylint: disable=g-import-not-at-top
  from af2flax.model import import_af2  # pylint: disable=g-import-not-at-top
  directory = REFERENCE / "af2_tiny"
  config = model_config_lib.from_alphafold_dict(
      json.loads((directory / "config.json").read_text())["model_config"])
  params = import_af2.haiku_to_flax(dict(np.load(directory / "params.npz")))
  return (config, params, dict(np.load(directory / "batch.npz")),
          dict(np.load(directory / "outputs.npz")))
