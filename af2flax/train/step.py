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

import dataclasses
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import ml_collections
import optax

from af2flax.common.packing import Packing
from af2flax.train import optimizer as optimizer_lib
from af2flax.train import sharding as sharding_lib
from af2flax.train import state as state_lib

PyTree = Any
Batch = Mapping[str, jax.Array]
Objective = Callable[[PyTree, Batch, jax.Array], tuple[jax.Array, Mapping[str, jax.Array]]]
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


def model_config_for_step(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """`config.model` as the train step runs it: with `vmap_batch_size` > 1, marked
  `examples_vmapped`.

  Under `jax.vmap` over examples, jax's batching rule for cuDNN attention cannot batch a
  bias shared over the attention batch (it reshapes [V, 1, H, Q, K] as if it were
  [V * B, H, Q, K]). So with vmapped examples, an attention with a bias that 'auto' would
  hand to cuDNN runs through XLA instead (`primitives.attention_path`), and 'cudnn' chosen
  outright is refused with a clear message rather than failing inside the trace. Our Pallas
  kernels batch under vmap (pallas_call adds a grid axis) and cuDNN without a bias does too,
  so both still run: on an H200 the initial-training presets with 2 examples vmapped took
  0.652 s per example (docs/benchmarks.md, 2026-12-03, eighth session).
  """
  vmap_size = int(config.get("vmap_batch_size", 1))
  gc = config.model.global_config
  if vmap_size <= 1:
    return config.model
  for key in ("attention_impl", "triangle_attention_impl", "extra_msa_attention_impl"):
    if gc.get(key, "") == "cudnn":
      raise ValueError(f"model.global_config.{key}='cudnn' cannot run with "
                       f"vmap_batch_size={vmap_size} (jax's cuDNN attention does not batch a "
                       "shared bias under vmap): use vmap_batch_size=1 or "
                       f"{key} 'auto' (our kernels, cuDNN where no bias, else XLA) or 'xla'")
  model_config = ml_collections.ConfigDict(config.model.to_dict())
  model_config.global_config.examples_vmapped = True
  return model_config


def example_scalars(loss: jax.Array, aux: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
  """The loss and the objective's scalar aux values of one example, float32."""
  scalars = {k: jnp.asarray(v, jnp.float32) for k, v in aux.items() if jnp.ndim(v) == 0}
  scalars["loss"] = jnp.asarray(loss, jnp.float32)
  return scalars


def clip_example_gradient(grads: PyTree, scalars: Mapping[str, jax.Array], clip_norm: float
                          ) -> tuple[PyTree, dict[str, jax.Array]]:
  """One example's gradient clipped to `clip_norm` (Suppl. 1.11.3), with its scalars plus
  `grad_norm` (before clipping) and `clipped_fraction`."""
  grads, norm = clip_by_global_norm(grads, clip_norm)
  scalars = dict(scalars)
  scalars["grad_norm"] = norm
  scalars["clipped_fraction"] = (norm > clip_norm).astype(jnp.float32)
  return grads, scalars


def example_rngs(rng: jax.Array, step: jax.Array, batch_size: int) -> jax.Array:
  """One dropout key per example of this step's batch (from the state's key and step)."""
  return jax.random.split(jax.random.fold_in(rng, step), batch_size)


class FlatView:
  """Trees shaped like the parameters as one float32 vector, and back.

  The update's arithmetic (Adam, the EMA, the finiteness check, the norms) is the same on
  each parameter array as on their concatenation, but XLA compiles one fused loop instead of
  one per array. On XLA:CPU the AlphaFold step's update program went from 22,325 to 6,315
  lines of StableHLO and from 16.8 to 6.5 s of compilation (docs/benchmarks.md, sixteenth
  session). On an H200 it took the one-program step's XLA compile from 141.7 to 131.9 s
  (seventeenth session), but side by side its expected step was 0.577 against 0.571 s
  (eighteenth session), so `optimizer.flat_update` stays off.
  `ravel_within` and `unravel_within` do the same for every parameter-shaped subtree of
  another tree (Adam's moments inside the optimizer state).
  """

  def __init__(self, params: PyTree):
    self._packing = Packing(params)

  def is_param_shaped(self, node: Any) -> bool:
    return jax.tree.structure(node) == self._packing.treedef

  def ravel(self, tree: PyTree) -> jax.Array:
    return self._packing.pack(tree, jnp.float32)

  def unravel(self, vector: jax.Array) -> PyTree:
    return self._packing.unpack(vector)

  def ravel_within(self, tree: PyTree) -> PyTree:
    parts, treedef = jax.tree.flatten(tree, is_leaf=self.is_param_shaped)
    return jax.tree.unflatten(treedef, [self.ravel(part) if self.is_param_shaped(part) else part
                                        for part in parts])

  def unravel_within(self, flat: PyTree, like: PyTree) -> PyTree:
    """`flat` (made by `ravel_within(like)` or updated from it) with `like`'s structure."""
    parts, treedef = jax.tree.flatten(like, is_leaf=self.is_param_shaped)
    return jax.tree.unflatten(treedef, [
        self.unravel(new) if self.is_param_shaped(old) else new
        for old, new in zip(parts, treedef.flatten_up_to(flat))])


def apply_summed_gradients(state: state_lib.TrainState, grad_sum: PyTree,
                           scalar_sum: Mapping[str, jax.Array], batch_size: int,
                           optimizer: optax.GradientTransformation, ema_decay: float,
                           flat: bool = False
                           ) -> tuple[state_lib.TrainState, dict[str, jax.Array]]:
  """The step's end: the clipped per-example gradients and scalars, summed over the batch,
  averaged; Adam and the EMA applied if everything is finite, else the update skipped
  (`make_train_step` says which metrics come out). `flat`: all of it on the parameters
  concatenated into one vector (`FlatView`); the same values, up to the norms' summation
  order, and the state keeps its structure."""
  metrics = jax.tree.map(lambda s: s / batch_size, dict(scalar_sum))
  view = FlatView(state.params) if flat else None
  if view is not None:
    operands = (view.ravel(state.params), view.ravel_within(state.opt_state),
                view.ravel(state.ema_params), view.ravel(grad_sum) / batch_size)
  else:
    operands = (state.params, state.opt_state, state.ema_params,
                jax.tree.map(lambda g: g / batch_size, grad_sum))
  grads = operands[3]

  def apply_update(operands):
    params, opt_state, ema_params, grads = operands
    updates, opt_state = optimizer.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    return params, opt_state, state_lib.ema_update(ema_params, params, ema_decay)

  # A conditional, not a select per array: one predicate feeding a select in every one of
  # hundreds of parameter arrays made XLA:CPU compile the step 4x slower (measured, tiny
  # AlphaFold, 188 s -> 820 s).
  finite = jnp.isfinite(metrics["loss"]) & _tree_all_finite(grads)
  # Nor a select on the GPU: the update computed, then kept or not array by array, took as
  # long (18.5 against 18.9 ms on an H200, 2026-12-06, `bench/optimizer_step.py`; on the
  # parameters concatenated 17.6 against 15.5 ms) and compiled slower.
  params, opt_state, ema_params = jax.lax.cond(
      finite, apply_update, lambda operands: operands[:3], operands)
  metrics["update_grad_norm"] = optax.global_norm(grads)
  metrics["param_norm"] = optax.global_norm(params)
  if view is not None:
    params, ema_params = view.unravel(params), view.unravel(ema_params)
    opt_state = view.unravel_within(opt_state, state.opt_state)
  skipped = (~finite).astype(jnp.int32)
  new_state = state.replace(
      step=state.step + 1, params=params, opt_state=opt_state, ema_params=ema_params,
      skipped_steps=state.skipped_steps + skipped,
      consecutive_skips=jnp.where(finite, 0, state.consecutive_skips + 1),
  )

  metrics["learning_rate"] = jnp.asarray(
      optimizer_lib.current_learning_rate(new_state.opt_state), jnp.float32)
  metrics["skipped"] = skipped.astype(jnp.float32)
  metrics["skipped_steps"] = new_state.skipped_steps
  metrics["consecutive_skips"] = new_state.consecutive_skips
  return new_state, metrics


def flat_update(config: ml_collections.ConfigDict, param_specs: PyTree) -> bool:
  """Whether the update runs on the concatenated parameters (`FlatView`):
  `config.optimizer.flat_update` (default off), unless the parameters are split over devices
  (FSDP), where a concatenation would gather them."""
  replicated = all(all(axis is None for axis in spec) for spec in jax.tree.leaves(
      param_specs, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec)))
  return bool(config.optimizer.get("flat_update", False)) and replicated


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

  Metrics (all scalars, averaged over examples): `loss`, every scalar in the objective's aux,
  `grad_norm` (mean per-example norm before clipping), `clipped_fraction`, `update_grad_norm`
  (norm of the averaged clipped gradient), `param_norm`, `learning_rate`, `skipped`,
  `skipped_steps`, `consecutive_skips`.
  """
  clip_norm = float(config.optimizer.clip_norm)
  ema_decay = float(config.optimizer.ema_decay)
  flat = flat_update(config, param_specs)

  def example_grads(params, example_and_rng):
    example, rng = example_and_rng
    (loss, aux), grads = jax.value_and_grad(objective, has_aux=True)(params, example, rng)
    return clip_example_gradient(grads, example_scalars(loss, aux), clip_norm)

  summed_grads = sharding_lib.sum_over_examples(
      example_grads, mesh, out_specs=(param_specs, jax.sharding.PartitionSpec()),
      vmap_size=int(config.get("vmap_batch_size", 1)))

  def train_step(state: state_lib.TrainState, batch: Batch):
    batch_size = jax.tree.leaves(batch)[0].shape[0]
    rngs = example_rngs(state.rng, state.step, batch_size)
    grad_sum, scalar_sum = summed_grads(state.params, (batch, rngs))
    return apply_summed_gradients(state, grad_sum, scalar_sum, batch_size, optimizer, ema_decay,
                                  flat)

  return train_step


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


Stage = Callable[[PyTree, Batch, PyTree, jax.Array], Any]
# (params, example, prev, carry, rng, iteration) -> carry: a part of one recycling iteration.
RecycleStage = Callable[[PyTree, Batch, PyTree, PyTree, jax.Array, jax.Array], PyTree]


@dataclasses.dataclass(frozen=True)
class RecycleStages:
  """The no-gradient recycling iterations (Suppl. 1.10) as parts, for the separately
  compiled step to run each part as a program of its own, once per iteration.

  `initial(example) -> prev`: the first iteration's recycled inputs (zeros);
  `count(example)`: how many iterations this example runs (at most `maximum`);
  `stages`: named parts of one iteration, each `(params, example, prev, carry, rng,
  iteration) -> carry`: the first's `carry` is `prev`, the last returns the next
  iteration's `prev`; `rng` is the iteration's key (`key`).
  `run` runs them all in plain JAX; it equals the objective's `recycle` for the same key.
  `next_prev(carry, prev) -> prev`, where given: the next iteration's `prev` from what the
  objective's next-to-last stage returns. Then its stages before the last take
  `iteration=i` (iteration i's features instead of the final iteration's) and, run with
  iteration i's key (`key`), one after another, then `next_prev`, make iteration i as
  `stages` do; so the separately compiled step can run the recycling iterations through
  the final iteration's forward programs (`recycle_through_forward`).
  """
  initial: Callable[[Batch], PyTree]
  count: Callable[[Batch], jax.Array]
  maximum: int
  stages: tuple[tuple[str, RecycleStage], ...]
  next_prev: Callable[[PyTree, PyTree], PyTree] | None = None

  @staticmethod
  def key(recycle_rng: jax.Array, iteration: jax.Array) -> jax.Array:
    """Iteration `iteration`'s dropout key: `recycle_rng` with the iteration folded in, as
    `nn.while_loop(split_rngs={'dropout': True})` makes it in the model's own loop."""
    return jax.random.fold_in(recycle_rng, iteration)

  def iteration(self, params: PyTree, example: Batch, prev: PyTree, rng: jax.Array,
                iteration: jax.Array) -> PyTree:
    """One iteration's stages one after another: the next `prev`."""
    carry = prev
    for _, stage in self.stages:
      carry = stage(params, example, prev, carry, self.key(rng, iteration), iteration)
    return carry

  def run(self, params: PyTree, example: Batch, rng: jax.Array) -> PyTree:
    count = self.count(example)
    return jax.lax.fori_loop(
        0, count, lambda i, prev: self.iteration(params, example, prev, rng, i),
        self.initial(example))


class StagedObjective:
  """An objective in stages: `recycle(params, example, rng) -> prev`, the no-gradient
  recycling iterations (Suppl. 1.10), then the final iteration and the losses, which alone
  carry the gradient, as a chain of named `stages`: each `(params, example, carry, rng) ->
  carry`, the first taking `prev`, the last returning `(loss, aux)`.

  Calling it is the whole objective (an `Objective`): the example's key is split in two, the
  first for the recycling iterations' dropout, the second for every stage of the final
  iteration. The separately compiled step (`af2flax.train.programs`) runs each part as
  programs of their own with the same keys, so both steps compute the same values.
  """

  def __init__(self, recycle: Callable[[PyTree, Batch, jax.Array], PyTree],
               stages: tuple[tuple[str, Stage], ...],
               recycle_stages: RecycleStages | None = None):
    """`recycle_stages`: the recycling iterations as parts too (the same values as
    `recycle`), which the separately compiled step then runs as programs of their own."""
    if not stages:
      raise ValueError("StagedObjective needs at least one stage")
    self.recycle = recycle
    self.stages = tuple(stages)
    self.recycle_stages = recycle_stages

  def final(self, params: PyTree, example: Batch, prev: PyTree, rng: jax.Array
            ) -> tuple[jax.Array, Mapping[str, jax.Array]]:
    """The final iteration and the losses: the stages one after another."""
    carry = prev
    for _, stage in self.stages:
      carry = stage(params, example, carry, rng)
    return carry

  def __call__(self, params: PyTree, example: Batch, rng: jax.Array
               ) -> tuple[jax.Array, Mapping[str, jax.Array]]:
    recycle_rng, final_rng = self.keys(rng)
    return self.final(params, example, self.recycle(params, example, recycle_rng), final_rng)

  def keys(self, rng: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The example's key for the recycling iterations and for the final iteration."""
    recycle_rng, final_rng = jax.random.split(rng)
    return recycle_rng, final_rng

  @classmethod
  def of(cls, objective: Objective) -> "StagedObjective":
    """`objective` itself if staged, else one with nothing to recycle (`prev` = {}) and one
    stage, `objective` with the example's whole key."""
    if isinstance(objective, cls):
      return objective
    return _Unstaged(objective)


class _Unstaged(StagedObjective):
  """A plain objective seen as staged: no recycled inputs, one stage, the key unsplit."""

  def __init__(self, objective: Objective):
    super().__init__(lambda params, example, rng: {},
                     (("final", lambda params, example, prev, rng: objective(params, example,
                                                                             rng)),))
    self._objective = objective

  def __call__(self, params, example, rng):
    return self._objective(params, example, rng)

  def keys(self, rng):
    return rng, rng


def trunk_stages(spec: str) -> tuple[tuple[str, ...], ...]:
  """The train config's `trunk_stages`: 'trunk' (the whole trunk as one stage), or stages
  separated by ',' of the trunk's parts joined by '+', together each part once in order
  (`af2flax.model.trunk.TRUNK_PARTS`), e.g. 'embeddings+extra_msa,evoformer'."""
  from af2flax.model.trunk import TRUNK_PARTS  # pylint: disable=g-import-not-at-top

  if spec.strip() == "trunk":
    return (TRUNK_PARTS,)
  stages = tuple(tuple(part.strip() for part in stage.split("+")) for stage in spec.split(","))
  if tuple(part for stage in stages for part in stage) != TRUNK_PARTS:
    raise ValueError(f"trunk_stages={spec!r}: expected 'trunk', or the parts "
                     f"{', '.join(TRUNK_PARTS)} each once and in that order, stages separated "
                     "by ',' and parts within a stage by '+' (e.g. "
                     "'embeddings+extra_msa,evoformer')")
  return stages


HEAD_STAGES = ("heads", "structure,losses")


def head_stages(spec: str) -> tuple[str, ...]:
  """The train config's `head_stages`: 'heads' (the heads and the losses as one stage) or
  'structure,losses' (the structure module, then the other heads with every loss)."""
  names = tuple(part.strip() for part in spec.split(","))
  if ",".join(names) not in HEAD_STAGES:
    raise ValueError(f"head_stages={spec!r}: expected one of {', '.join(map(repr, HEAD_STAGES))}")
  return names


def alphafold_objective(model: Any, model_config: ml_collections.ConfigDict,
                        trunk: str = "trunk", heads: str = "heads",
                        recycle_in_stages: bool = False) -> StagedObjective:
  """The per-example training objective of AlphaFold: model with dropout, then all losses.

  `model` is `af2flax.model.alphafold.AlphaFold(model_config)`; the loss is
  `af2flax.losses.total.alphafold_loss` on the final iteration's features (Suppl. 1.9,
  eq. 7), computed in float32 whatever the model's compute dtype. Staged: the no-gradient
  recycling iterations (`AlphaFold(recycle_only=True)`), then the final iteration in
  stages: the trunk (embeddings, Evoformer: `AlphaFold(prev=..., trunk_only=True)`) and the
  heads with the losses (`AlphaFold(representations=...)`). `trunk` (`trunk_stages`) cuts
  the trunk into more stages, each its own programs in the separately compiled step, and
  `heads` (`head_stages`) the heads: 'structure,losses' runs the structure module as a
  stage of its own (`AlphaFold(representations=..., heads=['structure_module'])`), then
  the other heads and the losses (`AlphaFold(representations=..., structure=...)`).
  `recycle_in_stages`: the recycling iterations as parts as well (`RecycleStages`: the
  trunk's stages, then the structure module alone, each `AlphaFold(..., iteration=i)`), so
  that the separately compiled step runs them as programs of their own. The values are the
  same.
  """
  from af2flax.losses.total import alphafold_loss  # pylint: disable=g-import-not-at-top

  heads_config = model_config.heads

  def recycle(params, example, dropout_rng):
    return model.apply({"params": params}, example, deterministic=False, recycle_only=True,
                       rngs={"dropout": dropout_rng})

  def trunk_stage(parts):
    return lambda params, example, carry, dropout_rng, iteration=None: _apply_trunk_parts(
        model, parts, params, example, carry, dropout_rng, iteration)

  def losses(params, example, carry, dropout_rng, structure=None):
    outputs = model.apply({"params": params}, example, deterministic=False,
                          representations=carry, structure=structure,
                          rngs={"dropout": dropout_rng})
    outputs = to_float32(outputs)
    loss, aux = alphafold_loss(final_iteration_features(example), outputs, heads_config)
    return loss, aux

  def structure_stage(params, example, representations, dropout_rng, iteration=None):
    outputs = _apply_structure_module(model, params, example, representations, dropout_rng,
                                      iteration)
    return {"representations": representations, "structure_module": outputs["structure_module"]}

  def losses_stage(params, example, carry, dropout_rng):
    return losses(params, example, carry["representations"], dropout_rng,
                  carry["structure_module"])

  stages = trunk_stages(trunk)
  names = ["trunk" if len(stages) == 1 else "+".join(parts) for parts in stages]
  last = ((("heads", losses),) if head_stages(heads) == ("heads",)
          else (("structure", structure_stage), ("losses", losses_stage)))
  return StagedObjective(
      recycle, tuple(zip(names, map(trunk_stage, stages))) + last,
      _alphafold_recycle_stages(model, model_config, stages, names,
                                through_structure_stage=len(last) == 2)
      if recycle_in_stages else None)


def _apply_trunk_parts(model: Any, parts: tuple[str, ...], params: PyTree, example: Batch,
                       carry: PyTree, rng: jax.Array, iteration: jax.Array | None = None
                       ) -> PyTree:
  """AlphaFold's trunk `parts` with dropout after `carry`: the recycled inputs (`prev`)
  where the parts start with 'embeddings', else the activations of the parts before;
  `iteration`: those of recycling iteration i, not the final iteration."""
  source = "prev" if parts[0] == "embeddings" else "trunk_activations"
  return model.apply({"params": params}, example, deterministic=False, trunk_only=True,
                     trunk_parts=parts, iteration=iteration, rngs={"dropout": rng},
                     **{source: carry})


def _apply_structure_module(model: Any, params: PyTree, example: Batch,
                            representations: PyTree, rng: jax.Array,
                            iteration: jax.Array | None = None) -> dict[str, Any]:
  """AlphaFold's structure module alone with dropout, on the trunk's `representations`."""
  return model.apply({"params": params}, example, deterministic=False,
                     representations=representations, heads=("structure_module",),
                     iteration=iteration, rngs={"dropout": rng})


def _alphafold_recycle_stages(model: Any, model_config: ml_collections.ConfigDict,
                              stages: tuple[tuple[str, ...], ...], names: list[str],
                              through_structure_stage: bool = False) -> RecycleStages:
  """AlphaFold's recycling iterations in parts: the trunk's `stages`, then the structure
  module, which makes the next iteration's `prev` (`AlphaFold(iteration=i)`: iteration i's
  features, `alphafold.prev_from_outputs`). `through_structure_stage`: the objective has the
  structure module as a stage of its own (`head_stages='structure,losses'`), whose output
  (the representations and the structure module's) `next_prev` turns into the next `prev`."""
  from af2flax.model import alphafold as alphafold_lib  # pylint: disable=g-import-not-at-top

  def trunk_part(parts):
    return lambda params, example, prev, carry, rng, iteration: _apply_trunk_parts(
        model, parts, params, example, carry, rng, iteration)

  def structure(params, example, prev, representations, rng, iteration):
    outputs = _apply_structure_module(model, params, example, representations, rng, iteration)
    return alphafold_lib.prev_from_outputs(outputs, prev)

  def initial(example):
    return alphafold_lib.initial_prev(example["aatype"].shape[1], model_config)

  return RecycleStages(
      initial=initial,
      count=lambda example: alphafold_lib.num_recycling_iterations(example, model_config),
      maximum=int(model_config.num_recycle),
      stages=tuple(zip(names, map(trunk_part, stages))) + (("structure", structure),),
      next_prev=alphafold_lib.prev_from_outputs if through_structure_stage else None)
