"""The train step as separately compiled programs, compiled concurrently.

The step of `step.make_train_step` is one XLA program. On an H200 its first compile takes
141-173 s (docs/benchmarks.md, 2026-12-02 night): GEMM autotuning on 16 threads (45 s), but
fusion (39 s) and most other passes on one thread per program. This step computes the same
thing as programs that XLA compiles at the same time. For an objective of stages
s_1..s_n (`step.StagedObjective`; AlphaFold's: the trunk, or its parts in `trunk_stages`,
then the heads with the losses):

  recycle        (params, rng, step, batch, k) -> prev
                 the no-gradient recycling iterations of each device's k-th example
                 (Suppl. 1.10); or, where the objective has them in parts
                 (`step.RecycleStages`, AlphaFold's `recycle_stages`):
  recycle.start  (params, rng, step, batch, k) -> prev, the first iteration's (zeros), and
  recycle.r_j    (params, rng, step, batch, k, iteration, prev, carry_j) -> carry_j+1
                 part j of one iteration (carry_0 is prev), run for iterations
                 0..maximum-1 (Python's loop);
                 an iteration past the example's count does nothing (the last part gives
                 `prev` back), so every device may run its own count; or, with
                 `recycle_through_forward` (and `RecycleStages.next_prev`), no program per
                 part: iteration i runs the forward programs below with i's features and
                 key (their residuals let go), then
  recycle.next   (batch, k, iteration, carry_n, prev) -> prev, for as many iterations as
                 `recycle.count` (batch, k) -> the most any device's example k runs says;
  forward.s_i    (params, rng, step, batch, k, carry_i[, iteration])
                 -> (carry_i+1, residuals_i)
                 stage i < n linearised with `jax.vjp` (carry_1 = prev); `iteration` with
                 `recycle_through_forward` (the final iteration: `maximum`);
  gradient.s_n   (params, rng, step, batch, k, carry_n)
                 -> {scalars, gradient, cotangent_n}
                 the last stage's loss and its gradient in one program (its forward and
                 backward passes run back to back, so XLA fuses or frees its intermediates
                 as in the one-program step instead of keeping them as residuals);
  backward.s_i   (params, {carry_i, carry_i+1, residuals_i, cotangent_i+1}, gradient)
                 -> {cotangent_i, gradient}
                 stage i's backward pass (under remat: the recomputation and the backward
                 pass) from its residuals, for i = n-1 down to 1, added to the gradient,
                 whose buffer it takes over (donated);
  accumulate     (gradient, scalars) -> sums
                 the device's first example's gradient clipped (Suppl. 1.11.3): the sums,
                 in the gradient's buffer (donated);
  accumulate.add (gradient, scalars, sums) -> sums
                 a later example's, added to the sums (donated); only where a device has
                 more than one example;
  update         (state, sums) -> (state, metrics)
                 the sums added over devices, averaged, Adam and the EMA
                 (`step.apply_summed_gradients`).

Python runs recycle, the forwards, gradient, the backwards and accumulate once per example
slot of a device (AlphaFold's one example per device: once), then update; a stage's
residuals are let go as soon as its backward program has run. No buffer of sums exists
while the first example's programs run: zero sums made before them (a parameter-sized
float32 buffer, 0.35 GiB for AlphaFold) would live through the backward passes' peak. The
values are those of the one-program step with the same objective: the same per-example
keys, split the same way; only XLA's fusion, hence rounding, differs. A one-stage objective
has no forward or backward program: recycle, gradient, accumulate.

A forward program's residuals are `jax.vjp`'s: its backward program is traced from the very
function `jax.vjp` returned in the forward program's trace, so the two always agree, and both
are compiled ahead of time from that one trace (a retrace could order residuals differently).
Residuals that are the parameters or the stage's carries are not copied: the backward
program takes those again. Residuals that the model's offloading checkpoint keeps in the
host's memory (`global_config.remat_offload`) stay there from one program to the next.
Examples vmapped together (`vmap_batch_size` > 1) are not supported here.
"""

from __future__ import annotations

from concurrent import futures as concurrent_futures
import re
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
# Where a stage's vjp leaf comes from when it is not a residual of its own.
_SOURCES = ("params", "carry_in", "carry_out")


def _example(local_batch: Mapping[str, jax.Array], index: jax.Array) -> dict[str, jax.Array]:
  return {key: jax.lax.dynamic_index_in_dim(value, index, axis=0, keepdims=False)
          for key, value in local_batch.items()}


def _lead(tree: PyTree) -> PyTree:
  """A leading axis of 1 on every leaf: a device's value, gathered over devices outside."""
  return jax.tree.map(lambda x: x[None], tree)


def _unlead(tree: PyTree) -> PyTree:
  return jax.tree.map(lambda x: x[0], tree)


def shapes_signature(tree: PyTree) -> tuple[Any, ...]:
  """The tree's structure with each leaf's shape and dtype (arrays or abstract)."""
  leaves, treedef = jax.tree.flatten(tree)
  return (treedef,) + tuple((tuple(x.shape), str(x.dtype)) for x in leaves)


_DOT = re.compile(r"stablehlo\.dot_general\b([^\n]*)")
_SSA_NAME = re.compile(r"%[\w.#:-]+")
_LOCATION = re.compile(r"\s*loc\(.*$")

COMPILE_SCHEDULES = ("together", "share_autotuning", "share_autotuning_all")


def matrix_products(stablehlo: str) -> frozenset[str]:
  """The distinct matrix products (`dot_general`s: operand and result types, dimension
  numbers) of a program's StableHLO text. XLA's GPU compiler autotunes each of its matrix
  product fusions once per process (its autotuning is cached), except where two programs
  compiling at the same time tune the same one each."""
  return frozenset(_LOCATION.sub("", _SSA_NAME.sub("%", match.group(1))).strip()
                   for match in _DOT.finditer(stablehlo))


def autotuning_schedule(products: Mapping[str, frozenset[str]], sizes: Mapping[str, int],
                        shallow: bool = False) -> tuple[list[str], dict[str, list[str]]]:
  """The order in which the programs start (the most matrix products first, then the longest
  StableHLO), and for each program the earlier ones it waits for, so that it finds their
  autotuning of its matrix products in XLA's cache instead of tuning the same products at
  the same time (`compile_schedule`).

  'share_autotuning_all' (`shallow=False`): for each of its products, the first program in
  that order holding it (which tunes it): every product is tuned once, and a program may
  wait for one that waits too. 'share_autotuning' (`shallow=True`): only programs that wait
  for nothing tune; a program waits for them where they hold at least half of its products,
  else it waits for nothing (and tunes all of its products, some also tuned beside it):
  waits never chain. Programs without matrix products wait for nothing."""
  order = sorted(products, key=lambda n: (-len(products[n]), -sizes.get(n, 0)))
  tuner: dict[str, str] = {}  # product -> the program that tunes it
  waits: dict[str, list[str]] = {}
  for name in order:
    tuned_before = [product for product in products[name] if product in tuner]
    held = {tuner[product] for product in tuned_before}
    if shallow and 2 * len(tuned_before) < len(products[name]):
      held = set()
    waits[name] = [earlier for earlier in order if earlier in held]
    if not (shallow and held):
      for product in products[name]:
        tuner.setdefault(product, name)
  return order, waits


def _in_host_memory(x: Any) -> bool:
  """Whether traced value `x` lives in the host's memory: a block input that the model's
  offloading checkpoint (`global_config.remat_offload`) keeps there for the backward pass."""
  return getattr(getattr(jax.typeof(x), "memory_space", None), "name", "") == "Host"


def _select_key(pred: jax.Array, on_true: jax.Array, on_false: jax.Array) -> jax.Array:
  """`jnp.where` for PRNG keys, raw (uint32) or typed."""
  if jax.dtypes.issubdtype(on_true.dtype, jax.dtypes.prng_key):
    data = jnp.where(pred, jax.random.key_data(on_true), jax.random.key_data(on_false))
    return jax.random.wrap_key_data(data, impl=jax.random.key_impl(on_true))
  return jnp.where(pred, on_true, on_false)


def _check_same_shapes(got: PyTree, expected: PyTree) -> None:
  """The last stage's gradient must be what the backward programs were lowered for."""
  if shapes_signature(got) != shapes_signature(expected):
    raise ValueError("the last stage's gradient is not shaped and typed as the parameters: "
                     f"{shapes_signature(got)} against {shapes_signature(expected)}")


def _per_device(tree: PyTree, devices: int, dtype: Any = None) -> PyTree:
  """Abstract per-device values of `tree`'s shapes: [devices, ...]."""
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct((devices,) + tuple(x.shape),
                                                     dtype or x.dtype), tree)


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
    self._stages = self._objective.stages
    self._optimizer = optimizer
    self._clip_norm = float(config.optimizer.clip_norm)
    self._ema_decay = float(config.optimizer.ema_decay)
    self._mesh = mesh
    self._state_shardings = state_shardings
    self._param_specs = param_specs
    self._flat = step_lib.flat_update(config, param_specs)
    # The recycling iterations through the forward programs (`recycle_through_forward`).
    self._through_forward = bool(config.get("recycle_through_forward", False))
    parts = self._objective.recycle_stages
    if self._through_forward and (parts is None or parts.next_prev is None
                                  or len(self._stages) < 2):
      raise ValueError("recycle_through_forward=True runs the recycling iterations through the "
                       "forward programs of the final iteration: it needs recycle_stages=True "
                       "and head_stages='structure,losses' (the structure module as a stage "
                       "of its own, whose output makes the next iteration's inputs)")
    # How many programs XLA compiles at once (`compile_workers`; 0: all of them).
    self._compile_workers = int(config.get("compile_workers", 0) or 0)
    if self._compile_workers < 0:
      raise ValueError(f"compile_workers={self._compile_workers}: expected 0 (every program "
                       "at once) or a positive number of programs compiled at a time")
    # 'together': every program compiled at once; 'share_autotuning(_all)': a program waits
    # for the larger programs that tune its matrix products (`autotuning_schedule`).
    self._compile_schedule = str(config.get("compile_schedule", "together"))
    if self._compile_schedule not in COMPILE_SCHEDULES:
      raise ValueError(f"compile_schedule={self._compile_schedule!r}: expected one of "
                       f"{COMPILE_SCHEDULES}")
    if self._compile_workers and self._compile_schedule != "together":
      raise ValueError(f"compile_workers={self._compile_workers} bounds the programs compiled "
                       f"at once by compile_schedule='together'; compile_schedule="
                       f"{self._compile_schedule!r} starts each when its waits end: set one")
    # Stages whose programs XLA compiles without Triton GEMMs (`cublas_stages`).
    self._cublas_stages = tuple(name.strip() for name in
                                str(config.get("cublas_stages", "") or "").split(",")
                                if name.strip())
    stage_names = [name for name, _ in self._stages]
    unknown = [name for name in self._cublas_stages if name not in stage_names]
    if unknown:
      raise ValueError(f"cublas_stages={','.join(self._cublas_stages)!r}: no stage "
                       f"{', '.join(map(repr, unknown))}; this step's stages are "
                       f"{', '.join(stage_names)}")
    self._replicated = sharding_lib.replicated(mesh)
    self._per_device = NamedSharding(mesh, _PER_DEVICE)
    self._devices = int(np.prod([mesh.shape[a] for a in sharding_lib.BATCH_AXES]))
    self.compiled: dict[str, Any] = {}  # name -> XLA's compiled program, after compile()
    self._signature = None
    self._local_examples = 1  # examples per device: set from the batch when lowering
    self._vjp: dict[int, Any] = {}  # stage -> (treedef, layout) of its vjp, from tracing
    self._residuals: dict[int, Any] = {}  # stage -> its residuals, abstract
    self._host_residuals: dict[int, list[bool]] = {}  # stage -> which are in host memory
    self.compile_seconds: dict[str, float] = {}

  def _name(self, kind: str, stage: int) -> str:
    return f"{kind}.{self._stages[stage][0]}"

  @property
  def _recycle_names(self) -> list[str]:
    parts = self._objective.recycle_stages
    if parts is None:
      return ["recycle"]
    if self._through_forward:
      return ["recycle.start", "recycle.count", "recycle.next"]
    return ["recycle.start"] + [f"recycle.{name}" for name, _ in parts.stages]

  @property
  def program_names(self) -> list[str]:
    """The programs, in the order they run."""
    n = len(self._stages)
    return (self._recycle_names + [self._name("forward", i) for i in range(n - 1)]
            + [self._name("gradient", n - 1)]
            + [self._name("backward", i) for i in reversed(range(n - 1))]
            + ["accumulate"] + (["accumulate.add"] if self._local_examples > 1 else [])
            + ["update"])

  def compiler_options(self, name: str) -> dict[str, Any] | None:
    """XLA's options for program `name`: a program of a stage named in the config's
    `cublas_stages` (its forward, backward or gradient program, or a recycling part of that
    name) compiles with `xla_gpu_enable_triton_gemm=False`, so that its matrix products go
    to cuBLAS, whose autotuning times the library's algorithms and compiles no kernel, where
    XLA's Triton GEMM autotuning compiles ~30-40 candidate kernels per product (its Hopper
    list; two thirds of the split step's compile, H200, 2026-12-05). Other programs: None
    (XLA_FLAGS as they are). XLA:CPU accepts and ignores the option."""
    stage = name.partition(".")[2]
    if stage in self._cublas_stages:
      return {"xla_gpu_enable_triton_gemm": False}
    return None

  # Programs, as traced functions of global arrays.

  def _shard_map(self, fn, in_specs, out_specs):
    return jax.shard_map(fn, mesh=self._mesh, in_specs=in_specs, out_specs=out_specs,
                         check_vma=False)

  def _local_example(self, local_batch, local_rngs, index):
    """Inside `shard_map`: this device's example `index` and its two keys (recycling
    iterations, final iteration: `StagedObjective.keys`)."""
    return (_example(local_batch, index), *self._objective.keys(local_rngs[index]))

  def _recycle(self, params, rng, step, batch, index):
    rngs = step_lib.example_rngs(rng, step, jax.tree.leaves(batch)[0].shape[0])

    def local(params, local_batch, local_rngs, index):
      example, recycle_rng, _ = self._local_example(local_batch, local_rngs, index)
      return _lead(self._objective.recycle(params, example, recycle_rng))

    return self._shard_map(local, (P(), _PER_DEVICE, _PER_DEVICE, P()), _PER_DEVICE)(
        params, batch, rngs, index)

  def _recycle_start(self, params, rng, step, batch, index):
    del params, rng, step
    parts = self._objective.recycle_stages

    def local(local_batch, index):
      return _lead(parts.initial(_example(local_batch, index)))

    return self._shard_map(local, (_PER_DEVICE, P()), _PER_DEVICE)(batch, index)

  def _recycle_part(self, part, params, rng, step, batch, index, iteration, prev, carry):
    """Part `part` of recycling iteration `iteration` of this device's example `index`; past
    the example's count of iterations, zeros (the last part: `prev` itself)."""
    parts = self._objective.recycle_stages
    stage_fn = parts.stages[part][1]
    last = part == len(parts.stages) - 1
    rngs = step_lib.example_rngs(rng, step, jax.tree.leaves(batch)[0].shape[0])

    def local(params, local_batch, local_rngs, index, iteration, local_prev, local_carry):
      example, recycle_rng, _ = self._local_example(local_batch, local_rngs, index)
      prev, carry = _unlead(local_prev), _unlead(local_carry)
      run = lambda: stage_fn(params, example, prev, carry if part else prev,
                             parts.key(recycle_rng, iteration), iteration)
      skip = ((lambda: prev) if last else
              (lambda: jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), jax.eval_shape(run))))
      return _lead(jax.lax.cond(iteration < parts.count(example), run, skip))

    return self._shard_map(
        local, (P(), _PER_DEVICE, _PER_DEVICE, P(), P(), _PER_DEVICE, _PER_DEVICE),
        _PER_DEVICE)(params, batch, rngs, index, iteration, prev, carry)

  def _recycle_count(self, batch, index):
    """How many recycling iterations the devices' examples `index` run: the most of any
    device (replicated), for Python to run that many (`recycle_through_forward`)."""
    parts = self._objective.recycle_stages

    def local(local_batch, index):
      return jax.lax.pmax(parts.count(_example(local_batch, index)), sharding_lib.BATCH_AXES)

    return self._shard_map(local, (_PER_DEVICE, P()), P())(batch, index)

  def _recycle_next(self, batch, index, iteration, carry, prev):
    """Iteration `iteration`'s `prev` for the next from the last forward program's output
    (`RecycleStages.next_prev`); `prev` itself on a device whose example runs fewer
    iterations (`recycle_through_forward`)."""
    parts = self._objective.recycle_stages

    def local(local_batch, index, iteration, local_carry, local_prev):
      prev = _unlead(local_prev)
      ran = iteration < parts.count(_example(local_batch, index))
      return _lead(jax.tree.map(lambda new, old: jnp.where(ran, new, old),
                                parts.next_prev(_unlead(local_carry), prev), prev))

    return self._shard_map(local, (_PER_DEVICE, P(), P(), _PER_DEVICE, _PER_DEVICE),
                           _PER_DEVICE)(batch, index, iteration, carry, prev)

  def _stage_on_example(self, stage, local, params, rng, step, batch, index, carry, *at):
    """`local(primals, fn, params, carry)` inside `shard_map` for this device's example
    `index`: `fn` is stage `stage` of the final iteration as a function of `primals` (the
    parameters, and the carry after the first stage: the recycled inputs carry no
    gradient); `params` and `carry` are this device's values (a vjp's leaves may be them).
    `at` (`recycle_through_forward`): the iteration i, recycling iteration i with its
    features and key (`RecycleStages.key`) where i is below the example's count, else the
    final iteration (Python passes `maximum` for it)."""
    rngs = step_lib.example_rngs(rng, step, jax.tree.leaves(batch)[0].shape[0])
    stage_fn = self._stages[stage][1]
    parts = self._objective.recycle_stages

    def on_example(params, local_batch, local_rngs, index, local_carry, *at):
      example, recycle_rng, final_rng = self._local_example(local_batch, local_rngs, index)
      carry = _unlead(local_carry)
      if at:
        count = parts.count(example)
        key = _select_key(at[0] >= count, final_rng, parts.key(recycle_rng, at[0]))
        fn = lambda p, c: stage_fn(p, example, c, key, iteration=jnp.minimum(at[0], count))
      else:
        fn = lambda p, c: stage_fn(p, example, c, final_rng)
      if stage == 0:
        return local((params,), lambda p: fn(p, carry), params, carry)
      return local((params, carry), fn, params, carry)

    return self._shard_map(
        on_example, (P(), _PER_DEVICE, _PER_DEVICE, P(), _PER_DEVICE) + (P(),) * len(at),
        _PER_DEVICE)(params, batch, rngs, index, carry, *at)

  def _forward(self, stage, *args):
    def local(primals, fn, params, carry):
      out, vjp_fn = jax.vjp(fn, *primals)
      leaves, treedef = jax.tree.flatten(vjp_fn)
      # Leaves that are the parameters or the carries come back as they are; not outputs.
      known = {}
      for source, tree in zip(_SOURCES, (params, carry, out)):
        known.update({id(leaf): (source, i) for i, leaf in enumerate(jax.tree.leaves(tree))})
      layout = [known.get(id(leaf)) for leaf in leaves]
      self._vjp[stage] = (treedef, layout)
      residuals = [leaf for leaf, where in zip(leaves, layout) if where is None]
      self._host_residuals[stage] = [_in_host_memory(leaf) for leaf in residuals]
      return _lead((out, residuals))

    return self._stage_on_example(stage, local, *args)

  def _gradient(self, *args):
    stage = len(self._stages) - 1

    def local(primals, fn, params, carry):  # pylint: disable=unused-argument
      loss, vjp_fn, aux = jax.vjp(fn, *primals, has_aux=True)
      grads, *carry_cotangent = vjp_fn(jnp.ones_like(loss))
      result = {"scalars": step_lib.example_scalars(loss, aux), "gradient": grads}
      if carry_cotangent:
        result["cotangent"] = carry_cotangent[0]
      return _lead(result)

    return self._stage_on_example(stage, local, *args)

  def _backward(self, stage, params, inputs, gradient):
    treedef, layout = self._vjp[stage]

    def local(params, local_inputs, local_gradient):
      inputs = _unlead(local_inputs)
      sources = {"params": jax.tree.leaves(params),
                 "carry_in": jax.tree.leaves(inputs["carry_in"]),
                 "carry_out": jax.tree.leaves(inputs["carry_out"])}
      remaining = iter(inputs["residuals"])
      vjp_fn = jax.tree.unflatten(treedef, [
          sources[where[0]][where[1]] if where is not None else next(remaining)
          for where in layout])
      grads, *carry_cotangent = vjp_fn(inputs["cotangent"])
      result = {"gradient": jax.tree.map(jnp.add, _unlead(local_gradient), grads)}
      if carry_cotangent:
        result["cotangent"] = carry_cotangent[0]
      return _lead(result)

    return self._shard_map(local, (P(), _PER_DEVICE, _PER_DEVICE), _PER_DEVICE)(
        params, inputs, gradient)

  def _accumulate(self, gradient, scalars, *sums):
    """The clipped example (`sums` not given: the first) or the sums plus it."""
    def local(local_gradient, local_scalars, *local_sums):
      grads, example = step_lib.clip_example_gradient(
          _unlead(local_gradient), _unlead(local_scalars), self._clip_norm)
      if not local_sums:  # float32 sums, as `accumulate.add` and `update` take them
        return _lead((jax.tree.map(lambda g: g.astype(jnp.float32), grads), example))
      grad_sums, scalar_sums = _unlead(local_sums[0])
      return _lead((jax.tree.map(jnp.add, grad_sums, grads),
                    {k: scalar_sums[k] + example[k] for k in scalar_sums}))

    return self._shard_map(local, (_PER_DEVICE,) * (2 + len(sums)), _PER_DEVICE)(
        gradient, scalars, *sums)

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
    """The programs for these shapes, traced and lowered one after another (Python), by
    name (`program_names`). `state` and `batch` may be abstract (`jax.ShapeDtypeStruct`s)."""
    return dict(self._lower_each(state, batch))

  def _lower_each(self, state, batch):
    """`lower`'s programs as (name, lowered) pairs, each as soon as it is lowered, so that
    `compile` starts the longest compiles first: each stage's backward program right after
    its forward program (it needs that trace's vjp and the shapes only; on an H200 the
    trunk's backward program was the longest compile, 82.4 s, 2026-12-05), then the last
    stage's gradient, accumulate and update, and the recycling iterations' parts last (each
    a short compile; a one-program recycling comes first, it is one of the longest)."""
    batch_size = self._count_local_examples(batch)
    rep, dev = self._replicated, self._per_device
    # One sharding for the whole state (a pytree prefix) or a tree of them.
    params_sh, rng_sh, step_sh = (getattr(self._state_shardings, name, self._state_shardings)
                                  for name in ("params", "rng", "step"))
    batch_sh = sharding_lib.batch_sharding(self._mesh)
    index = jax.ShapeDtypeStruct((), jnp.int32)
    n = len(self._stages)
    example_in = (params_sh, rng_sh, step_sh, batch_sh, rep, dev)
    example_args = (state.params, state.rng, state.step, batch, index)
    # The example's gradient, as the last stage's program returns it and each backward
    # program adds to it: per device, shaped and typed as the parameters.
    gradient = _per_device(state.params, self._devices)

    parts = self._objective.recycle_stages
    if parts is None:
      recycle = jax.jit(self._recycle, in_shardings=example_in[:5],
                        out_shardings=dev).lower(*example_args)
    else:
      recycle = jax.jit(self._recycle_start, in_shardings=example_in[:5],
                        out_shardings=dev).lower(*example_args)
    yield self._recycle_names[0], recycle
    carries = [recycle.out_info]
    # The forward programs' iteration (replicated), with `recycle_through_forward`.
    at = (index,) if self._through_forward else ()
    if self._through_forward:
      yield "recycle.count", jax.jit(self._recycle_count, in_shardings=(batch_sh, rep),
                                     out_shardings=rep).lower(batch, index)
    for i in range(n - 1):
      name = self._name("forward", i)
      # The residuals' shardings are left to the program (None): per device, as shard_map
      # gives them, in the memory where they were made. Residuals that the model's
      # offloading checkpoint keeps in the host's memory stay there; a device sharding would
      # copy them back to the accelerator (H200, fine-tuning shapes, 2026-12-05: a peak of
      # 24.81 GiB against the one-program step's 14.96).
      forward = jax.jit(
          lambda *args, i=i: self._forward(i, *args), in_shardings=example_in + (rep,) * len(at),
          out_shardings=(dev, None)).lower(*example_args, carries[i], *at)
      yield name, forward
      out, self._residuals[i] = forward.out_info
      carries.append(out)
      inputs = self._backward_inputs(i, carries, self._residuals[i], carries[i + 1])
      inputs_sh = {**jax.tree.map(lambda _: dev, inputs), "residuals": [
          dev.with_memory_kind("pinned_host") if host else dev
          for host in self._host_residuals[i]]}
      yield self._name("backward", i), jax.jit(
          lambda params, inputs, gradient, i=i: self._backward(i, params, inputs, gradient),
          in_shardings=(params_sh, inputs_sh, dev), out_shardings=dev, donate_argnums=2,
      ).lower(state.params, inputs, gradient)
    gradient_program = jax.jit(self._gradient, in_shardings=example_in,
                               out_shardings=dev).lower(*example_args, carries[n - 1])
    yield self._name("gradient", n - 1), gradient_program
    last = gradient_program.out_info
    _check_same_shapes(last["gradient"], gradient)
    scalars = last["scalars"]
    sums = (_per_device(state.params, self._devices, jnp.float32),
            {k: jax.ShapeDtypeStruct((self._devices,), jnp.float32)
             for k in list(scalars) + ["grad_norm", "clipped_fraction"]})
    yield "accumulate", jax.jit(
        self._accumulate, in_shardings=(dev, dev), out_shardings=dev,
        donate_argnums=0).lower(last["gradient"], scalars)
    if self._local_examples > 1:
      yield "accumulate.add", jax.jit(
          self._accumulate, in_shardings=(dev, dev, dev), out_shardings=dev,
          donate_argnums=2).lower(last["gradient"], scalars, sums)
    yield "update", jax.jit(
        lambda state, sums: self._update(state, sums, batch_size),
        in_shardings=(self._state_shardings, dev),
        out_shardings=(self._state_shardings, rep), donate_argnums=0).lower(state, sums)
    if parts is not None and self._through_forward:
      yield "recycle.next", jax.jit(
          self._recycle_next, in_shardings=(batch_sh, rep, rep, dev, dev), out_shardings=dev,
      ).lower(batch, index, index, carries[n - 1], carries[0])
    elif parts is not None:
      prev, carry = carries[0], {}
      for j, name in enumerate(self._recycle_names[1:]):
        program = jax.jit(
            lambda *args, j=j: self._recycle_part(j, *args),
            in_shardings=example_in[:5] + (rep, dev, dev), out_shardings=dev,
        ).lower(*example_args, index, prev, carry)
        yield name, program
        carry = program.out_info

  def _count_local_examples(self, batch) -> int:
    """Sets `_local_examples` (the examples per device) from `batch`; returns its size."""
    batch_size = jax.tree.leaves(batch)[0].shape[0]
    if batch_size % self._devices:
      raise ValueError(f"batch of {batch_size} examples does not split over "
                       f"{self._devices} devices")
    self._local_examples = batch_size // self._devices
    return batch_size

  @staticmethod
  def _backward_inputs(stage, carries, residuals, cotangent):
    """What backward program `stage` takes besides the parameters and the gradient
    (abstract or arrays): `carries` are the stage inputs (carries[0] = prev)."""
    return {"carry_in": carries[stage], "carry_out": carries[stage + 1],
            "residuals": residuals, "cotangent": cotangent}

  def compile(self, state: state_lib.TrainState, batch: Mapping[str, Any],
              concurrent: bool = True,
              lowered: dict[str, jax.stages.Lowered] | None = None) -> dict[str, float]:
    """Traces and lowers the programs (`lower`) while XLA compiles them, each on a thread of
    its own as soon as it is lowered (XLA's compile does not hold Python's lock), so the
    compiles overlap the tracing and each other; `concurrent=False`: everything lowered
    first, then compiled one after another, to time each alone. (The recycling program once
    waited for the first forward program, to find its matrix products' autotuning cached:
    on an H200 it still took 43.1 s after forward.trunk's 45.6 s.) Returns (and keeps in
    `compile_seconds`) each program's XLA seconds, `trace_lower` (the time until the last
    program was lowered) and `wall` (all of it). `lowered`: what `lower` returned for these
    shapes, not yet compiled (then `trace_lower` is 0). The config's `compile_workers` (N > 0)
    compiles at most N programs at a time, in the order they are lowered (longest compile
    first); the rest wait. On an H100 (2026-12-05) the 16 programs of
    `bf16-auto-split3hr-flatupdate`, all at once, took 84-100 s of XLA against a sum of 88 s
    for the same programs one after another with GEMM autotuning cached (the backward
    programs 93-100 s each among the others, 11-12 s alone); with 2 or 4 at a time, 96-103 s.
    So N bounds the compile's host memory, not its time. The config's `compile_schedule`
    'share_autotuning' or 'share_autotuning_all' lowers every program first, then starts
    each once the larger programs that tune its matrix products are compiled
    (`autotuning_schedule`; the others at once; not with `compile_workers`), so that XLA tunes
    a matrix product once, not once per program compiling it at the same time."""
    start = time.perf_counter()

    def compile_one(name, program):
      begin = time.perf_counter()
      compiled = program.compile(compiler_options=self.compiler_options(name))
      return name, compiled, time.perf_counter() - begin

    self._count_local_examples(batch)
    programs = lowered.items() if lowered else self._lower_each(state, batch)
    if concurrent and self._compile_schedule != "together":
      programs = dict(programs)
      seconds = {"trace_lower": 0.0 if lowered else time.perf_counter() - start}
      results = self._compile_sharing_autotuning(programs, compile_one)
    elif concurrent:
      workers = self._compile_workers or len(self.program_names)
      with concurrent_futures.ThreadPoolExecutor(max_workers=workers) as pool:
        pending = [pool.submit(compile_one, name, program) for name, program in programs]
        seconds = {"trace_lower": 0.0 if lowered else time.perf_counter() - start}
        results = [future.result() for future in pending]
    else:
      programs = dict(programs)
      seconds = {"trace_lower": 0.0 if lowered else time.perf_counter() - start}
      results = [compile_one(name, programs[name]) for name in self.program_names]
    self.compiled = {name: compiled for name, compiled, _ in results}
    seconds.update({name: s for name, _, s in results})
    seconds["wall"] = time.perf_counter() - start
    rep = self._replicated
    self._indices = [jax.device_put(np.int32(k), rep) for k in range(self._local_examples)]
    parts = self._objective.recycle_stages
    self._iterations = [jax.device_put(np.int32(i), rep)
                        for i in range(parts.maximum if parts is not None else 0)]
    # The final iteration, as the forward programs take it (`recycle_through_forward`).
    self._final_iteration = jax.device_put(
        np.int32(parts.maximum if parts is not None else 0), rep)
    self._signature = shapes_signature((state, batch))
    self.compile_seconds = seconds
    logging.info("split train step compiled: %s",
                 ", ".join(f"{k} {v:.1f} s" for k, v in seconds.items()))
    return seconds

  def _compile_sharing_autotuning(self, programs: dict[str, Any], compile_one: Any
                                  ) -> list[tuple[str, Any, float]]:
    """`compile` under a 'share_autotuning' schedule: every program on a thread of its own,
    each starting once the programs it waits for (`autotuning_schedule`) are compiled."""
    texts = {name: program.as_text() for name, program in programs.items()}
    order, waits = autotuning_schedule(
        {name: matrix_products(text) for name, text in texts.items()},
        {name: text.count("\n") for name, text in texts.items()},
        shallow=self._compile_schedule == "share_autotuning")
    logging.info("split train step compile, programs sharing matrix products' autotuning: %s",
                 "; ".join(f"{name} after {', '.join(waits[name])}"
                           for name in order if waits[name]) or "none")
    pending: dict[str, concurrent_futures.Future] = {}

    def after_waits(name):
      for earlier in waits[name]:
        pending[earlier].result()  # an earlier program's error is raised here too
      return compile_one(name, programs[name])

    # Enough threads for every program: a waiting one never holds up a program it waits for.
    with concurrent_futures.ThreadPoolExecutor(max_workers=len(order)) as pool:
      for name in order:  # each program's waits are submitted before it
        pending[name] = pool.submit(after_waits, name)
      return [pending[name].result() for name in order]

  def __call__(self, state: state_lib.TrainState, batch: Mapping[str, jax.Array]
               ) -> tuple[state_lib.TrainState, dict[str, jax.Array]]:
    if not self.compiled or shapes_signature((state, batch)) != self._signature:
      self.compile(state, batch)
    run, n = self.compiled, len(self._stages)
    example_args = (state.params, state.rng, state.step, batch)
    sums = None
    for index in self._indices:
      carries = [self._run_recycling(example_args, index)]
      residuals = []
      final = (self._final_iteration,) if self._through_forward else ()
      for i in range(n - 1):
        out, stage_residuals = run[self._name("forward", i)](*example_args, index, carries[i],
                                                             *final)
        carries.append(out)
        residuals.append(stage_residuals)
      result = run[self._name("gradient", n - 1)](*example_args, index, carries[n - 1])
      scalars = result["scalars"]
      for i in reversed(range(n - 1)):
        inputs = self._backward_inputs(i, carries, residuals[i], result["cotangent"])
        residuals[i] = None  # freed once the backward program has read them
        result = run[self._name("backward", i)](state.params, inputs, result["gradient"])
        del inputs
      sums = (run["accumulate"](result["gradient"], scalars) if sums is None
              else run["accumulate.add"](result["gradient"], scalars, sums))
    return run["update"](state, sums)

  def _run_recycling(self, example_args, index):
    """The recycling iterations of each device's example `index`: their `prev`."""
    run = self.compiled
    if self._objective.recycle_stages is None:
      return run["recycle"](*example_args, index)
    prev = run["recycle.start"](*example_args, index)
    if self._through_forward:
      # The final iteration's forward programs, then `recycle.next`, for as many iterations
      # as the devices' examples run (Python waits for that count, so for the device to
      # finish what was queued before it).
      count = int(run["recycle.count"](example_args[3], index))
      for iteration in self._iterations[:count]:
        carry = prev
        for i in range(len(self._stages) - 1):
          carry, _ = run[self._name("forward", i)](*example_args, index, carry, iteration)
        prev = run["recycle.next"](example_args[3], index, iteration, carry, prev)
      return prev
    for iteration in self._iterations:
      carry = {}
      for name in self._recycle_names[1:]:
        carry = run[name](*example_args, index, iteration, prev, carry)
      prev = carry
    return prev

  def residual_bytes(self, host: bool = False) -> dict[str, int]:
    """Bytes per device of each stage's residuals in the accelerator's memory (`host`: in
    the host's), by forward program ({} before compiling)."""
    return {self._name("forward", i): sum(
        int(np.prod(x.shape[1:])) * np.dtype(x.dtype).itemsize
        for x, in_host in zip(jax.tree.leaves(r), self._host_residuals[i]) if in_host == host)
            for i, r in self._residuals.items()}
