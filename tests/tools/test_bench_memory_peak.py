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
             "def layer(h, w):\n"
             "  return jnp.tanh(h @ w), None\n"
             "def f(x):\n"
             "  y = jnp.tanh(x @ x.T)\n"
             "  h, _ = jax.lax.scan(jax.checkpoint(layer), y @ x, jnp.stack([x[:128]] * 3))\n"
             "  return jnp.sum(jax.nn.relu(h) ** 2)\n"
             "jax.jit(jax.grad(f))(jnp.ones((256, 128))).block_until_ready()\n")
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS=f"--xla_dump_to={tmp_path} --xla_dump_hlo_pass_re=^$")
  subprocess.run([sys.executable, "-c", program], env=env, check=True, timeout=300)
  text = _module().report(tmp_path, "jit_f", top=5, min_percent=1.0)
  # Weighed as XLA weighs, without host memory, the device's peak is XLA's own: moment, bytes
  # and buffers (a loop, a checkpointed scan, among them).
  module = _module()
  path = module.live_range_file(tmp_path, "jit_f")
  live_ranges = path.read_text()
  xla = module.parse_peak(live_ranges)
  shapes = {name: shape for name, (shape, _) in module.instruction_info(
      path.with_name(path.name[:-len("-live-range.txt")] + ".txt")).items()}
  ours = module.device_peak(module.parse_live_ranges(live_ranges), shapes, weigh="xla")
  assert (ours["index"], ours["bytes"], sorted(ours["buffers"])) == (
      xla["index"], xla["bytes"], sorted(xla["buffers"]))
  assert ours["unsized"] == 0 and ours["host_bytes"] == 0
  assert "peak at instruction" in text and "GiB in" in text
  assert "backward: " in text and "forward: optimizer, clipping, EMA and other" in text
  assert "f32[256,256]" in text  # the largest buffers' shapes, from the optimised HLO


def test_shapes_are_read_and_sized():
  module = _module()
  line = ("  %custom-call.240 = (bf16[1966080,80]{1,0}, (f32[4]{0}, s32[]), /*index=2*/u8[1024]{0}) "
          "custom-call(%a), metadata={op_name=\"x\"}")
  shape = module._shape_at(line, line.index("= ") + 2)  # pylint: disable=protected-access
  assert shape == "(bf16[1966080,80]{1,0}, (f32[4]{0}, s32[]), u8[1024]{0})"
  assert module.tuple_elements(shape) == ["bf16[1966080,80]{1,0}", "(f32[4]{0}, s32[])",
                                          "u8[1024]{0}"]
  assert module.subshape(shape, "{}") == shape
  assert module.subshape(shape, "{1,0}") == "f32[4]{0}"
  assert module.shape_bytes(shape) == 24  # a tuple's own buffer: its table of pointers
  assert module.shape_bytes("bf16[1966080,80]{1,0}") == 1966080 * 80 * 2
  assert module.shape_bytes("pred[]") == 1 and module.shape_bytes("f8e4m3fn[3,5]{1,0}") == 15
  assert module.in_host_memory("bf16[27,516,384,256]{3,2,1,0:S(5)}")
  assert not module.in_host_memory("bf16[27,516,384,256]{3,2,1,0}")
  with pytest.raises(ValueError, match="q17"):
    module.shape_bytes("q17[3]{0}")


# A program with a value in host memory (`h`, S(5)) and a tuple-shaped instruction (`t`, as a
# loop's state) whose element t{1} is the largest device value. XLA's peak (instruction 2)
# counts `h`; weighed as XLA weighs (t's values as its table of pointers) the device's peak
# falls at 4, on `b`; every value at its own size, at 3, on t{1}.
_DUMP_HLO = """HloModule jit_train_step
ENTRY %main {
  %p = f32[256]{0} parameter(0), metadata={op_name="state.params['w']"}
  %h = f32[4096]{0:S(5)} custom-call(%p), custom_call_target="MoveToHost"
  %a = f32[512]{0} fusion(%p), kind=kLoop, metadata={op_name="jit(train_step)/jvp(AlphaFold)/evoformer/evoformer_iteration/pair_transition/mul"}
  %t = (f32[512]{0}, /*index=1*/f32[4096]{0}) fusion(%a), kind=kLoop, metadata={op_name="jit(train_step)/transpose(jvp(AlphaFold))/evoformer/evoformer_iteration/outer_product_mean/dot_general"}
  %b = f32[2048]{0} fusion(%t), kind=kLoop, metadata={op_name="jit(train_step)/transpose(jvp(AlphaFold))/evoformer/evoformer_iteration/msa_transition/dot_general"}
}
"""
_DUMP_LIVE_RANGE = """HloLiveRange (max 5):
  InstructionSequence:
    0:p
    1:h
    2:a
    3:t
    4:b
  BufferLiveRange:
    p{}:0-5
    h{}:1-2
    a{}:2-3
    t{}:3-3
    t{0}:3-3
    t{1}:3-3
    b{}:4-4
  Live ranges at 2 (peak):
    h{}: 16384 bytes (cumulative: 16384 bytes)
    a{}: 2048 bytes (cumulative: 18432 bytes)
    p{}: 1024 bytes (cumulative: 19456 bytes)
  Stack trace breakdown for peak usage: 19 456 bytes
    main (100.0%, total: 19 456 bytes, current: 0 bytes, remaining: 19 456 bytes)
"""


def test_the_device_peak_weighs_every_value_and_leaves_host_memory_out():
  module = _module()
  shapes = {name: shape for name, (shape, _) in module.instruction_info_lines(
      _DUMP_HLO.splitlines()).items()}
  ranges = module.parse_live_ranges(_DUMP_LIVE_RANGE)
  assert ranges[1] == ("h", "{}", 1, 2) and len(ranges) == 7
  own = module.device_peak(ranges, shapes)
  assert own["index"] == 3 and own["host_bytes"] == 16384 and own["unsized"] == 0
  assert own["buffers"] == [("t", "{1}", 16384), ("t", "{0}", 2048), ("p", "{}", 1024),
                            ("t", "{}", 16)]  # `a` handed over at 3: counted at 2 only
  assert own["bytes"] == 16384 + 2048 + 1024 + 16
  assert own["upper_bytes"] == own["bytes"] + 2048  # with `a`, read for the last time at 3
  xla = module.device_peak(ranges, shapes, weigh="xla")
  assert (xla["index"], xla["bytes"], xla["buffers"]) == (
      4, 1024 + 8192, [("b", "{}", 8192), ("p", "{}", 1024)])
  with pytest.raises(ValueError, match="weigh"):
    module.device_peak(ranges, shapes, weigh="mean")


def test_the_report_gives_the_device_peak(tmp_path):
  stem = "module_0001.jit_train_step.sm_9.0a_gpu_after_optimizations"
  (tmp_path / f"{stem}.txt").write_text(_DUMP_HLO)
  (tmp_path / f"{stem}-live-range.txt").write_text(_DUMP_LIVE_RANGE)
  text = _module().report(tmp_path, "train_step", top=3, min_percent=1.0)
  assert "XLA's peak at instruction 2, 0.00 GiB in 3 buffers, of which 0.00 GiB in host" in text
  assert "the device's peak, every value at its own size: instruction 3," in text
  assert "in 4 buffers, 0.00 GiB with the operands it reads for the last time (values in " \
      "host memory left out)" in text
  assert "backward: evoformer_iteration/outer_product_mean" in text
  assert "arguments: state.params" in text
  largest = text.split("the largest")[1].split("by JAX")[0]
  assert "t{1}  f32[4096]{0}" in largest and "S(5)" not in largest
  assert "breakdown at XLA's peak" in text


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
