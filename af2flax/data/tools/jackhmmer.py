"""jackhmmer: iterative HMM search of a sequence against a FASTA database.

Jumper et al. (2021) Suppl. 1.2.2: UniRef90 and MGnify are searched with jackhmmer
(`-N 1 -E 0.0001 --incE 0.0001 --F1 0.0005 --F2 0.00005 --F3 0.0000005`), the defaults below.
"""

from __future__ import annotations

import dataclasses
import os

from af2flax.data.tools import utils


@dataclasses.dataclass(frozen=True)
class JackhmmerResult:
  sto: str     # the alignment (Stockholm), query first
  tblout: str  # per-target table ('' unless get_tblout)
  stderr: str


@dataclasses.dataclass(frozen=True)
class Jackhmmer:
  """Wrapper of the jackhmmer binary; one `query` per input FASTA file."""
  database_path: str
  binary_path: str = "jackhmmer"
  n_cpu: int = 8
  n_iter: int = 1
  e_value: float = 0.0001
  z_value: int | None = None
  filter_f1: float = 0.0005
  filter_f2: float = 0.00005
  filter_f3: float = 0.0000005
  incdom_e: float | None = None
  dom_e: float | None = None
  get_tblout: bool = False
  timeout_s: float | None = None

  def __post_init__(self):
    if not os.path.exists(self.database_path):
      raise utils.ToolError("jackhmmer", f"database {self.database_path} not found")

  def command(self, input_fasta_path: str, sto_path: str, tblout_path: str | None) -> list[str]:
    flags = ["-o", "/dev/null", "-A", sto_path, "--noali",
             "--F1", str(self.filter_f1), "--F2", str(self.filter_f2), "--F3", str(self.filter_f3),
             "--incE", str(self.e_value), "-E", str(self.e_value),
             "--cpu", str(self.n_cpu), "-N", str(self.n_iter)]
    if tblout_path:
      flags += ["--tblout", tblout_path]
    if self.z_value:
      flags += ["-Z", str(self.z_value)]
    if self.dom_e is not None:
      flags += ["--domE", str(self.dom_e)]
    if self.incdom_e is not None:
      flags += ["--incdomE", str(self.incdom_e)]
    return [utils.find_binary(self.binary_path), *flags, input_fasta_path, self.database_path]

  def query(self, input_fasta_path: str) -> JackhmmerResult:
    """Searches the database with the (single-sequence) FASTA file; returns the Stockholm MSA."""
    with utils.temp_dir() as tmp:
      sto_path = os.path.join(tmp, "output.sto")
      tblout_path = os.path.join(tmp, "tblout.txt") if self.get_tblout else None
      command = self.command(input_fasta_path, sto_path, tblout_path)
      done = utils.run("jackhmmer", command, self.timeout_s)
      sto = utils.read_output("jackhmmer", sto_path, command, done.stderr)
      tblout = (utils.read_output("jackhmmer", tblout_path, command, done.stderr)
                if tblout_path else "")
    return JackhmmerResult(sto, tblout, done.stderr.decode("utf-8", "replace"))
