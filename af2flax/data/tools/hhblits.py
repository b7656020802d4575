"""HHblits: iterative HMM-HMM search against HH-suite databases (BFD, Uniclust30).

Jumper et al. (2021) Suppl. 1.2.2: BFD + Uniclust30 are searched with HHblits
(`-n 3 -e 0.001 -realign_max 100000 -maxfilt 100000 -min_prefilter_hits 1000 -maxseq 1000000`),
the defaults below. A database path is the common prefix of its `_a3m/_hhm/_cs219.ff{data,index}`.
"""

from __future__ import annotations

import dataclasses
import glob
import os

from af2flax.data.tools import utils

_DEFAULT_P = 20
_DEFAULT_Z = 500


def check_hhsuite_databases(tool: str, databases: tuple[str, ...]) -> None:
  if not databases:
    raise utils.ToolError(tool, "no database given")
  for database in databases:
    if not glob.glob(glob.escape(database) + "_*"):
      raise utils.ToolError(tool, f"database {database} not found (no {database}_* files)")


@dataclasses.dataclass(frozen=True)
class HHBlits:
  """Wrapper of the hhblits binary; `query` returns the A3M alignment."""
  databases: tuple[str, ...]
  binary_path: str = "hhblits"
  n_cpu: int = 4
  n_iter: int = 3
  e_value: float = 0.001
  maxseq: int = 1_000_000
  realign_max: int = 100_000
  maxfilt: int = 100_000
  min_prefilter_hits: int = 1000
  all_seqs: bool = False
  alt: int | None = None
  p: int = _DEFAULT_P
  z: int = _DEFAULT_Z
  timeout_s: float | None = None

  def __post_init__(self):
    object.__setattr__(self, "databases", tuple(self.databases))
    check_hhsuite_databases("hhblits", self.databases)

  def command(self, input_path: str, a3m_path: str) -> list[str]:
    command = [utils.find_binary(self.binary_path), "-i", input_path, "-cpu", str(self.n_cpu),
               "-oa3m", a3m_path, "-o", "/dev/null", "-n", str(self.n_iter),
               "-e", str(self.e_value), "-maxseq", str(self.maxseq),
               "-realign_max", str(self.realign_max), "-maxfilt", str(self.maxfilt),
               "-min_prefilter_hits", str(self.min_prefilter_hits)]
    if self.all_seqs:
      command.append("-all")
    if self.alt:
      command += ["-alt", str(self.alt)]
    if self.p != _DEFAULT_P:
      command += ["-p", str(self.p)]
    if self.z != _DEFAULT_Z:
      command += ["-Z", str(self.z)]
    for database in self.databases:
      command += ["-d", database]
    return command

  def query(self, input_path: str) -> str:
    """Searches with a FASTA/A3M input file; returns the A3M alignment (query first)."""
    with utils.temp_dir() as tmp:
      a3m_path = os.path.join(tmp, "output.a3m")
      command = self.command(input_path, a3m_path)
      done = utils.run("hhblits", command, self.timeout_s)
      return utils.read_output("hhblits", a3m_path, command, done.stderr)
