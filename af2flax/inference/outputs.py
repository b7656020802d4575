"""Files a prediction writes: structures with pLDDT, confidence JSONs, ranking, timings.

Per query directory (AlphaFold's names where AlphaFold has them):
  unrelaxed_<model>.pdb / .cif    the model's structure, pLDDT in every atom's B-factor column
  relaxed_<model>.pdb             after Amber relaxation (`--relax`), hydrogens included
  ranked_<i>.pdb / .cif           the models in ranking order (relaxed where relaxed)
  confidence_<model>.json         per-residue pLDDT, AlphaFold DB's layout: residueNumber,
                                  confidenceScore, confidenceCategory (D <50, L <70, M <90, H)
  pae_<model>.json                AlphaFold DB's PAE layout (pTM models): a one-element list
                                  [{"predicted_aligned_error": [[...]] (Å, 2 decimals),
                                    "max_predicted_aligned_error": ...}]
  result_<model>.json             everything in one file: plddt, mean_plddt, ptm,
                                  predicted_aligned_error, max_predicted_aligned_error, recycles
  ranking_debug.json              {"plddts": {...}, "ptms": {...}, "ranking_metric": ...,
                                   "order": [...]}
  timings.json                    seconds per stage
Ranking (Suppl. 1.9.6-1.9.7): by pTM when every model has a pTM head, else by mean pLDDT.
Files are written to a temporary name and renamed, so a killed run never leaves half a file.
"""

from __future__ import annotations

import json
import os
from typing import Any, Mapping, Sequence

import numpy as np

from af2flax.common import protein
from af2flax.inference.runner import Prediction


def write_text(path: str, text: str) -> None:
  tmp = f"{path}.tmp"
  with open(tmp, "w") as handle:
    handle.write(text)
  os.replace(tmp, path)


def write_json(path: str, value: Any) -> None:
  write_text(path, json.dumps(value, indent=1) + "\n")


def confidence_category(plddt: np.ndarray) -> list[str]:
  """AlphaFold DB's pLDDT bands: 'D' very low (<50), 'L' low (<70), 'M' confident (<90),
  'H' very high."""
  return [("D", "L", "M", "H")[int(np.searchsorted([50.0, 70.0, 90.0], value, side="right"))]
          for value in np.asarray(plddt, np.float64)]


def confidence_json(plddt: np.ndarray) -> dict[str, list]:
  """AlphaFold DB's confidence file: 1-based residue numbers, pLDDT (2 decimals), category."""
  plddt = np.asarray(plddt, np.float64)
  return {"residueNumber": list(range(1, plddt.shape[0] + 1)),
          "confidenceScore": [round(float(v), 2) for v in plddt],
          "confidenceCategory": confidence_category(plddt)}


def pae_json(pae: np.ndarray, max_pae: float) -> list[dict[str, Any]]:
  """AlphaFold DB's predicted-aligned-error file (v3+ layout)."""
  rounded = np.round(np.asarray(pae, np.float64), 2)
  return [{"predicted_aligned_error": rounded.tolist(),
           "max_predicted_aligned_error": round(float(max_pae), 2)}]


def result_json(prediction: Prediction) -> dict[str, Any]:
  """All confidences of one model in one file."""
  result: dict[str, Any] = {
      "model": prediction.model_name,
      "plddt": [round(float(v), 2) for v in prediction.plddt],
      "mean_plddt": round(prediction.mean_plddt, 4),
      "ptm": None if prediction.ptm is None else round(float(prediction.ptm), 4),
      "num_recycles": prediction.num_recycles,
      "recycle_changes": [round(float(v), 4) for v in prediction.recycle_changes],
  }
  if prediction.predicted_aligned_error is not None:
    result["predicted_aligned_error"] = np.round(
        np.asarray(prediction.predicted_aligned_error, np.float64), 2).tolist()
    result["max_predicted_aligned_error"] = round(float(prediction.max_predicted_aligned_error), 2)
  return result


def ranking_metric(predictions: Sequence[Prediction]) -> str:
  """'ptm' when every model has a pTM head, else 'plddt'."""
  return "ptm" if predictions and all(p.ptm is not None for p in predictions) else "plddt"


def rank(predictions: Sequence[Prediction]) -> tuple[list[str], dict[str, Any]]:
  """(model names best first, ranking_debug.json content). Ties keep the run order."""
  metric = ranking_metric(predictions)
  scores = {p.model_name: p.ranking_confidence(metric) for p in predictions}
  order = sorted(scores, key=lambda name: -scores[name])
  debug = {
      "plddts": {p.model_name: round(p.mean_plddt, 4) for p in predictions},
      "ptms": {p.model_name: round(float(p.ptm), 4) for p in predictions if p.ptm is not None},
      "ranking_metric": metric,
      "order": order,
  }
  return order, debug


def to_protein(prediction: Prediction, aatype: np.ndarray,
               residue_index: np.ndarray) -> protein.Protein:
  """The predicted structure as a Protein with pLDDT in the B-factors (residue numbers 1-based
  from the features' 0-based `residue_index`, as AlphaFold writes them)."""
  return protein.from_prediction(aatype, prediction.final_atom_positions,
                                 prediction.final_atom_mask, plddt=prediction.plddt,
                                 residue_index=np.asarray(residue_index) + 1)


def write_model_files(out_dir: str, prediction: Prediction, aatype: np.ndarray,
                      residue_index: np.ndarray) -> dict[str, str]:
  """unrelaxed PDB/mmCIF, confidence, PAE and result JSONs of one model; returns the paths."""
  name = prediction.model_name
  prot = to_protein(prediction, aatype, residue_index)
  paths = {"pdb": os.path.join(out_dir, f"unrelaxed_{name}.pdb"),
           "cif": os.path.join(out_dir, f"unrelaxed_{name}.cif"),
           "confidence": os.path.join(out_dir, f"confidence_{name}.json"),
           "result": os.path.join(out_dir, f"result_{name}.json")}
  write_text(paths["pdb"], protein.to_pdb(prot))
  write_text(paths["cif"], protein.to_mmcif(prot, entry_id=name))
  write_json(paths["confidence"], confidence_json(prediction.plddt))
  write_json(paths["result"], result_json(prediction))
  if prediction.predicted_aligned_error is not None:
    paths["pae"] = os.path.join(out_dir, f"pae_{name}.json")
    write_json(paths["pae"], pae_json(prediction.predicted_aligned_error,
                                      prediction.max_predicted_aligned_error))
  return paths


def write_ranked(out_dir: str, order: Sequence[str], unrelaxed: Mapping[str, protein.Protein],
                 relaxed_pdb: Mapping[str, str]) -> list[str]:
  """ranked_<i>.pdb/.cif in ranking order: the relaxed structure where there is one.

  `unrelaxed`: model name -> Protein; `relaxed_pdb`: model name -> relaxed PDB text.
  """
  written = []
  for index, name in enumerate(order):
    if name in relaxed_pdb:
      pdb_text = relaxed_pdb[name]
      heavy = protein.from_pdb_string(pdb_text, source=f"relaxed_{name}.pdb")
      cif_text = protein.to_mmcif(heavy, entry_id=f"ranked_{index}")
    else:
      pdb_text = protein.to_pdb(unrelaxed[name])
      cif_text = protein.to_mmcif(unrelaxed[name], entry_id=f"ranked_{index}")
    for suffix, text in (("pdb", pdb_text), ("cif", cif_text)):
      path = os.path.join(out_dir, f"ranked_{index}.{suffix}")
      write_text(path, text)
      written.append(path)
  return written
