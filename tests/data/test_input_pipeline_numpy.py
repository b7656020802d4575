"""The numpy backend of the training input on records of real PDB chains: the TF backend's
layout and per-example content, determinism for any worker count and type, exact resume,
hosts, bad records."""

import json
import logging

import numpy as np
import pytest

from af2flax.data import config as data_config
from af2flax.data import input_pipeline
from af2flax.data import training_example
from tests.conftest import REFERENCE
# Module-scoped fixtures of the TF backend's tests (real chains in 2 shards; bad records).
from tests.data.test_input_pipeline import chains, dataset, dataset_with_bad_records  # noqa: F401

MSA_KEYS = ("msa_feat", "true_msa", "bert_mask", "msa_mask", "msa_row_mask", "extra_msa",
            "extra_msa_mask", "extra_msa_row_mask", "extra_has_deletion", "extra_deletion_value")


def _config(workers=2, worker_type="thread"):
  config = data_config.get_config()
  config.backend = "numpy"
  config.train.crop_size = 48
  config.train.max_msa_clusters = 8
  config.common.max_extra_msa = 16
  config.pipeline.workers = workers
  config.pipeline.worker_type = worker_type
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


def test_layout_and_per_example_content_equal_the_tf_backend(dataset):  # noqa: F811
  """Same keys, dtypes and shapes as the TF backend (AlphaFold's af2_tiny batch + is_distillation);
  everything outside the MSA features (records, crop, templates, targets, recycling count) is
  identical, since the per-example step and its seeds are shared; the MSA features differ only
  in their random draws (same row counts, same query row)."""
  config = _config()
  numpy_batches = _take(_iterator(dataset, config), 2)
  assert _iterator(dataset, config).backend == "numpy"
  with np.load(REFERENCE / "af2_tiny" / "batch.npz", allow_pickle=False) as reference:
    assert set(numpy_batches[0]) == set(reference) | {"is_distillation"}
  for key, (shape, dtype) in training_example.batch_shapes(config).items():
    assert numpy_batches[0][key].shape == (2,) + shape, key
    assert numpy_batches[0][key].dtype == dtype, key
  pytest.importorskip("tensorflow")
  tf_batches = _take(_iterator(dataset, config, backend="tf"), 2)
  for ours, theirs in zip(numpy_batches, tf_batches):
    for key in ours:
      assert ours[key].shape == theirs[key].shape and ours[key].dtype == theirs[key].dtype, key
      if key not in MSA_KEYS:
        np.testing.assert_array_equal(ours[key], theirs[key], err_msg=key)
    for key in ("msa_mask", "msa_row_mask", "extra_msa_mask", "extra_msa_row_mask"):
      np.testing.assert_array_equal(ours[key], theirs[key], err_msg=key)
    np.testing.assert_array_equal(ours["true_msa"][:, :, 0], theirs["true_msa"][:, :, 0])
    assert not np.array_equal(ours["msa_feat"], theirs["msa_feat"])


def test_batch_is_consistent(dataset):  # noqa: F811
  batch = _take(_iterator(dataset), 1)[0]
  recycles = batch["num_iter_recycling"]
  assert np.all(recycles == recycles[0, 0]) and 0 <= recycles[0, 0] <= 3
  np.testing.assert_array_equal(batch["seq_mask"].sum(-1), batch["seq_length"])
  query = batch["true_msa"][:, :, 0]
  np.testing.assert_array_equal(query, batch["aatype"] * batch["seq_mask"].astype(np.int32))
  np.testing.assert_allclose(batch["msa_feat"][..., :23].sum(-1), batch["msa_mask"])
  np.testing.assert_allclose(batch["msa_feat"][..., 25:48].sum(-1), batch["msa_mask"], atol=1e-5)
  assert np.isfinite(batch["msa_feat"]).all() and batch["extra_msa"].max() <= 21


def test_same_batches_for_any_workers_and_exact_resume(dataset):  # noqa: F811
  """Examples are pure functions of (seed, step, slot): 1 thread, 3 threads and 2 processes
  give the same batches; a restored iterator repeats the uninterrupted batches."""
  uninterrupted = _take(_iterator(dataset, _config(workers=1)), 3)
  for workers, worker_type in ((3, "thread"), (2, "process")):
    batches = _take(_iterator(dataset, _config(workers, worker_type)), 3)
    for ours, theirs in zip(batches, uninterrupted):
      _assert_batches_equal(ours, theirs)
  iterator = _iterator(dataset)
  next(iterator)
  state = json.loads(json.dumps(iterator.get_state()))
  iterator.close()
  assert state["step"] == 1 and state["backend"] == "numpy" and len(json.dumps(state)) < 400
  resumed = _iterator(dataset, state=state)
  for ours, theirs in zip(_take(resumed, 2), uninterrupted[1:]):
    _assert_batches_equal(ours, theirs)
  other_seed = _take(_iterator(dataset, seed=1), 1)[0]
  assert not np.array_equal(other_seed["msa_feat"], uninterrupted[0]["msa_feat"])
  with pytest.raises(ValueError, match="seed"):
    _iterator(dataset, seed=1, state=state)


def test_state_of_the_other_backend_is_accepted_with_a_warning(dataset, caplog):  # noqa: F811
  state = _iterator(dataset).get_state() | {"step": 2, "backend": "tf"}
  with caplog.at_level(logging.WARNING):
    iterator = _iterator(dataset, state=state)
  assert iterator.step == 2 and "'tf' backend" in caplog.text


def test_hosts_get_disjoint_slots_of_the_same_global_batch(dataset):  # noqa: F811
  single = _take(_iterator(dataset, batch_size=2), 2)
  hosts = [_take(_iterator(dataset, batch_size=1, process_index=h, process_count=2), 2)
           for h in range(2)]
  for step in range(2):
    for host in range(2):
      for key in ("msa_feat", "aatype", "all_atom_positions", "num_iter_recycling"):
        np.testing.assert_array_equal(hosts[host][step][key][0], single[step][key][host])


@pytest.mark.parametrize("worker_type", ["thread", "process"])
def test_bad_records_are_skipped_and_counted(dataset_with_bad_records, worker_type):  # noqa: F811
  iterator = _iterator(dataset_with_bad_records, _config(2, worker_type), batch_size=2)
  batches = _take(iterator, 6)
  assert iterator.bad_records >= 4
  assert set(iterator.counter.ids) == {"crc", "not_example", "wrong_shape", "missing"}
  for batch in batches:
    assert np.all(batch["seq_length"] > 0) and np.isfinite(batch["msa_feat"]).all()


def test_backend_selection():
  config = data_config.get_config()
  assert config.backend == "auto"
  tf_importable = True
  try:
    import tensorflow  # noqa: F401  pylint: disable=import-outside-toplevel,unused-import
  except ImportError:
    tf_importable = False
  assert input_pipeline.resolve_backend(config) == ("tf" if tf_importable else "numpy")
  config.backend = "numpy"
  assert input_pipeline.resolve_backend(config) == "numpy"
  config.backend = "jax"
  with pytest.raises(ValueError, match="backend"):
    input_pipeline.resolve_backend(config)
