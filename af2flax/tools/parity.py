"""Parity of af2flax with DeepMind's AlphaFold on a reference dump.

    python -m af2flax.tools.parity --reference ../shared/reference/af2_tiny

A reference directory holds AlphaFold's `params.npz` (Haiku names), `batch.npz` (features
with the leading recycle axis), `outputs.npz` (every output, loss term and per-module
gradient norm `grad_norm/<haiku path prefix>`) and `config.json` (`model_config`: AlphaFold's
config tree). The tool builds our model from that config, imports the parameters (names and
shapes checked), runs the model deterministically in float32 on the batch
(`num_iter_recycling` recycles), computes `alphafold_loss` on the final iteration and its
gradient, and prints every reference output with its max-abs and relative error
(‖ours − ref‖ / ‖ref‖). It exits 1 when one exceeds its tolerance:
  * relative error 1e-4 for representations, logits, losses and the other outputs,
  * max-abs 1e-3 Å for final atom positions,
  * relative error 1e-3 for gradient norms (gradients mapped back to Haiku names),
except for the losses whose labels are binned from the *predicted* structure (pAE, pLDDT)
and the gradients of their heads (`BINNED_LABEL_TOLERANCE`): a predicted error or lDDT
within float32 rounding of a bin edge falls on either side depending on how XLA evaluates
the graph. Measured on af2_tiny: AlphaFold's own pAE loss function applied to the outputs
AlphaFold returned gives 4.167903, its in-graph value is 4.167466 (1.05e-4 apart; one
label of 1,600 flips), which moves the pAE head's gradient norm by 4.4e-3.

The gradient runs with the batch as a compile-time constant, the forward with the batch as an
argument, as the reference dumps were made (see `run_model`).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from af2flax.losses.total import alphafold_loss
from af2flax.model import import_af2
from af2flax.model.alphafold import AlphaFold, slice_recycle
from af2flax.model.config import from_alphafold_dict

RELATIVE_TOLERANCE = 1e-4
GRAD_NORM_TOLERANCE = 1e-3
POSITION_TOLERANCE_ANGSTROM = 1e-3
POSITION_KEYS = ("structure_module/final_atom_positions",
                 "structure_module/final_atom14_positions")
GRAD_NORM_PREFIX = "grad_norm/"
BINNED_LABEL_TOLERANCE = {
    "predicted_aligned_error/loss": 5e-4,
    "predicted_lddt/loss": 5e-4,
    GRAD_NORM_PREFIX + "alphafold/alphafold_iteration/predicted_aligned_error_head": 1e-2,
    GRAD_NORM_PREFIX + "alphafold/alphafold_iteration/predicted_lddt_head": 1e-2,
}
_ROT_FIELDS = [a + b for a in "xyz" for b in "xyz"]


@dataclass
class Row:
  key: str
  shape: tuple[int, ...]
  max_abs: float
  relative: float
  metric: str        # 'rel' or 'abs': which number is held to `tolerance`
  tolerance: float

  @property
  def ok(self) -> bool:
    value = self.relative if self.metric == "rel" else self.max_abs
    return bool(np.isfinite(value)) and value <= self.tolerance


def _load_npz(path: pathlib.Path) -> dict[str, np.ndarray]:
  if not path.is_file():
    raise FileNotFoundError(f"{path}: missing (a reference dump needs params.npz, batch.npz, "
                            "outputs.npz and config.json)")
  with np.load(path, allow_pickle=False) as data:
    return {key: data[key] for key in data.files}


def load_reference(directory: str | pathlib.Path):
  """(params {haiku key: array}, batch, outputs, AlphaFold model_config dict)."""
  directory = pathlib.Path(directory)
  config_path = directory / "config.json"
  if not config_path.is_file():
    raise FileNotFoundError(f"{config_path}: missing")
  config = json.loads(config_path.read_text())
  if "model_config" not in config:
    raise ValueError(f"{config_path}: no 'model_config' (AlphaFold's model config tree)")
  params = import_af2.load_alphafold_npz(directory / "params.npz")
  return params, _load_npz(directory / "batch.npz"), _load_npz(directory / "outputs.npz"), \
      config["model_config"]


def flatten_outputs(outputs: Mapping[str, Any]) -> dict[str, np.ndarray]:
  """Our output dict -> AlphaFold's flat output names (r3 fields split as x/y/z, rot/xx...)."""
  flat: dict[str, np.ndarray] = {}

  def visit(prefix: str, node: Mapping[str, Any]) -> None:
    for key, value in node.items():
      name = f"{prefix}{key}"
      if isinstance(value, Mapping):
        visit(name + "/", value)
      else:
        flat[name] = np.asarray(value)

  visit("", outputs)
  sidechains = "structure_module/sidechains/"
  if sidechains + "atom_pos" in flat:
    atom_pos = flat.pop(sidechains + "atom_pos")
    for i, axis in enumerate("xyz"):
      flat[f"{sidechains}atom_pos/{axis}"] = atom_pos[..., i]
  if sidechains + "frames" in flat:
    frames = flat.pop(sidechains + "frames")   # [..., 12]: row-major rotation, translation
    for i, field in enumerate(_ROT_FIELDS):
      flat[f"{sidechains}frames/rot/{field}"] = frames[..., i]
    for i, axis in enumerate("xyz"):
      flat[f"{sidechains}frames/trans/{axis}"] = frames[..., 9 + i]
  return flat


def imported_loss_fn(params_haiku: Mapping[str, np.ndarray], batch: Mapping[str, np.ndarray],
                     alphafold_config: Mapping[str, Any], dtype: str = "float32"):
  """(our params imported from Haiku's, loss_fn(params, batch) -> (total, (outputs, aux))):
  AlphaFold's network from its config dict with activations in `dtype`, deterministic, the
  loss on the final recycling iteration."""
  config = from_alphafold_dict(alphafold_config, dtype=dtype, use_remat=False,
                               low_memory=False)
  model = AlphaFold(config)
  expected = jax.eval_shape(model.init, jax.random.PRNGKey(0), batch)
  params = import_af2.flax_from_haiku(params_haiku, expected, source="params.npz")

  def loss_fn(p, features):
    outputs = model.apply(p, features, deterministic=True)
    final = slice_recycle(features, jnp.minimum(features["num_iter_recycling"][0],
                                                config.num_recycle))
    total, aux = alphafold_loss(final, outputs, config.heads)
    return total, (outputs, aux)

  return params, loss_fn


def run_model(params_haiku: Mapping[str, np.ndarray], batch: Mapping[str, np.ndarray],
              alphafold_config: Mapping[str, Any]):
  """Forward, loss and gradient of our model in float32, deterministic.

  The outputs and losses come from a program that takes the batch as an argument, the
  gradient from one where the batch is a compile-time constant: the way reference dumps are
  made. It matters for one feature: AlphaFold's template pre-omega torsion of a residue
  without predecessor (e.g. residue 0) is computed from a degenerate frame, so its value is
  float32 rounding noise scaled by 1/sqrt(1e-8), and it differs between XLA's fused kernels
  and its constant folding. Both programs reproduce AlphaFold's evaluation of it bit for bit
  (see `model/template_features.py`).

  Returns (flat outputs incl. loss terms, {haiku key: gradient}).
  """
  params, loss_fn = imported_loss_fn(params_haiku, batch, alphafold_config, "float32")
  constant_batch = {key: np.asarray(value) for key, value in batch.items()}
  with jax.default_matmul_precision("float32"):
    _, (outputs, aux) = jax.jit(loss_fn)(params, batch)
    grads = jax.jit(jax.grad(lambda p: loss_fn(p, constant_batch)[0]))(params)
  flat = flatten_outputs(outputs)
  flat.update({key: np.asarray(value) for key, value in aux.items()})
  return flat, import_af2.haiku_from_flax(jax.device_get(grads))


def compare(reference: Mapping[str, np.ndarray], ours: Mapping[str, np.ndarray],
            grads_haiku: Mapping[str, np.ndarray]) -> list[Row]:
  """One row per reference output; a missing output is a row with an infinite error."""
  rows = []
  for key in sorted(reference):
    ref = np.asarray(reference[key], np.float64)
    if key.startswith(GRAD_NORM_PREFIX):
      prefix = key[len(GRAD_NORM_PREFIX):]
      try:
        value = np.asarray(import_af2.group_norms(grads_haiku, [prefix])[prefix])
      except KeyError:
        value = None
      metric, tolerance = "rel", GRAD_NORM_TOLERANCE
    else:
      value = ours.get(key)
      if key in POSITION_KEYS:
        metric, tolerance = "abs", POSITION_TOLERANCE_ANGSTROM
      else:
        metric, tolerance = "rel", RELATIVE_TOLERANCE
    tolerance = BINNED_LABEL_TOLERANCE.get(key, tolerance)
    if value is None or np.shape(value) != ref.shape:
      rows.append(Row(key, ref.shape, float("inf"), float("inf"), metric, tolerance))
      continue
    diff = np.asarray(value, np.float64) - ref
    max_abs = float(np.max(np.abs(diff))) if diff.size else 0.0
    norm_ref = float(np.linalg.norm(ref))
    relative = float(np.linalg.norm(diff) / norm_ref) if norm_ref > 0 else (
        0.0 if max_abs == 0 else float("inf"))
    rows.append(Row(key, ref.shape, max_abs, relative, metric, tolerance))
  return rows


def format_table(rows: Sequence[Row]) -> str:
  width = max(len(row.key) for row in rows)
  lines = [f"{'output':{width}s}  {'shape':>14s}  {'max_abs':>10s}  {'rel_err':>10s}  "
           f"{'tolerance':>13s}  status"]
  for row in rows:
    status = "ok" if row.ok else "FAIL"
    lines.append(f"{row.key:{width}s}  {str(row.shape):>14s}  {row.max_abs:10.3e}  "
                 f"{row.relative:10.3e}  {row.metric + ' ' + format(row.tolerance, '.0e'):>13s}  "
                 f"{status}")
  return "\n".join(lines)


def run(reference_dir: str | pathlib.Path) -> list[Row]:
  params, batch, outputs, alphafold_config = load_reference(reference_dir)
  ours, grads = run_model(params, batch, alphafold_config)
  return compare(outputs, ours, grads)


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--reference", required=True,
                      help="directory with params.npz, batch.npz, outputs.npz, config.json")
  args = parser.parse_args(argv)
  rows = run(args.reference)
  print(format_table(rows))
  failed = [row.key for row in rows if not row.ok]
  if failed:
    print(f"\n{len(failed)} of {len(rows)} outputs exceed tolerance: {', '.join(failed)}")
    return 1
  print(f"\nall {len(rows)} outputs within tolerance")
  return 0


if __name__ == "__main__":
  sys.exit(main())
