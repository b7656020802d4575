"""The train step: per-example clipping, averaging, Adam, EMA, skip of non-finite updates."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from af2flax.train import optimizer as optimizer_lib
from af2flax.train import sharding as sharding_lib
from af2flax.train import state as state_lib
from af2flax.train import step as step_lib
from tests.train import mlp


@functools.lru_cache(maxsize=None)
def _setup(vmap_batch_size=1, flat_update=False):
  """One compiled step per setting, shared by the tests (compiling dominates their time)."""
  config = mlp.train_config(vmap_batch_size=vmap_batch_size)
  config.optimizer.flat_update = flat_update
  model = mlp.MLP()
  tx = optimizer_lib.make_optimizer(config.optimizer)
  state = state_lib.create_train_state(mlp.init_params(model), tx, jax.random.PRNGKey(1))
  mesh = sharding_lib.make_mesh({"data": 1, "fsdp": 1})
  step = jax.jit(step_lib.make_train_step(mlp.objective(model), tx, config, mesh))
  return config, model, tx, state, step


def test_per_example_clipping_matches_manual_computation():
  """Each example's gradient is clipped to norm 0.1 before averaging (Suppl. 1.11.3)."""
  config, model, tx, state, step = _setup()
  batch = mlp.make_batch(0, 4)
  new_state, metrics = step(state, batch)

  objective = mlp.objective(model)
  rngs = jax.random.split(jax.random.fold_in(state.rng, 0), 4)
  grad_fn = jax.jit(jax.grad(lambda p, ex, r: objective(p, ex, r)[0]))
  raw = [grad_fn(state.params, jax.tree.map(lambda x: x[i], batch), rngs[i]) for i in range(4)]
  norms = [float(optax.global_norm(g)) for g in raw]
  assert min(norms) > 0.1, "test needs gradients above the clip norm"
  clipped = [jax.tree.map(lambda g, n=n: g * min(1.0, 0.1 / n), g) for g, n in zip(raw, norms)]
  mean_grad = jax.tree.map(lambda *g: sum(g) / 4, *clipped)
  # Averaging clipped gradients differs from clipping the average.
  unclipped_mean = jax.tree.map(lambda *g: sum(g) / 4, *raw)
  assert float(optax.global_norm(unclipped_mean)) > 0.1 + 1e-3

  @jax.jit
  def apply(grads, opt_state, params):
    return optax.apply_updates(params, tx.update(grads, opt_state, params)[0])
  expected = apply(mean_grad, state.opt_state, state.params)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
               new_state.params, expected)
  np.testing.assert_allclose(metrics["grad_norm"], np.mean(norms), rtol=1e-5)
  np.testing.assert_allclose(metrics["update_grad_norm"], optax.global_norm(mean_grad),
                             rtol=1e-5)
  assert float(metrics["clipped_fraction"]) == 1.0
  assert "per_point" not in metrics  # non-scalar aux entries are not step metrics
  assert int(new_state.step) == 1


def test_ema_follows_params_with_decay():
  config, _, _, state, step = _setup()
  new_state, _ = step(state, mlp.make_batch(0, 4))
  expected = jax.tree.map(lambda e, p: 0.999 * e + 0.001 * p, state.ema_params,
                          new_state.params)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6),
               new_state.ema_params, expected)
  # EMA differs from the new params (it lags them) but moved from the old ones.
  diff = jax.tree.map(lambda a, b: float(jnp.abs(a - b).max()), new_state.ema_params,
                      new_state.params)
  assert max(jax.tree.leaves(diff)) > 0


def test_vmapped_examples_equal_one_at_a_time():
  _, _, _, state, step = _setup()
  _, _, _, _, step_accum = _setup(4)
  batch = mlp.make_batch(3, 8)
  a, metrics_a = step(state, batch)
  b, metrics_b = step_accum(state, batch)
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-7),
               a.params, b.params)
  np.testing.assert_allclose(metrics_a["loss"], metrics_b["loss"], rtol=1e-6)


@pytest.mark.parametrize("poison", ["x", "y"])
def test_non_finite_step_is_skipped_and_counted(poison):
  _, _, _, state, step = _setup()
  good = mlp.make_batch(0, 4)
  state, _ = step(state, good)
  bad = dict(good)
  bad[poison] = bad[poison].copy()
  bad[poison][2, 0, ...] = np.nan
  skipped_state, metrics = step(state, bad)
  assert float(metrics["skipped"]) == 1.0
  assert int(skipped_state.skipped_steps) == 1 and int(skipped_state.consecutive_skips) == 1
  assert int(skipped_state.step) == 2
  for name in ("params", "opt_state", "ema_params"):
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b),
                 getattr(skipped_state, name), getattr(state, name))
  skipped_again, _ = step(skipped_state, bad)
  assert int(skipped_again.consecutive_skips) == 2
  recovered, metrics = step(skipped_again, good)
  assert float(metrics["skipped"]) == 0.0
  assert int(recovered.consecutive_skips) == 0 and int(recovered.skipped_steps) == 2
  assert np.isfinite(float(metrics["loss"]))


def test_dropout_randomness_depends_on_step_and_example():
  _, _, _, state, step = _setup()
  batch = mlp.make_batch(0, 2)
  batch = jax.tree.map(lambda x: np.stack([x[0], x[0]]), batch)  # two identical examples
  _, metrics = step(state, batch)
  objective = jax.jit(mlp.objective(mlp.MLP()))
  rngs = jax.random.split(jax.random.fold_in(state.rng, 0), 2)
  example = jax.tree.map(lambda x: x[0], batch)
  losses = [float(objective(state.params, example, r)[0]) for r in rngs]
  assert losses[0] != losses[1]  # different dropout masks per example
  np.testing.assert_allclose(metrics["loss"], np.mean(losses), rtol=1e-6)


def test_learning_rate_schedule():
  config = mlp.train_config()
  config.optimizer.update(learning_rate=1e-3, warmup_steps=1000, decay_steps=50_000)
  schedule = optimizer_lib.learning_rate_schedule(config.optimizer)
  np.testing.assert_allclose(schedule(0), 1e-6, rtol=1e-5)
  np.testing.assert_allclose(schedule(499), 5e-4, rtol=1e-5)
  np.testing.assert_allclose(schedule(999), 1e-3, rtol=1e-6)
  np.testing.assert_allclose(schedule(49_999), 1e-3, rtol=1e-6)
  np.testing.assert_allclose(schedule(50_000), 0.95e-3, rtol=1e-6)
  config.optimizer.warmup_steps = 0
  np.testing.assert_allclose(optimizer_lib.learning_rate_schedule(config.optimizer)(0), 1e-3)


def test_step_reports_learning_rate_of_update():
  _, _, _, state, step = _setup()
  state, metrics = step(state, mlp.make_batch(0, 2))
  np.testing.assert_allclose(metrics["learning_rate"], 0.5e-2, rtol=1e-6)  # warm-up 1/2
  state, metrics = step(state, mlp.make_batch(1, 2))
  np.testing.assert_allclose(metrics["learning_rate"], 1e-2, rtol=1e-6)


def test_final_iteration_features_slices_recycle_axis():
  example = {"num_iter_recycling": jnp.array([2, 2, 2, 2]),
             "aatype": jnp.arange(12).reshape(4, 3)}
  final = step_lib.final_iteration_features(example)
  np.testing.assert_array_equal(final["aatype"], [6, 7, 8])
  assert int(final["num_iter_recycling"]) == 2


def test_flat_update_equals_update_per_array():
  """Adam, the EMA and the metrics on the concatenated parameters (`flat_update`) give the
  per-array update's values, and the state keeps its structure (the
  checkpoints' layout); a non-finite step is skipped the same way."""
  _, _, _, state, flat = _setup(flat_update=True)
  _, _, _, _, per_array = _setup()
  states = {"flat": state, "per_array": state}
  steps = {"flat": flat, "per_array": per_array}
  for i in range(3):
    batch = mlp.make_batch(i, 4)
    if i == 1:
      batch["y"][0, 0] = np.nan
    results = {name: steps[name](states[name], batch) for name in steps}
    states = {name: result[0] for name, result in results.items()}
    for key, value in results["per_array"][1].items():
      np.testing.assert_allclose(results["flat"][1][key], value, rtol=1e-6, err_msg=key)
  assert int(states["flat"].skipped_steps) == 1
  # Adam's square root: once for the concatenation against once per array (4 arrays); the
  # per-example and metric norms add the same count to both.
  sqrts = {name: steps[name].lower(state, mlp.make_batch(0, 4)).as_text().count("sqrt")
           for name in steps}
  assert sqrts["per_array"] - sqrts["flat"] == 3, sqrts
  flat_state, per_array_state = states["flat"], states["per_array"]
  assert jax.tree.structure(flat_state) == jax.tree.structure(per_array_state)
  for a, b in zip(jax.tree.leaves(flat_state), jax.tree.leaves(per_array_state)):
    assert a.shape == b.shape and a.dtype == b.dtype
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-8)


def test_flat_view_round_trip_and_parameter_shaped_subtrees():
  params = {"a": {"w": jnp.arange(6.0).reshape(2, 3), "b": jnp.ones(3, jnp.bfloat16)},
            "c": jnp.full((1,), 7.0)}
  view = step_lib.FlatView(params)
  vector = view.ravel(params)
  assert vector.shape == (10,) and vector.dtype == jnp.float32
  back = view.unravel(vector)
  assert jax.tree.structure(back) == jax.tree.structure(params)
  for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(params)):
    assert a.dtype == b.dtype
    np.testing.assert_array_equal(a, b)
  # Adam's state: the moments are parameter-shaped, the count is not.
  opt_state = optax.adam(1e-3).init(params)
  flat = view.ravel_within(opt_state)
  assert [x.shape for x in jax.tree.leaves(flat)] == [(), (10,), (10,)]
  restored = view.unravel_within(flat, opt_state)
  assert jax.tree.structure(restored) == jax.tree.structure(opt_state)


def test_flat_update_is_off_for_parameters_split_over_devices():
  config = mlp.train_config()
  P = jax.sharding.PartitionSpec
  assert not step_lib.flat_update(config, P())  # off unless asked for
  config.optimizer.flat_update = True
  assert step_lib.flat_update(config, {"w": P(), "b": P(None)})
  assert not step_lib.flat_update(config, {"w": P(None, "fsdp"), "b": P()})
