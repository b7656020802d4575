"""Fuzzing: random mutations of real files parse, or raise StructureParseError, nothing else."""

import gzip

import hypothesis
import hypothesis.strategies as st
import numpy as np

from af2flax.common import protein
from tests.conftest import SAMPLES

MMCIF_BYTES = (SAMPLES / "mmcif" / "1YJP.cif").read_bytes()
PDB_BYTES = gzip.decompress((SAMPLES / "pdb_chains" / "2cviA.pdb.gz").read_bytes())[:12000]
GZ_BYTES = (SAMPLES / "mmcif" / "1YJP_invalid.cif.gz").read_bytes()

# Characters that matter to the formats: quotes, separators, digits, signs, CIF keywords.
_TOKENS = [b"'", b'"', b";", b"\n;", b" ", b"\n", b"_", b"loop_", b"data_", b".", b"?", b"-",
           b"#", b"0", b"9", b"nan", b"inf", b"1e99", b"\x00", b"\xff", b"HETATM", b"ATOM  "]


@st.composite
def mutations(draw, data: bytes) -> bytes:
  """A few byte flips, token insertions, truncations, line deletions and duplications."""
  for _ in range(draw(st.integers(1, 4))):
    kind = draw(st.sampled_from(["flip", "insert", "truncate", "delete_line", "duplicate_line"]))
    if not data:
      break
    position = draw(st.integers(0, len(data) - 1))
    if kind == "flip":
      data = data[:position] + bytes([data[position] ^ draw(st.integers(1, 255))]) + data[position + 1:]
    elif kind == "insert":
      data = data[:position] + draw(st.sampled_from(_TOKENS)) + data[position:]
    elif kind == "truncate":
      data = data[:position]
    else:
      lines = data.split(b"\n")
      line = position % len(lines)
      copies = [] if kind == "delete_line" else [lines[line]] * 2
      data = b"\n".join(lines[:line] + copies + lines[line + 1:])
  return data


def _parse_or_structure_error(data: bytes, suffix: str, tmp_path_factory) -> None:
  path = tmp_path_factory.mktemp("fuzz") / f"mutant{suffix}"
  path.write_bytes(data)
  try:
    prot = protein.read_structure(path)
  except protein.StructureParseError as error:
    assert str(path) in str(error)
    return
  assert prot.num_res > 0 and np.isfinite(prot.atom_positions).all()
  protein.to_mmcif(prot)  # What parses can be written.


@hypothesis.settings(max_examples=150, deadline=None, database=None,
                     suppress_health_check=[hypothesis.HealthCheck.function_scoped_fixture])
@hypothesis.given(data=mutations(MMCIF_BYTES))
def test_mutated_mmcif(data, tmp_path_factory):
  _parse_or_structure_error(data, ".cif", tmp_path_factory)


@hypothesis.settings(max_examples=150, deadline=None, database=None,
                     suppress_health_check=[hypothesis.HealthCheck.function_scoped_fixture])
@hypothesis.given(data=mutations(PDB_BYTES))
def test_mutated_pdb(data, tmp_path_factory):
  _parse_or_structure_error(data, ".pdb", tmp_path_factory)


@hypothesis.settings(max_examples=60, deadline=None, database=None,
                     suppress_health_check=[hypothesis.HealthCheck.function_scoped_fixture])
@hypothesis.given(data=mutations(GZ_BYTES))
def test_mutated_gzip(data, tmp_path_factory):
  _parse_or_structure_error(data, ".cif.gz", tmp_path_factory)
