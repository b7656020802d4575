"""The training state: everything a step reads and writes, and everything a checkpoint holds.

A pure pytree (`flax.struct.dataclass`) with no functions inside, so that it can be sharded
by rules over its paths (`sharding.py`), donated to the jitted step and saved/restored by Orbax
as one tree. The optimizer itself lives beside the state (`optimizer.py`), not inside it.
"""

from __future__ import annotations

from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax

PyTree = Any


@flax.struct.dataclass
class TrainState:
  """Parameters, optimizer state, EMA parameters, counters and the base RNG key.

  Attributes:
    step: number of batches consumed so far (int32 []); skipped (non-finite) steps count too,
      so that `step` always matches the input iterator's position.
    params: model parameters (float32), the tree of `model.init(...)['params']`.
    opt_state: optax state of `optimizer.make_optimizer`; it only advances on applied updates,
      so the learning-rate schedule counts successful updates.
    ema_params: exponential moving average of `params` (Suppl. 1.11.7, decay 0.999), used for
      evaluation and export.
    rng: base PRNG key (uint32 [2]); step `s` draws its randomness from `fold_in(rng, s)`, so a
      restored run repeats an uninterrupted one.
    skipped_steps: total steps whose update was skipped because the loss or a gradient was
      not finite (int32 []).
    consecutive_skips: skipped steps since the last applied update (int32 []).
  """

  step: jax.Array
  params: PyTree
  opt_state: optax.OptState
  ema_params: PyTree
  rng: jax.Array
  skipped_steps: jax.Array
  consecutive_skips: jax.Array


def create_train_state(params: PyTree, optimizer: optax.GradientTransformation,
                       rng: jax.Array) -> TrainState:
  """A fresh state at step 0 whose EMA starts at `params`."""
  return TrainState(
      step=jnp.zeros((), jnp.int32),
      params=params,
      opt_state=optimizer.init(params),
      ema_params=jax.tree.map(jnp.array, params),
      rng=jnp.asarray(rng, jnp.uint32),
      skipped_steps=jnp.zeros((), jnp.int32),
      consecutive_skips=jnp.zeros((), jnp.int32),
  )


def ema_update(ema_params: PyTree, params: PyTree, decay: float) -> PyTree:
  """One step of the exponential moving average: ema <- decay * ema + (1 - decay) * params."""
  return jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p.astype(e.dtype),
                      ema_params, params)
