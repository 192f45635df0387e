#!/usr/bin/env bash
# The prepared device run of issue 11 (quantized values): one call, about 6 minutes on an H100.
#   bash benchmarks/gpu_quantized.sh "$OUT"
# Writes to $1: layer-gpu-codes.json (+ .md; its meta names the device) — batch 1 and 16 of the three LLaMA-7B
# shapes: DSF 0.5 / 0.3 in the nibble layout with fp16 values and with int8, fp8 and int4 codes (decoded and scaled
# in registers) against cuBLAS fp16 — after the code kernel tests pass on the GPU. Each step has its own time limit,
# so a slow step leaves the others' results.
set -uo pipefail
out=${1:?usage: gpu_quantized.sh OUTDIR}
mkdir -p "$out"
cd "$(dirname "$0")/.."
pip install -q -e . --no-deps >/dev/null 2>&1 || true
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$out/gpu.txt"
timeout 120 python -m pytest -q -x tests/dsf_runtime/kernels/test_nibble_codes.py > "$out/tests.txt" 2>&1
tail -3 "$out/tests.txt"
timeout 330 python -m benchmarks.bench_layer --shapes llama --batches 1,16 --no-bf16 --codes int8,fp8,int4 \
  --max-seconds 300 --out "$out/layer-gpu-codes.json" 2>&1 | tail -60
