"""PNG plots of a prediction: pLDDT per model, PAE heatmaps, MSA coverage (matplotlib, Agg).

  plddt.png         pLDDT along the sequence, one line per model (ranking order), with AlphaFold
                    DB's confidence bands (50, 70, 90)
  pae.png           predicted aligned error heatmap of every pTM model (0 to max Å)
  msa_coverage.png  the MSA rows sorted by identity to the query, coloured by identity (gaps
                    white), and the number of non-gap rows per position (as ColabFold draws it)
"""

from __future__ import annotations

from typing import Sequence

import matplotlib

matplotlib.use("Agg")  # no display on servers; must precede pyplot
from matplotlib import pyplot as plt  # noqa: E402  pylint: disable=wrong-import-position
import numpy as np  # noqa: E402  pylint: disable=wrong-import-position

from af2flax.inference.runner import Prediction  # noqa: E402  pylint: disable=wrong-import-position

_GAP_HHBLITS = 21


def plot_plddt(predictions: Sequence[Prediction], path: str, title: str = "") -> None:
  figure, axes = plt.subplots(figsize=(8, 4), dpi=100)
  for value, colour in ((50, "#ff7d45"), (70, "#ffdb13"), (90, "#65cbf3")):
    axes.axhline(value, color=colour, linewidth=0.8, linestyle="--")
  for prediction in predictions:
    residues = np.arange(1, prediction.plddt.shape[0] + 1)
    axes.plot(residues, prediction.plddt,
              label=f"{prediction.model_name} ({prediction.mean_plddt:.1f})")
  axes.set(xlabel="residue", ylabel="pLDDT", ylim=(0, 100), title=title or "pLDDT")
  axes.legend(fontsize="small", loc="lower right")
  figure.tight_layout()
  figure.savefig(path)
  plt.close(figure)


def plot_pae(predictions: Sequence[Prediction], path: str) -> bool:
  """Heatmaps of the models with a PAE; False (no file) when none has one."""
  with_pae = [p for p in predictions if p.predicted_aligned_error is not None]
  if not with_pae:
    return False
  figure, axes = plt.subplots(1, len(with_pae), figsize=(4 * len(with_pae), 3.6), dpi=100,
                              squeeze=False)
  for ax, prediction in zip(axes[0], with_pae):
    image = ax.imshow(prediction.predicted_aligned_error, cmap="bwr", vmin=0,
                      vmax=prediction.max_predicted_aligned_error)
    ax.set(title=f"{prediction.model_name} (pTM {prediction.ptm:.3f})",
           xlabel="scored residue", ylabel="aligned residue")
    figure.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="expected error (Å)")
  figure.tight_layout()
  figure.savefig(path)
  plt.close(figure)
  return True


def plot_msa_coverage(msa: np.ndarray, path: str, title: str = "") -> None:
  """`msa`: [S, N] in HHblits' alphabet (the raw `msa` feature), the query first."""
  msa = np.asarray(msa)
  is_residue = msa != _GAP_HHBLITS
  identity = np.sum((msa == msa[:1]) & is_residue, axis=1) / max(msa.shape[1], 1)
  order = np.argsort(-identity, kind="stable")
  image = np.where(is_residue[order], identity[order, None], np.nan)
  figure, axes = plt.subplots(figsize=(8, 5), dpi=100)
  shown = axes.imshow(image, aspect="auto", cmap="rainbow_r", vmin=0, vmax=1,
                      interpolation="nearest", extent=(0.5, msa.shape[1] + 0.5, 0, msa.shape[0]))
  axes.plot(np.arange(1, msa.shape[1] + 1), np.sum(is_residue, axis=0), color="black")
  axes.set(xlabel="residue", ylabel="sequences", xlim=(0.5, msa.shape[1] + 0.5),
           ylim=(0, msa.shape[0]), title=title or f"MSA coverage ({msa.shape[0]} sequences)")
  figure.colorbar(shown, ax=axes, label="identity to query")
  figure.tight_layout()
  figure.savefig(path)
  plt.close(figure)
