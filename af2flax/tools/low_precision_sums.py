"""Sums computed in 16 bits inside a traced program: where bf16 training loses gradient.

With bfloat16 activations, a sum over many terms accumulated in bfloat16 keeps ~3
significant digits of a running total: on the CPU a bias gradient over the 33,792 MSA
positions of crop 256 came out 52% off the float32 sum (docs/benchmarks.md, 2026-12-04).
JAX writes such sums where nobody wrote `jnp.sum`: the transpose of every implicit broadcast
of a 16-bit value that needs a gradient (`x[None] + y`, a bias, a gate) is a `reduce_sum` in
the cotangent's dtype. (`jnp.sum` and `jnp.mean` themselves accumulate 16-bit inputs in
float32; matrix products accumulate in float32 on GPUs and TPUs.)

`low_precision_sums(jaxpr)` walks a closed jaxpr (into scans, loops, conditionals,
checkpoints, custom derivatives, `shard_map` and nested jits; not into Pallas kernels, whose
own accumulators are their code's) and lists every `reduce_sum` of a 16-bit operand over
more than one term, with the model's source line and name stack. `bench/bf16_numerics.py
--sums` runs it on the presets' train step; a test keeps that list empty.
"""

from __future__ import annotations

import collections
import dataclasses
import math
from typing import Any, Iterator

from jax.extend import core as jax_core
import jax.numpy as jnp
from jax._src import source_info_util  # the user frame of an equation (no public API)

LOW_PRECISION = (jnp.bfloat16, jnp.float16)


@dataclasses.dataclass(frozen=True)
class LowPrecisionSum:
  """A `reduce_sum` of a 16-bit operand: `terms` values summed into each output element."""

  terms: int
  operand_shape: tuple[int, ...]
  dtype: str
  where: str       # the user's source line, 'path/file.py:line'
  name_stack: str  # JAX's name stack: the Flax modules and transformations around it
  count: int = 1   # equations with these same fields (a scan body counts once)


def _sub_jaxprs(eqn) -> Iterator[Any]:
  for value in eqn.params.values():
    for item in value if isinstance(value, (list, tuple)) else (value,):
      if isinstance(item, jax_core.ClosedJaxpr):
        yield item.jaxpr
      elif isinstance(item, jax_core.Jaxpr):
        yield item


def _where(eqn) -> str:
  frame = source_info_util.user_frame(eqn.source_info.traceback)
  if frame is None:
    return "?"
  name = frame.file_name
  for root in ("af2flax/", "bench/", "tests/"):
    if root in name:
      name = root + name.rsplit(root, 1)[1]
      break
  return f"{name}:{frame.start_line}"


def low_precision_sums(closed_jaxpr: jax_core.ClosedJaxpr, min_terms: int = 2
                       ) -> list[LowPrecisionSum]:
  """Every `reduce_sum` of a 16-bit operand over at least `min_terms` terms in
  `closed_jaxpr` (e.g. `jax.make_jaxpr(train_step)(state, batch)`), most terms first;
  equations with the same shape, place and name stack are counted together."""
  found: collections.Counter = collections.Counter()

  def walk(jaxpr):
    for eqn in jaxpr.eqns:
      if eqn.primitive.name == "pallas_call":
        continue
      if eqn.primitive.name == "reduce_sum":
        aval = eqn.invars[0].aval
        if aval.dtype in LOW_PRECISION:
          terms = math.prod(aval.shape[a] for a in eqn.params["axes"])
          if terms >= min_terms:
            found[LowPrecisionSum(terms, tuple(aval.shape), str(aval.dtype), _where(eqn),
                                  str(eqn.source_info.name_stack))] += 1
      for sub in _sub_jaxprs(eqn):
        walk(sub)

  walk(closed_jaxpr.jaxpr)
  return sorted((dataclasses.replace(s, count=n) for s, n in found.items()),
                key=lambda s: (-s.terms, s.where))


def format_sums(sums: list[LowPrecisionSum]) -> str:
  """A table: terms, count, operand shape and dtype, source line, name stack."""
  if not sums:
    return "no sums in 16 bits"
  lines = [f"{'terms':>9s} {'count':>5s}  {'operand':32s} {'where':36s} name stack"]
  for s in sums:
    operand = f"{s.dtype}{list(s.operand_shape)}"
    lines.append(f"{s.terms:9d} {s.count:5d}  {operand:32s} {s.where:36s} {s.name_stack}")
  return "\n".join(lines)
