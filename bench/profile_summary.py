"""Where a traced step spends its device time: kernels grouped by name and by model scope.

    python bench/profile_summary.py TRACE_DIR_OR_FILE [--hlo train_step.hlo.txt.gz] [--top 40]

Reads the perfetto trace that `jax.profiler.trace(..., create_perfetto_trace=True)` writes
(`perfetto_trace.json.gz`, e.g. from `bench/train_step.py --profile_dir`), keeps the events of
the device (GPU) streams, and prints total busy time, the number of kernels, the idle time
between kernels, and the top kernels and name scopes by time. With `--hlo` (the optimised HLO
text that `bench/train_step.py --profile_dir` saves), every kernel is attributed to the model
module that produced it (the op_name metadata of its fusion), giving the time per module.
`--host` summarises the host threads' events instead: where a traced compilation spends its
time (`bench/train_step.py --lower_only --compile_only --profile_dir DIR`).
"""

from __future__ import annotations

import argparse
import bisect
import collections
import gzip
import json
import pathlib
import re
import sys


def load_events(path: pathlib.Path) -> list[dict]:
  if path.is_dir():
    found = sorted(path.rglob("*.trace.json.gz")) + sorted(path.rglob("perfetto_trace.json.gz"))
    if not found:
      raise SystemExit(f"{path}: no perfetto_trace.json.gz / *.trace.json.gz inside")
    path = found[-1]
  opener = gzip.open if path.suffix == ".gz" else open
  with opener(path, "rt") as handle:
    data = json.load(handle)
  return data["traceEvents"] if isinstance(data, dict) else data


def scope_of(event: dict, depth: int) -> str:
  args = event.get("args", {}) or {}
  text = args.get("long_name") or args.get("name") or args.get("tf_op") or args.get("hlo_op") or ""
  parts = [p for p in re.split(r"[/]", str(text)) if p and not p.startswith("jit(")]
  keep = [p for p in parts if re.match(r"^[a-z_]+(_\\d+)?$", p) or "iteration" in p]
  return "/".join(keep[:depth]) or "(no scope)"


# Kernel classes by name, first match wins: (substring, class).
KERNEL_CLASSES = (
    ("af2_attention", "our attention kernels (Pallas)"), ("cudnn", "cuDNN"),
    ("gemm_fusion", "Triton GEMM fusions"), ("nvjet", "cuBLAS GEMMs"),
    ("cutlass", "cuBLAS GEMMs"), ("gemm", "cuBLAS GEMMs"),
    ("Memcpy", "copies"), ("Memset", "memsets"), ("transpose", "transpose fusions"),
    ("reduce", "reduction fusions"), ("concatenate", "concatenations"),
    ("loop_", "elementwise (loop) fusions"), ("fusion", "other fusions"),
)


def kernel_class(name: str) -> str:
  """The class of a kernel by its name (`KERNEL_CLASSES`; 'other' when none matches)."""
  return next((label for part, label in KERNEL_CLASSES if part in name), "other")


MODULES = ("msa_row_attention_with_pair_bias", "msa_column_global_attention",
           "msa_column_attention", "msa_transition", "outer_product_mean",
           "triangle_multiplication_outgoing", "triangle_multiplication_incoming",
           "triangle_attention_starting_node", "triangle_attention_ending_node", "pair_transition",
           "template_pointwise_attention", "structure_module", "distogram_head", "masked_msa_head",
           "predicted_lddt_head", "experimentally_resolved_head", "predicted_aligned_error_head")
STACKS = ("extra_msa_stack", "template_embedding", "evoformer_iteration")


def module_of(op_name: str) -> str:
  """'stack/module' for an op_name path (`evoformer_iteration/triangle_attention_...`)."""
  stack = next((s for s in STACKS if s in op_name), "")
  module = next((m for m in MODULES if m in op_name), "")
  if not module:
    if "ResidualDropout" in op_name:
      module = "residual updates (with dropout)"
    elif "alphafold_loss" in op_name or "loss" in op_name.split("/")[-1]:
      module = "losses"
    elif "AlphaFold" in op_name or "alphafold_iteration" in op_name:
      module = "other model ops"
    else:
      module = "optimizer, clipping, EMA and other"
  return f"{stack + '/' if stack else ''}{module}"


def direction_of(op_name: str) -> str:
  """'recompute' (remat's second forward pass, inside the backward pass), 'backward' or
  'forward'."""
  if "rematted_computation" in op_name:
    return "recompute"
  return "backward" if "transpose(" in op_name else "forward"


def hlo_instructions(path: pathlib.Path) -> dict[str, tuple[str, str]]:
  """Instruction name (with '.' as the trace writes '_') -> (its shape, its op_name metadata),
  for the instructions that have an op_name."""
  opener = gzip.open if path.suffix == ".gz" else open
  pattern = re.compile(r"^\s*(?:ROOT )?%?([\w.\-]+) = (\S+) .*?op_name=\"([^\"]*)\"")
  found = {}
  with opener(path, "rt") as handle:
    for line in handle:
      match = pattern.match(line)
      if match:
        found.setdefault(match.group(1).replace(".", "_"), (match.group(2), match.group(3)))
  return found


def _instruction_of(event: dict, instructions: dict[str, tuple[str, str]]) -> str:
  """The key of `instructions` for a kernel: the HLO instruction that launched it, as the
  trace names it (`hlo_op`, '.' written '_'), when the HLO has it, else the kernel's name."""
  launched = str(event.get("args", {}).get("hlo_op", "")).replace(".", "_")
  return launched if launched in instructions else event["name"]


def _print_modules(kernels: list[dict], instructions: dict[str, tuple[str, str]],
                   args) -> None:
  """Time per model module and direction (per step), and the kernels of chosen modules.

  A kernel is attributed through the HLO instruction the trace names (`hlo_op`), else
  through its kernel's name. The instruction first: XLA compiles identical fusions once and
  names the kernel after the first of them, so by kernel name every later copy (another
  module's, another stack's) would count for the first. Kernels inside CUDA-graph command
  buffers name only the buffer, so trace with `--xla_gpu_enable_command_buffer=` for a
  complete attribution.
  """
  directions = ("forward", "recompute", "backward")
  table = collections.defaultdict(lambda: dict.fromkeys(directions, 0.0))
  per_kernel = collections.defaultdict(collections.Counter)
  unattributed = collections.Counter()
  for e in kernels:
    op_name = instructions.get(_instruction_of(e, instructions), ("", ""))[1]
    if not op_name:
      unattributed[re.sub(r"_\d+$", "", e["name"])[:60]] += e["dur"]
      continue
    module = module_of(op_name)
    table[module][direction_of(op_name)] += e["dur"]
    per_kernel[module][e["name"][:70]] += e["dur"]
  busy = sum(e["dur"] for e in kernels)
  scale = 1e3 * args.steps
  print(f"\ntime per module per step, ms ({args.steps} steps traced; recompute = remat's "
        "second forward pass)")
  print(f"  {'module':58s} {'forward':>8s} {'recomp.':>8s} {'backward':>8s} {'total':>8s} "
        f"{'share':>6s}")
  rows = sorted(table.items(), key=lambda item: -sum(item[1].values()))
  for module, times in rows:
    total = sum(times.values())
    print(f"  {module:58s} " + " ".join(f"{times[d] / scale:8.2f}" for d in directions)
          + f" {total / scale:8.2f} {100 * total / busy:5.1f}%")
  left = sum(unattributed.values())
  print(f"  {'(not attributed: kernels inside command buffers)':58s} {'':8s} {'':8s} {'':8s} "
        f"{left / scale:8.2f} {100 * left / busy:5.1f}%")
  for name, dur in unattributed.most_common(8):
    print(f"      {dur / scale:8.2f} ms  {name}")
  for wanted in args.kernels_of:
    for module in (m for m in per_kernel if wanted in m):
      print(f"\nkernels of {module} (ms per step)")
      for name, dur in per_kernel[module].most_common(15):
        print(f"  {dur / scale:8.2f}  {name}")


def _print_instructions(kernels: list[dict], instructions: dict[str, tuple[str, str]],
                        args) -> None:
  """The top `args.kernels` HLO instructions by device time per step: kernels per step,
  the instruction's shape and the tail of its op_name (what ran, on what, for which line of
  the model)."""
  time, count = collections.Counter(), collections.Counter()
  for e in kernels:
    key = _instruction_of(e, instructions)
    time[key] += e["dur"]
    count[key] += 1
  print(f"\ntop {args.kernels} HLO instructions, µs per step ({args.steps} steps traced)")
  for key, dur in time.most_common(args.kernels):
    shape, op_name = instructions.get(key, ("?", ""))
    print(f"  {dur / args.steps:9.1f}  x{count[key] / args.steps:<4.0f} {key[:38]:38s} "
          f"{shape[:44]:44s} {op_name[-90:]}")


def host_summary(events: list[dict], device_pids: set, names: dict, top: int) -> None:
  """Where host time goes (e.g. XLA's compilation traced by `bench/train_step.py --lower_only
  --compile_only --profile_dir`): host events grouped by name (XLA's `name#key=value#`
  annotations to their name), inclusive seconds summed over all threads, and per thread."""
  host = [e for e in events if e.get("ph") == "X" and "dur" in e
          and e.get("pid") not in device_pids]
  if not host:
    print("no host events")
    return
  start = min(e["ts"] for e in host)
  end = max(e["ts"] + e["dur"] for e in host)
  by_name, count = collections.Counter(), collections.Counter()
  threads = collections.defaultdict(list)
  for e in host:
    name = re.sub(r"#.*$", "", str(e["name"])).strip() or "(unnamed)"
    by_name[name] += e["dur"]
    count[name] += 1
    threads[(e.get("pid"), e.get("tid"))].append(e)
  print(f"host events: {len(host)} on {len(threads)} threads over {(end - start) / 1e6:.1f} s")
  print(f"\ntop {top} host events by inclusive time (summed over threads; nested events "
        "count in their parents too)")
  for name, dur in by_name.most_common(top):
    print(f"  {dur / 1e6:9.2f} s  x{count[name]:<7d} {name[:110]}")
  print("\nthreads by busy time (top-level events only)")
  busy = {}
  for key, thread_events in threads.items():
    thread_events.sort(key=lambda e: (e["ts"], -e["dur"]))
    total, reach = 0, -1
    for e in thread_events:  # union of intervals: nested events count once
      begin, finish = e["ts"], e["ts"] + e["dur"]
      if finish <= reach:
        continue
      total += finish - max(begin, reach)
      reach = finish
    busy[key] = total
  for key, total in sorted(busy.items(), key=lambda item: -item[1])[:12]:
    label = names.get((key[0], key[1]), "") or f"tid {key[1]}"
    print(f"  {total / 1e6:9.2f} s  {label[:80]}")


def _union(intervals: list[tuple[int, int]]) -> list[tuple[int, int]]:
  """Sorted, merged [start, end) intervals."""
  merged: list[list[int]] = []
  for start, end in sorted(intervals):
    if merged and start <= merged[-1][1]:
      merged[-1][1] = max(merged[-1][1], end)
    else:
      merged.append([start, end])
  return [(a, b) for a, b in merged]


def _overlap(interval: tuple[int, int], union: list[tuple[int, int]]) -> int:
  """Length of `interval` covered by the sorted, merged intervals `union`."""
  start, end = interval
  covered = 0
  i = max(bisect.bisect_right(union, (start, start)) - 1, 0)
  while i < len(union) and union[i][0] < end:
    covered += max(0, min(end, union[i][1]) - max(start, union[i][0]))
    i += 1
  return covered


def stream_summary(kernels: list[dict], names: dict, steps: int) -> None:
  """Busy time per device stream, and how much of the copies' time (host offloading's
  device-to-host and host-to-device copies) ran while another stream computed: a copy that
  overlaps nothing stalls the step."""
  print(f"\nstreams (ms per step, {steps} steps traced)")
  by_stream = collections.defaultdict(list)
  for e in kernels:
    by_stream[(e["pid"], e.get("tid"))].append(e)
  for key, events in sorted(by_stream.items(), key=lambda item: -sum(e["dur"] for e in item[1])):
    copies = sum(e["dur"] for e in events if kernel_class(e["name"]) == "copies")
    print(f"  {names.get(key, str(key[1]))[:50]:50s} {len(events) / steps:8.0f} events "
          f"{sum(e['dur'] for e in events) / 1e3 / steps:9.2f} ms busy, copies "
          f"{copies / 1e3 / steps:8.2f} ms")
  computing = [e for e in kernels if kernel_class(e["name"]) != "copies"]
  copies = collections.defaultdict(list)
  for e in kernels:
    if kernel_class(e["name"]) == "copies":
      copies[re.sub(r"[^A-Za-z]+$", "", e["name"])[:40]].append(e)
  others: dict = {}  # stream -> merged intervals of the other streams' compute kernels
  for name, events in sorted(copies.items(), key=lambda item: -sum(e["dur"] for e in item[1])):
    total = sum(e["dur"] for e in events)
    hidden = 0
    for e in events:  # time covered by compute kernels of other streams
      stream = (e["pid"], e.get("tid"))
      if stream not in others:
        others[stream] = _union([(k["ts"], k["ts"] + k["dur"]) for k in computing
                                 if (k["pid"], k.get("tid")) != stream])
      hidden += _overlap((e["ts"], e["ts"] + e["dur"]), others[stream])
    print(f"  copy {name:40s} x{len(events) / steps:<7.0f} {total / 1e3 / steps:9.2f} ms, "
          f"{100 * hidden / max(total, 1):5.1f}% of it alongside compute")


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("trace")
  parser.add_argument("--top", type=int, default=40)
  parser.add_argument("--depth", type=int, default=4)
  parser.add_argument("--hlo", help="optimised HLO text (.txt or .txt.gz) of the traced program")
  parser.add_argument("--steps", type=int, default=2, help="steps in the trace (per-step times)")
  parser.add_argument("--kernels_of", action="append", default=[], metavar="MODULE",
                      help="with --hlo: also list the top kernels of modules whose name "
                      "contains MODULE (repeatable)")
  parser.add_argument("--kernels", type=int, default=0, metavar="N",
                      help="with --hlo: also list the top N HLO instructions by time, with "
                      "their shapes and op_names")
  parser.add_argument("--streams", action="store_true",
                      help="also print busy time per device stream and how much of the copies' "
                      "time (host offloading) overlaps compute on other streams")
  parser.add_argument("--host", action="store_true",
                      help="summarise host events instead (a traced compilation)")
  args = parser.parse_args(argv)
  events = load_events(pathlib.Path(args.trace))
  names = {}
  for e in events:
    if e.get("ph") == "M" and e.get("name") in ("process_name", "thread_name"):
      names[(e.get("pid"), e.get("tid") if e["name"] == "thread_name" else None)] = e["args"]["name"]
  device_pids = {pid for (pid, tid), name in names.items()
                 if tid is None and re.search(r"/device:GPU|GPU:|gpu", name, re.I)}
  if args.host:
    host_summary(events, device_pids, names, args.top)
    return 0
  kernels = [e for e in events if e.get("ph") == "X" and e.get("pid") in device_pids
             and "dur" in e]
  if not kernels:
    print("no device events; process names:", sorted(set(names.values()))[:20])
    return 1
  kernels.sort(key=lambda e: e["ts"])
  busy = sum(e["dur"] for e in kernels)
  span = kernels[-1]["ts"] + kernels[-1]["dur"] - kernels[0]["ts"]
  print(f"device events: {len(kernels)}, busy {busy / 1e3:.1f} ms over a span of "
        f"{span / 1e3:.1f} ms ({100 * busy / span:.0f}% busy)")
  by_name = collections.Counter()
  count = collections.Counter()
  by_scope = collections.Counter()
  for e in kernels:
    by_name[e["name"]] += e["dur"]
    count[e["name"]] += 1
    by_scope[scope_of(e, args.depth)] += e["dur"]
  by_class, class_count = collections.Counter(), collections.Counter()
  for name, dur in by_name.items():   # per kernel name, not per event
    by_class[kernel_class(name)] += dur
    class_count[kernel_class(name)] += count[name]
  print(f"\nkernel classes (ms and kernels per step, {args.steps} steps traced)")
  for label, dur in by_class.most_common():
    print(f"  {dur / 1e3 / args.steps:9.2f} ms {100 * dur / busy:5.1f}%  "
          f"{class_count[label] / args.steps:8.0f}  {label}")
  print(f"\ntop {args.top} kernels by time")
  for name, dur in by_name.most_common(args.top):
    print(f"  {dur / 1e3:9.2f} ms {100 * dur / busy:5.1f}%  x{count[name]:<6d} {name[:110]}")
  print(f"\ntop {args.top} scopes by time")
  for name, dur in by_scope.most_common(args.top):
    print(f"  {dur / 1e3:9.2f} ms {100 * dur / busy:5.1f}%  {name[:140]}")
  if args.streams:
    stream_summary(kernels, names, args.steps)
  if args.hlo:
    instructions = hlo_instructions(pathlib.Path(args.hlo))
    _print_modules(kernels, instructions, args)
    if args.kernels:
      _print_instructions(kernels, instructions, args)
  sample = next((e for e in kernels if e.get("args")), kernels[0])
  print("\nexample event:", json.dumps(sample)[:600])
  return 0


if __name__ == "__main__":
  sys.exit(main())
