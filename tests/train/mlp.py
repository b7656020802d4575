"""A small real Flax model and objective for testing the training machinery.

A two-layer MLP regression with dropout: it has what the machinery must handle (params tree,
dropout RNG, per-example gradients) and trains in milliseconds, so the tests of clipping, EMA,
sharding, checkpoints and multi-host runs do not need the AlphaFold network.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

FEATURES = 3
POINTS = 4  # rows per example


class MLP(nn.Module):
  hidden: int = 16
  dropout_rate: float = 0.1

  @nn.compact
  def __call__(self, x, deterministic: bool = True):
    x = nn.Dense(self.hidden)(x)
    x = nn.Dropout(self.dropout_rate, deterministic=deterministic)(x)
    x = jnp.tanh(x)
    return nn.Dense(1)(x)[..., 0]


def objective(model: MLP):
  def fn(params, example, rng):
    pred = model.apply({"params": params}, example["x"], deterministic=False,
                       rngs={"dropout": rng})
    mse = jnp.mean((pred - example["y"]) ** 2)
    return mse, {"mse": mse, "per_point": (pred - example["y"]) ** 2}
  return fn


def init_params(model: MLP, seed: int = 0):
  return model.init(jax.random.PRNGKey(seed), jnp.zeros((POINTS, FEATURES)))["params"]


def make_batch(seed: int, batch_size: int) -> dict[str, np.ndarray]:
  """Examples of a fixed linear target plus noise, deterministic in `seed`."""
  rs = np.random.RandomState(seed)
  x = rs.randn(batch_size, POINTS, FEATURES).astype(np.float32)
  y = (x @ np.array([1.0, -2.0, 0.5], np.float32) + 0.1 * rs.randn(batch_size, POINTS)).astype(
      np.float32)
  return {"x": x, "y": y}


def train_config(**overrides) -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict({
      "optimizer": {"learning_rate": 1e-2, "b1": 0.9, "b2": 0.999, "eps": 1e-6,
                    "warmup_steps": 2, "decay_steps": 1000, "decay_factor": 0.95,
                    "clip_norm": 0.1, "ema_decay": 0.999},
      "grad_accum_steps": 1,
  })
  config.update(overrides)
  return config
