"""The Beam dataset build: search -> build -> read back, identical to the single-machine build
record for record, idempotent, resumable; the tfds builder's Beam config gives the same examples."""

from __future__ import annotations

import pathlib

import pytest

from af2flax.data import build_dataset, build_dataset_beam, examples, parsers, pipeline, tfrecord
from tests.data.conftest import OPENFOLD, PDB_CHAINS, SEARCH_CHAINS, beam_test_options

EXTRA_CHAINS = ("1bvy_F", "4gcn_A")  # no alignments: single-sequence examples


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, searched):
  """Structures of the searched chains, two more, a 2-chain mmCIF and a corrupt file."""
  _, alignments, _, _ = searched
  structures = tmp_path_factory.mktemp("structures")
  for chain in SEARCH_CHAINS + EXTRA_CHAINS:
    name = chain.replace("_", "") + ".pdb.gz"
    (structures / name).symlink_to(PDB_CHAINS / name)
  (structures / "2q2k.cif").symlink_to(OPENFOLD / "mmcifs" / "2q2k.cif")
  (structures / "9bad.pdb.gz").write_bytes((PDB_CHAINS / "1ahsA.pdb.gz").read_bytes()[:2000])
  return structures, alignments


def options(inputs, out, **kwargs) -> build_dataset.BuildOptions:
  structures, alignments = inputs
  return build_dataset.BuildOptions(structures=str(structures), alignments=str(alignments),
                                    out=str(out), workers=1, shards=3, progress=False, **kwargs)


def output_files(out: pathlib.Path) -> dict[str, bytes]:
  return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


def all_records(out: pathlib.Path) -> list[bytes]:
  return [record for shard in sorted((out / "shards").glob("*-of-*[0-9]"))
          for record in tfrecord.read_tfrecord(str(shard))]


@pytest.fixture(scope="module")
def builds(inputs, tmp_path_factory):
  plain_out, beam_out = tmp_path_factory.mktemp("plain"), tmp_path_factory.mktemp("beam")
  plain = build_dataset.build(options(inputs, plain_out))
  beam = build_dataset_beam.build_with_beam(options(inputs, beam_out), beam_test_options())
  return plain_out, plain, beam_out, beam


def test_beam_build_equals_the_plain_build(builds):
  plain_out, plain, beam_out, beam = builds
  # 4 searched + 2 extra PDB chains + 2q2k A and B; the corrupt file is a failure.
  assert (beam.num_examples, beam.num_failures) == (plain.num_examples, plain.num_failures)
  assert (beam.num_examples, beam.num_failures) == (8, 1)
  assert beam.shards_built == 3 and beam.timings["parse"] > 0
  plain_files, beam_files = output_files(plain_out), output_files(beam_out)
  assert sorted(plain_files) == sorted(beam_files)
  assert len([f for f in beam_files if f.startswith("shards/") and f[-5:].isdigit()]) == 3
  for name, data in plain_files.items():
    assert beam_files[name] == data, name  # shards, index.tsv, failures.tsv, dataset_info.json
  assert "9bad.pdb.gz\t" in (beam_out / "failures.tsv").read_text()
  assert not [f for f in beam_files if ".tmp" in f]


def test_search_build_read_back(builds, inputs):
  _, _, beam_out, _ = builds
  structures, alignments = inputs
  records = all_records(beam_out)
  by_id = {tfrecord.decode_example(r)["chain_id"][0].decode(): r for r in records}
  assert sorted(by_id) == sorted(SEARCH_CHAINS + EXTRA_CHAINS + ("2q2k_A", "2q2k_B"))
  for chain in SEARCH_CHAINS:
    entry, chain_id = chain.split("_")
    alignment_dir = examples.find_alignment_dir(str(alignments), entry, chain_id)
    assert alignment_dir is not None
    example = tfrecord.decode_example(by_id[chain])
    sequence = example["sequence"][0].decode()
    # The example's MSA is the union of the searched files' rows, in AlphaFold's order.
    files = pipeline.list_alignment_files(alignment_dir)
    rows = {row for path in files.msas for row in pipeline.read_msa(path).sequences}
    assert len(example["msa"]) == len(rows) and (example["num_alignments"] == len(rows)).all()
    assert example["msa"][0].tolist() == pipeline.msa_rows_to_ids([sequence])[0].tolist()
    assert parsers.parse_hhr((pathlib.Path(alignment_dir) / "pdb70_hits.hhr").read_text())
    source = examples.ChainSource(chain, str(structures / f"{entry}{chain_id}.pdb.gz"), chain_id,
                                  alignment_dir)
    config = build_dataset._example_config(options(inputs, beam_out))
    assert by_id[chain] == tfrecord.encode_example(examples.make_example(source, config))


def test_retried_and_resumed_beam_builds_write_the_same_bytes(builds, inputs, tmp_path):
  _, _, beam_out, _ = builds
  reference = output_files(beam_out)
  out = tmp_path / "resume"
  build_options = options(inputs, out)
  num_shards, done, tasks = build_dataset.prepare_build(build_options)
  # A retried bundle: WriteShard on the same shard twice gives the same files.
  process = build_dataset_beam.ProcessFile(build_options)
  process.setup()
  shard_one = [item for task in tasks if task[0] == 1 for _, item in process.process(task)]
  writer = build_dataset_beam.WriteShard(build_options, num_shards)
  for _ in range(2):
    assert list(writer.process((1, list(reversed(shard_one))))) == [1]
    shard = out / "shards" / build_dataset.SHARD_NAME.format(shard=1, num_shards=3)
    assert shard.read_bytes() == reference[str(shard.relative_to(out))]
  # The command line (DirectRunner) completes the two missing shards only.
  assert build_dataset_beam.main([
      "--structures", build_options.structures, "--alignments", build_options.alignments,
      "--out", str(out), "--shards", "3", "--no_progress", "--runner", "DirectRunner",
      "--direct_num_workers", "1"]) == 0
  assert output_files(out) == reference
  summary = build_dataset_beam.build_with_beam(build_options, beam_test_options())
  assert (summary.shards_built, summary.shards_reused) == (0, 3)
  assert output_files(out) == reference


def test_tfds_beam_config_gives_the_same_examples(builds, tmp_path):
  import tensorflow_datasets as tfds
  from af2flax.data.tfds_builder import Af2flaxProteins
  _, _, beam_out, _ = builds
  records = [tfrecord.decode_example(r) for r in all_records(beam_out)]
  builder = Af2flaxProteins(config="beam", data_dir=str(tmp_path))
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
      manual_dir=str(beam_out), beam_options=beam_test_options()))
  dataset = list(tfds.as_numpy(builder.as_dataset(split="train")))
  assert [d["chain_id"][0] for d in dataset] == [r["chain_id"][0] for r in records]
  for got, want in zip(dataset, records):
    for name, (dtype, _) in tfrecord.FEATURES.items():
      if dtype == "bytes":
        assert list(got[name]) == list(want[name]), name
      else:
        assert got[name].dtype == want[name].dtype and got[name].tobytes() == want[name].tobytes()
