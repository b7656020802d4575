"""Device mesh and sharding rules inferred from the train state's paths and shapes.

The mesh has two axes: `data` (examples of the batch) and `fsdp` (parameters, optimizer
state and EMA are split over it; it also carries examples). The batch is sharded over both
axes, so every device works on its own examples; with `fsdp` = 1 this is plain data
parallelism and every parameter is replicated. The same code runs on one CPU and on a pod:
only the mesh shape in the config changes.

Parameter placement follows big_vision's `sharding.py`: a list of `(regex, tactic)` rules is
matched against each leaf's path ("params/alphafold_iteration/evoformer/..."); the first rule
that matches decides. Tactics:
  replicate      every device holds the whole array.
  fsdp           split the largest axis that the `fsdp` size divides, if the array is larger
                 than `min_size_to_shard_mb`.
  fsdp_stacked   the same but never the leading axis: for layer stacks scanned with `nn.scan`
                 ([48, ...] Evoformer blocks), where splitting the layer axis would make every
                 scan iteration gather the whole stack.
"""

from __future__ import annotations

import re
from typing import Any, Sequence

from absl import logging
import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
import ml_collections
import numpy as np

PyTree = Any

DATA_AXIS = "data"
FSDP_AXIS = "fsdp"
BATCH_AXES = (DATA_AXIS, FSDP_AXIS)


def make_mesh(config: ml_collections.ConfigDict, devices: Sequence[Any] | None = None) -> Mesh:
  """A ('data', 'fsdp') mesh over all devices; `config.data` = -1 takes what `fsdp` leaves."""
  devices = list(jax.devices() if devices is None else devices)
  fsdp = int(config.get("fsdp", 1))
  data = int(config.get("data", -1))
  if data == -1:
    if len(devices) % fsdp:
      raise ValueError(f"mesh.fsdp={fsdp} does not divide the {len(devices)} devices")
    data = len(devices) // fsdp
  if data * fsdp != len(devices):
    raise ValueError(f"mesh.data={data} x mesh.fsdp={fsdp} != {len(devices)} devices; "
                     "set mesh.data=-1 to use all devices")
  # Auto axes: XLA propagates shardings from the inputs (jax >= 0.10 defaults to Explicit).
  axis_types = (jax.sharding.AxisType.Auto,) * 2
  if devices == list(jax.devices()):
    # make_mesh orders devices for fast collectives on the physical topology (TPU torus).
    return jax.make_mesh((data, fsdp), (DATA_AXIS, FSDP_AXIS), axis_types=axis_types,
                         devices=devices)
  return Mesh(np.asarray(devices).reshape(data, fsdp), (DATA_AXIS, FSDP_AXIS),
              axis_types=axis_types)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (example) axis over every device of the mesh, the rest unsplit."""
  return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def path_name(path: tuple[Any, ...]) -> str:
  """'params/evoformer/weights' from a pytree key path (dict keys, attributes, indices)."""
  parts = []
  for key in path:
    for attr in ("key", "name", "idx"):
      if hasattr(key, attr):
        parts.append(str(getattr(key, attr)))
        break
    else:
      parts.append(str(key))
  return "/".join(parts)


def _fsdp_spec(shape: tuple[int, ...], itemsize: int, fsdp_size: int, min_size_mb: float,
               skip_leading: bool) -> tuple[Any, ...]:
  spec = [None] * len(shape)
  if fsdp_size == 1 or int(np.prod(shape)) * itemsize < min_size_mb * 2**20:
    return tuple(spec)
  candidates = range(1 if skip_leading else 0, len(shape))
  for axis in sorted(candidates, key=lambda a: -shape[a]):
    if shape[axis] % fsdp_size == 0:
      spec[axis] = FSDP_AXIS
      return tuple(spec)
  return tuple(spec)


def infer_sharding(tree: PyTree, mesh: Mesh, rules: Sequence[tuple[str, str]],
                   min_size_to_shard_mb: float = 0.0) -> PyTree:
  """A tree of `NamedSharding`s for `tree` (arrays or `jax.ShapeDtypeStruct`s), by rules.

  `rules` is a sequence of (regex, tactic); a leaf takes the first rule whose regex matches
  its full path (`re.fullmatch`), and is replicated when none does.
  """
  fsdp_size = mesh.shape[FSDP_AXIS]
  compiled = [(re.compile(pattern), tactic) for pattern, tactic in rules]
  for _, tactic in compiled:
    if tactic not in ("replicate", "fsdp", "fsdp_stacked"):
      raise ValueError(f"unknown sharding tactic {tactic!r}; expected replicate, fsdp or "
                       "fsdp_stacked")
  unsharded = []

  def leaf_sharding(path, leaf):
    name = path_name(path)
    shape = tuple(leaf.shape)
    tactic = next((t for pattern, t in compiled if pattern.fullmatch(name)), "replicate")
    spec = (None,) * len(shape)
    if tactic in ("fsdp", "fsdp_stacked"):
      spec = _fsdp_spec(shape, np.dtype(leaf.dtype).itemsize, fsdp_size,
                        min_size_to_shard_mb, skip_leading=tactic == "fsdp_stacked")
      if fsdp_size > 1 and all(s is None for s in spec) and len(shape):
        unsharded.append(f"{name}{list(shape)}")
    return NamedSharding(mesh, P(*spec))

  shardings = jax.tree_util.tree_map_with_path(leaf_sharding, tree)
  if unsharded:
    logging.info("fsdp: %d arrays stay replicated (small or no axis divisible by %d): %s",
                 len(unsharded), fsdp_size, ", ".join(unsharded[:10]))
  return shardings


def global_batch(local_batch: PyTree, sharding: NamedSharding) -> PyTree:
  """Assembles each process's local examples into global arrays sharded along the batch.

  Each host passes its own `global_batch_size / process_count` examples (its shard of the
  input pipeline); on one host this is a plain sharded `device_put`.
  """
  return jax.tree.map(
      lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), local_batch)


def abstract_with_sharding(abstract_tree: PyTree, shardings: PyTree) -> PyTree:
  """`jax.ShapeDtypeStruct`s carrying their target sharding (for sharded restores)."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      abstract_tree, shardings)


def init_sharded(init_fn: Any, *args: Any, mesh: Mesh, rules: Sequence[tuple[str, str]],
                 min_size_to_shard_mb: float = 0.0) -> tuple[PyTree, PyTree]:
  """Runs `init_fn(*args)` so that each device creates only its shards; returns (tree, shardings).

  The shapes come from `jax.eval_shape`, the shardings from `infer_sharding`, and the jitted
  init writes straight into them: a model too big for one device never exists whole.
  """
  abstract = jax.eval_shape(init_fn, *args)
  shardings = infer_sharding(abstract, mesh, rules, min_size_to_shard_mb)
  return jax.jit(init_fn, out_shardings=shardings)(*args), shardings


def jit_train_step(train_step: Any, state_shardings: PyTree, mesh: Mesh) -> Any:
  """The train step jitted with the state's shardings, the batch over all devices.

  The state is donated (updated in place); metrics come back replicated.
  """
  return jax.jit(train_step,
                 in_shardings=(state_shardings, batch_sharding(mesh)),
                 out_shardings=(state_shardings, replicated(mesh)),
                 donate_argnums=0)


def reduce_over_devices(x: jax.Array, spec: P) -> jax.Array:
  """Inside `shard_map`: the sum over all devices, split as `spec` says (fsdp: reduce-scatter)."""
  fsdp_axes = [i for i, name in enumerate(spec) if name == FSDP_AXIS]
  if not fsdp_axes:
    return jax.lax.psum(x, BATCH_AXES)
  x = jax.lax.psum(x, DATA_AXIS)
  return jax.lax.psum_scatter(x, FSDP_AXIS, scatter_dimension=fsdp_axes[0], tiled=True)


def reduce_tree_over_devices(tree: PyTree, specs: PyTree) -> PyTree:
  """Inside `shard_map`: `reduce_over_devices` of every leaf of `tree`, with the
  `PartitionSpec` that `specs` (a prefix tree of them) gives it."""
  def reduce_subtree(spec, subtree):
    return jax.tree.map(lambda x: reduce_over_devices(x, spec), subtree)
  return jax.tree.map(reduce_subtree, specs, tree, is_leaf=lambda x: isinstance(x, P))


def sum_over_examples(fn: Any, mesh: Mesh, out_specs: PyTree, vmap_size: int = 1) -> Any:
  """`(shared, batch) -> Σ over the batch's examples of fn(shared, example)`, device-local.

  Every device sums `fn` over its own examples of the batch (leading axis sharded over the
  mesh's batch axes) with `lax.scan`, `vmap_size` examples at a time (`jax.vmap` inside each
  scan step), then the sums are added over devices: all-reduced, or reduce-scattered for outputs
  whose `out_specs` entry splits an axis over `fsdp` (a prefix tree of `PartitionSpec`s of
  `fn`'s output, e.g. the parameters' specs for gradients and P() for scalars). `shared` (the
  parameters) is seen whole by every device.

  This is AlphaFold's data parallelism (each core works on its own examples, one at a time,
  Suppl. 1.11.3): per-example work never crosses devices, and with `vmap_size` 1 the compiled
  program holds one example's gradient at a time, whatever the local batch size.
  """

  def local_sum(shared, local_batch):
    num_local = jax.tree.leaves(local_batch)[0].shape[0]
    if num_local % vmap_size:
      raise ValueError(f"{num_local} examples per device is not a multiple of "
                       f"vmap_size={vmap_size}")
    if vmap_size == 1:  # no batch axis at all inside: the network compiles as for one example
      chunks, chunk_fn = local_batch, fn
      chunk_sum = lambda out: out
    else:
      chunks = jax.tree.map(
          lambda x: x.reshape((num_local // vmap_size, vmap_size) + x.shape[1:]), local_batch)
      chunk_fn = jax.vmap(fn, in_axes=(None, 0))
      chunk_sum = lambda out: jax.tree.map(lambda x: jnp.sum(x, axis=0), out)
    # jit: the shapes found here and the scan body below share one trace of the network.
    chunk_value = jax.jit(lambda s, c: chunk_sum(chunk_fn(s, c)))
    out_shape = jax.eval_shape(chunk_value, shared, jax.tree.map(lambda x: x[0], chunks))
    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), out_shape)

    def add_chunk(total, chunk):
      return jax.tree.map(jnp.add, total, chunk_value(shared, chunk)), None

    total, _ = jax.lax.scan(add_chunk, zeros, chunks)
    return reduce_tree_over_devices(total, out_specs)

  return jax.shard_map(local_sum, mesh=mesh, in_specs=(P(), P(BATCH_AXES)),
                       out_specs=out_specs, check_vma=False)
