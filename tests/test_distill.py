"""`python -m af2flax.distill` end to end on the CPU with the tiny AlphaFold reference model:
filter and mask decisions, the builder's output format, resuming, and the input pipeline
reading the set as self-distillation examples."""

from __future__ import annotations

import csv
import json
import sys

import numpy as np
import pytest

from af2flax import distill
from af2flax.data import tfrecord
from af2flax.inference import distillation
from tests.inference import helpers


def test_filter_decisions_residue_by_residue():
  rule = distillation.DistillationFilter(min_mean_plddt=70, mask_below=50,
                                         min_unmasked_residues=2)
  plddt = np.array([90.0, 49.99, 50.0, 80.0, 20.0])
  np.testing.assert_array_equal(rule.residue_mask(plddt), [1, 0, 1, 1, 0])
  assert rule.rejection(np.array([90.0, 70.0, 60.0])) is None
  assert rule.rejection(np.array([90.0, 60.0, 50.0])) == "filtered: mean pLDDT 66.67 < 70"
  low = distillation.DistillationFilter(min_mean_plddt=0, mask_below=95, min_unmasked_residues=2)
  assert "1 residues with pLDDT >= 95" in low.rejection(np.array([99.0, 90.0, 90.0]))


def test_make_example_masks_low_confidence_residues_and_fits_the_schema():
  num_res = 4
  raw = {"aatype": np.eye(21, dtype=np.int32)[[0, 1, 2, 3]],
         "between_segment_residues": np.zeros(num_res, np.int32),
         "domain_name": np.array([b"x"], object),
         "residue_index": np.arange(num_res, dtype=np.int32),
         "seq_length": np.full(num_res, num_res, np.int32),
         "sequence": np.array([b"ARND"], object), "msa": np.zeros((1, num_res), np.int32),
         "deletion_matrix_int": np.zeros((1, num_res), np.int32),
         "num_alignments": np.ones(num_res, np.int32),
         "msa_species_identifiers": np.array([b""], object)}
  positions = np.random.default_rng(0).normal(size=(num_res, 37, 3)).astype(np.float32)
  mask = np.ones((num_res, 37), np.float32)
  plddt = np.array([80.0, 40.0, 55.0, 10.0], np.float32)
  example = distillation.make_example(raw, "x", positions, mask, plddt,
                                      distillation.DistillationFilter(mask_below=50))
  decoded = tfrecord.decode_example(tfrecord.encode_example(example))
  np.testing.assert_array_equal(decoded["all_atom_mask"].max(-1), [1, 0, 1, 0])
  np.testing.assert_array_equal(decoded["is_distillation"], [1.0])
  np.testing.assert_array_equal(decoded["resolution"], [0.0])
  np.testing.assert_array_equal(decoded["plddt"], plddt)
  assert decoded["template_aatype"].shape == (0, num_res, 22)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, shared_dir):
  root = tmp_path_factory.mktemp("distill")
  helpers.write_a3m(root / "alignments" / "seqA", helpers.SEQ_A)
  helpers.write_a3m(root / "alignments" / "seqB", helpers.SEQ_B, seed=1)
  fasta = helpers.write_fasta(root / "in.fasta", {
      "seqA": helpers.SEQ_A, "bad": "MKT1", "seqB": helpers.SEQ_B, "noalignment": "MKTAYI"})
  return root, fasta


def distill_args(root, fasta, out, *extra):
  return ["--fasta", str(fasta), "--alignments", str(root / "alignments"), "--out", str(out),
          *helpers.TINY_MODEL_FLAGS, *helpers.SHAPE_FLAGS, "--shards", "2", *extra]


@pytest.fixture(scope="module")
def kept(inputs):
  """Everything kept (mean threshold 0); residues below pLDDT 49.7 masked."""
  root, fasta = inputs
  out = root / "kept"
  code = distill.main(distill_args(root, fasta, out, "--min_mean_plddt", "0", "--mask_below",
                                   "49.7"))
  return code, out


def read_examples(out):
  info = json.loads((out / "dataset_info.json").read_text())
  examples = {}
  for shard in info["shards"]:
    for record in tfrecord.read_tfrecord(str(out / shard)):
      decoded = tfrecord.decode_example(record)
      examples[decoded["chain_id"][0].decode()] = decoded
  return info, examples


def test_kept_examples_are_written_in_the_builders_format(kept):
  code, out = kept
  assert code == 0
  info, examples = read_examples(out)
  assert info["num_examples"] == 2 and info["num_shards"] == 2
  assert sorted(examples) == ["seqA", "seqB"]
  with open(out / "index.tsv") as handle:
    rows = list(csv.DictReader(handle, delimiter="\t"))
  assert [row["id"] for row in rows] == ["seqA", "seqB"]
  assert all(row["is_distillation"] == "1" and row["resolution"] == "0" for row in rows)
  failures = (out / "failures.tsv").read_text()
  assert "bad" in failures and "unknown residue letters '1'" in failures
  assert "noalignment" in failures and "no alignment directory" in failures
  for name, sequence in (("seqA", helpers.SEQ_A), ("seqB", helpers.SEQ_B)):
    example = examples[name]
    assert example["sequence"][0].decode() == sequence
    np.testing.assert_array_equal(example["is_distillation"], [1.0])
    plddt = example["plddt"]
    assert plddt.shape == (len(sequence),) and np.all((plddt >= 0) & (plddt <= 100))
    supervised = example["all_atom_mask"].max(-1) > 0
    np.testing.assert_array_equal(supervised, plddt >= 49.7)
    assert 0 < supervised.sum() < len(sequence)       # the threshold splits the residues
    assert example["msa"].shape[0] == 7               # the query and its 6 variants
    structure = (out / "structures" / f"{name}.pdb").read_text()
    assert structure.count(" CA ") == len(sequence)
  assert not list((out / "staging").iterdir())       # everything assembled


def test_a_rerun_skips_finished_sequences_and_changes_nothing(inputs, kept, caplog):
  root, fasta = inputs
  _, out = kept
  before = {p.name: p.read_bytes() for p in (out / "shards").iterdir()}
  caplog.set_level("INFO")
  code = distill.main(distill_args(root, fasta, out, "--min_mean_plddt", "0", "--mask_below",
                                   "49.7"))
  assert code == 0
  assert "3 already done, 0 to predict" in caplog.text
  assert {p.name: p.read_bytes() for p in (out / "shards").iterdir()} == before
  # Other options into the same directory are refused.
  assert distill.main(distill_args(root, fasta, out, "--min_mean_plddt", "10")) == 2


def test_an_interrupted_run_resumes_where_it_stopped(inputs, monkeypatch, caplog):
  root, fasta = inputs
  out = root / "interrupted"
  original = distill.distill_query
  calls = []

  def stop_at_second(query, *args):
    calls.append(query.name)
    if len(calls) == 2:
      raise KeyboardInterrupt
    return original(query, *args)

  monkeypatch.setattr(distill, "distill_query", stop_at_second)
  with pytest.raises(KeyboardInterrupt):
    distill.main(distill_args(root, fasta, out, "--min_mean_plddt", "99"))
  assert not (out / "index.tsv").exists()
  monkeypatch.setattr(distill, "distill_query", original)
  caplog.set_level("INFO")
  assert distill.main(distill_args(root, fasta, out, "--min_mean_plddt", "99")) == 0
  assert "1 already done, 2 to predict" in caplog.text
  info, examples = read_examples(out)
  assert info["num_examples"] == 0 and examples == {}
  failures = (out / "failures.tsv").read_text()
  assert failures.count("filtered: mean pLDDT") == 2     # both predictions are below 99


def test_the_input_pipeline_reads_the_set_as_distillation_examples(kept):
  from af2flax.data import config as data_config
  from af2flax.data import input_pipeline
  _, out = kept
  config = data_config.get_config("initial_training")
  config.train.crop_size = 32
  config.train.max_msa_clusters = 4
  config.common.max_extra_msa = 4
  config.sampling.distillation_fraction = 1.0
  iterator = input_pipeline.make_iterator(str(out), config, batch_size=2, seed=0,
                                          process_index=0, process_count=1)
  batch = next(iterator)
  iterator.close()
  assert iterator.bad_records == 0
  np.testing.assert_array_equal(np.asarray(batch["is_distillation"]).reshape(2, -1)[:, 0], [1, 1])
  assert np.all(np.asarray(batch["resolution"]) == 0)
  # Masked residues stay masked after cropping: fewer supervised residues than real ones.
  supervised = batch["all_atom_mask"][:, 0].max(-1) > 0      # [batch, residues]
  assert np.all(supervised.sum(-1) < batch["seq_mask"][:, 0].sum(-1))


def test_a_machine_without_tensorflow_builds_the_set(inputs, monkeypatch):
  """GPU machines have no TensorFlow: the whole set is still written."""
  root, fasta = inputs
  out = root / "no_tensorflow"
  monkeypatch.setitem(sys.modules, "tensorflow", None)   # import now fails
  assert distill.main(distill_args(root, fasta, out, "--min_mean_plddt", "0")) == 0
  monkeypatch.undo()
  info, examples = read_examples(out)
  assert sorted(examples) == ["seqA", "seqB"] and info["num_failures"] == 2
  assert not list((out / "staging").iterdir())
