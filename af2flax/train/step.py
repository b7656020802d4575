"""The training step: per-example gradients clipped to a global norm, averaged, applied.

Jumper et al. (2021) Suppl. 1.11.3: "we clip the gradients per example to a global norm of
0.1" before averaging over the batch, then Adam. Suppl. 1.11.7: an exponential moving average
of the parameters (decay 0.999) is kept for evaluation. Random recycling (Suppl. 1.10) is
decided by the input pipeline (`num_iter_recycling` in the batch); the step only supplies the
dropout randomness.

Data parallelism is AlphaFold's: each device runs its own examples (`sharding.sum_over_examples`,
a `shard_map`), so per-example gradients never need a batched (vmapped) copy of the network.
The step is generic over an *objective* `(params, example, dropout_rng) -> (loss, aux)` that
sees one example without a batch axis (MODEL_CONTRACT section 3); `alphafold_objective` builds
it from the model and the losses. This module imports neither TensorFlow nor `af2flax.data`.
"""

from __future__ import annotations

import concurrent.futures
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import ml_collections
import optax

from af2flax.train import optimizer as optimizer_lib
from af2flax.train import sharding as sharding_lib
from af2flax.train import state as state_lib

PyTree = Any
Batch = Mapping[str, jax.Array]
# (params, example, dropout_rng[, prev]) -> (loss, aux); `prev` only with a Recycler.
Objective = Callable[..., tuple[jax.Array, Mapping[str, jax.Array]]]
# (params, example, dropout_rng) -> prev: the recycling iterations alone, without gradient.
Recycler = Callable[[PyTree, Batch, jax.Array], PyTree]
TrainStep = Callable[[state_lib.TrainState, Batch],
                     tuple[state_lib.TrainState, dict[str, jax.Array]]]


def clip_by_global_norm(grads: PyTree, max_norm: float) -> tuple[PyTree, jax.Array]:
  """Scales `grads` so that their global L2 norm is at most `max_norm`; returns (grads, norm).

  A non-finite norm propagates into the gradients, so the step's finiteness guard sees it.
  """
  norm = optax.global_norm(grads)
  scale = jnp.where(norm > max_norm, max_norm / jnp.where(norm > 0, norm, 1.0), 1.0)
  return jax.tree.map(lambda g: g * scale.astype(g.dtype), grads), norm


def _tree_all_finite(tree: PyTree) -> jax.Array:
  leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]
  return jnp.stack(leaves).all() if leaves else jnp.array(True)


def make_train_step(objective: Objective, optimizer: optax.GradientTransformation,
                    config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh,
                    param_specs: PyTree = jax.sharding.PartitionSpec()) -> TrainStep:
  """Builds `train_step(state, batch) -> (state, metrics)` (not jitted; see `jit_train_step`).

  `batch` holds the global batch [B, ...], sharded over the mesh's devices. Every device takes
  its own examples one after another (`config.vmap_batch_size` at a time), computes each
  example's gradient and clips it to `config.optimizer.clip_norm` (per-example clipping,
  Suppl. 1.11.3); the clipped gradients are summed over all examples of all devices
  (reduce-scattered onto the parameters' `param_specs` under FSDP) and averaged, then Adam.
  AlphaFold trained this way with one example per TPU core.

  If the mean loss or the averaged gradient is not finite, the update is skipped: params,
  optimizer state and EMA stay as they were, `skipped_steps` and `consecutive_skips` count it
  (the loop stops the run after `config.max_consecutive_skips`).

  `train_step(state, batch, prev)` takes the recycled inputs of every example [B, ...] from
  `make_recycle_step` (the objective then runs the final iteration alone, `prev` its fourth
  argument); `SplitTrainStep` runs the two.

  Metrics (all scalars, averaged over examples): `loss`, every scalar in the objective's aux,
  `grad_norm` (mean per-example norm before clipping), `clipped_fraction`, `update_grad_norm`
  (norm of the averaged clipped gradient), `param_norm`, `learning_rate`, `skipped`,
  `skipped_steps`, `consecutive_skips`.
  """
  clip_norm = float(config.optimizer.clip_norm)
  ema_decay = float(config.optimizer.ema_decay)

  def example_grads(params, example_rng_prev):
    example, rng, *prev = example_rng_prev  # prev: the recycled inputs of a SplitTrainStep
    (loss, aux), grads = jax.value_and_grad(objective, has_aux=True)(params, example, rng,
                                                                     *prev)
    grads, norm = clip_by_global_norm(grads, clip_norm)
    scalars = {k: jnp.asarray(v, jnp.float32) for k, v in aux.items() if jnp.ndim(v) == 0}
    scalars["loss"] = jnp.asarray(loss, jnp.float32)
    scalars["grad_norm"] = norm
    scalars["clipped_fraction"] = (norm > clip_norm).astype(jnp.float32)
    return grads, scalars

  summed_grads = sharding_lib.sum_over_examples(
      example_grads, mesh, out_specs=(param_specs, jax.sharding.PartitionSpec()),
      vmap_size=int(config.get("vmap_batch_size", 1)))

  def train_step(state: state_lib.TrainState, batch: Batch, prev: PyTree = None):
    batch_size = jax.tree.leaves(batch)[0].shape[0]
    rngs = example_rngs(state, batch)
    operands = (batch, rngs) if prev is None else (batch, rngs, prev)
    grad_sum, scalar_sum = summed_grads(state.params, operands)
    grads = jax.tree.map(lambda g: g / batch_size, grad_sum)
    metrics = jax.tree.map(lambda s: s / batch_size, scalar_sum)

    def apply_update(operands):
      params, opt_state, ema_params, grads = operands
      updates, opt_state = optimizer.update(grads, opt_state, params)
      params = optax.apply_updates(params, updates)
      return params, opt_state, state_lib.ema_update(ema_params, params, ema_decay)

    # A conditional, not a select per array: one predicate feeding a select in every one of
    # hundreds of parameter arrays made XLA:CPU compile the step 4x slower (measured, tiny
    # AlphaFold, 188 s -> 820 s).
    finite = jnp.isfinite(metrics["loss"]) & _tree_all_finite(grads)
    params, opt_state, ema_params = jax.lax.cond(
        finite, apply_update, lambda operands: operands[:3],
        (state.params, state.opt_state, state.ema_params, grads))
    skipped = (~finite).astype(jnp.int32)
    new_state = state.replace(
        step=state.step + 1, params=params, opt_state=opt_state, ema_params=ema_params,
        skipped_steps=state.skipped_steps + skipped,
        consecutive_skips=jnp.where(finite, 0, state.consecutive_skips + 1),
    )

    metrics["update_grad_norm"] = optax.global_norm(grads)
    metrics["param_norm"] = optax.global_norm(new_state.params)
    metrics["learning_rate"] = jnp.asarray(
        optimizer_lib.current_learning_rate(new_state.opt_state), jnp.float32)
    metrics["skipped"] = skipped.astype(jnp.float32)
    metrics["skipped_steps"] = new_state.skipped_steps
    metrics["consecutive_skips"] = new_state.consecutive_skips
    return new_state, metrics

  return train_step


def example_rngs(state: state_lib.TrainState, batch: Batch) -> jax.Array:
  """One dropout key per example of the batch, from the state's key and step."""
  batch_size = jax.tree.leaves(batch)[0].shape[0]
  return jax.random.split(jax.random.fold_in(state.rng, state.step), batch_size)


# The recycling iterations of a SplitTrainStep draw their dropout from the example's key
# folded with this; the final iteration draws from the key itself.
RECYCLE_RNG_FOLD = 1


def make_recycle_step(recycler: Recycler, config: ml_collections.ConfigDict,
                      mesh: jax.sharding.Mesh) -> Callable[[state_lib.TrainState, Batch], PyTree]:
  """Builds `recycle_step(state, batch) -> prev` (not jitted; see `jit_train_step`).

  The recycling iterations of every example (Suppl. 1.10: `num_iter_recycling` forward
  passes without gradient, with dropout), each device on its own examples; `prev` [B, ...]
  goes to `train_step(state, batch, prev)`, which runs the final, gradient-carrying
  iteration. Together they compute the step of one program with its recycling loop inside
  (the same values without dropout; dropout draws other, equally distributed masks). Apart,
  XLA compiles them side by side (`SplitTrainStep`): the loop is a third of the program.
  """

  def recycle_example(params, example_and_rng):
    example, rng = example_and_rng
    return recycler(params, example, jax.random.fold_in(rng, RECYCLE_RNG_FOLD))

  per_example = sharding_lib.map_over_examples(
      recycle_example, mesh, vmap_size=int(config.get("vmap_batch_size", 1)))

  def recycle_step(state: state_lib.TrainState, batch: Batch) -> PyTree:
    params = jax.lax.stop_gradient(state.params)
    return per_example(params, (batch, example_rngs(state, batch)))

  return recycle_step


class SplitTrainStep:
  """The train step as two jitted programs: the recycling iterations, then the update.

  Called as the one-program step is, `(state, batch) -> (state, metrics)`. The first call
  for a set of shapes traces both programs, then XLA compiles them at the same time on two
  threads (`compile`), so that the first compile takes about as long as the larger program
  alone. Built by `sharding.jit_train_step(..., recycle_step=...)`.
  """

  def __init__(self, recycle: Any, update: Any):
    self.recycle = recycle    # jitted (state, batch) -> prev
    self.update = update      # jitted (state, batch, prev) -> (state, metrics), state donated
    self._compiled: dict[Any, tuple[Any, Any]] = {}

  @staticmethod
  def _signature(state: Any, batch: Batch) -> Any:
    leaves, treedef = jax.tree.flatten((state, batch))
    return treedef, tuple((tuple(x.shape), str(x.dtype)) for x in leaves)

  def trace(self, state: Any, batch: Batch) -> tuple[Any, Any]:
    """Both programs traced (`jax.stages.Traced`); `state`, `batch` may be abstract
    (`jax.ShapeDtypeStruct`)."""
    recycle = self.recycle.trace(state, batch)
    prev = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), recycle.out_info)
    return recycle, self.update.trace(state, batch, prev)

  def lower(self, state: Any, batch: Batch) -> tuple[Any, Any]:
    """Both programs traced and lowered (`jax.stages.Lowered`)."""
    return tuple(traced.lower() for traced in self.trace(state, batch))

  def compile(self, state: Any, batch: Batch, lowered: tuple[Any, Any] | None = None
              ) -> tuple[Any, Any]:
    """Compiles both programs at once (XLA releases the interpreter lock while it compiles)
    and keeps them for these shapes; returns them (`jax.stages.Compiled`)."""
    recycle, update = lowered if lowered is not None else self.lower(state, batch)
    with concurrent.futures.ThreadPoolExecutor(2, thread_name_prefix="compile") as pool:
      # The larger program first.
      update, recycle = pool.map(lambda program: program.compile(), (update, recycle))
    self._compiled[self._signature(state, batch)] = (recycle, update)
    return recycle, update

  def __call__(self, state: state_lib.TrainState, batch: Batch):
    compiled = self._compiled.get(self._signature(state, batch))
    if compiled is None:
      compiled = self.compile(state, batch)
    recycle, update = compiled
    return update(state, batch, recycle(state, batch))


def to_float32(tree: PyTree) -> PyTree:
  """Floating arrays of `tree` in float32 (losses and metrics of bf16 model outputs)."""
  return jax.tree.map(
      lambda x: x.astype(jnp.float32) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)


def final_iteration_features(example: Batch) -> dict[str, jax.Array]:
  """The features of the last recycling iteration (MODEL_CONTRACT section 5).

  Every feature carries the leading recycle axis R (AlphaFold's ensemble axis); the final,
  gradient-carrying iteration reads slice `num_iter_recycling`.
  """
  index = example["num_iter_recycling"][0]
  return {k: jax.lax.dynamic_index_in_dim(v, index, axis=0, keepdims=False)
          for k, v in example.items()}


def alphafold_objective(model: Any, model_config: ml_collections.ConfigDict) -> Objective:
  """The per-example training objective of AlphaFold: model with dropout, then all losses.

  `model` is `af2flax.model.alphafold.AlphaFold(model_config)`; the loss is
  `af2flax.losses.total.alphafold_loss` on the final iteration's features (Suppl. 1.9,
  eq. 7), computed in float32 whatever the model's compute dtype.
  """
  from af2flax.losses.total import alphafold_loss  # pylint: disable=g-import-not-at-top

  heads_config = model_config.heads

  def objective(params, example, dropout_rng, prev=None):
    outputs = model.apply({"params": params}, example, deterministic=False,
                          rngs={"dropout": dropout_rng}, prev=prev)
    outputs = to_float32(outputs)
    loss, aux = alphafold_loss(final_iteration_features(example), outputs, heads_config)
    return loss, aux

  return objective


def alphafold_recycler(model: Any) -> Recycler:
  """The recycling iterations of `model` (AlphaFold) alone, with dropout: the recycled inputs
  (`prev_pos`, `prev_msa_first_row`, `prev_pair`) of the final iteration, which
  `alphafold_objective(...)(params, example, rng, prev)` then runs."""

  def recycler(params, example, dropout_rng):
    return model.apply({"params": params}, example, deterministic=False,
                       rngs={"dropout": dropout_rng}, recycle_only=True)

  return recycler
