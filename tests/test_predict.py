"""`python -m af2flax.predict` end to end on the CPU with the tiny AlphaFold reference model.

One run over a FASTA file of good and bad records, with two models (the tiny reference
parameters and a perturbed copy) and per-sequence alignment directories; the tests check the
files it wrote: structures parse back (our reader and Biopython) with pLDDT in the B-factors,
confidence JSONs in AlphaFold DB's layout, PAE square and bounded, ranking consistent, bad
inputs skipped with their reasons while the good ones are predicted.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

pytest.importorskip("af2flax.model.alphafold")

from af2flax import predict  # noqa: E402
from af2flax.common import protein, residue_constants  # noqa: E402
from tests.inference import helpers  # noqa: E402

MODELS = ("model_1_ptm", "model_2_ptm")


@pytest.fixture(scope="module")
def params_dir(tmp_path_factory, shared_dir):
  """AlphaFold-style params directory: the tiny parameters and a perturbed copy."""
  directory = tmp_path_factory.mktemp("params")
  with np.load(helpers.TINY_PARAMS, allow_pickle=False) as data:
    params = {key: data[key] for key in data.files}
  np.savez(directory / "params_model_1_ptm.npz", **params)
  rng = np.random.default_rng(7)
  np.savez(directory / "params_model_2_ptm.npz",
           **{key: value + 0.02 * rng.standard_normal(value.shape).astype(value.dtype)
              for key, value in params.items()})
  return directory


@pytest.fixture(scope="module")
def run(tmp_path_factory, params_dir):
  root = tmp_path_factory.mktemp("predict")
  alignments = root / "alignments"
  helpers.write_a3m(alignments / "seqA", helpers.SEQ_A)
  helpers.write_a3m(alignments / "seqB", helpers.SEQ_B, seed=1)
  helpers.write_a3m(alignments / "toolong", "M" * 45, seed=2)
  fasta = helpers.write_fasta(root / "in.fasta", {
      "seqA": helpers.SEQ_A, "badletters": "MKTAYIAKQBZ", "seqB": helpers.SEQ_B,
      "noalignment": "MKTAYIAKQRQ", "toolong": "M" * 45})
  out = root / "out"
  code = predict.main(["--fasta", str(fasta), "--out", str(out), "--af2_params",
                       str(params_dir), "--models", ",".join(MODELS), "--model_config",
                       str(helpers.TINY_CONFIG), "--alignments", str(alignments),
                       "--max_length", "40", *helpers.SHAPE_FLAGS])
  return {"code": code, "out": out, "root": root}


def load_json(path):
  with open(path) as handle:
    return json.load(handle)


def test_bad_inputs_are_skipped_with_reasons_and_good_ones_predicted(run):
  out = run["out"]
  assert run["code"] == 1    # something was skipped
  assert sorted(p.name for p in out.iterdir() if p.is_dir()) == ["seqA", "seqB"]
  lines = (out / "failures.tsv").read_text().splitlines()
  assert lines[0] == "input\treason"
  reasons = dict(line.split("\t", 1) for line in lines[1:])
  assert len(reasons) == 3
  assert "unknown residue letters 'B' at 10" in reasons[next(k for k in reasons
                                                             if "badletters" in k)]
  assert "45 residues, longer than --max_length 40" in reasons[next(k for k in reasons
                                                                    if "toolong" in k)]
  assert "no alignment directory" in reasons["noalignment"]
  log = (out / "predict.log").read_text()
  assert "skipped noalignment" in log and "ranking by ptm" in log


@pytest.mark.parametrize("name, sequence", [("seqA", helpers.SEQ_A), ("seqB", helpers.SEQ_B)])
def test_structures_parse_back_with_plddt_b_factors(run, name, sequence):
  from Bio.PDB import MMCIFParser, PDBParser
  directory = run["out"] / name
  for model in MODELS:
    result = load_json(directory / f"result_{model}.json")
    plddt = np.asarray(result["plddt"])
    assert plddt.shape == (len(sequence),) and np.all((plddt >= 0) & (plddt <= 100))
    assert result["mean_plddt"] == pytest.approx(plddt.mean(), abs=1e-2)
    for suffix in ("pdb", "cif"):
      path = directory / f"unrelaxed_{model}.{suffix}"
      prot = protein.read_structure(path)
      assert prot.sequence == sequence
      np.testing.assert_array_equal(prot.residue_index, np.arange(1, len(sequence) + 1))
      ca = residue_constants.atom_order["CA"]
      np.testing.assert_allclose(prot.b_factors[:, ca], plddt, atol=0.01)
      parser = PDBParser(QUIET=True) if suffix == "pdb" else MMCIFParser(QUIET=True)
      structure = parser.get_structure(name, str(path))
      residues = list(structure[0].get_residues())
      assert len(residues) == len(sequence)
      b_factors = np.array([residue["CA"].get_bfactor() for residue in residues])
      np.testing.assert_allclose(b_factors, plddt, atol=0.01)


def test_confidence_and_pae_files_follow_alphafold_db(run):
  directory = run["out"] / "seqA"
  n = len(helpers.SEQ_A)
  for model in MODELS:
    confidence = load_json(directory / f"confidence_{model}.json")
    assert confidence["residueNumber"] == list(range(1, n + 1))
    scores = np.asarray(confidence["confidenceScore"])
    expected = np.select([scores < 50, scores < 70, scores < 90], ["D", "L", "M"], "H")
    assert confidence["confidenceCategory"] == expected.tolist()
    pae_file = load_json(directory / f"pae_{model}.json")
    assert isinstance(pae_file, list) and len(pae_file) == 1
    pae = np.asarray(pae_file[0]["predicted_aligned_error"])
    assert pae.shape == (n, n)
    assert pae_file[0]["max_predicted_aligned_error"] == pytest.approx(31.75)
    assert np.all((pae >= 0) & (pae <= 31.75))
    result = load_json(directory / f"result_{model}.json")
    np.testing.assert_allclose(result["predicted_aligned_error"], pae)
    assert 0 < result["ptm"] < 1


def test_ranking_is_consistent_with_the_scores(run):
  directory = run["out"] / "seqB"
  debug = load_json(directory / "ranking_debug.json")
  assert debug["ranking_metric"] == "ptm"       # every model has a pTM head
  ptms = {m: load_json(directory / f"result_{m}.json")["ptm"] for m in MODELS}
  assert sorted(debug["order"]) == sorted(MODELS)
  assert debug["order"] == sorted(MODELS, key=lambda m: -ptms[m])
  assert debug["ptms"] == pytest.approx(ptms, abs=1e-4)
  assert ptms[MODELS[0]] != ptms[MODELS[1]]     # the perturbed model predicts differently
  for rank, model in enumerate(debug["order"]):
    ranked = protein.read_structure(directory / f"ranked_{rank}.pdb")
    unrelaxed = protein.read_structure(directory / f"unrelaxed_{model}.pdb")
    np.testing.assert_allclose(ranked.atom_positions, unrelaxed.atom_positions, atol=1e-3)
    assert (directory / f"ranked_{rank}.cif").exists()


def test_timings_and_plots(run):
  directory = run["out"] / "seqA"
  timings = load_json(directory / "timings.json")
  for key in ("features", "total", *(f"predict_and_compile_{m}" for m in MODELS),
              *(f"process_features_{m}" for m in MODELS)):
    assert timings[key] >= 0
  from matplotlib import image
  for name in ("plddt.png", "pae.png", "msa_coverage.png"):
    pixels = image.imread(directory / name)
    assert pixels.ndim == 3 and pixels.shape[0] > 100 and pixels.shape[1] > 100
    assert pixels.std() > 0       # not a blank canvas


def test_unusable_parameters_stop_before_any_prediction(run, tmp_path, capsys):
  fasta = helpers.write_fasta(tmp_path / "in.fasta", {"seqA": helpers.SEQ_A})
  code = predict.main(["--fasta", str(fasta), "--out", str(tmp_path / "out"), "--af2_params",
                       str(helpers.TINY_PARAMS), "--models", "model_1_ptm"])
  assert code == 2
  message = capsys.readouterr().err
  assert "parameter mismatch" in message and "--model_config" in message
  assert not (tmp_path / "out" / "seqA").exists()


def test_training_checkpoints_predict_with_their_ema_parameters(run, tmp_path, params_dir):
  """A training run's latest checkpoint: the EMA parameters are used, not the raw ones."""
  import jax
  import ml_collections
  import optax
  from af2flax.inference import model_loading
  from af2flax.model import import_af2
  from af2flax.train import checkpoint, state

  def tree(path):
    with np.load(path, allow_pickle=False) as data:
      return import_af2.flax_from_haiku({k: data[k] for k in data.files})["params"]

  ema = tree(params_dir / "params_model_1_ptm.npz")         # what the af2_params run used
  raw = tree(params_dir / "params_model_2_ptm.npz")
  train_state = state.create_train_state(raw, optax.adam(1e-3), jax.random.PRNGKey(0))
  train_state = train_state.replace(ema_params=ema, step=np.int32(5))
  workdir = tmp_path / "run"
  config = ml_collections.ConfigDict({"every_steps": 1, "keep": 2, "keep_best": 0,
                                      "async_save": False})
  checkpointer = checkpoint.Checkpointer(workdir / "checkpoints", config)
  checkpointer.save(5, train_state, {"position": 5}, force=True)
  checkpointer.wait_until_finished()
  checkpointer.close()
  model_config = model_loading.config_from_json(helpers.TINY_CONFIG)
  (workdir / "config.json").write_text(json.dumps({"model": model_config.to_dict()}))

  fasta = helpers.write_fasta(tmp_path / "in.fasta", {"seqA": helpers.SEQ_A})
  out = tmp_path / "out"
  code = predict.main(["--fasta", str(fasta), "--out", str(out), "--checkpoint", str(workdir),
                       "--alignments", str(run["root"] / "alignments"), "--no_plots",
                       *helpers.SHAPE_FLAGS])
  assert code == 0
  result = load_json(out / "seqA" / "result_run_step5.json")
  expected = load_json(run["out"] / "seqA" / "result_model_1_ptm.json")
  np.testing.assert_allclose(result["plddt"], expected["plddt"], atol=1e-2)
  assert result["ptm"] == pytest.approx(expected["ptm"], abs=1e-4)
