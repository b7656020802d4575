"""HHsearch: template search of the query's MSA against PDB70 (Jumper et al. 2021 Suppl. 1.2.3)."""

from __future__ import annotations

import dataclasses
import os

from af2flax.data import parsers
from af2flax.data.tools import utils
from af2flax.data.tools.hhblits import check_hhsuite_databases


@dataclasses.dataclass(frozen=True)
class HHSearch:
  """Wrapper of the hhsearch binary: A3M in, HHR out."""
  databases: tuple[str, ...]
  binary_path: str = "hhsearch"
  maxseq: int = 1_000_000
  cpu: int = 8
  timeout_s: float | None = None

  input_format = "a3m"
  output_format = "hhr"

  def __post_init__(self):
    object.__setattr__(self, "databases", tuple(self.databases))
    check_hhsuite_databases("hhsearch", self.databases)

  def command(self, input_path: str, hhr_path: str) -> list[str]:
    command = [utils.find_binary(self.binary_path), "-i", input_path, "-o", hhr_path,
               "-maxseq", str(self.maxseq), "-cpu", str(self.cpu)]
    for database in self.databases:
      command += ["-d", database]
    return command

  def query(self, a3m: str) -> str:
    """Searches with an A3M alignment (text); returns the HHR result text."""
    with utils.temp_dir() as tmp:
      input_path, hhr_path = os.path.join(tmp, "query.a3m"), os.path.join(tmp, "output.hhr")
      with open(input_path, "w") as f:
        f.write(a3m)
      command = self.command(input_path, hhr_path)
      done = utils.run("hhsearch", command, self.timeout_s)
      return utils.read_output("hhsearch", hhr_path, command, done.stderr)

  def get_template_hits(self, output: str, input_sequence: str) -> list[parsers.TemplateHit]:
    del input_sequence  # HHR carries the query rows itself.
    return parsers.parse_hhr(output, "<hhsearch output>")
