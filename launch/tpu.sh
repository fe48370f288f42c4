#!/usr/bin/env bash
# Drives a Cloud TPU VM (single host or pod slice) for hybrid_jax: every command runs on ALL workers
# at once where it has to (a pod slice trains with one process per host, and all of them must run the
# same program), and on worker 0 where one process is enough.
#
#   launch/tpu.sh create                      # create the TPU VM
#   launch/tpu.sh setup                       # copy this checkout (git HEAD) to every worker, install
#   launch/tpu.sh data DIR                    # copy a data directory (e.g. ~/.cache/hybrid_jax/data) to workers
#   launch/tpu.sh train CONFIG WORKDIR [ARGS] # start training on all workers (background, logged)
#   launch/tpu.sh evaluate WORKDIR [ARGS]     # evaluate a run on worker 0 (foreground)
#   launch/tpu.sh logs [WORKER]               # tail a worker's training log (default 0)
#   launch/tpu.sh ssh [WORKER]                # interactive shell on a worker
#   launch/tpu.sh stop                        # kill training on all workers (SIGTERM: it checkpoints)
#   launch/tpu.sh delete                      # delete the TPU VM
#
# Settings come from the environment (defaults in brackets):
#   TPU_NAME [hybrid-jax]  ZONE [us-central2-b]  ACCELERATOR_TYPE [v4-8]
#   TPU_VERSION [tpu-ubuntu2204-base]  PROJECT [gcloud's default]  SPOT [0: on-demand; 1: --spot]
#   REMOTE_DIR [hybrid_jax]: checkout location on the workers (relative to $HOME)
#   REMOTE_DATA [hybrid_jax_data]: where `data` puts the data; exported as HYBRID_JAX_DATA
#
# WORKDIR must be shared by all workers when the slice has more than one host (gs://bucket/run):
# the trainer refuses a local path with more than one process, because Orbax would otherwise wait
# forever for checkpoint files that other hosts wrote to their own disks.
set -euo pipefail

TPU_NAME="${TPU_NAME:-hybrid-jax}"
ZONE="${ZONE:-us-central2-b}"
ACCELERATOR_TYPE="${ACCELERATOR_TYPE:-v4-8}"
TPU_VERSION="${TPU_VERSION:-tpu-ubuntu2204-base}"
REMOTE_DIR="${REMOTE_DIR:-hybrid_jax}"
REMOTE_DATA="${REMOTE_DATA:-hybrid_jax_data}"
GCLOUD="${GCLOUD:-gcloud}"

usage() {
  sed -n '2,22p' "$0" | sed 's/^# \{0,1\}//'
  exit 2
}

project_flag=()
[[ -n "${PROJECT:-}" ]] && project_flag=(--project="${PROJECT}")

tpu() {  # gcloud compute tpus tpu-vm SUBCOMMAND NAME --zone ... [more flags]
  local sub="$1"; shift
  # ${a[@]+"${a[@]}"}: an empty array under set -u on bash < 4.4 (CentOS 7, macOS)
  "${GCLOUD}" compute tpus tpu-vm "${sub}" "${TPU_NAME}" --zone="${ZONE}" \
    ${project_flag[@]+"${project_flag[@]}"} "$@"
}

on_workers() {  # on_workers WORKERS COMMAND: run a shell command on "all" or one worker index
  local workers="$1"; shift
  tpu ssh --worker="${workers}" --command="$*"
}

copy_to_workers() {  # copy_to_workers LOCAL REMOTE [FLAGS]: scp to every worker's $HOME/REMOTE
  local src="$1" dest="$2"; shift 2
  "${GCLOUD}" compute tpus tpu-vm scp "$@" "${src}" "${TPU_NAME}:${dest}" --zone="${ZONE}" \
    ${project_flag[@]+"${project_flag[@]}"} --worker=all
}

# Quotes each argument for the remote shell, so flags such as --config.data.alpha=0.3 or paths with
# spaces arrive unchanged.
quote_args() {
  local out="" arg
  for arg in "$@"; do out+=" $(printf '%q' "${arg}")"; done
  printf '%s' "${out}"
}

remote_env="export HYBRID_JAX_DATA=\$HOME/${REMOTE_DATA} TF_CPP_MIN_LOG_LEVEL=2; cd \$HOME/${REMOTE_DIR}"

cmd="${1:-}"
[[ -z "${cmd}" ]] && usage
shift

case "${cmd}" in
  create)
    spot_flag=()
    [[ "${SPOT:-0}" == "1" ]] && spot_flag=(--spot)
    tpu create --accelerator-type="${ACCELERATOR_TYPE}" --version="${TPU_VERSION}" ${spot_flag[@]+"${spot_flag[@]}"}
    ;;
  setup)
    # Ship exactly what is committed (git HEAD), not the working tree: a run is reproducible from
    # its commit, which the trainer also records in the workdir.
    repo="$(git -C "$(dirname "$0")/.." rev-parse --show-toplevel)"
    archive="$(mktemp -t hybrid_jax.XXXXXX.tar.gz)"
    git -C "${repo}" archive --format=tar.gz -o "${archive}" HEAD
    copy_to_workers "${archive}" hybrid_jax.tar.gz
    rm -f "${archive}"
    on_workers all "rm -rf \$HOME/${REMOTE_DIR} && mkdir -p \$HOME/${REMOTE_DIR} && \
      tar -xzf \$HOME/hybrid_jax.tar.gz -C \$HOME/${REMOTE_DIR} && cd \$HOME/${REMOTE_DIR} && \
      python3 -m pip install -q -e '.[tpu]' && \
      python3 -c 'import jax; print(jax.process_index(), jax.device_count(), jax.devices()[0].device_kind)'"
    ;;
  data)
    src="${1:?usage: launch/tpu.sh data LOCAL_DATA_DIR}"
    [[ -d "${src}" ]] || { echo "error: ${src} is not a directory" >&2; exit 2; }
    copy_to_workers "${src}" "${REMOTE_DATA}" --recurse
    ;;
  train)
    config="${1:?usage: launch/tpu.sh train CONFIG WORKDIR [EXTRA FLAGS]}"
    workdir="${2:?usage: launch/tpu.sh train CONFIG WORKDIR [EXTRA FLAGS]}"
    shift 2
    # One process per host, all started together; --distributed makes the trainer call
    # jax.distributed.initialize(), which finds its peers through the TPU metadata server.
    on_workers all "${remote_env} && nohup python3 -m hybrid_jax.train --distributed \
      $(quote_args --config="${config}" --workdir="${workdir}" "$@") \
      > \$HOME/train.log 2>&1 < /dev/null & echo started on \$(hostname)"
    ;;
  evaluate)
    workdir="${1:?usage: launch/tpu.sh evaluate WORKDIR [EXTRA FLAGS]}"
    shift
    on_workers 0 "${remote_env} && python3 -m hybrid_jax.evaluate $(quote_args --workdir="${workdir}" "$@")"
    ;;
  logs)
    on_workers "${1:-0}" "tail -n 200 -f \$HOME/train.log"
    ;;
  ssh)
    tpu ssh --worker="${1:-0}"
    ;;
  stop)
    on_workers all "pkill -TERM -f 'python3 -m hybrid_jax.train' || true"
    ;;
  delete)
    tpu delete --quiet
    ;;
  -h|--help|help)
    usage
    ;;
  *)
    echo "error: unknown command '${cmd}'" >&2
    usage
    ;;
esac
