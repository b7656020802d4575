"""What is live at a compiled program's memory peak, read from XLA's own dump.

    XLA_FLAGS=--xla_dump_to=DIR python ...         # any jitted program, compiled once
    python bench/memory_peak.py DIR --module train_step [--top 30]
    python bench/train_step.py --lower_only --compile_only --memory_report DIR ...   # the step

For every module it compiles, XLA writes `*-live-range.txt`: the program's instruction
sequence, each buffer's live range, the buffers live at the peak ("Live ranges at N
(peak)") and the peak's bytes by the JAX operations that made them ("Stack trace breakdown
for peak usage"). This prints the buffers live at the peak, largest first, each with its
shape and JAX operation read from the optimised HLO (`*after_optimizations.txt`), then that
breakdown. (XLA's memory-usage report, beside it, lists the allocation's slots and every
value that ever uses each, not what is live together; the eleventh session's question,
which buffers set the fine-tuning step's ~15 GiB, needs this file.)
Loops are single instructions of the top-level sequence: a buffer a loop holds through its
iterations counts at the peak as the loop's output or operand.
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
_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%?([\w.\-]+) = (\S+?(?:\{[^}]*\})?) ")
_OP_NAME = re.compile(r'op_name="([^"]*)"')


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


def instruction_info(hlo_path: str | pathlib.Path, names: set[str]) -> dict[str, tuple]:
  """(shape, op_name) of the named instructions in an optimised-HLO text file."""
  info = {}
  with open(hlo_path, encoding="utf-8", errors="replace") as handle:
    for line in handle:
      match = _INSTRUCTION.match(line)
      if match and match.group(1) in names and match.group(1) not in info:
        op_name = _OP_NAME.search(line)
        info[match.group(1)] = (match.group(2), op_name.group(1) if op_name else "")
  return info


def report(dump_dir: str | pathlib.Path, module: str = "", top: int = 30,
           min_percent: float = 1.0) -> str:
  """The peak as text: its buffers grouped by model module and pass, the largest `top`
  buffers, and XLA's breakdown by JAX operation cut to the entries of at least
  `min_percent` of the peak."""
  path = live_range_file(dump_dir, module)
  peak = parse_peak(path.read_text(encoding="utf-8", errors="replace"))
  stem = path.name[:-len("-live-range.txt")]
  hlo = path.with_name(stem + ".txt")
  info = instruction_info(hlo, {name for name, _, _ in peak["buffers"]}) if hlo.exists() else {}
  mib = 2 ** 20
  lines = [f"{path.name}: peak at instruction {peak['index']}, {peak['bytes'] / 2 ** 30:.2f} "
           f"GiB in {len(peak['buffers'])} buffers"]
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
    lines.append(f"  {size / mib:9.1f}  {name}{tuple_index}  {shape}  {_short(op_name)}")
  if peak["breakdown"]:
    lines.append(f"by JAX operation (XLA's stack trace breakdown, entries of at least "
                 f"{min_percent:g}%):")
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
