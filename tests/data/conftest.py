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


# --- the search pipeline on the small databases (test_search_beam.py, test_build_beam.py) ---

# Chains searched by the Beam pipeline, plus a duplicate of the first under another id.
SEARCH_CHAINS = ("1ahs_A", "1i8n_A", "2cvi_A", "3gkn_A")  # all in hhsuite_db
DUPLICATE_CHAIN = "9dup_A"


def beam_test_options(workers: int = 1):
  """DirectRunner in this process: the fastest set-up for tests on 2 cores."""
  from apache_beam.options.pipeline_options import PipelineOptions
  mode = "in_memory" if workers == 1 else "multi_threading"
  return PipelineOptions(["--runner=DirectRunner", f"--direct_num_workers={workers}",
                          f"--direct_running_mode={mode}"])


def write_fasta(path: pathlib.Path, records) -> pathlib.Path:
  path.write_text("".join(f">{name} test chain\n{sequence}\n" for name, sequence in records))
  return path


@pytest.fixture(scope="session")
def search_config(sequence_db, hhsuite_db) -> dict:
  """AlphaFold's recipe on the 40-chain databases (HHblits 1 iteration to save test time)."""
  from af2flax.data.search import make_config
  return make_config(uniref90_database_path=str(sequence_db),
                     mgnify_database_path=str(sequence_db),
                     bfd_database_path=hhsuite_db, uniclust30_database_path=hhsuite_db,
                     pdb70_database_path=hhsuite_db, msa_tools_n_cpu=1, hhblits={"n_iter": 1})


@pytest.fixture(scope="session")
def searched(tmp_path_factory, chain_sequences, search_config):
  """One Beam search of SEARCH_CHAINS + a duplicate + a bad record: (fasta, out, cache, summary)."""
  from af2flax.data.search import beam_pipeline, make_plan
  root = tmp_path_factory.mktemp("search")
  records = [(c, chain_sequences[c]) for c in SEARCH_CHAINS]
  records += [(DUPLICATE_CHAIN, chain_sequences[SEARCH_CHAINS[0]]), ("bad/id", "MKV")]
  fasta = write_fasta(root / "chains.fasta", records)
  out, cache = root / "alignments", root / "cache"
  plan = make_plan(search_config, str(cache))
  summary = beam_pipeline.run_search(str(fasta), plan, str(out), beam_test_options())
  return fasta, out, cache, summary
