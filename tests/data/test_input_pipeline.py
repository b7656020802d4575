"""The tf.data input pipeline on records of real PDB chains: layout, determinism, resume, hosts,
bad records."""

import json
import pathlib

import numpy as np
import pytest

from af2flax.data import config as data_config
from af2flax.data import input_pipeline
from af2flax.data import records
from af2flax.data import tfrecord
from af2flax.data import training_example
from tests.conftest import REFERENCE, SHARED_DATA
from tests.data import pipeline_helpers

NUM_CHAINS = 6


@pytest.fixture(scope="module")
def chains(shared_dir):
  paths = sorted((SHARED_DATA / "pdb_chains").glob("*.pdb.gz"))[:NUM_CHAINS]
  return [(path.name[:5],) + pipeline_helpers.load_pdb_chain(path) for path in paths]


@pytest.fixture(scope="module")
def dataset(chains, tmp_path_factory):
  """6 real chains in 2 shards: 4 PDB chains in 3 clusters, 2 self-distillation chains."""
  rng = np.random.default_rng(0)
  examples = [pipeline_helpers.raw_example(name, sequence, positions, mask, num_msa=60,
                                           num_templates=3, rng=rng, cluster_id=[0, 0, 1, 2, -1, -1][i],
                                           is_distillation=float(i >= 4))
              for i, (name, sequence, positions, mask) in enumerate(chains)]
  directory = tmp_path_factory.mktemp("records")
  paths = pipeline_helpers.write_shards(directory, examples, num_shards=2)
  return records.table_by_decoding(paths, tfrecord.decode_example)


def _config(stage="initial_training"):
  config = data_config.get_config(stage)
  config.train.crop_size = 48
  config.train.max_msa_clusters = 8
  config.common.max_extra_msa = 16
  return config


def _iterator(table, config=None, **kwargs):
  kwargs.setdefault("batch_size", 2)
  kwargs.setdefault("seed", 0)
  kwargs.setdefault("process_index", 0)
  kwargs.setdefault("process_count", 1)
  return input_pipeline.InputIterator(table, config or _config(), **kwargs)


def _take(iterator, count):
  batches = [next(iterator) for _ in range(count)]
  iterator.close()
  return batches


def _assert_batches_equal(first, second):
  assert first.keys() == second.keys()
  for key in first:
    np.testing.assert_array_equal(first[key], second[key], err_msg=key)


def test_record_table_reads_metadata_and_offsets(dataset):
  assert len(dataset) == NUM_CHAINS
  assert dataset.is_distillation.sum() == 2
  assert sorted(dataset.cluster_ids) == ["", "", "0", "0", "1", "2"]
  assert np.all(dataset.num_res > 70)
  assert (pathlib.Path(dataset.paths[0]).parent / records.OFFSETS_FILE).exists()


def test_batch_layout_is_af2_tiny_layout_and_consistent(dataset):
  """Keys, dtypes and ranks of AlphaFold's training batch (af2_tiny batch.npz) plus
  is_distillation, with a leading batch axis; one recycling count per batch."""
  config = _config()
  batch = _take(_iterator(dataset, config), 1)[0]
  with np.load(REFERENCE / "af2_tiny" / "batch.npz", allow_pickle=False) as reference:
    assert set(batch) == set(reference) | {"is_distillation"}
    for key in reference:
      assert batch[key].dtype == reference[key].dtype, key
      assert batch[key].ndim == reference[key].ndim + 1, key
  for key, (shape, dtype) in training_example.batch_shapes(config).items():
    assert batch[key].shape == (2,) + shape and batch[key].dtype == dtype, key
  recycles = batch["num_iter_recycling"]
  assert np.all(recycles == recycles[0, 0]) and 0 <= recycles[0, 0] <= 3
  np.testing.assert_array_equal(batch["seq_mask"].sum(-1), batch["seq_length"])
  np.testing.assert_array_equal(batch["aatype"], np.argmax(batch["target_feat"][..., 1:], -1))
  # Crop consistency: target positions and the structure agree residue by residue.
  atom14 = batch["atom14_gt_positions"]
  gathered = np.take_along_axis(batch["all_atom_positions"],
                                batch["residx_atom14_to_atom37"][..., None], axis=-2)
  np.testing.assert_allclose(atom14, gathered * batch["atom14_gt_exists"][..., None], atol=1e-5)
  query = batch["true_msa"][:, :, 0]
  np.testing.assert_array_equal(query, batch["aatype"] * batch["seq_mask"].astype(np.int32))


def test_full_initial_training_shapes(dataset):
  """At initial-training settings the batch has AlphaFold's shapes (R = 4, crop 256, 128
  clusters, 1024 extra sequences, 4 templates)."""
  config = data_config.get_config("initial_training")
  batch = _take(_iterator(dataset, config, batch_size=1), 1)[0]
  assert batch["msa_feat"].shape == (1, 4, 128, 256, 49)
  assert batch["extra_msa"].shape == (1, 4, 1024, 256)
  assert batch["template_all_atom_positions"].shape == (1, 4, 4, 256, 37, 3)
  assert batch["target_feat"].shape == (1, 4, 256, 22)


def test_same_seed_same_batches_and_resume_from_saved_state(dataset):
  """A restored iterator yields exactly the batches an uninterrupted one would."""
  uninterrupted = _iterator(dataset)
  batches = _take(uninterrupted, 2)
  state = json.loads(json.dumps(_iterator(dataset, state=None).get_state() | {"step": 1}))
  resumed = _iterator(dataset, state=state)
  assert resumed.step == 1
  _assert_batches_equal(_take(resumed, 1)[0], batches[1])
  again = _take(_iterator(dataset), 1)[0]
  _assert_batches_equal(again, batches[0])
  other_seed = _take(_iterator(dataset, seed=1), 1)[0]
  assert not np.array_equal(other_seed["msa_feat"], batches[0]["msa_feat"])
  with pytest.raises(ValueError, match="seed"):
    _iterator(dataset, seed=1, state=state)


def test_get_state_tracks_consumed_batches(dataset):
  iterator = _iterator(dataset)
  assert iterator.get_state()["step"] == 0
  _take(iterator, 2)
  state = iterator.get_state()
  assert state["step"] == 2 and len(json.dumps(state)) < 400


def test_hosts_get_disjoint_slots_of_the_same_global_batch(dataset):
  """Two hosts with batch 1 see the two halves of the one-host batch of 2, never the same
  record in a step."""
  single = _take(_iterator(dataset, batch_size=2), 2)
  hosts = [_take(_iterator(dataset, batch_size=1, process_index=h, process_count=2), 2)
           for h in range(2)]
  for step in range(2):
    for host in range(2):
      for key in ("msa_feat", "aatype", "all_atom_positions", "num_iter_recycling"):
        np.testing.assert_array_equal(hosts[host][step][key][0], single[step][key][host])
  sampler = input_pipeline.make_sampler(dataset, _config(), global_batch_size=2, seed=0)
  for step in range(200):
    records_of_step = sampler.plan(step).records
    assert records_of_step[0] != records_of_step[1]


@pytest.fixture(scope="module")
def dataset_with_bad_records(chains, tmp_path_factory):
  """3 good records and 4 bad ones that the record table believes are fine (as a builder index
  would): flipped payload bytes (CRC mismatch), not an Example, inconsistent shapes, a
  missing feature."""
  rng = np.random.default_rng(1)
  good = [pipeline_helpers.raw_example(name, sequence, positions, mask, num_msa=30,
                                       num_templates=1, rng=rng)
          for name, sequence, positions, mask in chains[:3]]
  wrong_shape = dict(good[0])
  wrong_shape["msa"] = np.zeros((30, good[0]["aatype"].shape[0] + 3), np.int32)
  missing = {key: value for key, value in good[1].items() if key != "all_atom_positions"}
  payloads = [tfrecord.encode_example(example) for example in good]
  payloads += [payloads[2], b"this is not a tf.train.Example",
               tfrecord.encode_example(wrong_shape), tfrecord.encode_example(missing, schema=None)]
  directory = tmp_path_factory.mktemp("bad_records")
  path = directory / "train-00000-of-00001.tfrecord"
  tfrecord.write_tfrecord(str(path), payloads)
  file_index, offsets = records.record_positions([str(path)])
  data = bytearray(path.read_bytes())
  flip_at = int(offsets[3]) + 5000
  data[flip_at:flip_at + 8] = b"\xff" * 8
  path.write_bytes(bytes(data))
  ids = ["good0", "good1", "good2", "crc", "not_example", "wrong_shape", "missing"]
  metadata = {"id": ids, "num_res": [100] * 7, "cluster_id": [""] * 7}
  return records.RecordTable.from_metadata([str(path)], file_index, offsets, metadata)


def test_bad_records_are_skipped_and_counted(dataset_with_bad_records):
  iterator = _iterator(dataset_with_bad_records, batch_size=2)
  batches = _take(iterator, 6)
  assert iterator.bad_records >= 4
  assert set(iterator.counter.ids) == {"crc", "not_example", "wrong_shape", "missing"}
  for batch in batches:
    assert np.all(batch["seq_length"] > 0) and np.isfinite(batch["msa_feat"]).all()


def test_truncated_shard_is_reported(tmp_path):
  path = tmp_path / "broken.tfrecord"
  tfrecord.write_tfrecord(str(path), [b"x" * 100, b"y" * 100])
  path.write_bytes(path.read_bytes()[:-10])
  with pytest.raises(records.CorruptRecordError, match="broken.tfrecord"):
    records.scan_record_offsets(str(path))


def test_batch_at_af2_tiny_shapes_feeds_the_losses(dataset):
  """At af2_tiny's sizes (40 residues, 8 clusters, 16 extra, 2 templates, R = 2) every batch
  array has exactly the reference batch's shape and dtype, and the final-iteration slice of
  each example gives a finite AlphaFold loss against af2_tiny's model outputs."""
  from tests.losses import af2_tiny  # pylint: disable=import-outside-toplevel
  config = data_config.get_config()
  config.common.num_recycle = 1
  config.train.crop_size = 40
  config.train.max_msa_clusters = 8
  config.common.max_extra_msa = 16
  config.train.max_templates = 2
  batch = _take(_iterator(dataset, config, batch_size=2, seed=3), 1)[0]
  reference = af2_tiny.raw_batch()
  for key, value in reference.items():
    assert batch[key].shape[1:] == value.shape and batch[key].dtype == value.dtype, key
  loss_fn = af2_tiny.jitted_loss()
  outputs = af2_tiny.model_outputs()
  totals = []
  for example in range(2):
    final = int(batch["num_iter_recycling"][example, 0])
    features = {key: value[example, final] for key, value in batch.items()}
    total, aux = loss_fn(features, outputs, features["is_distillation"])
    assert np.isfinite(float(total))
    for name in ("distogram/loss", "masked_msa/loss", "structure_module/fape",
                 "structure_module/chi_loss", "predicted_lddt/loss"):
      assert np.isfinite(float(aux[name])), name
    totals.append(float(total))
  assert totals[0] != totals[1]
