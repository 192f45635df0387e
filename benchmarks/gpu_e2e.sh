#!/usr/bin/env bash
# The prepared device run of issue 10's end-to-end rows: one call, about 7 minutes on an H100.
#   bash benchmarks/gpu_e2e.sh "$OUT"
# Writes to $1: e2e-gpu.json (+ .md, .png; the meta names the device): the LLaMA-2-7B-shaped fp16 model dense
# (eager and under torch.compile "max-autotune-no-cudagraphs", both with the decode step in one CUDA graph) and with
# random balanced DSF 0.5 / 0.3 factors, decode at batch 1 / 8 / 32 and a 2048-token prefill; speedups are against
# the faster dense variant. The JSON is rewritten after each section. Run it with the device's own Python.
set -uo pipefail
out=${1:?usage: gpu_e2e.sh OUTDIR}
mkdir -p "$out"
cd "$(dirname "$0")/.."
pip install -q -e . --no-deps >/dev/null 2>&1 || true
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$out/gpu.txt"
timeout 450 python -m benchmarks.bench_e2e --models llama2-7b --densities 0.5,0.3 --batches 1,8,32 --new-tokens 64 \
  --runs 3 --dense-compile max-autotune-no-cudagraphs --plot --out "$out/e2e-gpu.json" 2>&1 | tail -40
