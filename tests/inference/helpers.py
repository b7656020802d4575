"""Shared set-up of the inference tests: the tiny AlphaFold reference model and small inputs.

Every model run in these tests uses one per-iteration shape (48 residues after padding, 4 MSA
centres, 4 extra rows, 4 templates) and one inference config, so the whole session compiles
the network iteration once (`runner.compiled_step` caches it by config).
"""

from __future__ import annotations

import pathlib

from tests.conftest import REFERENCE, SHARED_DATA

TINY = REFERENCE / "af2_tiny"
TINY_PARAMS = TINY / "params.npz"
TINY_CONFIG = TINY / "config.json"
OPENFOLD = SHARED_DATA / "openfold_testdata"

SEQ_A = "MKTAYIAKQRQISFVKSHFSRQLEERLGLIEVQ"          # 33 residues
SEQ_B = "GSHMSLFDFFKNKGSAATATDRLKLILEGHLVERA"       # 35 residues
PADDED_LENGTH = 48

# Flags that give every run the shape above (and the tiny model's own config).
TINY_MODEL_FLAGS = ["--af2_params", str(TINY_PARAMS), "--models", "model_1_ptm",
                    "--model_config", str(TINY_CONFIG)]
SHAPE_FLAGS = ["--num_recycle", "1", "--max_msa_clusters", "4", "--max_extra_msa", "4",
               "--pad_to_multiple", str(PADDED_LENGTH)]


def write_fasta(path: pathlib.Path, records: dict[str, str]) -> pathlib.Path:
  path.write_text("".join(f">{name} test record\n{sequence}\n"
                          for name, sequence in records.items()))
  return path


def write_a3m(directory: pathlib.Path, sequence: str, num_variants: int = 6,
              seed: int = 0) -> pathlib.Path:
  """An alignment directory with one A3M: the query and mutated copies (some with gaps and
  lower-case insertions), enough rows for clustering and extra-MSA rows."""
  import numpy as np
  rng = np.random.default_rng(seed)
  letters = np.array(list("ACDEFGHIKLMNPQRSTVWY"))
  rows = [f">query\n{sequence}\n"]
  for index in range(num_variants):
    row = np.array(list(sequence))
    mutate = rng.random(len(row)) < 0.3
    row[mutate] = rng.choice(letters, mutate.sum())
    row[rng.random(len(row)) < 0.1] = "-"
    text = "".join(row)
    cut = len(text) // 2
    rows.append(f">hit{index}\n{text[:cut]}{'ka' if index % 2 else ''}{text[cut:]}\n")
  directory.mkdir(parents=True, exist_ok=True)
  (directory / "bfd_uniclust_hits.a3m").write_text("".join(rows))
  return directory
