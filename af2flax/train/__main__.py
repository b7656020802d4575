"""Training entry point.

    python -m af2flax.train --config=configs/tiny.py --workdir=/tmp/af2flax_tiny \\
        [--config.num_train_steps=500 ...]

Runs `af2flax.train.loop.train_and_evaluate`. Re-running the same command resumes from the
latest checkpoint in the workdir. Multi-host (TPU pod slices, GPU clusters): add
`--distributed` on every host (`launch_tpu.sh` does); the coordinator is found automatically
on Cloud TPU and SLURM, or given by `--coordinator_address/--num_processes/--process_id`.
"""

import logging as python_logging
import os

# TensorFlow (used by the input pipeline) logs its C++ start-up chatter unless told otherwise.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app  # pylint: disable=g-import-not-at-top
from absl import flags
from absl import logging
import jax
from ml_collections import config_flags

from af2flax.train import loop

FLAGS = flags.FLAGS

config_flags.DEFINE_config_file(
    "config", None, "Training configuration file (configs/*.py).", lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, TensorBoard events and logs.")
flags.DEFINE_bool("distributed", False,
                  "Call jax.distributed.initialize() before anything else (multi-host runs).")
flags.DEFINE_string("coordinator_address", None,
                    "host:port of process 0 (only where it is not auto-detected).")
flags.DEFINE_integer("num_processes", None, "Number of processes (with --coordinator_address).")
flags.DEFINE_integer("process_id", None, "This process's index (with --coordinator_address).")
flags.DEFINE_bool("library_logs", False,
                  "Also show the INFO logs of libraries (Orbax, clu, JAX); warnings always show.")

jax.config.parse_flags_with_absl()  # --jax_* flags, e.g. --jax_debug_nans


class _OwnInfoOnly(python_logging.Filter):
  """Keeps INFO records of af2flax and every WARNING or worse: a readable progress log."""

  def filter(self, record: python_logging.LogRecord) -> bool:
    return (record.levelno >= python_logging.WARNING
            or f"{os.sep}af2flax{os.sep}" in record.pathname)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not FLAGS.library_logs:
    logging.get_absl_handler().addFilter(_OwnInfoOnly())
  if FLAGS.distributed:
    jax.distributed.initialize(coordinator_address=FLAGS.coordinator_address,
                               num_processes=FLAGS.num_processes,
                               process_id=FLAGS.process_id)
  logging.info("JAX process %d/%d, local devices %s", jax.process_index(), jax.process_count(),
               jax.local_devices())
  loop.train_and_evaluate(FLAGS.config, FLAGS.workdir)


if __name__ == "__main__":
  flags.mark_flags_as_required(["config", "workdir"])
  app.run(main)
