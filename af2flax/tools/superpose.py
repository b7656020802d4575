r"""Superposes a predicted structure on the true one: metrics, a PDB pair and a PNG.

    python -m af2flax.tools.superpose --predicted pred/1bvyF/ranked_0.pdb \
        --true data/samples/pdb_chains/1bvyF.pdb.gz --out docs/images/1bvyF

Residues are matched by position along the chain (the predicted file numbers them 1..N, the
true one by author numbers); the two sequences must be the same, residues without a true Cα
are left out of the fit and the scores. The predicted structure is moved onto the true one by
the Cα Kabsch superposition (`af2flax.train.evaluate.kabsch`, proper rotation), then written:
`<out>_predicted_superposed.pdb`, `<out>_true.pdb` (the true chain as read), and
`<out>_superposed.png` (Cα traces in two orthogonal views and the per-residue Cα distance).
Prints lDDT-Cα, Cα-RMSD, TM-score and GDT-TS as the evaluation loop computes them.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from typing import Sequence

import numpy as np

from af2flax.common import protein as protein_lib
from af2flax.common import residue_constants as rc

_CA = rc.atom_order["CA"]


def _sequence(prot: protein_lib.Protein) -> str:
  return "".join(rc.restypes_with_x[a] for a in prot.aatype)


def superpose(predicted: protein_lib.Protein, true: protein_lib.Protein, name: str = ""
              ) -> tuple[protein_lib.Protein, dict[str, float], np.ndarray]:
  """(predicted moved onto true, metrics, per-residue Cα distance [N] in Å, NaN where no true
  Cα)."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from af2flax.train import evaluate  # pylint: disable=g-import-not-at-top

  if _sequence(predicted) != _sequence(true):
    raise ValueError(f"{name}: the predicted and true sequences differ "
                     f"({len(predicted.aatype)} and {len(true.aatype)} residues): "
                     f"{_sequence(predicted)} vs {_sequence(true)}")
  mask = (true.atom_mask[:, _CA] * predicted.atom_mask[:, _CA]).astype(np.float32)
  if mask.sum() < 3:
    raise ValueError(f"{name}: fewer than 3 residues have a Cα in both structures")
  pred_ca = predicted.atom_positions[:, _CA].astype(np.float32)
  true_ca = true.atom_positions[:, _CA].astype(np.float32)
  rot, trans = (np.asarray(x) for x in evaluate.kabsch(jnp.asarray(pred_ca),
                                                        jnp.asarray(true_ca),
                                                        jnp.asarray(mask)))
  moved_positions = np.einsum("raj,ij->rai", predicted.atom_positions, rot) + trans
  moved_positions = moved_positions * predicted.atom_mask[..., None]
  moved = dataclasses.replace(predicted, atom_positions=moved_positions.astype(np.float32))
  metrics = {key: float(value) for key, value in evaluate.structure_metrics(
      jnp.asarray(pred_ca), jnp.asarray(true_ca), jnp.asarray(mask)).items()}
  distance = np.linalg.norm(moved_positions[:, _CA] - true_ca, axis=-1)
  distance = np.where(mask > 0, distance, np.nan)
  return moved, metrics, distance


def plot(moved: protein_lib.Protein, true: protein_lib.Protein, distance: np.ndarray,
         path: str, title: str) -> None:
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  mask = ~np.isnan(distance)
  true_ca = true.atom_positions[:, _CA]
  pred_ca = moved.atom_positions[:, _CA]
  # View along the true structure's principal axes (largest spread in the first panel).
  centre = true_ca[mask].mean(axis=0)
  _, _, axes = np.linalg.svd(true_ca[mask] - centre)
  project = lambda xyz: (xyz - centre) @ axes.T
  true_p, pred_p = project(true_ca), project(pred_ca)
  figure, panels = plt.subplots(1, 3, figsize=(13.5, 4.3), dpi=110,
                                gridspec_kw={"width_ratios": [1, 1, 1.3]})
  for panel, (i, j) in zip(panels[:2], ((0, 1), (0, 2))):
    panel.plot(true_p[mask, i], true_p[mask, j], "-", color="0.35", lw=1.6, label="true")
    panel.plot(pred_p[mask, i], pred_p[mask, j], "-", color="tab:orange", lw=1.3,
               label="predicted")
    panel.scatter(true_p[mask, i][:1], true_p[mask, j][:1], color="0.35", s=25, zorder=3)
    panel.scatter(pred_p[mask, i][:1], pred_p[mask, j][:1], color="tab:orange", s=25,
                  zorder=3)
    panel.set_aspect("equal")
    panel.set_xlabel(f"principal axis {i + 1} (Å)")
    panel.set_ylabel(f"principal axis {j + 1} (Å)")
  panels[0].legend(fontsize=8, loc="best")
  panels[2].plot(np.arange(1, len(distance) + 1), distance, color="tab:blue", lw=1.2)
  panels[2].set_xlabel("residue")
  panels[2].set_ylabel("Cα distance after superposition (Å)")
  panels[2].grid(alpha=0.3)
  figure.suptitle(title, fontsize=10)
  figure.tight_layout()
  figure.savefig(path)
  plt.close(figure)


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m af2flax.tools.superpose",
                                   description=__doc__.split("\n\n")[0])
  parser.add_argument("--predicted", required=True, help="predicted PDB/mmCIF (one chain)")
  parser.add_argument("--true", required=True, help="true PDB/mmCIF (.gz accepted)")
  parser.add_argument("--chain", default=None, help="chain of the true file (default: all)")
  parser.add_argument("--out", required=True, help="output prefix")
  parser.add_argument("--title", default="")
  args = parser.parse_args(argv)

  predicted = protein_lib.read_structure(args.predicted)
  true = protein_lib.read_structure(args.true, chain_id=args.chain)
  moved, metrics, distance = superpose(predicted, true, name=args.predicted)
  protein_lib.write_structure(moved, f"{args.out}_predicted_superposed.pdb")
  protein_lib.write_structure(true, f"{args.out}_true.pdb")
  title = args.title or f"{args.predicted} on {args.true}"
  title += "\n" + ", ".join(f"{k} {v:.3f}" for k, v in sorted(metrics.items()))
  plot(moved, true, distance, f"{args.out}_superposed.png", title)
  print(json.dumps({k: round(v, 4) for k, v in metrics.items()}))
  print(f"wrote {args.out}_predicted_superposed.pdb, {args.out}_true.pdb, "
        f"{args.out}_superposed.png")
  return 0


if __name__ == "__main__":
  sys.exit(main())
