"""Head losses (Suppl. 1.9.6-1.9.10): targets against independent numpy, filters, empty masks."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from af2flax.losses import heads
from tests.losses import af2_tiny


def _log_softmax(x):
  x = x.astype(np.float64)
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


def test_distogram_bins_and_loss_match_numpy():
  rng = np.random.default_rng(0)
  positions = (rng.normal(size=(12, 3)) * 8).astype(np.float32)
  mask = np.ones(12, np.float32)
  mask[[2, 7]] = 0
  logits = rng.normal(size=(12, 12, 64)).astype(np.float32)
  edges = np.linspace(2.3125, 21.6875, 63).astype(np.float32)
  out = jax.jit(heads.distogram_loss, static_argnums=4)(logits, edges, positions, mask, 64)
  dist = np.linalg.norm(positions[:, None] - positions[None], axis=-1)
  bins = np.digitize(dist, edges)  # Number of edges strictly below the distance.
  ce = -np.take_along_axis(_log_softmax(logits), bins[..., None], -1)[..., 0]
  pair = mask[:, None] * mask[None]
  assert float(out["loss"]) == pytest.approx((ce * pair).sum() / pair.sum(), rel=1e-5)
  np.testing.assert_allclose(np.asarray(out["true_dist"]), dist, atol=2e-3)


def test_masked_msa_loss_counts_only_masked_entries():
  rng = np.random.default_rng(1)
  logits = rng.normal(size=(4, 10, 23)).astype(np.float32)
  true_msa = rng.integers(0, 22, size=(4, 10)).astype(np.int32)
  bert = (rng.random((4, 10)) < 0.3).astype(np.float32)
  fn = jax.jit(heads.masked_msa_loss, static_argnums=3)
  ce = -np.take_along_axis(_log_softmax(logits), true_msa[..., None], -1)[..., 0]
  assert float(fn(logits, true_msa, bert, 23)["loss"]) == pytest.approx(
      (ce * bert).sum() / bert.sum(), rel=1e-5)
  assert float(fn(logits, true_msa, bert * 0, 23)["loss"]) == 0.0


def test_resolution_filter():
  config = ml_collections.ConfigDict({"filter_by_resolution": True, "min_resolution": 0.1,
                                      "max_resolution": 3.0})
  weights = [float(heads.resolution_weight(r, config)) for r in (0.0, 0.1, 1.5, 3.0, 3.5)]
  assert weights == [0.0, 1.0, 1.0, 1.0, 0.0]
  config.filter_by_resolution = False
  assert float(heads.resolution_weight(0.0, config)) == 1.0


def test_plddt_target_bin_of_a_perfect_prediction_is_the_last():
  batch = af2_tiny.final_iteration_batch()
  config = af2_tiny.heads_config().predicted_lddt
  logits = np.zeros((40, 50), np.float32)
  logits[:, -1] = 20.0  # Confident in lDDT bin [0.98, 1].
  fn = jax.jit(lambda *a: heads.predicted_lddt_loss(*a, config=config))
  perfect = fn(logits, batch["all_atom_positions"], batch["all_atom_positions"],
               batch["all_atom_mask"], 1.5)["loss"]
  assert float(perfect) < 1e-6
  filtered = fn(logits, batch["all_atom_positions"] * 2.0, batch["all_atom_positions"],
                batch["all_atom_mask"], 0.0)["loss"]
  assert float(filtered) == 0.0


def test_experimentally_resolved_matches_numpy():
  rng = np.random.default_rng(2)
  config = ml_collections.ConfigDict({"filter_by_resolution": True, "min_resolution": 0.1,
                                      "max_resolution": 3.0})
  logits = rng.normal(size=(6, 37)).astype(np.float32) * 3
  exists = (rng.random((6, 37)) < 0.4).astype(np.float32)
  resolved = exists * (rng.random((6, 37)) < 0.8)
  value = heads.experimentally_resolved_loss(logits, exists, resolved, 2.0, config)["loss"]
  p = 1.0 / (1.0 + np.exp(-logits.astype(np.float64)))
  xent = -(resolved * np.log(p) + (1 - resolved) * np.log(1 - p))
  assert float(value) == pytest.approx((xent * exists).sum() / exists.sum(), rel=1e-5)


def test_confidence_losses_with_empty_masks_have_finite_gradients():
  """Padding-only inputs: all masks 0, zero coordinates and zero affines."""
  n = 8
  config = af2_tiny.heads_config()
  zeros3 = jnp.zeros((n, 37, 3))
  zero_mask = jnp.zeros((n, 37))
  breaks = jnp.linspace(0.0, 31.0, 63)

  def total(params):
    plddt, resolved, pae, dist = params
    return (heads.predicted_lddt_loss(plddt, zeros3, zeros3, zero_mask, 1.5,
                                      config.predicted_lddt)["loss"]
            + heads.experimentally_resolved_loss(resolved, zero_mask, zero_mask, 1.5,
                                                 config.experimentally_resolved)["loss"]
            + heads.predicted_aligned_error_loss(pae, breaks, jnp.zeros((n, 7)),
                                                 jnp.zeros((n, 7)), jnp.zeros(n), 1.5,
                                                 config.predicted_aligned_error)["loss"]
            + heads.distogram_loss(dist, breaks, jnp.zeros((n, 3)), jnp.zeros(n), 64)["loss"])

  params = (jnp.ones((n, 50)), jnp.ones((n, 37)), jnp.ones((n, n, 64)), jnp.ones((n, n, 64)))
  value, grads = jax.jit(jax.value_and_grad(total))(params)
  assert float(value) == 0.0
  assert all(np.isfinite(np.asarray(g)).all() for g in grads)
