"""Loads the af2_tiny reference (AlphaFold's own batch, outputs and losses) for loss tests."""

from __future__ import annotations

import functools
import json

import jax
import ml_collections
import numpy as np
import pytest

from af2flax.losses.total import alphafold_loss

from tests.conftest import REFERENCE

AF2_TINY = REFERENCE / "af2_tiny"


def _require():
  if not (AF2_TINY / "outputs.npz").exists():
    pytest.skip(f"{AF2_TINY} not present")


@functools.lru_cache(maxsize=None)
def raw_batch() -> dict[str, np.ndarray]:
  _require()
  with np.load(AF2_TINY / "batch.npz", allow_pickle=False) as data:
    return {key: data[key] for key in data.files}


@functools.lru_cache(maxsize=None)
def raw_outputs() -> dict[str, np.ndarray]:
  _require()
  with np.load(AF2_TINY / "outputs.npz", allow_pickle=False) as data:
    return {key: data[key] for key in data.files}


def heads_config() -> ml_collections.ConfigDict:
  _require()
  config = json.loads((AF2_TINY / "config.json").read_text())
  return ml_collections.ConfigDict(config["model_config"]["heads"])


def final_iteration_batch(index: int | None = None) -> dict[str, np.ndarray]:
  """The batch slice of the final (gradient) iteration: `num_iter_recycling` by default."""
  batch = raw_batch()
  if index is None:
    index = int(batch["num_iter_recycling"][0])
  return {key: value[index] for key, value in batch.items()}


def model_outputs() -> dict:
  """AlphaFold's outputs in our contract's layout (MODEL_CONTRACT section 4)."""
  out = raw_outputs()
  sc = "structure_module/sidechains/"
  frames_rot = np.stack([out[sc + f"frames/rot/{a}{b}"] for a in "xyz" for b in "xyz"], -1)
  frames_trans = np.stack([out[sc + f"frames/trans/{a}"] for a in "xyz"], -1)
  atom_pos = np.stack([out[sc + f"atom_pos/{a}"] for a in "xyz"], -1)
  structure_module = {
      key: out["structure_module/" + key]
      for key in ("final_atom_positions", "final_atom_mask", "final_atom14_positions",
                  "final_atom14_mask", "final_affines", "traj")
  }
  structure_module["sidechains"] = {
      "angles_sin_cos": out[sc + "angles_sin_cos"],
      "unnormalized_angles_sin_cos": out[sc + "unnormalized_angles_sin_cos"],
      "atom_pos": atom_pos,
      "frames": np.concatenate([frames_rot, frames_trans], axis=-1),
  }
  return {
      "distogram": {"logits": out["distogram/logits"], "bin_edges": out["distogram/bin_edges"]},
      "masked_msa": {"logits": out["masked_msa/logits"]},
      "experimentally_resolved": {"logits": out["experimentally_resolved/logits"]},
      "predicted_lddt": {"logits": out["predicted_lddt/logits"]},
      "predicted_aligned_error": {"logits": out["predicted_aligned_error/logits"],
                                  "breaks": out["predicted_aligned_error/breaks"]},
      "structure_module": structure_module,
  }


@functools.lru_cache(maxsize=None)
def jitted_loss():
  """`alphafold_loss` with the af2_tiny heads config, jitted once for every test that uses it:
  (batch, outputs, is_distillation) -> (total, aux)."""
  config = heads_config()
  return jax.jit(lambda batch, outputs, is_distillation: alphafold_loss(
      batch, outputs, config, is_distillation=is_distillation))


@functools.lru_cache(maxsize=None)
def jitted_loss_and_grad():
  """d total / d outputs of `alphafold_loss` (af2_tiny heads config), jitted once."""
  config = heads_config()
  return jax.jit(jax.value_and_grad(
      lambda outputs, batch: alphafold_loss(batch, outputs, config)[0]))
