"""bench/bf16_reduction.py: the broadcast's gradient is the column sum, and the table."""

import sys

import jax.numpy as jnp
import numpy as np

from tests.tools.helpers import bench_module


def test_broadcast_gradient_is_the_column_sum():
  """Alone and fused, the program returns the sum over rows (exact here: small integers)."""
  bf16_reduction = bench_module("bf16_reduction")
  terms = jnp.asarray(np.arange(24).reshape(6, 4) % 5, jnp.bfloat16)
  for fused in (False, True):
    result = bf16_reduction.broadcast_gradient(6, 4, fused)(terms)
    assert result.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(result, np.float32),
                                  np.asarray(terms, np.float32).sum(0))


def test_table_has_each_sum_and_a_float32_row_within_half_a_unit(monkeypatch, capsys):
  bf16_reduction = bench_module("bf16_reduction")
  monkeypatch.setattr(sys, "argv", ["bf16_reduction.py", "--rows", "2048", "--channels", "8"])
  bf16_reduction.main()
  rows = [line.split() for line in capsys.readouterr().out.splitlines()
          if line.startswith(("positive", "signed"))]
  assert [(r[0], r[1]) for r in rows] == [(t, s) for t in ("positive", "signed")
                                          for s in ("broadcast's", "same,", "float32,")]
  for row in rows:
    if row[1] == "float32,":
      assert float(row[4]) <= 2.0 ** -8  # one rounding to bf16: half a unit at most
