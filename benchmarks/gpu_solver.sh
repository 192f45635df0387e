#!/usr/bin/env bash
# The prepared device run of issue 13 (solver speed): one call, about 3 minutes on an H100.
#   bash benchmarks/gpu_solver.sh "$OUT"
# Writes to $1: solver-speed-h100-3xtf32.json — the three LLaMA-2-7B shapes, DSF 0.5, 40 iterations, solved with
# fp32 products and with 3×TF32 products, each against the reference port's time and error on the same W, H; and the
# products' tests on the GPU first (tests.txt; the timing runs whatever they say). Each step has its own time limit.
set -uo pipefail
out=${1:?usage: gpu_solver.sh OUTDIR}
mkdir -p "$out"
cd "$(dirname "$0")/.."
pip install -q -e . --no-deps >/dev/null 2>&1 || true
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$out/gpu.txt"
timeout 60 python -m pytest -q -x tests/compress/test_solvers_products.py > "$out/tests.txt" 2>&1
tail -3 "$out/tests.txt"
timeout 300 python benchmarks/solver_speed.py --device cuda --reference --matmul fp32,3xtf32 --repeats 2 \
  --out "$out/solver-speed-h100-3xtf32.json" 2>&1 | tail -20
