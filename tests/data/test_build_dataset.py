"""The dataset builder: one example per usable chain, failures with reasons, exact read-back,
identical output across worker counts and after an interrupted build."""

from __future__ import annotations

import gzip
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import tensorflow as tf

from af2flax.data import build_dataset, examples, tfrecord
from tests.conftest import REPO_ROOT
from tests.data.conftest import OPENFOLD, PDB_CHAINS

BAD_STRUCTURES = {"9trn.pdb.gz": "corrupt or truncated gzip", "9emp.cif": "the file is empty",
                  "9fmt.cif": "StructureParseError", "notes.txt": "not a structure file"}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, shared_dir):
  """pdb_chains + openfold mmCIFs + broken files; alignments incl. a foreign and a broken one."""
  root = tmp_path_factory.mktemp("inputs")
  structures, alignments = root / "structures", root / "alignments"
  (structures / "openfold").mkdir(parents=True)
  alignments.mkdir()
  for path in sorted(PDB_CHAINS.glob("*.pdb.gz")):
    (structures / path.name).symlink_to(path)
  for path in sorted((OPENFOLD / "mmcifs").glob("*.cif")):
    (structures / "openfold" / path.name).symlink_to(path)
  (structures / "9trn.pdb.gz").write_bytes((PDB_CHAINS / "1ahsA.pdb.gz").read_bytes()[:3000])
  (structures / "9emp.cif").write_text("")
  (structures / "9fmt.cif").write_text((OPENFOLD / "short.fasta").read_text())
  (structures / "notes.txt").write_text("not a structure\n")
  for chain in ("2q2k_A", "2q2k_B"):
    (alignments / chain).symlink_to(OPENFOLD / "alignments" / chain)
  shutil.copytree(OPENFOLD / "alignments" / "2q2k_A", alignments / "1ahsA")  # another sequence
  (alignments / "2cvi_A").mkdir()
  sto = (OPENFOLD / "alignments" / "2q2k_A" / "uniref90_hits.sto").read_text()
  (alignments / "2cvi_A" / "uniref90_hits.sto").write_text(sto[:len(sto) // 2])  # truncated
  return structures, alignments


def options(inputs, out, **kwargs) -> build_dataset.BuildOptions:
  structures, alignments = inputs
  return build_dataset.BuildOptions(structures=str(structures), alignments=str(alignments),
                                    out=str(out), progress=False, **kwargs)


@pytest.fixture(scope="module")
def built(inputs, tmp_path_factory):
  out = tmp_path_factory.mktemp("built")
  summary = build_dataset.build(options(inputs, out, workers=2, shards=4))
  return out, summary


def read_tsv(path):
  lines = pathlib.Path(path).read_text().splitlines()
  return [dict(zip(lines[0].split("\t"), line.split("\t"))) for line in lines[1:]]


def all_records(out):
  return [record for shard in sorted((out / "shards").glob("*-of-*[0-9]"))
          for record in tfrecord.read_tfrecord(str(shard))]


def test_one_example_per_usable_chain_and_failures(built):
  out, summary = built
  index = read_tsv(out / "index.tsv")
  failures = {row["input"]: row["reason"] for row in read_tsv(out / "failures.tsv")}
  ids = [row["id"] for row in index]
  # 40 PDB chains + 22 protein chains of the 8 mmCIFs, less the two with broken alignments.
  assert len(ids) == len(set(ids)) == 60 == summary.num_examples
  assert "1ahs_A" not in ids and "2cvi_A" not in ids
  assert {"2q2k_A", "2q2k_B", "3u8v_A", "1psm_A", "1bvy_F"} <= set(ids)
  for name, reason in BAD_STRUCTURES.items():
    assert reason in failures[name], (name, failures[name])
  assert "alignment query has 70 residues, the chain has 126" in failures["1ahsA.pdb.gz:A"]
  assert "uniref90_hits.sto" in failures["2cviA.pdb.gz:A"]
  assert "truncated" in failures["2cviA.pdb.gz:A"]
  assert len(failures) == 6 == summary.num_failures
  rows = {row["id"]: row for row in index}
  assert rows["2q2k_A"]["resolution"] == "3" and rows["2q2k_A"]["release_date"] == "2008-02-05"
  assert int(rows["2q2k_A"]["num_alignments"]) > 10 and rows["1bvy_F"]["num_alignments"] == "1"
  assert sorted({row["shard"] for row in index}) == ["0", "1", "2", "3"]


def test_records_read_back_bit_for_bit(built, inputs):
  out, _ = built
  structures, alignments = inputs
  index = read_tsv(out / "index.tsv")
  records = all_records(out)
  assert len(records) == len(index)
  decoded = {}
  for record, row in zip(records, index):
    example = tfrecord.decode_example(record)
    assert example["chain_id"][0].decode() == row["id"]
    assert len(example["aatype"]) == int(row["length"])
    decoded[row["id"]] = record
  config = build_dataset._example_config(options(inputs, out))
  for example_id, relative in (("2q2k_A", "openfold/2q2k.cif"), ("4gcn_A", "4gcnA.pdb.gz")):
    entry, chain = example_id.split("_")
    source = examples.ChainSource(example_id, str(structures / relative), chain,
                                  examples.find_alignment_dir(str(alignments), entry, chain))
    assert decoded[example_id] == tfrecord.encode_example(examples.make_example(source, config))
  dataset = tf.data.TFRecordDataset([str(p) for p in sorted((out / "shards").glob("*-of-*[0-9]"))])
  parsed = list(dataset.map(tfrecord.parse_tf_example).as_numpy_iterator())
  assert [p["chain_id"][0].decode() for p in parsed] == [row["id"] for row in index]
  first = tfrecord.decode_example(records[0])
  for name in ("msa", "all_atom_positions", "template_aatype"):
    assert parsed[0][name].tobytes() == first[name].tobytes()


def test_same_bytes_in_process_and_with_workers(built, inputs, tmp_path):
  out, _ = built
  build_dataset.build(options(inputs, tmp_path, workers=1, shards=4))
  assert_same_tree(out, tmp_path)


def assert_same_tree(a: pathlib.Path, b: pathlib.Path) -> None:
  files_a = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
  files_b = sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
  assert files_a == files_b
  for relative in files_a:
    assert (a / relative).read_bytes() == (b / relative).read_bytes(), relative


def _run_until_shards(command, out, num_done, sig):
  """Starts the CLI, waits until `num_done` shards are complete, then sends `sig`."""
  process = subprocess.Popen(command, cwd=REPO_ROOT, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, start_new_session=True)
  deadline = time.monotonic() + 120
  while process.poll() is None and time.monotonic() < deadline:
    if len(list((out / "shards").glob("*.index.tsv"))) >= num_done:
      os.killpg(process.pid, sig)
      break
    time.sleep(0.005)
  process.communicate(timeout=60)
  return process.returncode


@pytest.mark.parametrize("where", ["opening", "closing"])
def test_an_interrupt_while_a_shard_opens_or_closes_leaves_no_temporary_file(
    inputs, tmp_path, monkeypatch, where):
  """Ctrl-C can land between a shard's temporary file being created and its writer being
  registered, or between the writer being taken out to close and the file's rename (seen
  in CI: a `.tmp` left behind): the build still removes every unfinished shard's file."""
  real_writer, real_replace = tfrecord.TFRecordWriter, os.replace
  opened, interrupted = [], []

  def writer_then_interrupt(path, *args):
    writer = real_writer(path, *args)
    opened.append(path)
    if len(opened) == 2:  # the second shard's file exists, its writer is not yet returned
      interrupted.append(path)
      raise KeyboardInterrupt
    return writer

  def interrupt_before_rename(source, target):
    if ".tfrecord-" in source and source.endswith(".tmp"):  # the first shard's rename
      interrupted.append(source)
      raise KeyboardInterrupt
    real_replace(source, target)

  if where == "opening":
    monkeypatch.setattr(tfrecord, "TFRecordWriter", writer_then_interrupt)
  else:
    monkeypatch.setattr(build_dataset.os, "replace", interrupt_before_rename)
  with pytest.raises(KeyboardInterrupt):
    build_dataset.build(options(inputs, tmp_path, workers=1, shards=4))
  assert len(interrupted) == 1 and interrupted[0].endswith(".tmp")
  assert not list(tmp_path.rglob("*.tmp"))


def test_interrupted_build_resumes_to_identical_output(inputs, tmp_path):
  structures, alignments = inputs
  subset = tmp_path / "structures"
  subset.mkdir()
  for path in sorted(PDB_CHAINS.glob("*.pdb.gz"))[:10]:
    (subset / path.name).symlink_to(path)
  reference, out = tmp_path / "reference", tmp_path / "out"
  build_dataset.build(build_dataset.BuildOptions(structures=str(subset), out=str(reference),
                                                 shards=10, workers=1, progress=False))
  command = [sys.executable, "-m", "af2flax.data.build_dataset", "--structures", str(subset),
             "--out", str(out), "--shards", "10", "--workers", "1", "--no_progress"]
  returncode = _run_until_shards(command, out, 2, signal.SIGINT)  # Ctrl-C
  done = len(list((out / "shards").glob("*.index.tsv")))
  if done < 10:
    assert returncode == 130
    assert not list(out.rglob("*.tmp"))  # the partial shard was removed
  _run_until_shards(command, out, done + 2, signal.SIGKILL)  # a crash
  # Whatever the race left, take away the last shard so the resume has work to do.
  for path in (out / "shards").glob("examples.tfrecord-00009-of-00010*"):
    path.unlink()
  summary = build_dataset.build(build_dataset.BuildOptions(structures=str(subset), out=str(out),
                                                           shards=10, workers=1, progress=False))
  assert summary.shards_built >= 1 and summary.shards_reused + summary.shards_built == 10
  for leftover in out.rglob("*.tmp"):
    leftover.unlink()  # a SIGKILL may leave a partial temp shard; it is never read
  assert_same_tree(reference, out)


def test_changed_inputs_refuse_to_resume(inputs, tmp_path):
  structures, _ = inputs
  subset = tmp_path / "structures"
  subset.mkdir()
  (subset / "2cviA.pdb.gz").symlink_to(PDB_CHAINS / "2cviA.pdb.gz")
  build_dataset.build(build_dataset.BuildOptions(structures=str(subset), out=str(tmp_path / "o"),
                                                 workers=1, progress=False))
  (subset / "4gcnA.pdb.gz").symlink_to(PDB_CHAINS / "4gcnA.pdb.gz")
  with pytest.raises(ValueError, match="holds a build of other inputs or options"):
    build_dataset.build(build_dataset.BuildOptions(structures=str(subset),
                                                   out=str(tmp_path / "o"), workers=1,
                                                   progress=False))


def test_tfds_builder_exposes_the_same_records(built, tmp_path):
  import tensorflow_datasets as tfds
  from af2flax.data.tfds_builder import Af2flaxProteins
  out, _ = built
  builder = Af2flaxProteins(data_dir=str(tmp_path))
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=str(out)))
  records = [tfrecord.decode_example(r) for r in all_records(out)]
  dataset = list(tfds.as_numpy(builder.as_dataset(split="train")))
  assert len(dataset) == len(records)
  for got, want in zip(dataset, records):
    for name, (dtype, _) in tfrecord.FEATURES.items():
      if dtype == "bytes":
        assert list(got[name]) == list(want[name]), name
      else:
        assert got[name].dtype == want[name].dtype and got[name].shape == want[name].shape
        assert got[name].tobytes() == want[name].tobytes(), name


def test_default_resolution_for_structures_without_one(tmp_path):
  """Header-less PDB chains have no resolution: unknown (0) unless --default_resolution gives
  one; a structure that states its resolution keeps it. The option is part of the manifest."""
  structures = tmp_path / "structures"
  structures.mkdir()
  (structures / "2cviA.pdb.gz").symlink_to(PDB_CHAINS / "2cviA.pdb.gz")   # no header
  (structures / "2q2k.cif").symlink_to(OPENFOLD / "mmcifs" / "2q2k.cif")  # 3.0 Å
  resolutions = {}
  for name, argv in (("plain", []), ("given", ["--default_resolution", "2.5"])):
    options = build_dataset.parse_args(["--structures", str(structures), "--out",
                                        str(tmp_path / name), "--workers", "1",
                                        "--no_progress"] + argv)
    build_dataset.build(options)
    resolutions[name] = {row["id"]: float(row["resolution"])
                         for row in read_tsv(tmp_path / name / "index.tsv")}
  assert resolutions["plain"] == {"2cvi_A": 0.0, "2q2k_A": 3.0, "2q2k_B": 3.0}
  assert resolutions["given"] == {"2cvi_A": 2.5, "2q2k_A": 3.0, "2q2k_B": 3.0}
  with pytest.raises(ValueError, match="holds a build of other inputs or options"):
    build_dataset.build(build_dataset.parse_args(
        ["--structures", str(structures), "--out", str(tmp_path / "plain"), "--workers", "1",
         "--no_progress", "--default_resolution", "2.5"]))
