"""`python -m af2flax.distill --from_predictions`: a self-distillation set from published
predicted structures (AlphaFold DB files), built here from real structures with synthetic pLDDT
in the B-factor column. Checks the file decisions (ids, fragments, versions, duplicates, files
without pLDDT, mismatched alignments, broken files), the filter and mask residue by residue,
resuming, and one mixed PDB + distillation batch through the input pipeline, the tiny AlphaFold
model and its loss."""

from __future__ import annotations

import csv
import json
import shutil
import sys

import numpy as np
import pytest

from af2flax import distill
from af2flax.common import protein
from af2flax.data import tfrecord
from af2flax.inference import prediction_files
from tests.conftest import SHARED_DATA
from tests.inference import helpers

MIN_MEAN, MASK_BELOW = 80.0, 50.0   # the command's defaults


def confident_plddt(num_res: int, seed: int) -> np.ndarray:
  """Mostly confident (mean > 80), with residues at and around the mask threshold: 49.99 is
  masked, 50.00 kept; every 13th residue at 20 (masked). Two decimals, as the files hold."""
  plddt = np.round(np.random.default_rng(seed).uniform(88.0, 99.0, num_res), 2)
  plddt[::13] = 20.0
  plddt[1], plddt[2] = 49.99, 50.0
  return plddt.astype(np.float32)


def chain(name: str) -> protein.Protein:
  return protein.read_structure(SHARED_DATA / "pdb_chains" / name)


def write(path, prot: protein.Protein, plddt) -> protein.Protein:
  """Writes `prot` with `plddt` in every atom's B-factor (our PDB / mmCIF writers)."""
  path.parent.mkdir(parents=True, exist_ok=True)
  written = prot.with_residue_b_factors(np.asarray(plddt, np.float32))
  protein.write_structure(written, path)
  return written


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, shared_dir):
  """A predictions directory in AlphaFold DB's naming (and others) plus alignments; returns
  (root, {file: (Protein written, pLDDT)} of the files expected to be kept)."""
  root = tmp_path_factory.mktemp("published")
  predictions, alignments = root / "predictions", root / "alignments"
  glucagon = protein.read_structure(SHARED_DATA / "alphafold_testdata" / "glucagon.pdb")
  kept = {}
  # Kept, with its alignment directory (named by the UniProt accession).
  plddt = confident_plddt(glucagon.num_res, 0)
  kept["AF-P01275-F1-model_v4.pdb"] = (write(predictions / "AF-P01275-F1-model_v4.pdb",
                                             glucagon, plddt), plddt)
  helpers.write_a3m(alignments / "P01275", glucagon.sequence)
  # An older model version of the same entry: superseded.
  write(predictions / "AF-P01275-F1-model_v3.pdb", glucagon, plddt)
  # Kept without alignments (single sequence), mmCIF gz in a subdirectory; its PDB copy is
  # a duplicate.
  ahs = chain("1ahsA.pdb.gz")
  plddt = confident_plddt(ahs.num_res, 1)
  kept["sub/AF-Q9XYZ1-F1-model_v4.cif.gz"] = (
      write(predictions / "sub" / "AF-Q9XYZ1-F1-model_v4.cif.gz", ahs, plddt), plddt)
  write(predictions / "sub" / "AF-Q9XYZ1-F1-model_v4.pdb.gz", ahs, plddt)
  # Any other name: the file stem is the id; its alignment matches.
  lpb = chain("1lpbA.pdb.gz")
  plddt = confident_plddt(lpb.num_res, 2)
  kept["my_model.cif"] = (write(predictions / "my_model.cif", lpb, plddt), plddt)
  helpers.write_a3m(alignments / "my_model", lpb.sequence, seed=3)
  # A multi-fragment entry: F1 and F2 both refused.
  write(predictions / "AF-Q8LONG-F1-model_v4.cif", chain("1i8nA.pdb.gz"),
        confident_plddt(89, 4))
  write(predictions / "AF-Q8LONG-F2-model_v4.cif", chain("1mr1D.pdb.gz"),
        confident_plddt(96, 5))
  write(predictions / "AF-Q7LONE-F3-model_v4.pdb", chain("1mr1D.pdb.gz"),
        confident_plddt(96, 5))
  # No pLDDT: constant B-factors; B-factors beyond 100.
  dx5 = chain("1dx5I.pdb.gz")
  write(predictions / "AF-A0A0B0-F1-model_v4.pdb", dx5, np.full(dx5.num_res, 70.0))
  write(predictions / "scaled.pdb", dx5, np.linspace(10.0, 150.0, dx5.num_res))
  # An alignment of another sequence.
  write(predictions / "mismatch.pdb", dx5, confident_plddt(dx5.num_res, 6))
  helpers.write_a3m(alignments / "mismatch", chain("1eteA.pdb.gz").sequence[:dx5.num_res])
  # Confident residues, but a mean below 80: filtered.
  low = np.round(np.linspace(40.0, 99.0, glucagon.num_res), 2)
  write(predictions / "lowconf.pdb", glucagon, low)
  # Unreadable, two chains, not a structure file.
  shutil.copy(SHARED_DATA / "mmcif_misc" / "1YJP_invalid.cif.gz", predictions / "broken.cif.gz")
  two_chains = protein.read_structure(SHARED_DATA / "alphafold_testdata" / "2rbg.pdb")
  write(predictions / "dimer.pdb", two_chains, np.full(two_chains.num_res, 90.0))
  (predictions / "AF-P01275-F1-predicted_aligned_error_v4.json").write_text("[]")
  return root, kept


def run(root, out, *extra) -> int:
  return distill.main(["--from_predictions", str(root / "predictions"), "--alignments",
                       str(root / "alignments"), "--out", str(out), "--shards", "3", *extra])


def read_set(out):
  info = json.loads((out / "dataset_info.json").read_text())
  examples = {}
  for shard in info["shards"]:
    for record in tfrecord.read_tfrecord(str(out / shard)):
      decoded = tfrecord.decode_example(record)
      examples[decoded["chain_id"][0].decode()] = decoded
  with open(out / "index.tsv") as handle:
    index = list(csv.DictReader(handle, delimiter="\t"))
  with open(out / "failures.tsv") as handle:
    failures = {row["input"]: row["reason"] for row in csv.DictReader(handle, delimiter="\t")}
  return info, examples, index, failures


@pytest.fixture(scope="module")
def built(inputs):
  root, _ = inputs
  out = root / "set"
  assert run(root, out) == 0
  return out


def test_names_decide_ids_fragments_versions_and_duplicates():
  selection = prediction_files.select_predictions([
      "AF-P12345-F1-model_v3.pdb", "AF-P12345-F1-model_v4.pdb.gz", "AF-P12345-F1-model_v4.cif",
      "AF-Q11111-F1-model_v4.cif", "AF-Q11111-F2-model_v4.cif", "AF-Q22222-2-F1-model_v4.pdb",
      "x/AF-P12345-F1-model_v4.cif", "my model.PDB", "readme.txt"])
  assert [(f.path, f.example_id) for f in selection.files] == [
      ("AF-P12345-F1-model_v4.cif", "P12345"), ("AF-Q22222-2-F1-model_v4.pdb", "Q22222-2"),
      ("my model.PDB", "my_model")]
  rejected = dict(selection.rejected)
  assert rejected["AF-P12345-F1-model_v3.pdb"].startswith("superseded: AlphaFold DB model_v4")
  assert rejected["AF-P12345-F1-model_v4.pdb.gz"].startswith(
      "duplicate: AF-P12345-F1-model_v4.cif")       # the mmCIF of the same entry is used
  assert rejected["x/AF-P12345-F1-model_v4.cif"].startswith("duplicate")
  assert "F2 also present" in rejected["AF-Q11111-F1-model_v4.cif"]
  assert rejected["AF-Q11111-F2-model_v4.cif"].startswith("fragment F2 of a multi-fragment")
  assert rejected["readme.txt"].startswith("not a structure file")
  assert len(selection.rejected) == 6
  assert selection.files[0].source == "AlphaFold DB model_v4 F1"


def test_kept_predictions_and_every_refusal_with_its_reason(built):
  info, examples, index, failures = read_set(built)
  assert sorted(examples) == ["P01275", "Q9XYZ1", "my_model"]
  assert [row["id"] for row in index] == ["P01275", "my_model", "Q9XYZ1"]   # listing order
  assert {row["id"]: row["structure"] for row in index}["Q9XYZ1"] == \
      "sub/AF-Q9XYZ1-F1-model_v4.cif.gz"
  assert all(row["is_distillation"] == "1" and row["resolution"] == "0" for row in index)
  expected = {
      "AF-P01275-F1-model_v3.pdb": "superseded: AlphaFold DB model_v4 of P01275",
      "sub/AF-Q9XYZ1-F1-model_v4.pdb.gz": "duplicate: sub/AF-Q9XYZ1-F1-model_v4.cif.gz",
      "AF-Q8LONG-F1-model_v4.cif": "F1 of a multi-fragment AlphaFold DB entry (F2 also",
      "AF-Q8LONG-F2-model_v4.cif": "fragment F2 of a multi-fragment AlphaFold DB entry",
      "AF-Q7LONE-F3-model_v4.pdb": "fragment F3 of a multi-fragment",
      "AF-A0A0B0-F1-model_v4.pdb": "no pLDDT: every CA B-factor is 70",
      "scaled.pdb": "no pLDDT: B-factors span 10 to 150, outside pLDDT's 0-100",
      "mismatch.pdb": "alignment query differs from the chain sequence",
      "lowconf.pdb": "filtered: mean pLDDT 69.50 < 80",
      "broken.cif.gz": "broken.cif.gz",
      "dimer.pdb": "2 protein chains (A, B)",
      "AF-P01275-F1-predicted_aligned_error_v4.json": "not a structure file",
  }
  assert sorted(failures) == sorted(expected)
  for name, reason in expected.items():
    assert reason in failures[name], (name, failures[name])
  assert info["num_examples"] == 3 and info["num_failures"] == len(expected)
  assert not list((built / "staging").iterdir())


def test_filter_and_mask_residue_by_residue(inputs, built):
  _, kept = inputs
  _, examples, _, _ = read_set(built)
  for name, (written, plddt) in kept.items():
    example = examples[prediction_files.parse_name(name).example_id]
    assert example["sequence"][0].decode() == written.sequence
    np.testing.assert_array_equal(example["plddt"], plddt)
    assert float(plddt.mean()) >= MIN_MEAN
    supervised = plddt >= MASK_BELOW
    assert not supervised[1] and supervised[2] and 0 < supervised.sum() < len(plddt)
    np.testing.assert_array_equal(example["all_atom_mask"],
                                  written.atom_mask * supervised[:, None])
    np.testing.assert_allclose(example["all_atom_positions"], written.atom_positions, atol=1e-3)
    np.testing.assert_array_equal(example["is_distillation"], [1.0])
    np.testing.assert_array_equal(example["resolution"], [0.0])
  # The alignment directory named by the accession (or file stem) is read; else the query alone.
  assert examples["P01275"]["msa"].shape[0] == 7
  assert examples["my_model"]["msa"].shape[0] == 7
  assert examples["Q9XYZ1"]["msa"].shape[0] == 1


def test_thresholds_are_options(inputs, tmp_path):
  root, _ = inputs
  out = tmp_path / "strict"
  assert run(root, out, "--min_mean_plddt", "90", "--mask_below", "95") == 0
  _, examples, _, failures = read_set(out)
  for example in examples.values():
    plddt = example["plddt"]
    assert plddt.mean() >= 90
    np.testing.assert_array_equal(example["all_atom_mask"].max(-1) > 0, plddt >= 95)
  assert failures["lowconf.pdb"] == "filtered: mean pLDDT 69.50 < 90"
  assert sum("filtered: mean pLDDT" in reason for reason in failures.values()) >= 2


def test_an_interrupted_run_resumes_to_the_same_bytes(inputs, built, monkeypatch, caplog):
  root, _ = inputs
  out = root / "interrupted"
  original, calls = distill.distill_prediction_file, []

  def stop_at_third(prediction, *args):
    calls.append(prediction.path)
    if len(calls) == 3:
      raise KeyboardInterrupt
    return original(prediction, *args)

  monkeypatch.setattr(distill, "distill_prediction_file", stop_at_third)
  with pytest.raises(KeyboardInterrupt):
    run(root, out)
  assert not (out / "index.tsv").exists()
  monkeypatch.setattr(distill, "distill_prediction_file", original)
  caplog.set_level("INFO")
  assert run(root, out) == 0
  assert "2 already done" in caplog.text
  for name in ("index.tsv", "failures.tsv", "dataset_info.json"):
    assert (out / name).read_bytes() == (built / name).read_bytes(), name
  for shard in (built / "shards").iterdir():
    assert (out / "shards" / shard.name).read_bytes() == shard.read_bytes(), shard.name
  # A finished set: nothing to do, nothing changes; other options are refused.
  caplog.clear()
  assert run(root, out) == 0 and "0 to read" in caplog.text
  assert run(root, out, "--mask_below", "70") == 2


def test_model_flags_are_refused_and_no_tensorflow_is_needed(inputs, tmp_path, monkeypatch):
  root, _ = inputs
  with pytest.raises(SystemExit) as exit_info:
    run(root, tmp_path / "flags", "--af2_params", str(helpers.TINY_PARAMS))
  assert exit_info.value.code == 2
  monkeypatch.setitem(sys.modules, "tensorflow", None)   # GPU machines: importing it fails
  assert run(root, tmp_path / "no_tf") == 0
  monkeypatch.undo()
  assert read_set(tmp_path / "no_tf")[0]["num_examples"] == 3


def test_a_mixed_batch_trains_all_terms_except_the_distillation_off_ones(built, tmp_path):
  """PDB (2q2k chain A, 3.0 Å, real MSAs) + this set, mixed by the input pipeline; the tiny
  AlphaFold model with DeepMind's parameters and its loss on one batch holding both kinds."""
  import jax  # pylint: disable=import-outside-toplevel
  from af2flax.data import build_dataset, input_pipeline  # pylint: disable=import-outside-toplevel
  from af2flax.data import config as data_config  # pylint: disable=import-outside-toplevel
  from af2flax.losses.total import alphafold_loss  # pylint: disable=import-outside-toplevel
  from af2flax.model import import_af2  # pylint: disable=import-outside-toplevel
  from af2flax.model.alphafold import AlphaFold  # pylint: disable=import-outside-toplevel
  from af2flax.model.config import from_alphafold_dict  # pylint: disable=import-outside-toplevel
  from af2flax.train.step import final_iteration_features  # pylint: disable=import-outside-toplevel

  openfold = SHARED_DATA / "openfold_testdata"
  structures, alignments = tmp_path / "structures", tmp_path / "alignments"
  structures.mkdir()
  alignments.mkdir()
  (structures / "2q2k_A.cif").symlink_to(openfold / "mmcifs" / "2q2k.cif")
  (alignments / "2q2k_A").symlink_to(openfold / "alignments" / "2q2k_A")
  pdb_set = tmp_path / "pdb_set"
  build_dataset.build(build_dataset.BuildOptions(
      structures=str(structures), alignments=str(alignments), out=str(pdb_set), workers=1,
      shards=1, progress=False))

  config = data_config.get_config()
  config.common.num_recycle = 1
  config.train.crop_size = 40
  config.train.max_msa_clusters = 8
  config.common.max_extra_msa = 16
  config.train.max_templates = 2
  config.sampling.distillation_fraction = 0.5
  iterator = input_pipeline.make_iterator([str(pdb_set), str(built)], config, batch_size=2,
                                          seed=0, process_index=0, process_count=1)
  for _ in range(20):
    batch = next(iterator)
    kinds = np.asarray(batch["is_distillation"]).reshape(2, -1)[:, 0]
    if sorted(kinds.tolist()) == [0.0, 1.0]:
      break
  iterator.close()
  assert sorted(kinds.tolist()) == [0.0, 1.0], "no mixed batch in 20 steps"
  assert iterator.bad_records == 0

  tiny = json.loads(helpers.TINY_CONFIG.read_text())["model_config"]
  model_config = from_alphafold_dict(tiny, dtype="float32", use_remat=False, low_memory=False)
  model = AlphaFold(model_config)
  # (Names and shapes are checked by the parity tests; apply would fail on a mismatch.)
  params = import_af2.flax_from_haiku(import_af2.load_alphafold_npz(helpers.TINY_PARAMS))

  @jax.jit
  def losses(features):
    outputs = model.apply(params, features, deterministic=True)
    return alphafold_loss(final_iteration_features(features), outputs, model_config.heads)

  off = ("predicted_lddt/loss", "experimentally_resolved/loss", "predicted_aligned_error/loss")
  on = ("distogram/loss", "masked_msa/loss", "structure_module/fape",
        "structure_module/sidechain_fape", "structure_module/loss")
  for index, kind in enumerate(kinds):
    total, aux = losses({key: value[index] for key, value in batch.items()})
    assert np.isfinite(float(total)), kind
    assert all(np.isfinite(np.asarray(value)).all() for value in aux.values()), kind
    for key in on:
      assert float(aux[key]) > 0, (kind, key)
    for key in off:
      if kind:
        assert float(aux[key]) == 0.0, key       # distillation: switched off
      else:
        assert float(aux[key]) > 0, key         # PDB at 3.0 Å: trained
