"""Amber relaxation of predicted structures (Jumper et al. (2021) Suppl. 1.8.6).

`relax.AmberRelaxation` is the entry point (`python -m af2flax.relax` is its command line):
`cleanup` prepares the structure with PDBFixer, `amber_minimize` runs the restrained
Amber99sb minimisation in OpenMM, `checks` reports AlphaFold's structural violations
(via `af2flax.losses.violations`) and heavy-atom RMSD.
"""
