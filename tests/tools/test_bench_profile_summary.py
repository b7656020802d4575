"""bench/profile_summary.py attributes kernels to modules and directions through the HLO."""

import gzip
import json
import subprocess
import sys

from tests.conftest import REPO_ROOT

_HLO = """\
  %fusion.1 = f32[2] fusion(), metadata={op_name="jit(f)/transpose(jvp(x))/while/body/evoformer_iteration/outer_product_mean/dot_general"}
  %custom-call.7 = f32[2] custom-call(), metadata={op_name="jit(f)/transpose(jvp(x))/checkpoint/rematted_computation/evoformer_iteration/triangle_attention_starting_node/attention/dot"}
  %fusion.2 = f32[2] fusion(), metadata={op_name="jit(f)/jvp(x)/extra_msa_stack/msa_transition/add"}
"""


def _summary(tmp_path, kernels, hlo, *flags):
  """bench/profile_summary.py's output for one traced step of `kernels` (ts, dur, kernel
  name, HLO instruction) on one GPU, with `hlo` as the program's HLO text."""
  events = [{"ph": "M", "name": "process_name", "pid": 1, "args": {"name": "/device:GPU:0"}}]
  for ts, dur, name, hlo_op in kernels:
    events.append({"ph": "X", "pid": 1, "tid": 1, "ts": ts, "dur": dur, "name": name,
                   "args": {"hlo_op": hlo_op}})
  with gzip.open(tmp_path / "perfetto_trace.json.gz", "wt") as handle:
    json.dump({"traceEvents": events}, handle)
  (tmp_path / "hlo.txt").write_text(hlo)
  return subprocess.run([sys.executable, "bench/profile_summary.py", str(tmp_path), "--hlo",
                         str(tmp_path / "hlo.txt"), "--steps", "1", *flags],
                        cwd=REPO_ROOT, capture_output=True, text=True, check=True).stdout


def test_time_per_module_and_direction(tmp_path):
  out = _summary(tmp_path, ((0, 100, "fusion_1", "fusion.1"),
                            (100, 50, "cudnn_fprop", "custom-call.7"),
                            (150, 30, "fusion_2", "command_buffer_1"),
                            (180, 20, "nvjet_gemm", "command_buffer_1")),
                 _HLO, "--kernels_of", "outer")
  table = out[out.index("time per module"):]
  lines = {line.split()[0]: line.split()[1:] for line in table.splitlines()[2:6]}
  # forward, recompute, backward, total (ms per step), share
  assert lines["evoformer_iteration/outer_product_mean"][:4] == ["0.00", "0.00", "0.10", "0.10"]
  assert lines["evoformer_iteration/triangle_attention_starting_node"][:4] == [
      "0.00", "0.05", "0.00", "0.05"]
  assert lines["extra_msa_stack/msa_transition"][:4] == ["0.03", "0.00", "0.00", "0.03"]
  assert "nvjet_gemm" in table  # inside a command buffer: listed as not attributed
  assert "kernels of evoformer_iteration/outer_product_mean" in out and "fusion_1" in out
  classes = out[out.index("kernel classes"):out.index("top 40 kernels")].splitlines()[1:-1]
  # ms per step, share, kernels per step, class
  assert [line.split()[:4] for line in classes] == [
      ["0.13", "ms", "65.0%", "2"], ["0.05", "ms", "25.0%", "1"], ["0.02", "ms", "10.0%", "1"]]
  assert [" ".join(line.split()[4:]) for line in classes] == [
      "other fusions", "cuDNN", "cuBLAS GEMMs"]


def test_a_shared_kernel_counts_for_the_instruction_that_ran_it(tmp_path):
  """XLA compiles identical fusions once and names the kernel after the first: a kernel is
  attributed through the instruction the trace names (`hlo_op`), not its kernel's name.
  `--kernels N` lists the top instructions with shapes and op_names; residual updates are
  a row of their own."""
  hlo = _HLO + ('  ROOT %fusion.3 = bf16[4,8]{1,0} fusion(), metadata={op_name="jit(f)/'
                'checkpoint/EvoformerIteration/ResidualDropout_2/add"}\n')
  out = _summary(tmp_path, ((0, 100, "fusion_1", "fusion.1"),
                            (100, 40, "fusion_1", "fusion.2"),   # fusion.1's kernel
                            (140, 10, "fusion_3", "fusion.3")),
                 hlo, "--kernels", "2")
  table = out[out.index("time per module"):]
  lines = {line.split("  ")[1].strip(): line.split()[-5:] for line in table.splitlines()[2:5]}
  assert lines["evoformer_iteration/outer_product_mean"][:4] == ["0.00", "0.00", "0.10", "0.10"]
  assert lines["extra_msa_stack/msa_transition"][:4] == ["0.04", "0.00", "0.00", "0.04"]
  assert lines["residual updates (with dropout)"][:4] == ["0.01", "0.00", "0.00", "0.01"]
  listing = out[out.index("top 2 HLO instructions"):].splitlines()[1:3]
  assert listing[0].split()[:4] == ["100.0", "x1", "fusion_1", "f32[2]"]
  assert listing[1].split()[:4] == ["40.0", "x1", "fusion_2", "f32[2]"]
  assert listing[1].endswith("extra_msa_stack/msa_transition/add")


def test_host_summary_of_a_traced_compilation(tmp_path):
  """--host: host events grouped by name (XLA's '#key=value#' stripped), nested events counted
  once in a thread's busy time."""
  events = [{"ph": "M", "name": "process_name", "pid": 1, "args": {"name": "/device:GPU:0"}},
            {"ph": "M", "name": "process_name", "pid": 2, "args": {"name": "/host:CPU"}},
            {"ph": "M", "name": "thread_name", "pid": 2, "tid": 7, "args": {"name": "main"}}]
  for tid, ts, dur, name in ((7, 0, 3_000_000, "GpuCompiler::RunBackend#module=jit_step#"),
                             (7, 0, 2_000_000, "GemmFusionAutotuner#module=jit_step#"),
                             (8, 500_000, 1_000_000, "GemmFusionAutotuner#module=jit_step#")):
    events.append({"ph": "X", "pid": 2, "tid": tid, "ts": ts, "dur": dur, "name": name})
  events.append({"ph": "X", "pid": 1, "tid": 1, "ts": 0, "dur": 9, "name": "kernel"})
  with gzip.open(tmp_path / "perfetto_trace.json.gz", "wt") as handle:
    json.dump({"traceEvents": events}, handle)
  out = subprocess.run([sys.executable, "bench/profile_summary.py", str(tmp_path), "--host"],
                       cwd=REPO_ROOT, capture_output=True, text=True, check=True).stdout
  assert "host events: 3 on 2 threads over 3.0 s" in out
  assert "3.00 s  x2       GemmFusionAutotuner" in out
  assert "3.00 s  x1       GpuCompiler::RunBackend" in out
  busy = out[out.index("threads by busy time"):].splitlines()
  assert busy[1].split() == ["3.00", "s", "main"] and busy[2].split() == ["1.00", "s", "tid", "8"]


def test_streams_and_copies_alongside_compute(tmp_path):
  """--streams: a copy on its own stream counts as hidden only where another stream computed."""
  events = [{"ph": "M", "name": "process_name", "pid": 1, "args": {"name": "/device:GPU:0"}},
            {"ph": "M", "name": "thread_name", "pid": 1, "tid": 1, "args": {"name": "compute"}},
            {"ph": "M", "name": "thread_name", "pid": 1, "tid": 2, "args": {"name": "copy"}}]
  for tid, ts, dur, name in ((1, 0, 100, "fusion_1"), (1, 150, 50, "fusion_2"),
                             (2, 50, 100, "MemcpyDtoH"),    # 50 of 100 beside fusion_1
                             (2, 300, 40, "MemcpyHtoD"),    # nothing beside it
                             (1, 400, 10, "MemcpyDtoD")):   # on the compute stream itself
    events.append({"ph": "X", "pid": 1, "tid": tid, "ts": ts, "dur": dur, "name": name})
  with gzip.open(tmp_path / "perfetto_trace.json.gz", "wt") as handle:
    json.dump({"traceEvents": events}, handle)
  out = subprocess.run([sys.executable, "bench/profile_summary.py", str(tmp_path), "--steps",
                        "1", "--streams"], cwd=REPO_ROOT, capture_output=True, text=True,
                       check=True).stdout
  streams = out[out.index("\nstreams"):out.index("example event")].splitlines()
  compute = next(line for line in streams if line.strip().startswith("compute"))
  assert compute.split()[1:4] == ["3", "events", "0.16"]
  copies = {line.split()[1]: line.split()[3:] for line in streams if "copy Memcpy" in line}
  assert copies["MemcpyDtoH"][:3] == ["0.10", "ms,", "50.0%"]
  assert copies["MemcpyHtoD"][:3] == ["0.04", "ms,", "0.0%"]
  assert copies["MemcpyDtoD"][:3] == ["0.01", "ms,", "0.0%"]
