"""bench/bf16_numerics.py --gradients: the gradient table's arithmetic."""

import numpy as np

from tests.tools.helpers import bench_module


def test_gradient_differences_by_group(capsys):
  """Biases (names ending in 'bias' or '_b') and the other parameters apart, each the
  relative L2 difference over the group's arrays together."""
  bf16_numerics = bench_module("bf16_numerics")
  fp32 = {"a/bias": np.array([3.0, 4.0]), "a/output_b": np.array([0.0]),
          "a/weights": np.array([[1.0, 0.0], [0.0, 0.0]])}
  bf16 = {"a/bias": np.array([3.0, 4.5]), "a/output_b": np.array([0.0]),
          "a/weights": np.array([[1.0, 0.1], [0.0, 0.0]])}
  bf16_numerics.print_gradient_differences(fp32, bf16)
  rows = {line.split()[0]: line.split()[-2:] for line in capsys.readouterr().out.splitlines()
          if line.startswith(("biases", "other"))}
  assert rows["biases"] == ["2", "1.00e-01"]   # |0.5| / |(3, 4)|
  assert rows["other"] == ["1", "1.00e-01"]    # |0.1| / |1|


def test_low_precision_sums_are_found_inside_scans_and_checkpoints():
  """The walker finds a 16-bit broadcast's transpose inside a scan under `jax.checkpoint`
  and a nested jit, with its terms and source line; float32 sums and sums over one term are
  not listed."""
  import jax
  import jax.numpy as jnp

  from af2flax.tools import low_precision_sums as lps

  def loss(x16, x32, row):
    def body(carry, _):
      y = jax.checkpoint(lambda a: a[None] * row)(x16)   # [5, 7]: x16 broadcast over 5 rows
      return carry + jnp.sum(y.astype(jnp.float32)), None
    total = jax.lax.scan(body, 0.0, None, length=2)[0]
    return total + jnp.sum(jax.jit(lambda a: a[None] * 2)(x32)) + jnp.sum(
        (x16[None] * 2).astype(jnp.float32))   # [1, 7]: one term

  closed = jax.make_jaxpr(jax.grad(loss, argnums=(0, 1)))(
      jnp.ones(7, jnp.bfloat16), jnp.ones(7, jnp.float32), jnp.ones((5, 7), jnp.bfloat16))
  sums = lps.low_precision_sums(closed)
  assert [(s.terms, s.operand_shape, s.dtype) for s in sums] == [(5, (5, 7), "bfloat16")]
  assert sums[0].where.startswith("tests/tools/test_bench_bf16_numerics.py:")
  assert "5" in lps.format_sums(sums) and lps.format_sums([]) == "no sums in 16 bits"


def test_the_presets_train_step_sums_nothing_in_16_bits():
  """The initial-training preset's train step (smoke-sized network and shapes, our kernels
  traced where a GPU would run them) accumulates no sum in bfloat16: every broadcast of a
  16-bit activation that needs a gradient goes through `add_bias` or `expand`."""
  bf16_numerics = bench_module("bf16_numerics")
  sums = bf16_numerics.train_step_sums("bf16-auto", "smoke", smoke=True)
  from af2flax.tools import low_precision_sums as lps
  assert not sums, lps.format_sums(sums)
