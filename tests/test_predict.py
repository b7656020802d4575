"""`python -m af2flax.predict` end to end on the CPU with the tiny AlphaFold reference model.

One run over a FASTA file of good and bad records, with two models (the tiny reference
parameters and a perturbed copy) and per-sequence alignment directories; the tests check the
files it wrote: structures parse back (our reader and Biopython) with pLDDT in the B-factors,
confidence JSONs in AlphaFold DB's layout, PAE square and bounded, ranking consistent, bad
inputs skipped with their reasons while the good ones are predicted.
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from af2flax import predict
from af2flax.common import protein, residue_constants
from tests.inference import helpers

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


def test_run_search_builds_the_msa_with_jackhmmer(tmp_path):
  """--run_search: jackhmmer against a small database; alignments land in msas/ and are reused."""
  import shutil
  if shutil.which("jackhmmer") is None:
    pytest.skip("jackhmmer is not installed")
  rng = np.random.default_rng(3)
  letters = np.array(list("ACDEFGHIKLMNPQRSTVWY"))
  records = {}
  for index in range(8):
    row = np.array(list(helpers.SEQ_A))
    mutate = rng.random(len(row)) < 0.2
    row[mutate] = rng.choice(letters, mutate.sum())
    records[f"homolog{index}"] = "".join(row)
  for index in range(8):
    records[f"unrelated{index}"] = "".join(rng.choice(letters, 60))
  database = helpers.write_fasta(tmp_path / "db.fasta", records)
  fasta = helpers.write_fasta(tmp_path / "in.fasta", {"seqA": helpers.SEQ_A})
  out = tmp_path / "out"
  flags = ["--fasta", str(fasta), "--out", str(out), *helpers.TINY_MODEL_FLAGS,
           "--run_search", "--uniref90_database_path", str(database), "--n_cpu", "1",
           "--no_plots", *helpers.SHAPE_FLAGS]
  assert predict.main(flags) == 0
  sto = out / "seqA" / "msas" / "uniref90_hits.sto"
  assert sto.exists() and "homolog" in sto.read_text()
  log = (out / "predict.log").read_text()
  rows = int(log.split("seqA: 33 residues, ")[1].split(" MSA rows")[0])
  assert 1 < rows <= 9                  # the query and (some of) its 8 homologs
  modified = sto.stat().st_mtime_ns
  assert predict.main(flags) == 0       # the second run reuses the alignment
  assert sto.stat().st_mtime_ns == modified
  assert predict.main(flags[:-len(helpers.SHAPE_FLAGS) - 1] + [
      "--run_search", "--uniref90_database_path", str(tmp_path / "missing.fasta")]) == 2


def test_relax_the_best_model_and_rank_the_relaxed_structure(tmp_path):
  """--relax wiring on a real AlphaFold model (the tiny model's random structures cannot be
  minimised): relaxed_<model>.pdb and its report are written and ranked_0 is the relaxed one;
  a structure Amber cannot take is recorded, and its unrelaxed file stays ranked."""
  from af2flax.relaxation import relax as relax_lib
  from af2flax.inference import outputs
  from af2flax.inference.queries import FailureLog
  from tests.conftest import SHARED_DATA
  model = protein.read_structure(SHARED_DATA / "alphafold_testdata" / "model_output.pdb")
  model = model.with_residue_b_factors(np.linspace(60, 90, model.num_res).astype(np.float32))
  unknown = dataclasses.replace(model, aatype=np.full(model.num_res, 20))
  proteins = {"good": model, "unk": unknown}
  failures = FailureLog(tmp_path / "failures.tsv")
  timings = {}
  relaxed = predict.relax_models(str(tmp_path), "q", ["good", "unk"], proteins,
                                 relax_lib.AmberRelaxation(), failures, timings)
  assert list(relaxed) == ["good"] and timings["relax_good"] > 0
  report = load_json(tmp_path / "relax_good.json")
  assert report["violations_after"]["violating_residues"] == 0
  assert "q:relax_unk" in (tmp_path / "failures.tsv").read_text()
  outputs.write_ranked(str(tmp_path), ["good", "unk"], proteins, relaxed)
  ranked = (tmp_path / "ranked_0.pdb").read_text()
  assert ranked == (tmp_path / "relaxed_good.pdb").read_text()
  heavy = protein.read_structure(tmp_path / "ranked_0.cif")
  assert heavy.sequence == model.sequence
  np.testing.assert_allclose(heavy.b_factors[:, 1], model.b_factors[:, 1], atol=0.01)
  assert protein.read_structure(tmp_path / "ranked_1.pdb").num_res == model.num_res


def test_params_checkpoints_of_convert_params(run, tmp_path, params_dir):
  """An Orbax {'params': tree} checkpoint (convert_params output) with its preset named."""
  from af2flax.model import import_af2
  with np.load(params_dir / "params_model_1_ptm.npz", allow_pickle=False) as data:
    params = import_af2.flax_from_haiku({k: data[k] for k in data.files})
  checkpoint = import_af2.save_params(tmp_path / "ckpt", params)
  fasta = helpers.write_fasta(tmp_path / "in.fasta", {"seqA": helpers.SEQ_A})
  common = ["--fasta", str(fasta), "--checkpoint", str(checkpoint), "--alignments",
            str(run["root"] / "alignments"), "--no_plots", *helpers.SHAPE_FLAGS]
  assert predict.main(["--out", str(tmp_path / "unnamed"), *common]) == 2
  assert predict.main(["--out", str(tmp_path / "out"), *common, "--models", "model_1_ptm",
                       "--model_config", str(helpers.TINY_CONFIG)]) == 0
  result = load_json(tmp_path / "out" / "seqA" / "result_model_1_ptm.json")
  expected = load_json(run["out"] / "seqA" / "result_model_1_ptm.json")
  np.testing.assert_allclose(result["plddt"], expected["plddt"], atol=1e-2)
