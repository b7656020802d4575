"""hmmsearch: template search of the query's profile against pdb_seqres (Suppl. 1.2.3, AF 2.3)."""

from __future__ import annotations

import dataclasses
import os
from typing import Sequence

from af2flax.data import parsers
from af2flax.data.tools import utils
from af2flax.data.tools.hmmbuild import Hmmbuild

# AlphaFold's permissive settings: keep every hit, the featurizer filters them.
DEFAULT_FLAGS = ("--F1", "0.1", "--F2", "0.1", "--F3", "0.1", "--incE", "100", "-E", "100",
                 "--domE", "100", "--incdomE", "100")


@dataclasses.dataclass(frozen=True)
class Hmmsearch:
  """Wrapper of hmmsearch (with hmmbuild for the profile): Stockholm MSA in, Stockholm hits out."""
  database_path: str
  binary_path: str = "hmmsearch"
  hmmbuild_binary_path: str = "hmmbuild"
  flags: Sequence[str] = DEFAULT_FLAGS
  cpu: int = 8
  timeout_s: float | None = None

  input_format = "sto"
  output_format = "sto"

  def __post_init__(self):
    if not os.path.exists(self.database_path):
      raise utils.ToolError("hmmsearch", f"database {self.database_path} not found")

  def query(self, msa_sto: str) -> str:
    """Builds the profile from the MSA's '#=GC RF' columns ('hand') and searches with it."""
    hmm = Hmmbuild(self.hmmbuild_binary_path, timeout_s=self.timeout_s).build_profile_from_sto(
        msa_sto, model_construction="hand")
    return self.query_with_hmm(hmm)

  def query_with_hmm(self, hmm: str) -> str:
    with utils.temp_dir() as tmp:
      hmm_path, out_path = os.path.join(tmp, "query.hmm"), os.path.join(tmp, "output.sto")
      with open(hmm_path, "w") as f:
        f.write(hmm)
      command = [utils.find_binary(self.binary_path), "--noali", "--cpu", str(self.cpu),
                 *self.flags, "-A", out_path, hmm_path, self.database_path]
      done = utils.run("hmmsearch", command, self.timeout_s)
      return utils.read_output("hmmsearch", out_path, command, done.stderr)

  def get_template_hits(self, output: str, input_sequence: str) -> list[parsers.TemplateHit]:
    return parsers.parse_hmmsearch_sto(input_sequence, output, "<hmmsearch output>")
