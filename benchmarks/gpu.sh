#!/usr/bin/env bash
# GPU decode and prefill for the E2B, E4B, 26B-A4B and 31B shapes (random weights, bf16, captured decode step),
# each beside transformers' generate on the same config: one command, under 8 minutes on one H100.
#
#   bash benchmarks/gpu.sh              # needs torch with CUDA and transformers; writes benchmarks/results/gpu-*.json
#   bash benchmarks/gpu.sh --plan       # prints the runs without starting them (any machine)
#
# PYTHON picks the interpreter (default: .venv/bin/python if present, else python3); OUT the results folder.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
OUT=${OUT:-benchmarks/results}
VARIANTS=(gemma-4-e2b gemma-4-e4b gemma-4-26b-a4b gemma-4-31b)
LIMIT=110  # seconds per variant: four of them stay under 8 minutes

runs() {
  for v in "${VARIANTS[@]}"; do
    echo "benchmarks/decode.py --variant $v --device cuda --dtype bfloat16 --mode cuda-graph --prompt-len 1024" \
         "--new-tokens 64 --batch 8 --repeat 2 --peers transformers --json $OUT/gpu-$v.json"
  done
}

if [ "${1:-}" = "--plan" ]; then runs; exit 0; fi
"$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else
  "no CUDA device: this script measures the GPU path; run it where torch sees a GPU (or use --plan)")' || exit 1
mkdir -p "$OUT"
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
failed=0
while read -r line; do
  echo "== $line"
  # shellcheck disable=SC2086 - the plan's words are the arguments
  timeout "$LIMIT" "$PY" $line || { echo "!! exit $? (124: over ${LIMIT}s): $line"; failed=1; }
done < <(runs)
exit $failed
