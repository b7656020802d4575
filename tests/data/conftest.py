"""Fixtures of the data tests: small real databases made from ../shared/data sequences."""

from __future__ import annotations

import gzip
import pathlib

import pytest
from Bio.PDB import PDBParser
from Bio.SeqUtils import seq1

from tests.conftest import SHARED_DATA

PDB_CHAINS = SHARED_DATA / "pdb_chains"
OPENFOLD = SHARED_DATA / "openfold_testdata"


def pdb_chain_sequence(path: pathlib.Path) -> str:
  """One-letter sequence of the residues with coordinates (test helper, not product code)."""
  with gzip.open(path, "rt") as f:
    structure = PDBParser(QUIET=True).get_structure(path.name, f)
  chain = next(structure[0].get_chains())
  return "".join(seq1(r.get_resname()) or "X" for r in chain if r.id[0] == " ")


@pytest.fixture(scope="session")
def chain_sequences(shared_dir) -> dict[str, str]:
  """`<pdbid>_<chain>` -> sequence for the 40 chains of pdb_chains/ (sorted)."""
  return {f"{p.name[:4]}_{p.name[4]}": pdb_chain_sequence(p)
          for p in sorted(PDB_CHAINS.glob("*.pdb.gz"))}


@pytest.fixture(scope="session")
def sequence_db(tmp_path_factory, chain_sequences) -> pathlib.Path:
  """A FASTA database of the 40 chains, pdb_seqres style (for jackhmmer and hmmsearch)."""
  path = tmp_path_factory.mktemp("seqdb") / "pdb_seqres.fasta"
  path.write_text("".join(f">{name} mol:protein length:{len(seq)}  CHAIN {name}\n{seq}\n"
                          for name, seq in chain_sequences.items()))
  return path


@pytest.fixture(scope="session")
def hhsuite_db(tmp_path_factory, chain_sequences) -> str:
  """An HH-suite database (a3m, hhm, cs219) of single-sequence entries: 2cvi_A and every 5th
  chain (hhmake and cstranslate take ~0.25 s per entry on the 2-core CI machine)."""
  from af2flax.data.tools import hhsuite_db
  prefix = str(tmp_path_factory.mktemp("hhdb") / "pdb_mini")
  chosen = [name for i, name in enumerate(chain_sequences) if i % 5 == 0 or name == "2cvi_A"]
  return hhsuite_db.build_hhsuite_database(
      {name: f">{name}\n{chain_sequences[name]}\n" for name in chosen}, prefix)
