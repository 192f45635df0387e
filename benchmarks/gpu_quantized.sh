#!/usr/bin/env bash
# The prepared device run of issue 11 (quantized values): one call, about 5 minutes on an H100.
#   bash benchmarks/gpu_quantized.sh "$OUT"
# Writes to $1: layer-gpu-int8.json (+ .md; its meta names the device) — batch 1 and 16 of the three LLaMA-7B shapes: DSF 0.5 / 0.3 in the
# nibble layout with fp16 values and with int8 codes (row scales, decoded in registers) against cuBLAS fp16 — after
# the int8-code kernel tests pass on the GPU. Each step has its own time limit, so a slow step leaves the others'
# results. (int4 and fp8 codes are decoded to fp16 at load time: their speed is the fp16 rows'.)
set -uo pipefail
out=${1:?usage: gpu_quantized.sh OUTDIR}
mkdir -p "$out"
cd "$(dirname "$0")/.."
pip install -q -e . --no-deps >/dev/null 2>&1 || true
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$out/gpu.txt"
timeout 90 python -m pytest -q -x tests/dsf_runtime/kernels/test_nibble_codes.py > "$out/tests.txt" 2>&1
tail -3 "$out/tests.txt"
timeout 300 python -m benchmarks.bench_layer --shapes llama --batches 1,16 --no-bf16 --int8 --max-seconds 240 \
  --out "$out/layer-gpu-int8.json" 2>&1 | tail -60
