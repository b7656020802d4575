"""The recycling runner: equal to the full model, early stop, padding, confidences."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from af2flax.data import pipeline
from af2flax.inference import feature_processing as fp
from af2flax.inference import model_loading, runner
from af2flax.model.config import model_config
from af2flax.model.evoformer import outer_product_mean_chunked
from tests.inference import helpers


@pytest.fixture(scope="module")
def tiny(shared_dir):
  (model,) = model_loading.load_alphafold_models(str(helpers.TINY_PARAMS), ["model_1_ptm"],
                                                 str(helpers.TINY_CONFIG))
  return model


@pytest.fixture(scope="module")
def raw(tmp_path_factory):
  directory = helpers.write_a3m(tmp_path_factory.mktemp("aln") / "a", helpers.SEQ_A)
  features = dict(pipeline.make_sequence_features(helpers.SEQ_A, "a"))
  features.update(pipeline.make_msa_features_from_dir(helpers.SEQ_A, directory))
  return features


def make_batch(raw, config, num_res_multiple=helpers.PADDED_LENGTH):
  feature_config = fp.feature_config_from_model(
      config, {}, max_msa_clusters=4, max_extra_msa=4, num_res_multiple=num_res_multiple,
      pad_msa_rows=True)
  return fp.process_features(raw, feature_config, seed=0)


def test_runner_equals_the_full_model_with_recycling(tiny, raw):
  from af2flax.model.alphafold import AlphaFold
  config = runner.inference_config(tiny.config, num_recycle=1)
  batch = make_batch(raw, config)
  prediction = runner.ModelRunner("m", config, tiny.params).predict(batch, num_res=33)
  # jit: op by op, this test took 61 s instead of 36 s on the 2-core CI machine.
  outputs = jax.jit(lambda params, batch: AlphaFold(config).apply(
      {"params": params}, batch, deterministic=True))(tiny.params, batch)
  positions = np.asarray(outputs["structure_module"]["final_atom_positions"])[:33]
  np.testing.assert_allclose(prediction.final_atom_positions, positions, atol=1e-3)
  from af2flax.common import confidence
  plddt = np.asarray(confidence.compute_plddt(outputs["predicted_lddt"]["logits"]))[:33]
  np.testing.assert_allclose(prediction.plddt, plddt, atol=1e-3)
  assert prediction.num_recycles == 1 and len(prediction.recycle_changes) == 1


def test_early_stop_and_confidence_ranges(tiny, raw):
  config = runner.inference_config(tiny.config, num_recycle=3)
  batch = make_batch(raw, config)
  model = runner.ModelRunner("m", config, tiny.params)
  full = model.predict(batch, num_res=33)
  assert full.num_recycles == 3 and len(full.recycle_changes) == 3
  assert all(np.isfinite(c) and c >= 0 for c in full.recycle_changes)
  stopped = model.predict(batch, num_res=33, recycle_tolerance=1e9)
  assert stopped.num_recycles == 1 and len(stopped.recycle_changes) == 1
  # The first recycle's change does not depend on when recycling stops.
  assert stopped.recycle_changes[0] == pytest.approx(full.recycle_changes[0], rel=1e-4)
  assert full.final_atom_positions.shape == (33, 37, 3)
  assert np.all((full.plddt >= 0) & (full.plddt <= 100))
  assert full.predicted_aligned_error.shape == (33, 33)
  assert np.all(full.predicted_aligned_error >= 0)
  assert np.all(full.predicted_aligned_error <= full.max_predicted_aligned_error)
  assert full.max_predicted_aligned_error == pytest.approx(31.75)
  assert 0 < full.ptm < 1


def test_padding_does_not_change_the_prediction(tiny, raw):
  config = runner.inference_config(tiny.config, num_recycle=1)
  model = runner.ModelRunner("m", config, tiny.params)
  padded = model.predict(make_batch(raw, config), num_res=33)
  exact = model.predict(make_batch(raw, config, num_res_multiple=0))
  np.testing.assert_allclose(padded.plddt, exact.plddt, atol=1e-2)
  np.testing.assert_allclose(padded.final_atom_positions, exact.final_atom_positions, atol=1e-2)
  np.testing.assert_allclose(padded.predicted_aligned_error, exact.predicted_aligned_error,
                             atol=1e-2)
  assert padded.ptm == pytest.approx(exact.ptm, abs=1e-3)


@pytest.mark.slow
def test_chunking_does_not_change_the_prediction(tiny, raw):
  """--chunk_size (the model's low-memory mode) trades speed for memory, not accuracy."""
  plain = runner.inference_config(tiny.config, num_recycle=1)
  chunked = runner.inference_config(tiny.config, num_recycle=1, chunk_size=8)
  assert chunked.global_config.low_memory and chunked.global_config.subbatch_size == 8
  batch = make_batch(raw, plain)
  expected = runner.ModelRunner("m", plain, tiny.params).predict(batch, num_res=33)
  got = runner.ModelRunner("m", chunked, tiny.params).predict(batch, num_res=33)
  np.testing.assert_allclose(got.plddt, expected.plddt, atol=1e-3)
  np.testing.assert_allclose(got.final_atom_positions, expected.final_atom_positions, atol=1e-3)


def test_inference_keeps_alphafold_outer_product_mean_chunks():
  """Training runs the outer product mean in one piece (the presets); prediction keeps
  AlphaFold's chunks with or without --chunk_size (an [N, 32, 32, N] intermediate would cost
  8.6 GB at 2,048 residues)."""
  config = model_config("model_1_ptm")
  assert not outer_product_mean_chunked(config.global_config)
  for chunk_size in (None, 64):
    predicting = runner.inference_config(config, chunk_size=chunk_size)
    assert outer_product_mean_chunked(predicting.global_config)
    assert predicting.embeddings_and_evoformer.evoformer.outer_product_mean.chunk_size == (
        chunk_size or 128)
