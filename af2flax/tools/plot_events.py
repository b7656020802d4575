r"""Training curves as PNG plots and a CSV, from a run's TensorBoard event files.

    python -m af2flax.tools.plot_events --logdir runs/overfit_gpu --out docs/images/overfit \
        [--panels "loss=train/loss,train_eval/loss,val/loss" \
                  "lddt=train_eval/lddt_ca,val/lddt_ca"]

Reads every `events.out.tfevents.*` file under `--logdir` (a resumed run writes one per
start; a step written twice keeps the later value), scalars written either as `simple_value`
(our TensorFlow-free writer) or as scalar tensors (clu / tf.summary). Writes one PNG per panel
(`<out>_<panel>.png`) and every scalar of every step to `<out>_scalars.csv`. Needs only the
`tensorboard` and `matplotlib` packages (no TensorFlow).
"""

from __future__ import annotations

import argparse
import csv
import glob
import os
import sys
from typing import Mapping, Sequence

import numpy as np

DEFAULT_PANELS = (
    "loss=train/loss,train_eval/loss,val/loss",
    "structure=train/structure_module/fape,train/distogram/loss,train/masked_msa/loss",
    "lddt=train_eval/lddt_ca,val/lddt_ca",
    "rmsd=train_eval/ca_rmsd,val/ca_rmsd",
)


def read_scalars(logdir: str) -> dict[str, dict[int, float]]:
  """{tag: {step: value}} from every event file under `logdir`, in file-time order."""
  from tensorboard.backend.event_processing import event_file_loader  # pylint: disable=g-import-not-at-top
  from tensorboard.util import tensor_util  # pylint: disable=g-import-not-at-top

  files = sorted(glob.glob(os.path.join(logdir, "**", "events.out.tfevents.*"), recursive=True),
                 key=lambda path: (_file_time(path), path))
  if not files:
    raise FileNotFoundError(f"no TensorBoard event files (events.out.tfevents.*) under {logdir}")
  scalars: dict[str, dict[int, float]] = {}
  for path in files:
    try:
      for event in event_file_loader.EventFileLoader(path).Load():
        for value in event.summary.value:
          kind = value.WhichOneof("value")
          if kind == "simple_value":
            number = float(value.simple_value)
          elif kind == "tensor":
            array = tensor_util.make_ndarray(value.tensor)
            if array.ndim != 0 or not np.issubdtype(array.dtype, np.number):
              continue
            number = float(array)
          else:
            continue
          scalars.setdefault(value.tag, {})[int(event.step)] = number
    except Exception as error:  # a truncated last record of a killed run keeps what was read
      print(f"warning: {path}: stopped reading at {type(error).__name__}: {error}",
            file=sys.stderr)
  return scalars


def _file_time(path: str) -> float:
  parts = os.path.basename(path).split(".")
  try:
    return float(parts[3])
  except (IndexError, ValueError):
    return os.path.getmtime(path)


def write_csv(scalars: Mapping[str, Mapping[int, float]], path: str) -> None:
  tags = sorted(scalars)
  steps = sorted({step for values in scalars.values() for step in values})
  with open(path, "w", newline="", encoding="utf-8") as handle:
    writer = csv.writer(handle)
    writer.writerow(["step"] + tags)
    for step in steps:
      # Summaries hold float32: 7 significant digits are all there is.
      writer.writerow([step] + [f"{scalars[tag][step]:.7g}" if step in scalars[tag] else ""
                                for tag in tags])


def plot_panel(scalars: Mapping[str, Mapping[int, float]], name: str, tags: Sequence[str],
               path: str, title: str = "") -> bool:
  """One PNG with the given tags against step; False (nothing written) if none is present."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  present = [tag for tag in tags if scalars.get(tag)]
  if not present:
    return False
  figure, axis = plt.subplots(figsize=(6.4, 4.0), dpi=110)
  for tag in present:
    steps = sorted(scalars[tag])
    values = [scalars[tag][s] for s in steps]
    marker = "o" if len(steps) < 30 else None
    axis.plot(steps, values, label=tag, marker=marker, markersize=3)
  axis.set_xlabel("step")
  axis.set_ylabel(name)
  axis.grid(alpha=0.3)
  axis.legend(fontsize=8)
  if title:
    axis.set_title(title, fontsize=10)
  figure.tight_layout()
  figure.savefig(path)
  plt.close(figure)
  return True


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m af2flax.tools.plot_events",
                                   description=__doc__.split("\n\n")[0])
  parser.add_argument("--logdir", required=True, help="the run's workdir (or any folder above "
                      "its event files)")
  parser.add_argument("--out", required=True, help="output prefix: <out>_<panel>.png, "
                      "<out>_scalars.csv")
  parser.add_argument("--panels", nargs="+", default=list(DEFAULT_PANELS),
                      help="NAME=tag1,tag2,... (one PNG each)")
  parser.add_argument("--title", default="")
  args = parser.parse_args(argv)

  scalars = read_scalars(args.logdir)
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  write_csv(scalars, f"{args.out}_scalars.csv")
  print(f"{len(scalars)} scalars, steps {min(min(v) for v in scalars.values())} to "
        f"{max(max(v) for v in scalars.values())} -> {args.out}_scalars.csv")
  for panel in args.panels:
    if "=" not in panel:
      parser.error(f"--panels entry {panel!r} is not NAME=tag1,tag2")
    name, tags = panel.split("=", 1)
    path = f"{args.out}_{name}.png"
    if plot_panel(scalars, name, tags.split(","), path, args.title):
      print(f"wrote {path}")
    else:
      print(f"skipped {name}: none of {tags} in the events")
  return 0


if __name__ == "__main__":
  sys.exit(main())
