"""The tools that turn a training run into its report: event plots and a superposition."""

import dataclasses
import glob
import json

import numpy as np
import pytest

from af2flax.common import protein as protein_lib
from af2flax.tools import plot_events, superpose
from af2flax.train import metrics as metrics_lib
from tests.conftest import REPO_ROOT


def test_event_files_of_a_resumed_run_to_csv_and_png(tmp_path, capsys):
  pytest.importorskip("tensorboard")
  for start, (first, last) in enumerate(((1, 3), (3, 5))):  # the restart rewrites step 3
    writer = metrics_lib.FallbackWriter(tmp_path / "run")
    for step in range(first, last + 1):
      writer.write_scalars(step, {"train/loss": 10.0 * start + step, "val/lddt_ca": step / 10})
    writer.close()
  scalars = plot_events.read_scalars(str(tmp_path / "run"))
  assert scalars["train/loss"] == {1: 1.0, 2: 2.0, 3: 13.0, 4: 14.0, 5: 15.0}
  assert plot_events.main(["--logdir", str(tmp_path / "run"), "--out", str(tmp_path / "r"),
                           "--panels", "loss=train/loss", "lddt=val/lddt_ca",
                           "none=missing/tag"]) == 0
  assert "skipped none" in capsys.readouterr().out
  assert sorted(p.split("/")[-1] for p in glob.glob(str(tmp_path / "r_*"))) == [
      "r_lddt.png", "r_loss.png", "r_scalars.csv"]
  rows = (tmp_path / "r_scalars.csv").read_text().splitlines()
  assert rows[0] == "step,train/loss,val/lddt_ca" and rows[3] == "3,13,0.3"
  with pytest.raises(FileNotFoundError, match="no TensorBoard event files"):
    plot_events.read_scalars(str(tmp_path / "empty"))


def test_superposition_recovers_a_moved_copy(tmp_path, capsys):
  true_path = REPO_ROOT / "data/samples/pdb_chains/2cviA.pdb.gz"
  true = protein_lib.read_structure(true_path)
  angle = 1.1
  rot = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0],
                  [0, 0, 1]])
  moved = np.einsum("raj,ij->rai", true.atom_positions, rot) + np.array([30.0, -4.0, 7.0])
  predicted = dataclasses.replace(true, atom_positions=(moved * true.atom_mask[..., None]
                                                        ).astype(np.float32),
                                  residue_index=np.arange(1, len(true.aatype) + 1))
  pred_path = tmp_path / "pred.pdb"
  protein_lib.write_structure(predicted, pred_path)
  assert superpose.main(["--predicted", str(pred_path), "--true", str(true_path),
                         "--out", str(tmp_path / "x")]) == 0
  metrics = json.loads(capsys.readouterr().out.splitlines()[0])
  assert metrics["ca_rmsd"] < 0.01 and metrics["lddt_ca"] > 0.999 and metrics["tm_score"] > 0.99
  back = protein_lib.read_structure(tmp_path / "x_predicted_superposed.pdb")
  np.testing.assert_allclose(back.atom_positions, true.atom_positions, atol=0.01)
  assert (tmp_path / "x_superposed.png").stat().st_size > 10_000

  other = protein_lib.read_structure(REPO_ROOT / "data/samples/pdb_chains/2xcjA.pdb.gz")
  with pytest.raises(ValueError, match="sequences differ"):
    superpose.superpose(other, true, name="other.pdb")
