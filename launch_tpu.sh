#!/usr/bin/env bash
# Launches af2flax training on a Cloud TPU VM or pod slice.
#
# Creates the TPU (or reuses it if it exists), copies this checkout to every worker, installs
# requirements.txt plus JAX's TPU runtime there, starts the same training command on all
# workers with --distributed (jax.distributed.initialize finds the other hosts by itself), and
# streams the log of worker 0. Run with --dry-run to print every command instead of running it.
set -euo pipefail

usage() {
  cat <<'USAGE'
Usage: ./launch_tpu.sh --name NAME --zone ZONE --config CONFIG --workdir gs://BUCKET/DIR [options] [-- TRAIN_FLAGS...]

Required:
  --name NAME            TPU VM / pod slice name (created if it does not exist)
  --zone ZONE            e.g. us-central2-b
  --config CONFIG        training preset, e.g. configs/initial_training.py
  --workdir DIR          checkpoints + TensorBoard; must be gs://... for multi-host slices

Options:
  --accelerator TYPE     accelerator type when creating, e.g. v4-8, v4-32, v5p-64 (default v4-8)
  --version VERSION      TPU software version when creating (default tpu-ubuntu2204-base)
  --project PROJECT      gcloud project (default: gcloud's configured project)
  --spot                 create a Spot TPU (preemptible; training resumes from checkpoints)
  --no-copy              do not copy the code (already on the workers)
  --no-install           do not install the Python packages
  --no-logs              start training and return without streaming the log
  --dry-run              print every command instead of running it
  -h, --help             this help

Everything after "--" is passed to python -m af2flax.train, e.g.
  -- --config.batch_size=128 --config.init_from=gs://bucket/params_model_1_ptm

Example (v4-32 pod slice, 4 hosts):
  ./launch_tpu.sh --name af2-v4-32 --zone us-central2-b --accelerator v4-32 \
      --config configs/initial_training.py --workdir gs://my-bucket/af2/initial
USAGE
}

NAME="" ZONE="" CONFIG="" WORKDIR="" PROJECT=""
ACCELERATOR="v4-8" VERSION="tpu-ubuntu2204-base"
SPOT=0 COPY=1 INSTALL=1 LOGS=1 DRY_RUN=0
TRAIN_FLAGS=()

die() { echo "launch_tpu.sh: $*" >&2; exit 2; }

while (($#)); do
  case "$1" in
    --name) NAME="${2:?--name needs a value}"; shift 2 ;;
    --zone) ZONE="${2:?--zone needs a value}"; shift 2 ;;
    --config) CONFIG="${2:?--config needs a value}"; shift 2 ;;
    --workdir) WORKDIR="${2:?--workdir needs a value}"; shift 2 ;;
    --accelerator) ACCELERATOR="${2:?--accelerator needs a value}"; shift 2 ;;
    --version) VERSION="${2:?--version needs a value}"; shift 2 ;;
    --project) PROJECT="${2:?--project needs a value}"; shift 2 ;;
    --spot) SPOT=1; shift ;;
    --no-copy) COPY=0; shift ;;
    --no-install) INSTALL=0; shift ;;
    --no-logs) LOGS=0; shift ;;
    --dry-run) DRY_RUN=1; shift ;;
    -h|--help) usage; exit 0 ;;
    --) shift; TRAIN_FLAGS=("$@"); break ;;
    *) usage >&2; die "unknown argument: $1" ;;
  esac
done

[[ -n "$NAME" ]] || die "--name is required (see --help)"
[[ -n "$ZONE" ]] || die "--zone is required (see --help)"
[[ -n "$CONFIG" ]] || die "--config is required (see --help)"
[[ -n "$WORKDIR" ]] || die "--workdir is required (see --help)"
if [[ "$WORKDIR" != gs://* ]]; then
  echo "launch_tpu.sh: warning: --workdir $WORKDIR is not on GCS; on a multi-host slice every" \
       "host must see the same checkpoints, so use gs://..." >&2
fi

cd "$(dirname "$0")"
[[ -f "$CONFIG" ]] || die "config file $CONFIG not found (paths are relative to the repository)"
JAX_VERSION="$(sed -n 's/^jax==\(.*\)$/\1/p' requirements.txt)"
[[ -n "$JAX_VERSION" ]] || die "requirements.txt pins no jax==VERSION"

GCLOUD=(gcloud compute tpus tpu-vm)
LOCATION=(--zone="$ZONE")
[[ -n "$PROJECT" ]] && LOCATION+=(--project="$PROJECT")
REMOTE_DIR="af2flax"
ARCHIVE="/tmp/af2flax-${NAME}.tar.gz"

# Runs a command, or prints it (shell-quoted) with --dry-run.
run() {
  if ((DRY_RUN)); then
    printf '%q ' "$@"
    printf '\n'
  else
    "$@"
  fi
}

# 1. The TPU: reuse it if it exists, else create it.
if ((DRY_RUN)); then
  echo "# dry run: would check for the TPU with the next command and create it if absent"
  run "${GCLOUD[@]}" describe "$NAME" "${LOCATION[@]}" --format="value(state)"
  exists=0
elif "${GCLOUD[@]}" describe "$NAME" "${LOCATION[@]}" --format="value(state)" >/dev/null 2>&1; then
  echo "Reusing TPU $NAME in $ZONE"
  exists=1
else
  exists=0
fi
if ((!exists)); then
  CREATE=("${GCLOUD[@]}" create "$NAME" "${LOCATION[@]}" --accelerator-type="$ACCELERATOR"
          --version="$VERSION")
  ((SPOT)) && CREATE+=(--spot)
  run "${CREATE[@]}"
fi

# 2. The code: the files git tracks, on every worker.
if ((COPY)); then
  run git archive --format=tar.gz --prefix="$REMOTE_DIR/" -o "$ARCHIVE" HEAD
  run "${GCLOUD[@]}" scp "$ARCHIVE" "$NAME:af2flax.tar.gz" "${LOCATION[@]}" --worker=all
  run "${GCLOUD[@]}" ssh "$NAME" "${LOCATION[@]}" --worker=all \
    --command="rm -rf $REMOTE_DIR && tar -xzf af2flax.tar.gz"
fi

# 3. The packages: Python 3.11 (the TPU images ship Ubuntu 22.04's 3.10; requirements.txt
#    needs >= 3.11), requirements.txt and the TPU build of the same JAX, on every worker.
if ((INSTALL)); then
  GET_PYTHON="command -v python3.11 >/dev/null || { sudo add-apt-repository -y ppa:deadsnakes/ppa && sudo apt-get update -q && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -q python3.11 python3.11-venv; }"
  run "${GCLOUD[@]}" ssh "$NAME" "${LOCATION[@]}" --worker=all \
    --command="$GET_PYTHON && cd $REMOTE_DIR && python3.11 -m venv .venv && .venv/bin/pip install -q -r requirements.txt && .venv/bin/pip install -q 'jax[tpu]==$JAX_VERSION' -f https://storage.googleapis.com/jax-releases/libtpu_releases.html"
fi

# 4. Training: the same command on all workers, detached so that a dropped ssh does not stop it.
TRAIN=(.venv/bin/python -m af2flax.train --config="$CONFIG" --workdir="$WORKDIR" --distributed
       "${TRAIN_FLAGS[@]}")
printf -v TRAIN_QUOTED '%q ' "${TRAIN[@]}"
run "${GCLOUD[@]}" ssh "$NAME" "${LOCATION[@]}" --worker=all \
  --command="cd $REMOTE_DIR && nohup $TRAIN_QUOTED> train.log 2>&1 < /dev/null &"

# 5. The log of worker 0 (Ctrl-C stops streaming, not training).
if ((LOGS)); then
  run "${GCLOUD[@]}" ssh "$NAME" "${LOCATION[@]}" --worker=0 \
    --command="tail -n +1 -F $REMOTE_DIR/train.log"
fi
if ((!DRY_RUN)); then
  echo "Training runs on $NAME. TensorBoard: tensorboard --logdir $WORKDIR"
  echo "Logs: ${GCLOUD[*]} ssh $NAME ${LOCATION[*]} --worker=0 --command='tail -F $REMOTE_DIR/train.log'"
fi
