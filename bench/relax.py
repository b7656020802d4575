r"""Seconds per structure of AlphaFold's Amber relaxation (CPU by default).

    python bench/relax.py [--use_gpu] [--max_outer_iterations 3] [FILE ...]

Without files it relaxes AlphaFold's relax test structures from `../shared/data/
alphafold_testdata/` (beside the checkout). Prints one row per structure: residues, atoms
after protonation, rounds, violating residues before -> after, heavy-atom RMSD, wall-clock
and process CPU seconds (CPU time sums OpenMM's threads).
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from af2flax.relaxation import relax  # pylint: disable=wrong-import-position

_DEFAULT_DIR = pathlib.Path(__file__).resolve().parents[2] / "shared/data/alphafold_testdata"
_DEFAULT_FILES = ("model_output.pdb", "with_violations.pdb", "with_violations_casp14.pdb",
                  "multiple_disulfides_target.pdb")


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("files", nargs="*", type=pathlib.Path)
  parser.add_argument("--use_gpu", action="store_true")
  parser.add_argument("--max_outer_iterations", type=int,
                      default=relax.DEFAULT_MAX_OUTER_ITERATIONS)
  args = parser.parse_args()
  files = args.files or [_DEFAULT_DIR / name for name in _DEFAULT_FILES]
  relaxer = relax.AmberRelaxation(use_gpu=args.use_gpu,
                                  max_outer_iterations=args.max_outer_iterations)
  print(f"{'structure':<32}{'res':>5}{'atoms':>7}{'rounds':>7}{'viol before->after':>20}"
        f"{'RMSD A':>8}{'wall s':>8}{'cpu s':>8}")
  for path in files:
    wall, cpu = time.perf_counter(), time.process_time()
    result = relaxer.relax_file(path)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    atoms = sum(line.startswith("ATOM") for line in result.pdb_string.splitlines())
    before = result.violations_before.num_violating_residues
    after = result.violations_after.num_violating_residues
    print(f"{path.name:<32}{result.violations_before.per_residue.size:>5}{atoms:>7}"
          f"{len(result.rounds):>7}{f'{before} -> {after}':>20}{result.heavy_atom_rmsd:>8.3f}"
          f"{wall:>8.1f}{cpu:>8.1f}")


if __name__ == "__main__":
  main()
