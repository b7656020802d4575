"""The loop's training/validation split and its training-set evaluation subset."""

import numpy as np
import pytest

from af2flax.data import records
from af2flax.train import input as input_lib


def _table(n):
  return records.RecordTable(
      paths=("a.tfrecord",), file_index=np.zeros(n, np.int64),
      offsets=np.arange(n, dtype=np.int64) * 100, ids=tuple(f"chain{i}_A" for i in range(n)),
      num_res=np.arange(n) + 50, cluster_ids=("",) * n, is_distillation=np.zeros(n, bool))


def test_validation_split_is_disjoint_stable_and_complete():
  table = _table(20)
  train, val = input_lib.split_validation(table, 5)
  assert len(train) == 15 and len(val) == 5
  assert set(train.ids).isdisjoint(val.ids) and set(train.ids) | set(val.ids) == set(table.ids)
  # Chosen by id, not position: reversing the table holds out the same chains.
  reversed_table = input_lib._subset(table, np.arange(20)[::-1])  # pylint: disable=protected-access
  assert set(input_lib.split_validation(reversed_table, 5)[1].ids) == set(val.ids)
  with pytest.raises(ValueError, match="leaves no training example"):
    input_lib.split_validation(table, 20)


def test_training_subset_for_train_eval():
  train, _ = input_lib.split_validation(_table(20), 5)
  assert input_lib.training_subset(train, -1) is train
  assert input_lib.training_subset(train, 100) is train
  subset = input_lib.training_subset(train, 4)
  assert len(subset) == 4 and set(subset.ids) <= set(train.ids)
  index = {chain: i for i, chain in enumerate(train.ids)}
  for i, chain in enumerate(subset.ids):  # offsets and lengths travel with their ids
    assert subset.offsets[i] == train.offsets[index[chain]]
    assert subset.num_res[i] == train.num_res[index[chain]]
