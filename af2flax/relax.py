r"""Amber relaxation of a predicted structure (Jumper et al. (2021) Suppl. 1.8.6).

    python -m af2flax.relax --in model.pdb --out relaxed.pdb \
        [--max_iterations 0] [--tolerance 2.39] [--stiffness 10.0] \
        [--max_outer_iterations 3] [--use_gpu] [--report relaxed.json]

Reads a PDB or mmCIF file (gzipped or not; all protein chains), relaxes it with AlphaFold's
protocol (`af2flax.relaxation.relax.AmberRelaxation`) and writes the relaxed PDB, hydrogens
included, with each residue's input B-factor (pLDDT) carried over. Prints violations before
and after, energies and heavy-atom RMSD; `--report` also writes them as JSON. Exits with
status 1 and a message naming the file when the input cannot be read or relaxed.
"""

from __future__ import annotations

import json
import logging
import pathlib
import sys

from absl import app
from absl import flags

from af2flax.relaxation import relax

_IN = flags.DEFINE_string("in", None, "Input structure: PDB or mmCIF, optionally gzipped.")
_OUT = flags.DEFINE_string("out", None, "Output PDB path for the relaxed structure.")
_REPORT = flags.DEFINE_string("report", None, "Optional JSON path for the relaxation report.")
_MAX_ITERATIONS = flags.DEFINE_integer(
    "max_iterations", relax.DEFAULT_MAX_ITERATIONS,
    "L-BFGS iterations per round; 0 runs each minimisation to convergence.", lower_bound=0)
_TOLERANCE = flags.DEFINE_float(
    "tolerance", relax.DEFAULT_TOLERANCE,
    "Minimiser tolerance, kcal/mol/nm (root-mean-square force).", lower_bound=0.0)
_STIFFNESS = flags.DEFINE_float(
    "stiffness", relax.DEFAULT_STIFFNESS,
    "Heavy-atom position restraint, kcal/mol/A^2.", lower_bound=0.0)
_MAX_OUTER_ITERATIONS = flags.DEFINE_integer(
    "max_outer_iterations", relax.DEFAULT_MAX_OUTER_ITERATIONS,
    "Most rounds of minimisation; each frees the residues that still violate.", lower_bound=1)
_USE_GPU = flags.DEFINE_bool("use_gpu", False, "Minimise on OpenMM's CUDA platform.")


def _format_violations(report: dict) -> str:
  return (f"{report['violating_residues']}/{report['residues']} residues "
          f"(bond/angle {report['between_residue_bond']}, clash "
          f"{report['between_residue_clash']}, within-residue {report['within_residue']})")


def main(argv: list[str]) -> int:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not flags.FLAGS["in"].value or not _OUT.value:
    raise app.UsageError("--in and --out are required")
  logging.getLogger("af2flax").setLevel(logging.INFO)
  relaxer = relax.AmberRelaxation(
      max_iterations=_MAX_ITERATIONS.value, tolerance=_TOLERANCE.value,
      stiffness=_STIFFNESS.value, max_outer_iterations=_MAX_OUTER_ITERATIONS.value,
      use_gpu=_USE_GPU.value)
  try:
    result = relaxer.relax_file(_IN.value)
  except relax.RelaxationError as error:
    print(f"relax: {error}", file=sys.stderr)
    return 1
  out_path = pathlib.Path(_OUT.value)
  out_path.parent.mkdir(parents=True, exist_ok=True)
  out_path.write_text(result.pdb_string)
  summary = result.summary()
  if _REPORT.value:
    report_path = pathlib.Path(_REPORT.value)
    report_path.parent.mkdir(parents=True, exist_ok=True)
    report_path.write_text(json.dumps(summary, indent=2) + "\n")
  print(f"{_IN.value} -> {out_path}\n"
        f"  violations before: {_format_violations(summary['violations_before'])}\n"
        f"  violations after:  {_format_violations(summary['violations_after'])}\n"
        f"  energy: {result.initial_energy:.1f} -> {result.final_energy:.1f} kcal/mol in "
        f"{len(result.rounds)} round(s); heavy-atom RMSD {result.heavy_atom_rmsd:.3f} A; "
        f"{result.seconds:.1f} s")
  return 0


if __name__ == "__main__":
  app.run(main)
