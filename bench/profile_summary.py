"""Where a traced step spends its device time: kernels grouped by name and by model scope.

    python bench/profile_summary.py TRACE_DIR_OR_FILE [--top 40]

Reads the perfetto trace that `jax.profiler.trace(..., create_perfetto_trace=True)` writes
(`perfetto_trace.json.gz`, e.g. from `bench/train_step.py --profile_dir`), keeps the events of
the device (GPU) streams, and prints total busy time, the number of kernels, the idle time
between kernels, and the top kernels and name scopes by time.
"""

from __future__ import annotations

import argparse
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


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("trace")
  parser.add_argument("--top", type=int, default=40)
  parser.add_argument("--depth", type=int, default=4)
  args = parser.parse_args(argv)
  events = load_events(pathlib.Path(args.trace))
  names = {}
  for e in events:
    if e.get("ph") == "M" and e.get("name") in ("process_name", "thread_name"):
      names[(e.get("pid"), e.get("tid") if e["name"] == "thread_name" else None)] = e["args"]["name"]
  device_pids = {pid for (pid, tid), name in names.items()
                 if tid is None and re.search(r"/device:GPU|GPU:|gpu", name, re.I)}
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
  print(f"\ntop {args.top} kernels by time")
  for name, dur in by_name.most_common(args.top):
    print(f"  {dur / 1e3:9.2f} ms {100 * dur / busy:5.1f}%  x{count[name]:<6d} {name[:110]}")
  print(f"\ntop {args.top} scopes by time")
  for name, dur in by_scope.most_common(args.top):
    print(f"  {dur / 1e3:9.2f} ms {100 * dur / busy:5.1f}%  {name[:140]}")
  sample = next((e for e in kernels if e.get("args")), kernels[0])
  print("\nexample event:", json.dumps(sample)[:600])
  return 0


if __name__ == "__main__":
  sys.exit(main())
