"""What is live at a compiled program's memory peak, read from XLA's own dump.

    XLA_FLAGS=--xla_dump_to=DIR python ...         # any jitted program, compiled once
    python bench/memory_peak.py DIR --module train_step [--top 30]
    python bench/train_step.py --lower_only --compile_only --memory_report DIR ...   # the step

For every module it compiles, XLA writes `*-live-range.txt`: the program's instruction
sequence, each buffer's live range, the buffers live at the peak ("Live ranges at N
(peak)") and the peak's bytes by the JAX operations that made them ("Stack trace breakdown
for peak usage"). This prints the buffers live at the device's peak (below), grouped and
largest first, each with its shape and JAX operation read from the optimised HLO
(`*after_optimizations.txt`), then XLA's breakdown. (XLA's memory-usage report, beside it,
lists the allocation's slots and every value that ever uses each, not what is live
together; the eleventh session's question, which buffers set the fine-tuning step's
~15 GiB, needs this file.)
The sequence is flattened: a loop body's instructions have indices of their own, between
those of the instructions around the loop.

XLA's peak is not the device's: it counts the buffers in host memory too (layout memory
space `S(5)`: block inputs offloaded by `remat_offload`), and it weighs a tuple's values, a
loop's carried state among them, as the tuple's table of pointers when it picks the moment
(the chunked extra-MSA loops' stacked residuals counted as nothing). So the report recomputes
the peak from the file's live ranges (`BufferLiveRange`) and the values' sizes read from
their shapes in the optimised HLO: device memory only, every value at its own size
(`device_peak`; weighed as XLA does, it reproduces XLA's moment and list exactly), and groups
and lists that peak's buffers. The live ranges do not say which values share a buffer (a
loop's state and its body's parameter do), so the peak is given as a lower and an upper
estimate (below).
"""

from __future__ import annotations

import argparse
import pathlib
import re
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
# The same attribution of op_names to model modules and passes as the profile tables.
from profile_summary import direction_of, module_of  # noqa: E402  pylint: disable=wrong-import-position

_PEAK_HEADER = re.compile(r"^\s*Live ranges at (\d+) \(peak\):\s*$")
_PEAK_BUFFER = re.compile(r"^\s*(\S+?)(\{[^}]*\})?: (\d+) bytes")
_BREAKDOWN_HEADER = re.compile(r"^\s*Stack trace breakdown for peak usage: ([\d ]+) bytes")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%?([\w.\-]+) = ")
_LIVE_RANGE = re.compile(r"^\s*(\S+?)(\{[^}]*\}):(\d+)-(\d+)\s*$")
_ARRAY = re.compile(r"^([a-z]\w*)\[([\d,]*)\](\{[^}]*\})?$")
_HOST_MEMORY_SPACE = "S(5)"  # XLA's memory space of host memory (offloaded buffers)
_BITS = {"pred": 8, "s4": 4, "u4": 4, "s8": 8, "u8": 8, "s16": 16, "u16": 16, "f16": 16,
         "bf16": 16, "s32": 32, "u32": 32, "f32": 32, "s64": 64, "u64": 64, "f64": 64,
         "c64": 64, "c128": 128, "token": 0}
_OP_NAME = re.compile(r'op_name="([^"]*)"')
_COMMENT = re.compile(r"/\*.*?\*/")


def live_range_file(dump_dir: str | pathlib.Path, module: str = "") -> pathlib.Path:
  """The live-range file of the largest module in `dump_dir` whose name contains `module`.

  Raises FileNotFoundError naming the directory when there is none."""
  candidates = [path for path in pathlib.Path(dump_dir).glob("*-live-range.txt")
                if module in path.name]
  if not candidates:
    raise FileNotFoundError(f"{dump_dir}: no XLA live-range file"
                            + (f" of a module named *{module}*" if module else "")
                            + " (was it compiled with XLA_FLAGS=--xla_dump_to=DIR?)")
  return max(candidates, key=lambda path: path.stat().st_size)


def parse_peak(text: str) -> dict:
  """The peak of a live-range file: {'index': N, 'bytes': total, 'buffers': [(name,
  tuple index, bytes)], 'breakdown': [lines]}. Raises ValueError when the file has no
  peak section."""
  lines = text.splitlines()
  start = next((i for i, line in enumerate(lines) if _PEAK_HEADER.match(line)), None)
  if start is None:
    raise ValueError("no 'Live ranges at N (peak)' section")
  buffers = []
  index = start + 1
  while index < len(lines):
    match = _PEAK_BUFFER.match(lines[index])
    if not match:
      break
    buffers.append((match.group(1), match.group(2) or "", int(match.group(3))))
    index += 1
  breakdown, total = [], sum(size for _, _, size in buffers)
  for position in range(index, len(lines)):
    header = _BREAKDOWN_HEADER.match(lines[position])
    if header:
      total = int(header.group(1).replace(" ", ""))
      breakdown = [line.rstrip() for line in lines[position + 1:] if line.strip()]
      break
  return {"index": int(_PEAK_HEADER.match(lines[start]).group(1)), "bytes": total,
          "buffers": sorted(buffers, key=lambda item: -item[2]), "breakdown": breakdown}


def instruction_info(hlo_path: str | pathlib.Path) -> dict[str, tuple]:
  """(shape, op_name) of every instruction in an optimised-HLO text file."""
  with open(hlo_path, encoding="utf-8", errors="replace") as handle:
    return instruction_info_lines(handle)


def instruction_info_lines(lines) -> dict[str, tuple]:
  """`instruction_info` of optimised HLO given as its lines."""
  info = {}
  for line in lines:
    match = _INSTRUCTION.match(line)
    if match and match.group(1) not in info:
      op_name = _OP_NAME.search(line)
      info[match.group(1)] = (_shape_at(line, match.end()), op_name.group(1) if op_name else "")
  return info


def _shape_at(line: str, start: int) -> str:
  """The shape that starts at `start` in an HLO instruction line: an array shape up to the
  next space, or a (possibly nested) tuple shape up to its closing parenthesis, without the
  printer's comments ('/*index=5*/')."""
  if not line.startswith("(", start):
    end = line.find(" ", start)
    return line[start:end if end >= 0 else len(line)]
  depth, end = 0, len(line)
  for position in range(start, len(line)):
    depth += {"(": 1, ")": -1}.get(line[position], 0)
    if depth == 0:
      end = position + 1
      break
  return _COMMENT.sub("", line[start:end])


def tuple_elements(shape: str) -> list[str]:
  """The top-level elements of a tuple shape '(a, (b, c), d)'."""
  elements, depth, current = [], 0, []
  for char in shape[1:-1]:
    if char in "({[":
      depth += 1
    elif char in ")}]":
      depth -= 1
    if char == "," and depth == 0:
      elements.append("".join(current).strip())
      current = []
    else:
      current.append(char)
  if "".join(current).strip():
    elements.append("".join(current).strip())
  return elements


def subshape(shape: str, tuple_index: str) -> str:
  """The shape at a buffer's tuple index ('{}', '{1}', '{1,0}') within `shape`."""
  for position in filter(None, tuple_index.strip("{}").split(",")):
    shape = tuple_elements(shape)[int(position)]
  return shape


def shape_bytes(shape: str) -> int:
  """A buffer's bytes: an array's elements times its type's size; a tuple's own buffer is its
  table of pointers (8 bytes an element). Raises ValueError on a shape it cannot read."""
  if shape.startswith("("):
    return 8 * len(tuple_elements(shape))
  match = _ARRAY.match(shape)
  if not match:
    raise ValueError(f"unreadable shape {shape!r}")
  dtype, dims = match.group(1), match.group(2)
  bits = _BITS.get(dtype)
  if bits is None:
    if not re.match(r"^f[48]", dtype):
      raise ValueError(f"unknown element type in {shape!r}")
    bits = int(dtype[1])
  elements = 1
  for dim in filter(None, dims.split(",")):
    elements *= int(dim)
  return (elements * bits + 7) // 8


def in_host_memory(shape: str) -> bool:
  """Whether an array shape's layout puts it in host memory ('{...:S(5)}')."""
  return not shape.startswith("(") and _HOST_MEMORY_SPACE in (shape.rpartition("{")[2])


def parse_live_ranges(text: str) -> list[tuple[str, str, int, int]]:
  """The file's `BufferLiveRange` section: (name, tuple index, first, last instruction)."""
  ranges, inside = [], False
  for line in text.splitlines():
    if line.strip() == "BufferLiveRange:":
      inside = True
      continue
    if inside:
      match = _LIVE_RANGE.match(line)
      if not match:
        break
      ranges.append((match.group(1), match.group(2), int(match.group(3)), int(match.group(4))))
  return ranges


def device_peak(ranges: list[tuple[str, str, int, int]], shapes: dict[str, str],
                weigh: str = "own") -> dict:
  """The peak of the values in device memory (host memory, `S(5)`, left out).

  weigh='own': every value at its own size. The moment and its `buffers` count a value from
  the instruction that makes it up to, not including, its last use (a value never used after
  the instruction that makes it: at that instruction), a lower estimate: at an instruction,
  the operands it reads for the last time are left out, which is right where a loop's state
  passes its buffer to its body's parameter (counted twice otherwise) and too little
  elsewhere. 'upper_bytes' adds them at the same moment, an upper estimate. weigh='xla':
  XLA's own computation (`HloLiveRange::ComputePeakMemoryMoment`): the moment found with each value weighed by its
  defining instruction's whole shape (a tuple's values, a loop's carried state among them, by
  the tuple's table of pointers), a start counted before the ends at the same instruction,
  and the live set then listed as XLA prints it, every value whose range holds the moment at
  its own size. {'index', 'bytes', 'buffers': [(name, tuple index, bytes)] largest first,
  'upper_bytes', 'host_bytes': the summed sizes of the host-memory values left out,
  'unsized': values whose instruction was not found}."""
  if weigh not in ("own", "xla"):
    raise ValueError(f"weigh must be 'own' or 'xla', not {weigh!r}")
  values, host_bytes, unsized = [], 0, 0
  for name, tuple_index, first, last in ranges:
    if name not in shapes:
      unsized += 1
      continue
    own = subshape(shapes[name], tuple_index)
    if in_host_memory(own):
      host_bytes += shape_bytes(own)
      continue
    size = shape_bytes(own)
    if weigh == "own":
      values.append((name, tuple_index, first, max(last, first + 1), size, size, last))
    else:
      values.append((name, tuple_index, first, last + 1, shape_bytes(shapes[name]), size, last))
  # Each value is live over [start, stop). At one instruction XLA counts the starts before
  # the ends (so the moment's sum can hold values already gone); by own sizes, the ends first.
  start_rank, stop_rank = (0, 1) if weigh == "xla" else (1, 0)
  events = sorted([(start, start_rank, weight) for _, _, start, _, weight, _, _ in values]
                  + [(stop, stop_rank, -weight) for _, _, _, stop, weight, _, _ in values])
  usage, best, moment = 0, 0, 0
  for time, _, change in events:
    usage += change
    if usage > best:
      best, moment = usage, time
  buffers = sorted(((name, tuple_index, size) for name, tuple_index, start, stop, _, size, _
                    in values if start <= moment < stop), key=lambda item: -item[2])
  upper = sum(size for _, _, start, _, _, size, last in values if start <= moment <= last)
  return {"index": moment, "bytes": sum(size for _, _, size in buffers), "buffers": buffers,
          "upper_bytes": upper, "host_bytes": host_bytes, "unsized": unsized}


def report(dump_dir: str | pathlib.Path, module: str = "", top: int = 30,
           min_percent: float = 1.0) -> str:
  """The peak as text: its buffers grouped by model module and pass, the largest `top`
  buffers, and XLA's breakdown by JAX operation cut to the entries of at least
  `min_percent` of the peak."""
  path = live_range_file(dump_dir, module)
  text = path.read_text(encoding="utf-8", errors="replace")
  peak = parse_peak(text)
  stem = path.name[:-len("-live-range.txt")]
  hlo = path.with_name(stem + ".txt")
  info = instruction_info(hlo) if hlo.exists() else {}
  gib, mib = 2 ** 30, 2 ** 20
  lines = [f"{path.name}: XLA's peak at instruction {peak['index']}, "
           f"{peak['bytes'] / gib:.2f} GiB in {len(peak['buffers'])} buffers"]
  host_at_xla_peak = sum(size for name, index, size in peak["buffers"]
                         if name in info and in_host_memory(subshape(info[name][0], index)))
  if host_at_xla_peak:
    lines[0] += f", of which {host_at_xla_peak / gib:.2f} GiB in host memory (S(5))"
  if info:
    device = device_peak(parse_live_ranges(text), {name: shape for name, (shape, _) in
                                                   info.items()})
    lines.append(
        f"the device's peak, every value at its own size: instruction {device['index']}, "
        f"{device['bytes'] / gib:.2f} GiB in {len(device['buffers'])} buffers, "
        f"{device['upper_bytes'] / gib:.2f} GiB with the operands it reads for the last time"
        + (" (values in host memory left out)" if device["host_bytes"] else "")
        + (f" ({device['unsized']} values of unknown shape left out)" if device["unsized"]
           else "")
        + ". (XLA's moment counts host memory, and weighs a tuple's values, a loop's state "
        "among them, as the tuple's table of pointers.)")
    peak = dict(peak, bytes=device["bytes"], buffers=device["buffers"])
  groups: dict[str, list[int]] = {}
  for name, _, size in peak["buffers"]:
    entry = groups.setdefault(group_of(name, info.get(name, ("", ""))[1]), [0, 0])
    entry[0] += size
    entry[1] += 1
  lines.append(f"by module and pass (MiB, buffers; groups of at least {min_percent:g}%):")
  shown_groups = sorted(groups.items(), key=lambda item: -item[1][0])
  for key, (size, count) in shown_groups:
    if 100 * size < min_percent * peak["bytes"]:
      break
    lines.append(f"  {size / mib:9.1f} {count:5d}  {key}")
  shown = peak["buffers"][:top]
  lines.append(f"the largest {len(shown)} buffers (MiB):")
  for name, tuple_index, size in shown:
    shape, op_name = info.get(name, ("", ""))
    shape = subshape(shape, tuple_index) if shape else ""
    lines.append(f"  {size / mib:9.1f}  {name}{tuple_index}  {shape}  {_short(op_name)}")
  if peak["breakdown"]:
    lines.append(f"by JAX operation (XLA's stack trace breakdown"
                 + (" at XLA's peak" if info else "")
                 + f", entries of at least {min_percent:g}%):")
    lines += ["  " + line for line in peak["breakdown"] if _percent(line) >= min_percent]
  return "\n".join(lines)


def group_of(name: str, op_name: str) -> str:
  """A peak buffer's group: 'arguments: X' for the program's inputs (parameters, optimiser
  state, batch: an op_name that is an argument path), 'no JAX operation: X' for what XLA
  added (copies, conversions), else 'PASS: STACK/MODULE' as `bench/profile_summary.py`
  attributes kernels (`direction_of`: forward, recompute or backward; `module_of`)."""
  if not op_name:  # copies and conversions XLA added
    return "no JAX operation: " + re.sub(r"[._]\d+$", "", name)
  if "[" in op_name.split("/")[0]:
    return "arguments: " + op_name.split("[")[0]
  return f"{direction_of(op_name)}: {module_of(op_name)}"


def _percent(line: str) -> float:
  """The share in a breakdown line ('name (12.5%, total: ...)'), 0 if none."""
  match = re.search(r"\(([\d.]+)%", line)
  return float(match.group(1)) if match else 0.0


def _short(op_name: str, keep: int = 6) -> str:
  """The last `keep` components of a JAX op_name path."""
  parts = op_name.split("/")
  return ("…/" if len(parts) > keep else "") + "/".join(parts[-keep:])


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("dump_dir")
  parser.add_argument("--module", default="", help="a part of the module's name "
                      "(default: the largest module dumped)")
  parser.add_argument("--top", type=int, default=30)
  parser.add_argument("--min_percent", type=float, default=1.0,
                      help="groups and breakdown entries below this share of the peak are left out")
  args = parser.parse_args(argv)
  try:
    print(report(args.dump_dir, args.module, args.top, args.min_percent))
  except (FileNotFoundError, ValueError) as error:
    print(f"memory_peak: {error}", file=sys.stderr)
    return 1
  return 0


if __name__ == "__main__":
  sys.exit(main())
