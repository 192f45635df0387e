"""How many bytes does each packed layout take against dense fp16, for DSF factor pairs and single sparse matrices?

LLaMA-7B shapes (4096×4096, 11008×4096, 4096×11008) at densities 0.5 and 0.3, fp16 values in the stored layouts and
the GPU layouts ``delta`` and ``tile`` (16×64 tiles) (and int8 / fp8 codes
with fp16 row scales, and int4 codes with an fp16 scale per 128 columns, in dense, csr and bitmask; for DSF also
``int4+int8``, the factor with fewer values in int8 and the other in int4), random masks of exactly the target
non-zero counts. DSF uses its real factor budget (the reference code's ``factorize``): inner
dim ``k = min(m, n)``, the square ``k×k`` factor holds ``0.16·k²`` (square W) or ``0.25·k²`` non-zeros and the
other factor the rest of ``density·m·n``; the square factor is ``A`` when ``m < n`` and ``B`` otherwise. Bytes are
measured (``nbytes`` of the packed tensors), not modelled.

Run: ``python benchmarks/sizes.py [--out benchmarks/results/sizes.json]`` (CPU, about a minute).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import time
from pathlib import Path

import torch

from benchmarks.common import git_sha, utc_now
from dsf_runtime.formats import BLOCK_SIZES, pack

logger = logging.getLogger("benchmarks.sizes")

SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008)]
DENSITIES = [0.5, 0.3]
# plus the GPU kernel layouts that take any mask: delta (4-bit column deltas) and tile (a bitmap per 16x64 tile);
# nibble needs balanced masks (its bytes are in the layer benchmarks' rows).
LAYOUTS = ([("dense", None), ("csr", None), ("bitmask", None)] + [("bsr", b) for b in BLOCK_SIZES]
           + [("delta", None), ("tile", None)])
# Quantized values (docs/format.md "Quantized values"): one-byte codes plus an fp16 scale per row, and int4 codes
# plus an fp16 scale per INT4_GROUP columns, in the layouts that store codes.
CODES = {"int8": torch.int8, "fp8": torch.float8_e4m3fn}
INT4_GROUP = 128
CODE_LAYOUTS = ("dense", "csr", "bitmask")


def exact_mask(rows: int, cols: int, nnz: int, generator: torch.Generator) -> torch.Tensor:
    """A uniformly random bool ``[rows, cols]`` mask with exactly ``nnz`` ones (Bernoulli draw, then the few
    surplus or missing ones toggled at random positions)."""
    n = rows * cols
    flat = torch.rand(n, generator=generator) < nnz / n
    surplus = int(flat.sum()) - nnz
    while surplus:
        want = surplus > 0  # remove ones (True -> False) or add ones (False -> True)
        candidates = torch.randint(n, (8 * abs(surplus) + 64,), generator=generator).unique()
        candidates = candidates[flat[candidates] == want][: abs(surplus)]
        flat[candidates] = not want
        surplus = int(flat.sum()) - nnz
    return flat.view(rows, cols)


def dsf_budget(rows: int, cols: int, density: float) -> tuple[tuple[int, int], int, tuple[int, int], int]:
    """Shapes and non-zeros of DSF's factors ``A`` and ``B`` for a ``rows × cols`` weight."""
    k = min(rows, cols)
    square_nnz = int(k * k * (0.16 if rows == cols else 0.25))
    rect_nnz = int(rows * cols * density) - square_nnz
    if rows < cols:
        return (k, k), square_nnz, (k, cols), rect_nnz
    return (rows, k), rect_nnz, (k, k), square_nnz


def measure(matrix: torch.Tensor) -> dict[tuple[str, int | None, str], int]:
    """Packed bytes of ``matrix`` (fp16) per (layout, block size, values): fp16 values in every layout, and
    int8 / fp8 codes (non-zero where ``matrix`` is) with fp16 row scales and int4 codes with fp16 group scales in
    the layouts that store codes."""
    sizes = {(layout, block, "fp16"): pack(matrix, layout, **({"block_size": block} if block else {})).nbytes
             for layout, block in LAYOUTS}
    scales = torch.ones(matrix.shape[0], dtype=torch.float16)
    for name, dtype in CODES.items():
        codes = (matrix != 0).to(dtype)
        sizes.update({(layout, None, name): pack(codes, layout, scales=scales).nbytes for layout in CODE_LAYOUTS})
    rows, cols = matrix.shape
    group_scales = torch.ones(rows, -(-cols // INT4_GROUP), dtype=torch.float16)
    codes = (matrix != 0).to(torch.int8)
    sizes.update({(layout, None, "int4"): pack(codes, layout, scales=group_scales, group_size=INT4_GROUP).nbytes
                  for layout in CODE_LAYOUTS})
    return sizes


def run(seed: int = 0) -> list[dict]:
    generator = torch.Generator().manual_seed(seed)
    records = []
    # The square factor's budget does not depend on the density nor on which side it sits: measure it once.
    square_bytes: dict[tuple[int, int], dict[tuple[str, int | None, str], int]] = {}
    for rows, cols in SHAPES:
        for density in DENSITIES:
            start = time.perf_counter()
            target = int(rows * cols * density)
            single = measure(exact_mask(rows, cols, target, generator).to(torch.float16))
            a_shape, a_nnz, b_shape, b_nnz = dsf_budget(rows, cols, density)
            factors = []
            for fshape, fnnz in ((a_shape, a_nnz), (b_shape, b_nnz)):
                key = (fshape[0], fnnz)
                if fshape[0] != fshape[1] or key not in square_bytes:
                    measured = measure(exact_mask(*fshape, fnnz, generator).to(torch.float16))
                    if fshape[0] != fshape[1]:
                        factors.append(measured)
                        continue
                    square_bytes[key] = measured
                factors.append(square_bytes[key])
            dsf = {key: factors[0][key] + factors[1][key] for key in factors[0]}
            small = 0 if a_nnz < b_nnz else 1  # --small-factor-values int8: the factor with fewer values in int8
            dsf.update({(layout, None, "int4+int8"): factors[small][(layout, None, "int8")]
                        + factors[1 - small][(layout, None, "int4")] for layout in CODE_LAYOUTS})
            for kind, measured, nnz, shapes in (
                ("single", single, target, [[rows, cols]]),
                ("dsf", dsf, a_nnz + b_nnz, [list(a_shape), list(b_shape)]),
            ):
                for (layout, block, values), nbytes in measured.items():
                    records.append({
                        "layout": layout,
                        "block_size": block,
                        "values": values,
                        "kind": kind,
                        "shape": [rows, cols],
                        "density": density,
                        "nnz": nnz,
                        "factor_shapes": shapes,
                        "bytes": nbytes,
                        "dense_bytes": 2 * rows * cols,
                        "ratio": round(nbytes / (2 * rows * cols), 4),
                    })
            logger.info("%dx%d density %.1f: %.1f s", rows, cols, density, time.perf_counter() - start)
    return records


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "sizes.json",
                        help="Where to write the JSON records.")
    parser.add_argument("--seed", type=int, default=0, help="Seed of the random masks.")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    start = time.perf_counter()
    rows = run(args.seed)
    result = {
        "question": "packed bytes vs dense fp16 per layout, DSF factor pairs and single sparse matrices",
        "torch": torch.__version__,
        "date": utc_now(),
        "machine": {"node": platform.node(), "machine": platform.machine(), "cpus": os.cpu_count(),
                    "python": platform.python_version()},
        "git_sha": git_sha(),
        "values_dtype": "float16 (rows with values fp16); int8 / fp8 codes with fp16 row scales; int4 codes with an "
                        f"fp16 scale per {INT4_GROUP} columns; int4+int8 (DSF): the factor with fewer values in int8, "
                        "the other in int4",
        "seed": args.seed,
        "seconds": round(time.perf_counter() - start, 1),
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    for r in rows:
        if r["layout"] in ("bitmask", "csr", "tile", "delta") or (r["layout"] == "bsr" and r["block_size"] == 32):
            logger.info("%-6s %-7s %-4s %-10s d=%.1f  %.3f x dense", r["kind"], r["layout"], r["values"],
                        "x".join(map(str, r["shape"])), r["density"], r["ratio"])
    logger.info("wrote %s in %.0f s", args.out, result["seconds"])


if __name__ == "__main__":
    main()
