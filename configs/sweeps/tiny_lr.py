"""Learning rate × per-example clip norm on the tiny preset (4 runs of 200 steps).

    python -m af2flax.sweep --sweep=configs/sweeps/tiny_lr.py --workdir=/tmp/af2flax_sweep
    python -m af2flax.sweep --sweep=configs/sweeps/tiny_lr.py --workdir=gs://B/sweep --dry_run

then `tensorboard --logdir /tmp/af2flax_sweep` shows one run per grid point.
"""


def get_sweep():
  return {
      "config": "configs/tiny.py",
      "grid": {
          "optimizer.learning_rate": [1e-3, 3e-4],
          "optimizer.clip_norm": [0.1, 1.0],
      },
      "fixed": {"num_train_steps": 200},
  }
