#!/usr/bin/env bash
# The prepared device run of the runtime redesign (issue 8): one call, about 6 minutes on an H100.
#   bash benchmarks/gpu_check.sh "$OUT"
# Writes to $1: layer-h100-redesign.json (+ .md) — batch 1 and 16 for the three LLaMA-7B shapes, to compare with the
# committed benchmarks/results/layer-h100.json — and load-memory-h100.json (peak CUDA memory while loading a
# LLaMA-7B-shaped DSF 0.5 model stored as nibble and as bitmask). Each step has its own time limit, so a slow step
# leaves the others' results.
set -uo pipefail
out=${1:?usage: gpu_check.sh OUTDIR}
mkdir -p "$out"
cd "$(dirname "$0")/.."
pip install -q -e . --no-deps >/dev/null 2>&1 || true
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$out/gpu.txt"
timeout 240 python -m benchmarks.bench_layer --shapes llama --batches 1,16 --no-bf16 --max-seconds 200 \
  --out "$out/layer-h100-redesign.json" 2>&1 | tail -40
timeout 200 python -m benchmarks.load_memory --out "$out/load-memory-h100.json" --workdir /tmp/dsf-load 2>&1 | tail -5
timeout 60 python -m pytest -q -x tests/dsf_runtime/kernels 2>&1 | tail -3
