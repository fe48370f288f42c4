#!/usr/bin/env bash
# Trains hybrid_jax on a SLURM GPU cluster: NODES nodes x GPUS_PER_NODE GPUs, ONE JAX process per
# node that drives all of its node's GPUs (not one process per GPU), all started by one srun.
#
#   launch/slurm.sh [--dry-run] setup                        # pip install -e ".[cuda]" (login node)
#   launch/slurm.sh [--dry-run] train CONFIG WORKDIR [ARGS]  # sbatch the training job
#   launch/slurm.sh [--dry-run] evaluate WORKDIR [ARGS]      # sbatch an evaluation (1 node, 1 GPU)
#   launch/slurm.sh logs JOBID [RANK]                        # follow one rank's log (default 0)
#   launch/slurm.sh stop JOBID                               # SIGTERM: checkpoint, then end
#
# --dry-run prints the exact sbatch command and the batch script (with its srun line) and submits
# nothing. Settings come from the environment (defaults in brackets):
#   NODES [1]  GPUS_PER_NODE [8]  CPUS_PER_TASK [16]  TIME [24:00:00]  JOB_NAME [hybrid-jax]
#   PARTITION, ACCOUNT, QOS [cluster defaults]  LOG_DIR [logs/slurm, in this checkout]
#   PYTHON [python3]: the interpreter of the environment with hybrid_jax installed ([cuda] extra)
#   CHECKPOINT_SECONDS [300]: how long before the time limit the job checkpoints and requeues
#   SHARED_FILESYSTEM [1]: WORKDIR is on a filesystem every node mounts (NFS, Lustre); with
#     NODES > 1 and a local-looking path this passes --config.train.shared_filesystem=True
#   HYBRID_JAX_DATA: passed on to the job when set (the data directory; see hybrid_jax/data/locations.py)
#
# How a multi-node run starts: the batch script runs `srun ... python -m hybrid_jax.train
# --distributed ...`, one task per node. --distributed calls jax.distributed.initialize(), which
# reads SLURM's SLURM_JOB_ID, SLURM_STEP_NODELIST (the coordinator is the first node, port derived
# from the job id), SLURM_NTASKS (process count), SLURM_PROCID (process id) and SLURM_LOCALID.
# JAX's SLURM default is one process per GPU (each process sees GPU $SLURM_LOCALID only), so the
# script sets JAX_LOCAL_DEVICE_IDS=0,...,GPUS_PER_NODE-1: every process sees all of its GPUs.
#
# Preemption and time limits (the job is submitted with --requeue): a preempted job gets SIGTERM
# on every process; the trainer saves the current step (all hosts agree on the step through JAX's
# preemption sync) and SLURM requeues the job. CHECKPOINT_SECONDS before the time limit SLURM sends
# USR1 to the batch script, which sends SIGTERM to the trainer, waits for the checkpoint and runs
# `scontrol requeue`. Either way the requeued job runs the same command, which resumes from the
# newest checkpoint in WORKDIR exactly (same batches, same parameters). Logs: one file per rank
# and restart, LOG_DIR/JOB_NAME-JOBID-restartK-rankR.log (SLURM's own output: JOB_NAME-JOBID.out).
set -euo pipefail

REPO="$(cd "$(dirname "$0")/.." && pwd)"
NODES="${NODES:-1}"
GPUS_PER_NODE="${GPUS_PER_NODE:-8}"
CPUS_PER_TASK="${CPUS_PER_TASK:-16}"
TIME="${TIME:-24:00:00}"
JOB_NAME="${JOB_NAME:-hybrid-jax}"
LOG_DIR="${LOG_DIR:-${REPO}/logs/slurm}"
PYTHON="${PYTHON:-python3}"
CHECKPOINT_SECONDS="${CHECKPOINT_SECONDS:-300}"
SHARED_FILESYSTEM="${SHARED_FILESYSTEM:-1}"
SBATCH="${SBATCH:-sbatch}"
SCANCEL="${SCANCEL:-scancel}"

usage() {
  sed -n '2,9p' "$0" | sed 's/^# \{0,1\}//'
  exit 2
}

fail() {
  echo "error: $*" >&2
  exit 2
}

for name in NODES GPUS_PER_NODE CPUS_PER_TASK CHECKPOINT_SECONDS; do
  [[ "${!name}" =~ ^[1-9][0-9]*$ ]] || fail "${name}=${!name}: expected a positive integer"
done

dry_run=0
if [[ "${1:-}" == "--dry-run" ]]; then
  dry_run=1
  shift
fi

# Each argument quoted for the batch script, so flags such as --config.data.alpha=0.3 or paths
# with spaces arrive unchanged.
quote_args() {
  local out="" arg
  for arg in "$@"; do out+=" $(printf '%q' "${arg}")"; done
  printf '%s' "${out# }"
}

# The sbatch options of a job: resources, requeue, the early-warning signal, SLURM's own log.
sbatch_args() {  # sbatch_args NODES GPUS
  local args=(--job-name="${JOB_NAME}" --nodes="$1" --ntasks-per-node=1 --gpus-per-node="$2"
              --cpus-per-task="${CPUS_PER_TASK}" --time="${TIME}" --requeue
              --signal="B:USR1@${CHECKPOINT_SECONDS}" --open-mode=append
              --output="${LOG_DIR}/%x-%j.out")
  [[ -n "${PARTITION:-}" ]] && args+=(--partition="${PARTITION}")
  [[ -n "${ACCOUNT:-}" ]] && args+=(--account="${ACCOUNT}")
  [[ -n "${QOS:-}" ]] && args+=(--qos="${QOS}")
  printf '%s\n' "${args[@]}"
}

# The batch script: environment, signal handling, one srun of COMMAND over all nodes.
batch_script() {  # batch_script NODES GPUS COMMAND...
  local nodes="$1" gpus="$2"; shift 2
  local rank_log srun_line
  rank_log="$(printf '%q' "${LOG_DIR}")/%x-%j-restart\${restart}-rank%t.log"
  # Resources again on srun: since SLURM 22.05 a step no longer inherits --cpus-per-task.
  srun_line="srun --nodes=${nodes} --ntasks=${nodes} --ntasks-per-node=1"
  srun_line+=" --gpus-per-node=${gpus} --cpus-per-task=${CPUS_PER_TASK} --kill-on-bad-exit=1"
  srun_line+=" --output=${rank_log} $(quote_args "$@")"
  local data_line="# HYBRID_JAX_DATA: not set when submitted"
  [[ -n "${HYBRID_JAX_DATA:-}" ]] && data_line="export HYBRID_JAX_DATA=$(printf '%q' \
    "${HYBRID_JAX_DATA}")"
  cat <<EOF
#!/usr/bin/env bash
# Written by launch/slurm.sh ($(date -u +%Y-%m-%dT%H:%M:%SZ)): ${nodes} node(s) x ${gpus} GPU(s),
# one JAX process per node.
set -uo pipefail
cd $(printf '%q' "${REPO}")
export TF_CPP_MIN_LOG_LEVEL=2
${data_line}
# One process per node sees all of the node's GPUs (JAX's SLURM default: GPU \$SLURM_LOCALID only).
export JAX_LOCAL_DEVICE_IDS=$(seq -s, 0 $((gpus - 1)))
requeue=0
srun_pid=""
# USR1 (${CHECKPOINT_SECONDS} s before the time limit): the trainer checkpoints, then we requeue.
on_time_limit() {
  requeue=1
  echo "time limit near: SIGTERM to the trainer (it checkpoints), then requeue" >&2
  [[ -n "\${srun_pid}" ]] && kill -TERM "\${srun_pid}" 2>/dev/null
}
# TERM (preemption, scancel): pass it on; SLURM requeues a preempted --requeue job itself.
on_term() { [[ -n "\${srun_pid}" ]] && kill -TERM "\${srun_pid}" 2>/dev/null; }
trap on_time_limit USR1
trap on_term TERM
restart="\${SLURM_RESTART_COUNT:-0}"
${srun_line} &
srun_pid=\$!
# A trapped signal interrupts \`wait\` (status > 128); wait again until srun itself has exited.
while :; do
  wait "\${srun_pid}"; status=\$?
  kill -0 "\${srun_pid}" 2>/dev/null || break
done
wait "\${srun_pid}" 2>/dev/null; last=\$?  # srun's status if it ended during the last trap
[[ \${last} -ne 127 ]] && status=\${last}
if (( requeue )); then
  scontrol requeue "\${SLURM_JOB_ID}"
fi
exit "\${status}"
EOF
}

# Writes the batch script to LOG_DIR and submits it (or, with --dry-run, prints both).
submit() {  # submit NAME NODES GPUS COMMAND...
  local name="$1" nodes="$2" gpus="$3"; shift 3
  local script="${LOG_DIR}/${JOB_NAME}-${name}.sbatch"
  local args
  mapfile -t args < <(sbatch_args "${nodes}" "${gpus}")
  if (( dry_run )); then
    echo "$(quote_args "${SBATCH}" "${args[@]}" "${script}")"
    echo "# ${script}:"
    batch_script "${nodes}" "${gpus}" "$@"
    return
  fi
  mkdir -p "${LOG_DIR}"
  batch_script "${nodes}" "${gpus}" "$@" > "${script}"
  "${SBATCH}" "${args[@]}" "${script}"
}

cmd="${1:-}"
[[ -z "${cmd}" ]] && usage
shift

case "${cmd}" in
  setup)
    # On the login node, into the environment PYTHON belongs to (clusters share it with the
    # compute nodes); the [cuda] extra brings jax's CUDA 12 wheels.
    install=("${PYTHON}" -m pip install -e "${REPO}[cuda]")
    if (( dry_run )); then echo "$(quote_args "${install[@]}")"; else "${install[@]}"; fi
    ;;
  train)
    config="${1:?usage: launch/slurm.sh train CONFIG WORKDIR [EXTRA FLAGS]}"
    workdir="${2:?usage: launch/slurm.sh train CONFIG WORKDIR [EXTRA FLAGS]}"
    shift 2
    extra=()
    if (( NODES > 1 )) && [[ "${workdir}" != *://* && "${SHARED_FILESYSTEM}" == "1" ]]; then
      # Several processes write one checkpoint: the trainer refuses local paths unless told
      # the filesystem is shared (it is on a cluster's NFS/Lustre).
      extra=(--config.train.shared_filesystem=True)
    fi
    submit train "${NODES}" "${GPUS_PER_NODE}" "${PYTHON}" -m hybrid_jax.train --distributed \
      --config="${config}" --workdir="${workdir}" ${extra[@]+"${extra[@]}"} "$@"
    ;;
  evaluate)
    workdir="${1:?usage: launch/slurm.sh evaluate WORKDIR [EXTRA FLAGS]}"
    shift
    submit evaluate 1 1 "${PYTHON}" -m hybrid_jax.evaluate --workdir="${workdir}" "$@"
    ;;
  logs)
    job="${1:?usage: launch/slurm.sh logs JOBID [RANK]}"
    rank="${2:-0}"
    # The newest restart's log of that rank.
    log="$(ls -t "${LOG_DIR}/${JOB_NAME}-${job}-restart"*"-rank${rank}.log" 2>/dev/null \
      | head -n 1)"
    [[ -n "${log}" ]] || fail "no log of job ${job} rank ${rank} in ${LOG_DIR}"
    tail -n 200 -f "${log}"
    ;;
  stop)
    job="${1:?usage: launch/slurm.sh stop JOBID}"
    # SIGTERM to the job's steps: the trainer checkpoints and returns; nothing is requeued.
    stop=("${SCANCEL}" --signal=TERM "${job}")
    if (( dry_run )); then echo "$(quote_args "${stop[@]}")"; else "${stop[@]}"; fi
    ;;
  -h|--help|help)
    usage
    ;;
  *)
    echo "error: unknown command '${cmd}'" >&2
    usage
    ;;
esac
