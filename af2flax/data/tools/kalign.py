"""Kalign: realigns a template hit's sequence to the mmCIF's own sequence (Suppl. 1.2.3)."""

from __future__ import annotations

import dataclasses
import os
from typing import Sequence

from af2flax.data.tools import utils

# Kalign crashes (segfault) on sequences shorter than this.
MIN_SEQUENCE_LENGTH = 6


@dataclasses.dataclass(frozen=True)
class Kalign:
  """Wrapper of the kalign binary; `align` returns aligned FASTA (A3M without insertions)."""
  binary_path: str = "kalign"
  timeout_s: float | None = None

  def align(self, sequences: Sequence[str]) -> str:
    for sequence in sequences:
      if len(sequence) < MIN_SEQUENCE_LENGTH:
        raise ValueError(f"kalign needs sequences of at least {MIN_SEQUENCE_LENGTH} residues, got "
                         f"{sequence!r} ({len(sequence)})")
    with utils.temp_dir() as tmp:
      input_path, output_path = os.path.join(tmp, "input.fasta"), os.path.join(tmp, "output.a3m")
      with open(input_path, "w") as f:
        f.write("".join(f">sequence {i}\n{s}\n" for i, s in enumerate(sequences, start=1)))
      command = [utils.find_binary(self.binary_path), "-i", input_path, "-o", output_path,
                 "-format", "fasta"]
      done = utils.run("kalign", command, self.timeout_s)
      return utils.read_output("kalign", output_path, command, done.stderr)
