"""The train step as separately compiled programs, compiled concurrently.

The step of `step.make_train_step` is one XLA program. On an H200 its first compile takes
141-173 s (docs/benchmarks.md, 2026-12-02 night): GEMM autotuning on 16 threads (45 s), but
fusion (39 s) and most other passes on one thread per program. This step computes the same
thing as
five programs that XLA compiles at the same time (four threads: the recycling program
follows the forward one, see `_COMPILE_CHAINS`):

  recycle   (params, rng, step, batch, k) -> prev
            the no-gradient recycling iterations of each device's k-th example
            (`StagedObjective.recycle`, Suppl. 1.10);
  forward   (params, rng, step, batch, k, prev) -> (scalars, residuals)
            the final iteration and the losses (`StagedObjective.final`), linearised with
            `jax.vjp`: the loss and aux scalars, and what the backward pass needs;
  backward  (params, residuals, scalars, sums) -> sums
            the gradient from those residuals (under remat: the recomputation and the
            backward pass), clipped per example (Suppl. 1.11.3) and added to the device's sums;
  update    (state, sums) -> (state, metrics)
            the sums added over devices, averaged, Adam and the EMA: `step.apply_summed_gradients`;
  zeros     () -> sums.

Python runs recycle, forward and backward once per example slot of a device (AlphaFold's
one example per device: once), then update. The values are those of the one-program step
with the same objective: the same per-example keys, split the same way
(`step.StagedObjective`); only XLA's fusion, hence rounding, differs.

The forward program's residuals are `jax.vjp`'s: the backward program is traced from the very
function `jax.vjp` returned in the forward program's trace, so the two always agree, and both
are compiled ahead of time from that one trace (a retrace could order residuals differently).
Parameters that the backward pass reads are not copied into the residuals: the backward
program takes the parameters again. Examples vmapped together (`vmap_batch_size` > 1) are not
supported here.
"""

from __future__ import annotations

from concurrent import futures as concurrent_futures
import time
from typing import Any, Mapping

from absl import logging
import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P
import ml_collections
import numpy as np
import optax

from af2flax.train import sharding as sharding_lib
from af2flax.train import state as state_lib
from af2flax.train import step as step_lib

PyTree = Any
_PER_DEVICE = P(sharding_lib.BATCH_AXES)


# Programs compiled one after another in one thread; the chains run at the same time. The
# recycling program follows the forward program: its matrix products are the forward
# program's, whose GPU autotuning XLA has cached in the process by then (compiled at the same
# time, both would tune them), and the two together take about as long as the backward
# program alone (XLA:CPU, initial shapes: 16.7 + 10.4 s against 27.5 s).
_COMPILE_CHAINS = (("forward", "recycle"), ("backward",), ("update",), ("zeros",))


def _example(local_batch: Mapping[str, jax.Array], index: jax.Array) -> dict[str, jax.Array]:
  return {key: jax.lax.dynamic_index_in_dim(value, index, axis=0, keepdims=False)
          for key, value in local_batch.items()}


def _lead(tree: PyTree) -> PyTree:
  """A leading axis of 1 on every leaf: a device's value, gathered over devices outside."""
  return jax.tree.map(lambda x: x[None], tree)


def _unlead(tree: PyTree) -> PyTree:
  return jax.tree.map(lambda x: x[0], tree)


def _signature(tree: PyTree) -> tuple[Any, ...]:
  leaves, treedef = jax.tree.flatten(tree)
  return (treedef,) + tuple((tuple(x.shape), str(x.dtype)) for x in leaves)


class SplitTrainStep:
  """`train_step(state, batch) -> (state, metrics)` as separately compiled programs.

  A drop-in for `sharding.jit_train_step(step.make_train_step(...))` (same arguments, same
  metrics, the state donated to the update). The programs are compiled on the first call, or
  ahead of it with `compile(state, batch)`, and again if the shapes change;
  `compile_seconds` then holds each program's XLA compile time and the trace and wall time.
  """

  def __init__(self, objective: step_lib.Objective, optimizer: optax.GradientTransformation,
               config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh,
               state_shardings: PyTree, param_specs: PyTree = P()):
    """`state_shardings`: the state's shardings, a tree or one for all (a pytree prefix);
    `param_specs`: the parameters' `PartitionSpec`s, where gradients are reduce-scattered."""
    if int(config.get("vmap_batch_size", 1)) != 1:
      raise ValueError(f"step_programs='split' runs one example per device at a time; "
                       f"vmap_batch_size={config.vmap_batch_size} needs step_programs='one'")
    self._objective = step_lib.StagedObjective.of(objective)
    self._optimizer = optimizer
    self._clip_norm = float(config.optimizer.clip_norm)
    self._ema_decay = float(config.optimizer.ema_decay)
    self._mesh = mesh
    self._state_shardings = state_shardings
    self._param_specs = param_specs
    self._flat = step_lib.flat_update(config, param_specs)
    self._replicated = sharding_lib.replicated(mesh)
    self._per_device = NamedSharding(mesh, _PER_DEVICE)
    self._devices = int(np.prod([mesh.shape[a] for a in sharding_lib.BATCH_AXES]))
    self.compiled: dict[str, Any] = {}  # name -> XLA's compiled program, after compile()
    self._signature = None
    self._vjp_layout = None  # set while tracing the forward program
    self._residuals = None   # the forward program's residuals, abstract
    self.compile_seconds: dict[str, float] = {}

  # Programs, as traced functions of global arrays.

  def _shard_map(self, fn, in_specs, out_specs):
    return jax.shard_map(fn, mesh=self._mesh, in_specs=in_specs, out_specs=out_specs,
                         check_vma=False)

  def _recycle(self, params, rng, step, batch, index):
    rngs = step_lib.example_rngs(rng, step, jax.tree.leaves(batch)[0].shape[0])

    def local(params, local_batch, local_rngs, index):
      recycle_rng, _ = self._objective.keys(local_rngs[index])
      return _lead(self._objective.recycle(params, _example(local_batch, index), recycle_rng))

    return self._shard_map(local, (P(), _PER_DEVICE, _PER_DEVICE, P()), _PER_DEVICE)(
        params, batch, rngs, index)

  def _forward(self, params, rng, step, batch, index, prev):
    rngs = step_lib.example_rngs(rng, step, jax.tree.leaves(batch)[0].shape[0])

    def local(params, local_batch, local_rngs, index, local_prev):
      _, final_rng = self._objective.keys(local_rngs[index])
      example, prev = _example(local_batch, index), _unlead(local_prev)
      loss, vjp_fn, aux = jax.vjp(
          lambda p: self._objective.final(p, example, prev, final_rng), params, has_aux=True)
      leaves, treedef = jax.tree.flatten(vjp_fn)
      # Parameters the backward pass reads come back as they are; they are not outputs.
      param_index = {id(leaf): i for i, leaf in enumerate(jax.tree.leaves(params))}
      layout = [param_index.get(id(leaf)) for leaf in leaves]
      self._vjp_layout = (treedef, layout, jax.ShapeDtypeStruct(loss.shape, loss.dtype))
      residuals = [leaf for leaf, where in zip(leaves, layout) if where is None]
      return _lead(step_lib.example_scalars(loss, aux)), _lead(residuals)

    return self._shard_map(local, (P(), _PER_DEVICE, _PER_DEVICE, P(), _PER_DEVICE),
                           (_PER_DEVICE, _PER_DEVICE))(params, batch, rngs, index, prev)

  def _backward(self, params, residuals, scalars, sums):
    treedef, layout, loss_aval = self._vjp_layout

    def local(params, local_residuals, local_scalars, local_sums):
      param_leaves = jax.tree.leaves(params)
      remaining = iter(_unlead(local_residuals))
      vjp_fn = jax.tree.unflatten(treedef, [
          param_leaves[where] if where is not None else next(remaining) for where in layout])
      (grads,) = vjp_fn(jnp.ones(loss_aval.shape, loss_aval.dtype))
      grads, example = step_lib.clip_example_gradient(grads, _unlead(local_scalars),
                                                      self._clip_norm)
      grad_sums, scalar_sums = _unlead(local_sums)
      return _lead((jax.tree.map(jnp.add, grad_sums, grads),
                    {k: scalar_sums[k] + example[k] for k in scalar_sums}))

    return self._shard_map(local, (P(), _PER_DEVICE, _PER_DEVICE, _PER_DEVICE), _PER_DEVICE)(
        params, residuals, scalars, sums)

  def _update(self, state, sums, batch_size):
    param_specs = self._param_specs

    def reduce(local_sums):
      return sharding_lib.reduce_tree_over_devices(_unlead(local_sums), (param_specs, P()))

    grad_sum, scalar_sum = self._shard_map(reduce, (_PER_DEVICE,), (param_specs, P()))(sums)
    return step_lib.apply_summed_gradients(state, grad_sum, scalar_sum, batch_size,
                                           self._optimizer, self._ema_decay, self._flat)

  # Compilation.

  def lower(self, state: state_lib.TrainState, batch: Mapping[str, Any]
            ) -> dict[str, jax.stages.Lowered]:
    """The five programs for these shapes, traced and lowered one after another (Python).
    `state` and `batch` may be abstract (`jax.ShapeDtypeStruct`s)."""
    batch_size = jax.tree.leaves(batch)[0].shape[0]
    local_examples = batch_size // self._devices
    if local_examples * self._devices != batch_size:
      raise ValueError(f"batch of {batch_size} examples does not split over "
                       f"{self._devices} devices")
    rep, dev = self._replicated, self._per_device
    # One sharding for the whole state (a pytree prefix) or a tree of them.
    params_sh, rng_sh, step_sh = (getattr(self._state_shardings, name, self._state_shardings)
                                  for name in ("params", "rng", "step"))
    batch_sh = sharding_lib.batch_sharding(self._mesh)
    index = jax.ShapeDtypeStruct((), jnp.int32)

    lowered = {}
    lowered["recycle"] = jax.jit(
        self._recycle, in_shardings=(params_sh, rng_sh, step_sh, batch_sh, rep),
        out_shardings=dev
    ).lower(state.params, state.rng, state.step, batch, index)
    prev = lowered["recycle"].out_info
    lowered["forward"] = jax.jit(
        self._forward, in_shardings=(params_sh, rng_sh, step_sh, batch_sh, rep, dev),
        out_shardings=(dev, dev)
    ).lower(state.params, state.rng, state.step, batch, index, prev)
    scalars, residuals = lowered["forward"].out_info
    self._residuals = residuals
    grad_sums = jax.tree.map(
        lambda p: jax.ShapeDtypeStruct((self._devices,) + tuple(p.shape), jnp.float32),
        state.params)
    scalar_sums = {k: jax.ShapeDtypeStruct((self._devices,), jnp.float32)
                   for k in list(scalars) + ["grad_norm", "clipped_fraction"]}
    sums = (grad_sums, scalar_sums)
    lowered["backward"] = jax.jit(
        self._backward, in_shardings=(params_sh, dev, dev, dev), out_shardings=dev,
        donate_argnums=3).lower(state.params, residuals, scalars, sums)
    lowered["update"] = jax.jit(
        lambda state, sums: self._update(state, sums, batch_size),
        in_shardings=(self._state_shardings, dev),
        out_shardings=(self._state_shardings, rep), donate_argnums=0).lower(state, sums)
    lowered["zeros"] = jax.jit(
        lambda: jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), sums),
        out_shardings=dev).lower()
    self._local_examples = local_examples
    return lowered

  def compile(self, state: state_lib.TrainState, batch: Mapping[str, Any],
              concurrent: bool = True) -> dict[str, float]:
    """Traces and lowers the five programs (`lower`), then has XLA compile them at the same
    time, the recycling program after the forward one (`_COMPILE_CHAINS`;
    `concurrent=False`: one after another, to time each alone). Returns (and keeps in
    `compile_seconds`) each program's XLA seconds, `trace_lower` and `wall` (all of it)."""
    start = time.perf_counter()
    lowered = self.lower(state, batch)
    seconds = {"trace_lower": time.perf_counter() - start}

    def compile_chain(names):
      results = []
      for name in names:
        begin = time.perf_counter()
        results.append((name, lowered[name].compile(), time.perf_counter() - begin))
      return results

    if concurrent:
      with concurrent_futures.ThreadPoolExecutor(max_workers=len(_COMPILE_CHAINS)) as pool:
        results = [r for chain in pool.map(compile_chain, _COMPILE_CHAINS) for r in chain]
    else:
      results = compile_chain(lowered)
    self.compiled = {name: compiled for name, compiled, _ in results}
    seconds.update({name: s for name, _, s in results})
    seconds["wall"] = time.perf_counter() - start
    rep = self._replicated
    self._indices = [jax.device_put(np.int32(k), rep) for k in range(self._local_examples)]
    self._signature = _signature((state, batch))
    self.compile_seconds = seconds
    logging.info("split train step compiled: %s",
                 ", ".join(f"{k} {v:.1f} s" for k, v in seconds.items()))
    return seconds

  def __call__(self, state: state_lib.TrainState, batch: Mapping[str, jax.Array]
               ) -> tuple[state_lib.TrainState, dict[str, jax.Array]]:
    if not self.compiled or _signature((state, batch)) != self._signature:
      self.compile(state, batch)
    run = self.compiled
    sums = run["zeros"]()
    for index in self._indices:
      prev = run["recycle"](state.params, state.rng, state.step, batch, index)
      scalars, residuals = run["forward"](state.params, state.rng, state.step, batch, index,
                                          prev)
      sums = run["backward"](state.params, residuals, scalars, sums)
    return run["update"](state, sums)

  def residual_bytes(self) -> int | None:
    """Bytes per device of the forward program's residuals (None before compiling)."""
    if self._residuals is None:
      return None
    return sum(int(np.prod(x.shape[1:])) * np.dtype(x.dtype).itemsize
               for x in jax.tree.leaves(self._residuals))
