"""hmmbuild: a profile HMM from an MSA, the first step of the hmmsearch template search."""

from __future__ import annotations

import dataclasses
import os
import re

from af2flax.data.tools import utils


@dataclasses.dataclass(frozen=True)
class Hmmbuild:
  """Wrapper of the hmmbuild binary."""
  binary_path: str = "hmmbuild"
  singlemx: bool = False
  timeout_s: float | None = None

  def build_profile_from_sto(self, sto: str, model_construction: str = "fast") -> str:
    """HMM from a Stockholm MSA; 'hand' uses its '#=GC RF' line to choose the match columns."""
    return self._build(sto, model_construction)

  def build_profile_from_a3m(self, a3m: str) -> str:
    """HMM from an A3M MSA (insertions, the lower-case letters, are dropped first)."""
    lines = [line if line.startswith(">") else re.sub("[a-z]+", "", line)
             for line in a3m.splitlines()]
    return self._build("\n".join(lines) + "\n", "fast")

  def _build(self, msa: str, model_construction: str) -> str:
    if model_construction not in ("hand", "fast"):
      raise ValueError(f"model_construction must be 'hand' or 'fast', got {model_construction!r}")
    with utils.temp_dir() as tmp:
      msa_path, hmm_path = os.path.join(tmp, "query.msa"), os.path.join(tmp, "output.hmm")
      with open(msa_path, "w") as f:
        f.write(msa)
      command = [utils.find_binary(self.binary_path)]
      if model_construction == "hand":
        command.append("--hand")
      if self.singlemx:
        command.append("--singlemx")
      command += ["--amino", hmm_path, msa_path]
      done = utils.run("hmmbuild", command, self.timeout_s)
      return utils.read_output("hmmbuild", hmm_path, command, done.stderr)
