"""What does storing the input embedding as int8 rows cost in perplexity, and what does it save in bytes?

For the dense SmolLM2-135M (fp32, the embedding replaced in memory by its int8-row encoding) and for a compressed
directory (default: the ``make demo`` output), exported with ``dsf export --embedding keep`` and with the default
``--embedding int8``: Persuasion perplexity on the documented windows (``compress.evaluate``: the first N
non-overlapping windows of 1024 tokens), and the directory's bytes against the dense fp16 model
(``CompressedCheckpoint.size_summary``). The compressed rows load through ``dsf_runtime.from_pretrained`` on the
CPU, the path a user takes.

    python benchmarks/embedding_int8.py --model runs/demo-smollm2-dsf50 --windows 32 \\
        --out benchmarks/results/embedding-int8-smollm2.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.cpu_decode import machine  # noqa: E402
from compress.assets import smollm2_dir  # noqa: E402
from compress.data import load_evaluation  # noqa: E402
from compress.evaluate import perplexity  # noqa: E402
from compress.output import write_json_atomic  # noqa: E402
from compress.quantize import quantize_embedding  # noqa: E402
from dsf_runtime import from_pretrained  # noqa: E402
from dsf_runtime.checkpoint import open_compressed  # noqa: E402
from dsf_runtime.quantized import dequantize_rows  # noqa: E402
from exporters.config import ExportConfig  # noqa: E402
from exporters.layouts import convert_layout  # noqa: E402


def _dense_rows(windows: torch.Tensor) -> list[dict]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(smollm2_dir(), dtype=torch.float32).eval()
    rows = [{"model": "dense", "embedding": "fp32", "perplexity": perplexity(model, windows).perplexity}]
    embedding = model.get_input_embeddings().weight
    stored = quantize_embedding({"embedding": embedding.detach()}, "embedding")
    with torch.no_grad():
        embedding.copy_(dequantize_rows(stored["embedding"], stored["embedding_scale"], torch.float32))
    rows.append({"model": "dense", "embedding": "int8-row", "perplexity": perplexity(model, windows).perplexity})
    return rows


def _compressed_rows(source: Path, windows: torch.Tensor, scratch: Path) -> list[dict]:
    rows = []
    for embedding in ("keep", "int8"):
        directory = convert_layout(source, scratch / embedding, ExportConfig(embedding=embedding))
        with open_compressed(directory) as ckpt:
            size = ckpt.size_summary()
        model = from_pretrained(directory)
        rows.append({
            "model": str(source.name), "embedding": "int8-row" if embedding == "int8" else "as stored",
            "perplexity": perplexity(model, windows).perplexity, "total_bytes": size["total_bytes"],
            "bytes_ratio": size["ratio"], "linear_ratio": size["linear_ratio"],
        })
        del model
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=Path("runs/demo-smollm2-dsf50"))
    parser.add_argument("--windows", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/embedding-int8-smollm2.json"))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir())
    windows = load_evaluation(tokenizer, "persuasion", 1024, args.windows)
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as scratch:
        rows = _dense_rows(windows) + _compressed_rows(args.model, windows, Path(scratch))
    result = {
        "machine": machine(args.threads, load_before),
        "date": datetime.date.today().isoformat(), "torch": torch.__version__,
        "eval": f"Persuasion, first {int(windows.shape[0])} windows of {int(windows.shape[1])} tokens",
        "rows": rows,
    }
    write_json_atomic(args.out, result)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
