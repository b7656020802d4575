"""bench/optimizer_step.py: the clipping and update programs timed alone."""

import jax
import jax.numpy as jnp
import pytest

from tests.tools.helpers import bench_module


def test_kernels_counts_launches_outside_fused_computations():
  hlo = "\n".join([
      "HloModule m",
      "%fused_computation.1 (p: f32[4]) -> f32[4] {",
      "  %p = f32[4] parameter(0)",
      "  %m = f32[4] multiply(%p, %p)",
      "}",
      "ENTRY %main (a: f32[4]) -> f32[4] {",
      "  %a = f32[4] parameter(0)",
      "  %fusion.1 = f32[4] fusion(%a), kind=kLoop, calls=%fused_computation.1",
      "  %copy.2 = f32[4] copy(%fusion.1)",
      "  %cc = f32[4] custom-call(%copy.2), custom_call_target=\"__cublas$gemm\"",
      "  ROOT %t = (f32[4]) tuple(%cc)",
      "}",
  ])
  assert bench_module("optimizer_step")._kernels(hlo) == 3


@pytest.mark.filterwarnings("ignore:Some donated buffers were not usable")
def test_every_variant_runs_on_a_small_parameter_tree(monkeypatch, capsys):
  """Each variant compiles and runs (a two-array tree in place of the model's), and its row
  has the timings and the kernel count."""
  import configs.initial_training as preset

  bench = bench_module("optimizer_step")
  shapes = {"a": {"w": jax.ShapeDtypeStruct((8, 4), jnp.float32)},
            "b": jax.ShapeDtypeStruct((3,), jnp.float32)}
  monkeypatch.setattr(bench, "_parameter_shapes",
                      lambda shape_name: (preset.get_config(), shapes))
  names = ["accumulate", "accumulate-flat", "update", "update-flat"]
  rows = bench.run(names, "initial", runs=2)
  assert [row["variant"] for row in rows] == names
  for row in rows:
    assert row["ms"] > 0 and 0 < row["dispatch_ms"] <= row["ms"] * 1.5
    assert row["arrays"] == 2 and row["parameters"] == 35 and row["kernels"] >= 1
  assert "update-flat" in capsys.readouterr().out
