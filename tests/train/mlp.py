"""A small real Flax model and objective for testing the training machinery.

A two-layer MLP regression with dropout: it has what the machinery must handle (params tree,
dropout RNG, per-example gradients) and trains in milliseconds, so the tests of clipping, EMA,
sharding, checkpoints and multi-host runs do not need the AlphaFold network.
"""

from __future__ import annotations

import flax.linen as nn
import jax
from jax.ad_checkpoint import checkpoint_name
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


def staged_objective(model: MLP, offload: bool = False):
  """The MLP's network as two stages (`step.StagedObjective`, nothing to recycle): the hidden
  layer and the output layer's product, then its bias and the loss. The first stage's
  backward pass reads the output kernel again (a parameter, not a residual to copy).
  `offload`: two more layers, scanned and checkpointed, whose inputs the checkpoint keeps in
  the host's memory, as `remat_offload` does with block inputs."""
  from af2flax.train import step as step_lib  # pylint: disable=g-import-not-at-top
  policy = jax.checkpoint_policies.save_and_offload_only_these_names(
      names_which_can_be_saved=[], names_which_can_be_offloaded=["layer_input"],
      offload_src="device", offload_dst="pinned_host")

  def layer(h, bias):
    return jnp.tanh(checkpoint_name(h, "layer_input") + bias), None

  def hidden(params, example, prev, rng):
    del prev
    h = example["x"] @ params["Dense_0"]["kernel"] + params["Dense_0"]["bias"]
    h = jnp.tanh(nn.Dropout(model.dropout_rate, deterministic=False).apply(
        {}, h, rngs={"dropout": rng}))
    if offload:
      bias = params["Dense_0"]["bias"]
      h, _ = jax.lax.scan(jax.checkpoint(layer, policy=policy), h, jnp.stack([bias, -bias]))
    return h @ params["Dense_1"]["kernel"]

  def output(params, example, z, rng):
    del rng
    pred = (z + params["Dense_1"]["bias"])[..., 0]
    mse = jnp.mean((pred - example["y"]) ** 2)
    return mse, {"mse": mse, "per_point": (pred - example["y"]) ** 2}

  return step_lib.StagedObjective(lambda params, example, rng: {},
                                  (("hidden", hidden), ("output", output)))


def recycling_objective(model: MLP):
  """`staged_objective` with recycling (`step.RecycleStages`): each example runs one or two
  no-gradient iterations (two where its inputs sum above 0), each in two parts, the hidden
  layer with dropout, then the output that the next iteration adds to its hidden layer; the
  final iteration reads the last one's output too."""
  from af2flax.train import step as step_lib  # pylint: disable=g-import-not-at-top

  def hidden_layer(params, example, prev, rng):
    h = (example["x"] @ params["Dense_0"]["kernel"] + params["Dense_0"]["bias"]
         + prev["out"][:, None])
    return jnp.tanh(nn.Dropout(model.dropout_rate, deterministic=False).apply(
        {}, h, rngs={"dropout": rng}))

  def first(params, example, prev, carry, rng, iteration):
    del prev, iteration  # the first part's carry is prev
    return {"h": hidden_layer(params, example, carry, rng)}

  def second(params, example, prev, carry, rng, iteration):
    del prev, rng
    out = (carry["h"] @ params["Dense_1"]["kernel"])[..., 0] + params["Dense_1"]["bias"][0]
    return {"out": jax.lax.stop_gradient(out * (1.0 + iteration))}

  parts = step_lib.RecycleStages(
      initial=lambda example: {"out": jnp.zeros(example["x"].shape[:1])},
      count=lambda example: jnp.where(example["x"].sum() > 0, 2, 1), maximum=2,
      stages=(("first", first), ("second", second)))

  def hidden(params, example, prev, rng):
    return hidden_layer(params, example, prev, rng) @ params["Dense_1"]["kernel"]

  def output(params, example, z, rng):
    del rng
    pred = (z + params["Dense_1"]["bias"])[..., 0]
    mse = jnp.mean((pred - example["y"]) ** 2)
    return mse, {"mse": mse, "per_point": (pred - example["y"]) ** 2}

  return step_lib.StagedObjective(parts.run, (("hidden", hidden), ("output", output)), parts)


def recycling_through_forward_objective(model: MLP):
  """`recycling_objective`'s kind of recycling that the split step can also run through the
  final iteration's forward programs (`RecycleStages.next_prev`): the first stage takes
  `iteration=` (iteration i's inputs, scaled by 1 + i; the final iteration's scale is
  1 + its count) and returns the output that `next_prev` recycles."""
  from af2flax.train import step as step_lib  # pylint: disable=g-import-not-at-top

  count = lambda example: jnp.where(example["x"].sum() > 0, 2, 1)

  def hidden(params, example, prev, rng, iteration=None):
    scale = 1.0 + (count(example) if iteration is None else iteration)
    h = (scale * example["x"] @ params["Dense_0"]["kernel"] + params["Dense_0"]["bias"]
         + prev["out"][:, None])
    h = jnp.tanh(nn.Dropout(model.dropout_rate, deterministic=False).apply(
        {}, h, rngs={"dropout": rng}))
    return (h @ params["Dense_1"]["kernel"])[..., 0] + params["Dense_1"]["bias"][0]

  def first(params, example, prev, carry, rng, iteration):
    del prev
    return {"pred": hidden(params, example, carry, rng, iteration)}

  def second(params, example, prev, carry, rng, iteration):
    del params, example, prev, rng, iteration
    return {"out": jax.lax.stop_gradient(carry["pred"])}

  parts = step_lib.RecycleStages(
      initial=lambda example: {"out": jnp.zeros(example["x"].shape[:1])},
      count=count, maximum=2, stages=(("first", first), ("second", second)),
      next_prev=lambda pred, prev: {"out": jax.lax.stop_gradient(pred)})

  def output(params, example, pred, rng):
    del params, rng
    mse = jnp.mean((pred - example["y"]) ** 2)
    return mse, {"mse": mse, "per_point": (pred - example["y"]) ** 2}

  return step_lib.StagedObjective(parts.run, (("hidden", hidden), ("output", output)), parts)


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
      "vmap_batch_size": 1,
  })
  config.update(overrides)
  return config


class MLPInput:
  """A deterministic, checkpointable iterator of local batches: batch i comes from seed i.

  `process_index` offsets the seed so that every process feeds different examples. For the
  kill/preemption tests, `on_batch` (batch index -> None) runs before batch i is produced.
  """

  def __init__(self, local_batch_size: int, process_index: int = 0, on_batch=None,
               nan_batches: tuple[int, ...] = ()):
    self.local_batch_size, self.process_index = local_batch_size, process_index
    self.position, self.on_batch, self.nan_batches = 0, on_batch, nan_batches

  def __iter__(self):
    return self

  def __next__(self):
    if self.on_batch is not None:
      self.on_batch(self.position)
    batch = make_batch(1000 * self.process_index + self.position, self.local_batch_size)
    if self.position in self.nan_batches:
      batch["y"][0, 0] = np.nan
    self.position += 1
    return batch

  def get_state(self):
    return {"position": self.position}

  def set_state(self, state):
    self.position = int(state["position"])


def eval_batches(local_batch_size: int, process_index: int = 0):
  """Two validation batches; the second has padding (eval_mask 0) in its last example."""
  def batches():
    for i in range(2):
      batch = make_batch(10_000 + 1000 * process_index + i, local_batch_size)
      batch["eval_mask"] = np.ones(local_batch_size, np.float32)
      if i == 1:
        batch["eval_mask"][-1] = 0.0
      yield batch
  return batches


def model_fns(model: MLP | None = None):
  """The `loop.ModelFns` of the MLP."""
  from af2flax.train import loop  # pylint: disable=g-import-not-at-top
  model = model or MLP()

  def init(rng, example):
    return model.init(rng, jnp.asarray(example["x"]))["params"]

  def evaluate(params, example):
    pred = model.apply({"params": params}, example["x"], deterministic=True)
    mse = jnp.mean((pred - example["y"]) ** 2)
    return {"mse": mse, "neg_mse": -mse}

  return loop.ModelFns(init=init, objective=objective(model), evaluate=evaluate)


def loop_config(**overrides) -> ml_collections.ConfigDict:
  """A full training config (keys of configs/*.py) around the MLP."""
  config = train_config()
  config.update({
      "seed": 0, "batch_size": 8, "num_train_steps": 12, "max_consecutive_skips": 3,
      "mesh": {"data": -1, "fsdp": 1},
      "sharding": {"rules": [(".*", "fsdp")], "min_size_to_shard_mb": 0.0},
      "checkpoint": {"every_steps": 2, "keep": 3, "keep_best": 1,
                     "best_metric": "val/neg_mse", "best_mode": "max", "async_save": True},
      "log_every_steps": 2, "eval_every_steps": 6, "profile_steps": 0, "init_from": "",
  })
  config.update(overrides)
  return config


def patch_loop(loop, on_batch=None, nan_batches=()):
  """Points `loop.create_model/create_input` at the MLP (tests only)."""
  import jax as _jax  # pylint: disable=g-import-not-at-top
  loop.create_model = lambda config: model_fns()
  loop.create_input = lambda config, workdir, local_batch_size: loop.InputData(
      train=MLPInput(local_batch_size, _jax.process_index(), on_batch, nan_batches),
      eval_batches=eval_batches(local_batch_size, _jax.process_index()))
