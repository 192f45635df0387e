#!/usr/bin/env bash
# The prepared device run of issue 10 (tile-bitmap tensor-core kernel): one call, about 5 minutes on an H100.
#   bash benchmarks/gpu_tile.sh "$OUT"
# Writes to $1: tests.txt (the tile kernel's tests on the GPU: every token count 1-64, odd shapes, split-K, the DSF
# chain, against float64 with poisoned outputs) and tile-gpu.json + tile-gpu.png (DSF 0.5/0.3 on the three
# LLaMA-7B shapes, batch 1..2048: the tile kernel after a small config sweep, the nibble and delta decode kernels,
# against cuBLAS fp16; the JSON's meta names the device) and tuned-tile.json (the sweep's winners as tuning entries, to
# merge into dsf_runtime/kernels/tuned/). Each step has its own time limit, and the JSON is rewritten
# after every row, so a slow step leaves the others' results. Run it with the device's own Python (torch with CUDA).
set -uo pipefail
out=${1:?usage: gpu_tile.sh OUTDIR}
mkdir -p "$out"
cd "$(dirname "$0")/.."
pip install -q -e . --no-deps >/dev/null 2>&1 || true
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$out/gpu.txt"
timeout 100 python -m pytest -q -x tests/dsf_runtime/kernels/test_tile_matmul.py > "$out/tests.txt" 2>&1
tail -3 "$out/tests.txt"
timeout 300 python -m benchmarks.bench_tile --max-seconds 200 --out "$out/tile-gpu.json" \
  --tuning-file "$out/tuned-tile.json" 2>&1 | tail -60
