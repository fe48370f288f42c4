#!/usr/bin/env bash
# Accelerator figures in one go (under 10 minutes on one GPU), without TensorFlow:
#
#   bash benchmarks/accelerator.sh [OUT_DIR]          # on a GPU (or TPU) host
#   bash benchmarks/accelerator.sh --smoke [OUT_DIR]  # everything tiny, on CPU (what the test runs)
#
#   1. the trainer's train step, bf16: XLM-R base at batch 128 and multilingual-e5-small at batch
#      256, each plain and with GradCache: steps/s, MFU, peak memory (and the memory plan's
#      estimate of it)                                     (benchmarks/accelerator.py train)
#   2. the encoder train step against PyTorch transformers on the same device, bf16 and fp32
#                                                          (benchmarks/encoder_step.py)
#   3. the evaluator's encoding throughput (TextEmbedder), e5-small and XLM-R base
#                                                          (benchmarks/accelerator.py embed)
#
# Each measurement is its own process (so peak memory is its own) with a time limit; a failure is
# recorded in OUT_DIR/failures.txt and the rest still run. OUT_DIR (default $OUT, else
# benchmarks/accelerator_out) gets results.jsonl, the encoder_step outputs and summary.md (the
# tables for benchmarks/README.md). Batches are built from random token ids; weights are random
# (throughput does not depend on them), so nothing is downloaded or read from ../shared.
set -uo pipefail
cd "$(dirname "$0")/.."

smoke=0
if [[ "${1:-}" == "--smoke" ]]; then
  smoke=1
  shift
fi
out="${1:-${OUT:-benchmarks/accelerator_out}}"
mkdir -p "${out}"
results="${out}/results.jsonl"
failures="${out}/failures.txt"
: > "${results}"
: > "${failures}"
export TF_CPP_MIN_LOG_LEVEL=2
# This checkout's hybrid_jax, installed or not (the benchmark host may only have jax and torch).
export PYTHONPATH="$(pwd)${PYTHONPATH:+:${PYTHONPATH}}"
# Repeated runs (a rerun after a failure) reuse compiled programs.
export JAX_COMPILATION_CACHE_DIR="${JAX_COMPILATION_CACHE_DIR:-/tmp/hybrid_jax_compilation_cache}"
PYTHON="${PYTHON:-python}"

if (( smoke )); then
  export JAX_PLATFORMS=cpu
  limit=300
  train_runs=("tiny 16 0" "tiny 16 8")
  train_flags=(--steps=2 --warmup=1 --lengths=16,16)
  embed_runs=(tiny)
  embed_flags=(--texts=64 --batch_size=32)
  encoder_runs=("--shape=tiny")
else
  limit=240
  train_runs=("xlmr-base 128 0" "xlmr-base 128 32" "me5-small 256 0" "me5-small 256 64")
  train_flags=(--steps=10 --warmup=2)
  embed_runs=(me5-small xlmr-base)
  embed_flags=(--texts=8192 --batch_size=128)
  encoder_runs=("--shape=xlmr-base --batch_size=32 --dtype=bfloat16 --rounds=3 --steps=5"
                "--shape=xlmr-base --batch_size=32 --rounds=3 --steps=5")
fi

run() {  # run NAME COMMAND...: time-limited, output to OUT_DIR/NAME.txt, failures recorded
  local name="$1"; shift
  echo "== ${name}: $*" >&2
  local started=${SECONDS}
  timeout "${limit}" "$@" > "${out}/${name}.txt" 2> "${out}/${name}.log"
  local status=$?
  echo "   ${name}: $((SECONDS - started))s" >&2
  if (( status != 0 )); then
    echo "${name}: exit ${status}$( (( status == 124 )) && echo " (over ${limit}s)") ($*);" \
      "see ${out}/${name}.log" | tee -a "${failures}" >&2
    tail -n 5 "${out}/${name}.log" >&2
  fi
  cat "${out}/${name}.txt"
}

"${PYTHON}" -c "import jax; print('devices:', jax.devices())"
for spec in "${train_runs[@]}"; do
  read -r model batch chunk <<< "${spec}"
  run "train-${model}-b${batch}-c${chunk}" "${PYTHON}" benchmarks/accelerator.py train \
    --model="${model}" --batch_size="${batch}" --chunk="${chunk}" "${train_flags[@]}" \
    --results="${results}"
done
i=0
for flags in "${encoder_runs[@]}"; do
  i=$((i + 1))
  # shellcheck disable=SC2086  # the flags are words on purpose
  run "encoder-step-${i}" "${PYTHON}" benchmarks/encoder_step.py ${flags}
done
for model in "${embed_runs[@]}"; do
  run "embed-${model}" "${PYTHON}" benchmarks/accelerator.py embed --model="${model}" \
    "${embed_flags[@]}" --results="${results}"
done
"${PYTHON}" benchmarks/accelerator.py summarize --results="${results}" | tee "${out}/summary.md"
for f in "${out}"/encoder-step-*.txt; do
  echo; cat "${f}"
done | tee -a "${out}/summary.md"
if [[ -s "${failures}" ]]; then
  echo "FAILED:" >&2
  cat "${failures}" >&2
  exit 1
fi
