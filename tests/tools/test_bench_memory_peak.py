"""bench/memory_peak.py: what is live at a compiled program's memory peak, from XLA's dump."""

import os
import pathlib
import subprocess
import sys

import pytest

from tests.tools.helpers import bench_module

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]


def _module():
  return bench_module("memory_peak")


_LIVE_RANGE = """HloLiveRange (max 4):
  InstructionSequence:
    0:p
    1:fusion.1
    2:fusion.2
    3:fusion.3
  BufferLiveRange:
    p{}:0-4
    fusion.1{}:1-3
  Live ranges at 2 (peak):
    fusion.1{}: 4096 bytes (cumulative: 4096 bytes)
    p{}: 1024 bytes (cumulative: 5120 bytes)
    while.7{1}: 8192 bytes (cumulative: 13312 bytes)
  Stack trace breakdown for peak usage: 13 312 bytes
    main (100.0%, total: 13 312 bytes, current: 0 bytes, remaining: 13 312 bytes)
      ├── jit(f)/while (61.5%, total: 8 192 bytes, current: 8 192 bytes, remaining: 5 120 bytes)
      └── x (0.5%, total: 64 bytes, current: 64 bytes, remaining: 0 bytes)
"""


def test_the_peak_section_is_parsed_largest_first():
  peak = _module().parse_peak(_LIVE_RANGE)
  assert peak["index"] == 2 and peak["bytes"] == 13312
  assert peak["buffers"] == [("while.7", "{1}", 8192), ("fusion.1", "{}", 4096),
                             ("p", "{}", 1024)]
  assert peak["breakdown"][0].strip().startswith("main (100.0%")
  with pytest.raises(ValueError, match="peak"):
    _module().parse_peak("HloLiveRange (max 0):\n")


def test_buffers_are_grouped_by_module_and_pass():
  group_of = _module().group_of
  assert group_of("fusion.3", "jit(train_step)/while/body/transpose(jvp(AlphaFold))/"
                  "alphafold_iteration/evoformer/while/body/checkpoint/extra_msa_stack/"
                  "msa_transition/input_layer_norm/mul") == (
                      "backward: extra_msa_stack/msa_transition")
  assert group_of("fusion.5", "jit(train_step)/transpose(jvp(AlphaFold))/alphafold_iteration/"
                  "evoformer/rematted_computation/evoformer_iteration/outer_product_mean/"
                  "dot_general") == "recompute: evoformer_iteration/outer_product_mean"
  assert group_of("fusion.4", "jit(f)/jvp()/tanh") == (
      "forward: optimizer, clipping, EMA and other")
  assert group_of("state_params.1", "state.params['a']['b']") == "arguments: state.params"
  assert group_of("copy.8506", "") == "no JAX operation: copy"


def test_a_compiled_gradient_reports_its_peak(tmp_path):
  """End to end on the CPU: a jitted gradient compiled with XLA's dump; the report names the
  peak, groups its buffers by pass and shows the largest with their JAX operations."""
  program = ("import jax, jax.numpy as jnp\n"
             "def f(x):\n"
             "  y = jnp.tanh(x @ x.T)\n"
             "  return jnp.sum(jax.nn.relu(y @ x) ** 2)\n"
             "jax.jit(jax.grad(f))(jnp.ones((256, 128))).block_until_ready()\n")
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS=f"--xla_dump_to={tmp_path} --xla_dump_hlo_pass_re=^$")
  subprocess.run([sys.executable, "-c", program], env=env, check=True, timeout=300)
  text = _module().report(tmp_path, "jit_f", top=5, min_percent=1.0)
  assert "peak at instruction" in text and "GiB in" in text
  assert "backward: " in text and "forward: optimizer, clipping, EMA and other" in text
  assert "f32[256,256]" in text  # the largest buffers' shapes, from the optimised HLO


def test_a_directory_without_a_dump_is_named(tmp_path):
  module = _module()
  with pytest.raises(FileNotFoundError, match=str(tmp_path)):
    module.live_range_file(tmp_path, "train_step")
  assert module.main([str(tmp_path)]) == 1


def test_train_step_memory_report_needs_a_compile():
  done = subprocess.run([sys.executable, "bench/train_step.py", "--smoke", "--memory_report",
                         "/tmp/unused"], cwd=REPO_ROOT, capture_output=True, text=True,
                        timeout=120, check=False)
  assert done.returncode != 0
  assert "--memory_report needs --lower_only --compile_only" in done.stderr


@pytest.mark.slow
def test_train_step_memory_report_of_the_smoke_model(tmp_path):
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_backend_optimization_level=0")
  done = subprocess.run([sys.executable, "bench/train_step.py", "--lower_only", "--compile_only",
                         "--smoke", "--variants", "bf16-xla", "--memory_report", str(tmp_path)],
                        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=900,
                        check=False)
  assert done.returncode == 0, done.stderr[-2000:]
  report = (tmp_path / "bf16-xla-smoke.peak.txt").read_text()
  assert "jit_train_step" in report and "by module and pass" in report
  assert "arguments: state.params" in report
  assert report.strip() in done.stdout
