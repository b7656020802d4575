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
