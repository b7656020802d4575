"""Ranking and the AlphaFold DB file layouts, on hand-made predictions."""

from __future__ import annotations

import numpy as np
import pytest

from af2flax.inference import outputs
from af2flax.inference.runner import Prediction


def prediction(name, plddt, ptm=None):
  n = len(plddt)
  pae = None if ptm is None else np.full((n, n), 3.0, np.float32)
  return Prediction(name, np.zeros((n, 37, 3), np.float32), np.ones((n, 37), np.float32),
                    np.asarray(plddt, np.float32), pae, None if ptm is None else 31.75, ptm,
                    num_recycles=3, recycle_changes=(1.0, 0.5, 0.1), seconds=1.0)


def test_rank_by_ptm_when_every_model_has_one_else_by_plddt():
  a, b = prediction("a", [90, 90], ptm=0.5), prediction("b", [50, 50], ptm=0.7)
  order, debug = outputs.rank([a, b])
  assert order == ["b", "a"] and debug["ranking_metric"] == "ptm"
  assert debug["ptms"] == {"a": 0.5, "b": 0.7} and debug["plddts"] == {"a": 90.0, "b": 50.0}
  c = prediction("c", [70, 80])
  order, debug = outputs.rank([a, b, c])
  assert order == ["a", "c", "b"] and debug["ranking_metric"] == "plddt"
  with pytest.raises(ValueError, match="no pTM"):
    c.ranking_confidence("ptm")


def test_alphafold_db_layouts():
  confidence = outputs.confidence_json(np.array([49.999, 50.0, 69.99, 70.0, 90.0, 100.0]))
  assert confidence["confidenceCategory"] == ["D", "L", "L", "M", "H", "H"]
  assert confidence["residueNumber"] == [1, 2, 3, 4, 5, 6]
  assert confidence["confidenceScore"][0] == 50.0     # 2 decimals
  pae = outputs.pae_json(np.array([[0.123, 1.0], [2.0, 31.75]]), 31.75)
  assert pae == [{"predicted_aligned_error": [[0.12, 1.0], [2.0, 31.75]],
                  "max_predicted_aligned_error": 31.75}]
  result = outputs.result_json(prediction("a", [10.0, 20.0], ptm=0.25))
  assert result["mean_plddt"] == 15.0 and result["ptm"] == 0.25
  assert np.asarray(result["predicted_aligned_error"]).shape == (2, 2)
  assert "predicted_aligned_error" not in outputs.result_json(prediction("b", [10.0]))
