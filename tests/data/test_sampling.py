"""Example sampling (Suppl. 1.2.5, 1.3, 1.10): weights, source mixture, recycling draws."""

import numpy as np

from af2flax.data import config as data_config
from af2flax.data import sampling


def _chi_square(counts: np.ndarray, probabilities: np.ndarray) -> float:
  expected = counts.sum() * probabilities
  return float(np.sum((counts - expected) ** 2 / expected))


def test_chain_weight_formula():
  """w = 1/cluster_size * max(min(N, 512), 256) / 512."""
  weights = sampling.chain_sampling_weights(
      np.asarray([100, 300, 1000, 300, 300]), ["a", "b", "c", "b", None])
  np.testing.assert_allclose(weights, [0.5, 300 / 512 / 2, 1.0, 300 / 512 / 2, 300 / 512])
  unweighted = sampling.chain_sampling_weights(np.asarray([100, 1000]), ["a", "a"],
                                               cluster_weighting=False, length_weighting=False)
  np.testing.assert_array_equal(unweighted, [1, 1])


def _sampler(weights, is_distillation, batch=1, fraction=0.75, seed=0):
  return sampling.StepSampler(np.asarray(weights, float), np.asarray(is_distillation, bool),
                              fraction, batch, num_recycle=3, uniform_recycling=True, seed=seed)


def test_frequencies_follow_weights_and_sources_mix_at_the_configured_ratio():
  num_res = np.asarray([60, 256, 400, 512, 900, 120, 333, 700])
  clusters = ["a", "a", "b", "c", "c", "c", "d", "e"]
  is_distillation = np.asarray([0, 0, 0, 0, 1, 1, 1, 1], bool)
  config = data_config.get_config().sampling
  weights = sampling.weights_from_config(num_res, clusters, is_distillation, config)
  sampler = _sampler(weights, is_distillation)
  steps = 20000
  plans = [sampler.plan(step) for step in range(steps)]
  records = np.asarray([plan.records[0] for plan in plans])
  sources = np.asarray([plan.sources[0] for plan in plans])
  assert np.all(sources == is_distillation[records])
  fraction = sources.mean()
  assert abs(fraction - 0.75) < 4 * np.sqrt(0.75 * 0.25 / steps)
  for source in (0, 1):
    members = np.flatnonzero(is_distillation == source)
    counts = np.bincount(records[sources == source], minlength=8)[members]
    probabilities = weights[members] / weights[members].sum()
    assert _chi_square(counts, probabilities) < 16.3   # 3 dof, 99.9%
  recycles = np.bincount([plan.num_iter_recycling for plan in plans], minlength=4)
  assert len(recycles) == 4 and _chi_square(recycles, np.full(4, 0.25)) < 16.3


def test_no_record_twice_in_a_step_and_plans_are_stateless():
  weights = np.linspace(0.1, 1.0, 40)
  is_distillation = np.arange(40) % 2 == 1
  sampler = _sampler(weights, is_distillation, batch=16)
  for step in range(300):
    plan = sampler.plan(step)
    assert len(set(plan.records.tolist())) == 16
  again = _sampler(weights, is_distillation, batch=16)
  for step in (0, 7, 299):
    np.testing.assert_array_equal(sampler.plan(step).records, again.plan(step).records)
  other_seed = _sampler(weights, is_distillation, batch=16, seed=1)
  assert any(not np.array_equal(sampler.plan(s).records, other_seed.plan(s).records)
             for s in range(5))


def test_single_source_and_replacements():
  only_pdb = _sampler([1.0, 2.0, 0.0], [False, False, False], batch=2)
  plan = only_pdb.plan(0)
  assert np.all(plan.sources == 0) and set(plan.records.tolist()) == {0, 1}   # weight 0 never drawn
  mixed = _sampler([1.0, 1.0, 1.0, 1.0], [False, True, False, True])
  for attempt in range(20):
    assert mixed.replacement(3, 0, attempt, sampling.DISTILLATION) in (1, 3)
    assert mixed.replacement(3, 0, attempt, sampling.PDB) in (0, 2)


def test_fixed_recycling_without_uniform_draws():
  sampler = sampling.StepSampler(np.ones(3), np.zeros(3, bool), 0.75, 1, num_recycle=3,
                                 uniform_recycling=False, seed=0)
  assert {sampler.plan(step).num_iter_recycling for step in range(20)} == {3}


def test_example_seeds_depend_on_seed_step_and_slot():
  rng_a, tf_a = sampling.example_seeds(0, 5, 1)
  rng_b, tf_b = sampling.example_seeds(0, 5, 1)
  assert rng_a.random() == rng_b.random() and np.array_equal(tf_a, tf_b)
  seeds = {tuple(sampling.example_seeds(seed, step, slot)[1])
           for seed in (0, 1) for step in (0, 1) for slot in (0, 1)}
  assert len(seeds) == 8
