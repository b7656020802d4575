"""AlphaFold's optimiser: Adam with linear warm-up and a one-off step decay.

Jumper et al. (2021) Suppl. 1.11.3: Adam (β1 0.9, β2 0.999, ε 1e-6), base learning rate
1e-3 (5e-4 when fine-tuning), linear warm-up over the first 0.128M samples (1000 steps at
batch 128), and the learning rate multiplied by 0.95 after 6.4M samples (50k steps).
Gradient clipping is per example (Suppl. 1.11.3) and happens in `step.py`, before the
examples' gradients are averaged; this module only sees the averaged gradient.
"""

from __future__ import annotations

import jax.numpy as jnp
import ml_collections
import optax


def learning_rate_schedule(config: ml_collections.ConfigDict) -> optax.Schedule:
  """The learning rate after `count` successful updates.

  `config` is the optimizer config (`learning_rate`, `warmup_steps`, `decay_steps`,
  `decay_factor`). Warm-up is linear from lr/warmup_steps at the first update to lr at update
  `warmup_steps` (so no update is wasted at learning rate 0); from update `decay_steps` on the
  rate is multiplied by `decay_factor` once (Suppl. 1.11.3).
  """
  base = float(config.learning_rate)
  warmup_steps = int(config.warmup_steps)
  decay_steps = int(config.decay_steps)
  decay_factor = float(config.decay_factor)

  def schedule(count):
    count = jnp.asarray(count, jnp.float32)
    if warmup_steps > 0:
      warmup = jnp.minimum(1.0, (count + 1.0) / warmup_steps)
    else:
      warmup = jnp.ones_like(count)
    decay = jnp.where(count >= decay_steps, decay_factor, 1.0)
    return base * warmup * decay

  return schedule


def make_optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
  """Adam with AlphaFold's schedule; the learning rate is logged from the optimizer state.

  `optax.inject_hyperparams` keeps the learning rate used by the last update in
  `opt_state.hyperparams['learning_rate']`, which the train step reports. An optional
  `global_clip_norm` clips the *averaged* gradient as well (off in AlphaFold's recipe).
  """
  schedule = learning_rate_schedule(config)

  def adam_chain(learning_rate):
    transforms = []
    if config.get("global_clip_norm"):
      transforms.append(optax.clip_by_global_norm(float(config.global_clip_norm)))
    transforms.append(optax.scale_by_adam(b1=float(config.b1), b2=float(config.b2),
                                          eps=float(config.eps)))
    if config.get("weight_decay"):
      transforms.append(optax.add_decayed_weights(float(config.weight_decay)))
    transforms.append(optax.scale_by_learning_rate(learning_rate))
    return optax.chain(*transforms)

  return optax.inject_hyperparams(adam_chain)(learning_rate=schedule)


def current_learning_rate(opt_state: optax.OptState) -> jnp.ndarray:
  """The learning rate of the last update (see `make_optimizer`)."""
  return opt_state.hyperparams["learning_rate"]
