"""Loads the af2_tiny AlphaFold dump (params, final-iteration batch, outputs, model config)."""

import json

import ml_collections
import numpy as np
import pytest

from af2flax.model.import_af2 import haiku_to_flax
from tests.conftest import REFERENCE

TINY = REFERENCE / "af2_tiny"
ITERATION_PREFIX = "alphafold/alphafold_iteration"


def _load_npz(name):
  path = TINY / name
  if not path.exists():
    pytest.skip(f"{path} missing")
  with np.load(path, allow_pickle=False) as data:
    return dict(data)


def load_tiny():
  """(haiku params, final-iteration batch, outputs, model config) of the af2_tiny dump."""
  params = _load_npz("params.npz")
  full_batch = _load_npz("batch.npz")
  outputs = _load_npz("outputs.npz")
  with open(TINY / "config.json") as handle:
    config = ml_collections.ConfigDict(json.load(handle)["model_config"])
  # The final iteration reads slice num_iter_recycling of the recycle axis (MODEL_CONTRACT 3).
  final = int(full_batch["num_iter_recycling"][0])
  batch = {key: value[final] for key, value in full_batch.items()}
  return params, batch, outputs, config


def module_params(params, haiku_module):
  """Flax params tree of the Haiku module `alphafold/alphafold_iteration/<haiku_module>`."""
  return haiku_to_flax(params, f"{ITERATION_PREFIX}/{haiku_module}")


def relative_error(ours, ref):
  ours = np.asarray(ours, np.float64)
  ref = np.asarray(ref, np.float64)
  assert ours.shape == ref.shape, (ours.shape, ref.shape)
  return float(np.linalg.norm(ours - ref) / max(np.linalg.norm(ref), 1e-30))
