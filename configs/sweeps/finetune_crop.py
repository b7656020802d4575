"""Fine-tuning crop size and learning rate (for a cluster: print the commands with --dry_run).

    python -m af2flax.sweep --sweep=configs/sweeps/finetune_crop.py \\
        --workdir=gs://BUCKET/af2/sweeps/finetune_crop --dry_run
"""


def get_sweep():
  return {
      "config": "configs/finetune.py",
      "grid": {
          "data.train.crop_size": [256, 384],
          "optimizer.learning_rate": [5e-4, 2.5e-4],
      },
      "fixed": {"num_train_steps": 2000},
  }
