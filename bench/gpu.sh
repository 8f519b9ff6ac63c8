#!/usr/bin/env bash
# One GPU, bf16: samples/s and MFU of the bundled encoder's train step (batch 256 x 128 tokens, SDPA and
# eager attention, the faster reported), then mtkit's loop overhead against a hand-written loop.
# Without a GPU (or with MTKIT_BENCH_CPU=1) it runs the same scripts small on the CPU, as CI does.
#
#   bench/gpu.sh [OUT_DIR] [extra loop_overhead.py arguments, e.g. --set data.root=DIR]
#
# Writes OUT_DIR/mfu.json and OUT_DIR/loop_overhead.json (default OUT_DIR: bench/results/gpu).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
OUT=${1:-bench/results/gpu}
shift || true
mkdir -p "$OUT"

if [[ "${MTKIT_BENCH_CPU:-0}" != 1 ]] && "$PYTHON" -c 'import sys, torch; sys.exit(not torch.cuda.is_available())'; then
    "$PYTHON" bench/mfu.py --device cuda --batch 256 --length 128 --steps 30 --warmup 5 --out "$OUT/mfu.json"
    "$PYTHON" bench/loop_overhead.py --steps 60 --repeats 2 --set train.precision=bf16 train.device=cuda "$@" \
        --out "$OUT/loop_overhead.json"
else
    echo "no GPU (or MTKIT_BENCH_CPU=1): CPU fallback, small batch, few steps" >&2
    "$PYTHON" bench/mfu.py --device cpu --batch 4 --length 32 --steps 2 --warmup 1 --out "$OUT/mfu.json"
    "$PYTHON" bench/loop_overhead.py --config configs/debug_tiny.yaml --steps 3 --repeats 1 "$@" \
        --out "$OUT/loop_overhead.json"
fi
echo "wrote $OUT/mfu.json and $OUT/loop_overhead.json" >&2
