"""Inference: prediction runs, confidence outputs and the self-distillation set.

  queries.py             FASTA records -> checked queries; failures.tsv of skipped inputs
  inputs.py              raw features: alignments directory, database search, templates
  feature_processing.py  raw features -> the model's batch (AlphaFold's eval-mode transforms, numpy)
  model_loading.py       configs and parameters: our checkpoints (EMA) or AlphaFold's .npz files
  runner.py              recycling with early stop, pLDDT / PAE / pTM
  outputs.py, plots.py   PDB/mmCIF, AlphaFold DB JSON layouts, ranking, PNG plots
  distillation.py        Suppl. 1.3 filters and the distillation TFRecord writer
  prediction_files.py    published predictions (AlphaFold DB files) as distillation inputs
Entry points: `python -m af2flax.predict`, `python -m af2flax.distill`.
"""
