"""End to end on real data: build_dataset on real chains (2q2k A/B with their real MSAs, two
PDB chains without), then the input pipeline, then AlphaFold's loss on the batch."""

import numpy as np
import pytest

from af2flax.data import build_dataset
from af2flax.data import config as data_config
from af2flax.data import input_pipeline
from tests.conftest import SHARED_DATA

OPENFOLD = SHARED_DATA / "openfold_testdata"


@pytest.fixture(scope="module")
def built(shared_dir, tmp_path_factory):
  root = tmp_path_factory.mktemp("builder_inputs")
  structures, alignments = root / "structures", root / "alignments"
  structures.mkdir()
  alignments.mkdir()
  (structures / "2q2k.cif").symlink_to(OPENFOLD / "mmcifs" / "2q2k.cif")
  for name in ("1ahsA.pdb.gz", "2cviA.pdb.gz"):
    (structures / name).symlink_to(SHARED_DATA / "pdb_chains" / name)
  for chain in ("2q2k_A", "2q2k_B"):
    (alignments / chain).symlink_to(OPENFOLD / "alignments" / chain)
  clusters = root / "clusters.txt"
  clusters.write_text("2q2k_A 2q2k_B\n1ahs_A\n")
  out = tmp_path_factory.mktemp("built")
  summary = build_dataset.build(build_dataset.BuildOptions(
      structures=str(structures), alignments=str(alignments), out=str(out), workers=1, shards=2,
      clusters=str(clusters), progress=False))
  assert summary.num_examples == 4, summary
  return out


def _af2_tiny_data_config():
  """The data config whose batches have af2_tiny's shapes (crop 40, 8 + 16 MSA rows, 2
  templates, 1 recycle)."""
  config = data_config.get_config()
  config.common.num_recycle = 1
  config.train.crop_size = 40
  config.train.max_msa_clusters = 8
  config.common.max_extra_msa = 16
  config.train.max_templates = 2
  return config


def test_table_from_the_builder_index(built):
  table = input_pipeline.load_table(str(built))
  assert sorted(table.ids) == ["1ahs_A", "2cvi_A", "2q2k_A", "2q2k_B"]
  clusters = dict(zip(table.ids, table.cluster_ids))
  assert clusters["2q2k_A"] == clusters["2q2k_B"] != clusters["1ahs_A"] and clusters["2cvi_A"] == ""
  assert not table.is_distillation.any() and np.all(table.num_res > 40)


def test_real_records_give_af2_tiny_batches_and_a_finite_loss(built):
  from tests.losses import af2_tiny  # pylint: disable=import-outside-toplevel
  config = _af2_tiny_data_config()
  iterator = input_pipeline.make_iterator(str(built), config, batch_size=2, seed=0,
                                          process_index=0, process_count=1)
  batches = [next(iterator) for _ in range(3)]
  iterator.close()
  reference = af2_tiny.raw_batch()
  loss_fn = af2_tiny.jitted_loss()
  outputs = af2_tiny.model_outputs()
  deep_msa_seen = False
  for batch in batches:
    for key, value in reference.items():
      assert batch[key].shape[1:] == value.shape and batch[key].dtype == value.dtype, key
    for example in range(2):
      final = int(batch["num_iter_recycling"][example, 0])
      features = {key: value[example, final] for key, value in batch.items()}
      total, _ = loss_fn(features, outputs, features["is_distillation"])
      assert np.isfinite(float(total))
      deep_msa_seen |= bool(features["msa_row_mask"].sum() > 1)
  assert deep_msa_seen   # 2q2k's real MSAs (20 sequences) give cluster centres beyond the query
  assert iterator.bad_records == 0


@pytest.mark.parametrize("backend", ["tf", "numpy"])
def test_create_input_for_the_train_loop(built, backend):
  """The train loop's entry point: held-out validation records, padded validation batches,
  a checkpointable train iterator over the rest; with either backend."""
  import ml_collections  # pylint: disable=import-outside-toplevel
  if backend == "tf":
    pytest.importorskip("tensorflow")
  data = data_config.get_config()
  data.backend = backend
  data.common.num_recycle = 1
  data.train.crop_size = 32
  data.train.max_msa_clusters = 4
  data.common.max_extra_msa = 8
  config = ml_collections.ConfigDict({
      "seed": 0, "data": data,
      "dataset": {"train_dirs": str(built), "eval_dirs": "", "build_structures": "",
                  "num_eval_examples": 1, "eval_batch_size": 4}})
  inputs = [input_pipeline.create_input(config, workdir=str(built), local_batch_size=1,
                                        process_index=index, process_count=2)
            for index in range(2)]
  assert len(inputs[0].train.table) == 3
  eval_batches = [list(process.eval_batches()) for process in inputs]
  assert [len(batches) for batches in eval_batches] == [1, 1]
  np.testing.assert_array_equal(eval_batches[0][0]["eval_mask"], [1, 0])
  np.testing.assert_array_equal(eval_batches[1][0]["eval_mask"], [0, 0])
  assert eval_batches[0][0]["msa_feat"].shape == (2, 2, 4, 32, 49)
  again = list(inputs[0].eval_batches())[0]
  np.testing.assert_array_equal(again["msa_feat"], eval_batches[0][0]["msa_feat"])
  np.testing.assert_array_equal(again["num_iter_recycling"], np.ones((2, 2)))
  batch = next(inputs[0].train)
  assert batch["aatype"].shape == (1, 2, 32) and inputs[0].train.get_state()["step"] == 1
  assert inputs[0].train.backend == backend
  for process in inputs:
    process.train.close()
  with pytest.raises(ValueError, match="training config"):
    input_pipeline.create_input(data, workdir=str(built), local_batch_size=1, process_index=0,
                                process_count=1)


def test_a_real_batch_trains_the_tiny_model(built):
  """One pipeline batch from real records through our model (af2_tiny's network and
  DeepMind's parameters), every loss and the gradient: finite, and the structure loss
  reacts to the real ground truth."""
  import jax  # pylint: disable=import-outside-toplevel
  from af2flax.tools import parity  # pylint: disable=import-outside-toplevel
  from tests.conftest import REFERENCE  # pylint: disable=import-outside-toplevel
  params, reference_batch, _, model_config = parity.load_reference(REFERENCE / "af2_tiny")
  # Without recycling iterations: the loop (no gradient through it) is most of the compile
  # of this test, and the pipeline's recycling features are checked by the pipeline's tests.
  model_config["num_recycle"] = 0
  config = _af2_tiny_data_config()
  iterator = input_pipeline.make_iterator(str(built), config, batch_size=1, seed=3,
                                          process_index=0, process_count=1)
  batch = next(iterator)
  iterator.close()
  example = {key: value[0] for key, value in batch.items() if key in reference_batch}
  # One program for the loss and the gradient (parity.run_model compiles two: its gradient
  # takes the batch as a constant, which only the reference comparison needs).
  our_params, loss_fn = parity.imported_loss_fn(params, example, model_config)
  (total, (_, aux)), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(our_params,
                                                                                 example)
  assert np.isfinite(float(total))
  for key in ("structure_module/loss", "distogram/loss", "masked_msa/loss"):
    assert np.isfinite(np.asarray(aux[key])).all(), key
  assert float(aux["structure_module/loss"]) > 0.0
  norms = [float(np.linalg.norm(g)) for g in jax.tree.leaves(grads)]
  assert all(np.isfinite(norms)) and sum(norms) > 0.0
