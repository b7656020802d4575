"""How the backend sums a bf16 reduction: the transpose of a broadcast, alone and fused.

    python bench/bf16_reduction.py [--rows 33792] [--channels 64]

JAX transposes `jnp.broadcast_to(v, (rows, channels))` into a `reduce_sum` over the rows in
the cotangent's dtype. In bf16 (8 mantissa bits), a sum over tens of thousands of terms is
accurate only if the backend accumulates in float32 and rounds once. The model does not rely
on it: `primitives.expand` and `add_bias` sum their gradients in float32 themselves
(docs/model.md). This measures what the backend does without them: for positive and for
signed bf16 terms, the gradient of the broadcast computed alone and fused with an elementwise
producer, against float64 numpy on the same bf16 values; and a float32 sum rounded once to
bf16 for comparison (about half a bf16 unit, 3.9e-3, at most). The reduce result types of the
compiled program tell whether XLA widened the accumulator.

33,792 rows are the Evoformer's MSA at initial-training shapes (132 x 256), the broadcasts of
the input embedder. Needs jax and numpy.
"""

from __future__ import annotations

import argparse
import re

import jax
import jax.numpy as jnp
import numpy as np


def broadcast_gradient(rows: int, channels: int, fused: bool):
  """The gradient of `broadcast_to(v, (rows, channels))` for a bf16 cotangent, jitted; with
  `fused`, the cotangent is made in the same program (an elementwise producer XLA may fuse
  into the reduction)."""
  v0 = jnp.zeros((channels,), jnp.bfloat16)

  def gradient(cotangent):
    if fused:
      cotangent = cotangent * jnp.bfloat16(1.0) + jnp.sin(cotangent) * jnp.bfloat16(0.0)
    _, vjp = jax.vjp(lambda v: jnp.broadcast_to(v, (rows, channels)), v0)
    return vjp(cotangent)[0]

  return jax.jit(gradient)


def relative_errors(result: np.ndarray, exact: np.ndarray) -> tuple[float, float]:
  rel = np.abs(result.astype(np.float64) - exact) / np.maximum(np.abs(exact), 1e-30)
  return float(rel.max()), float(np.median(rel))


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--rows", type=int, default=33_792)
  parser.add_argument("--channels", type=int, default=64)
  args = parser.parse_args()
  rng = np.random.default_rng(0)
  shape = (args.rows, args.channels)
  print(f"{jax.devices()[0].device_kind}, jax {jax.__version__}: sum of {args.rows} bf16 "
        f"terms, {args.channels} columns; relative error against float64")
  print(f"{'terms':<10} {'sum':<22} {'max rel':>9} {'median rel':>11}  reduce types")
  for name, values in (("positive", rng.uniform(0, 1, shape)), ("signed", rng.normal(0, 1, shape))):
    terms = jnp.asarray(values, jnp.bfloat16)
    exact = np.asarray(terms, np.float64).sum(0)
    for label, fused in (("broadcast's gradient", False), ("same, fused", True)):
      program = broadcast_gradient(*shape, fused)
      worst, median = relative_errors(np.asarray(program(terms), np.float64), exact)
      types = sorted(set(re.findall(r"= (\w+)\[[^\]]*\][^ ]* reduce\(",
                                    program.lower(terms).compile().as_text())))
      print(f"{name:<10} {label:<22} {worst:9.2e} {median:11.2e}  {','.join(types)}")
    rounded = jnp.sum(terms.astype(jnp.float32), 0).astype(jnp.bfloat16)
    worst, median = relative_errors(np.asarray(rounded, np.float64), exact)
    print(f"{name:<10} {'float32, rounded once':<22} {worst:9.2e} {median:11.2e}")


if __name__ == "__main__":
  main()
