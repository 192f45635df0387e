"""Launch configurations of the decode kernels: a table measured on an H100, and a heuristic for other shapes.

``lookup(op, rows, per_row, BN)`` returns ``{"BN", "BLOCK_R", "BLOCK_S", "num_warps", "num_stages"}`` for a
matrix with ``rows`` rows and ``per_row`` stored slots per row (``nibble``: ``S``; ``delta``: average entries).
``TUNED`` holds what benchmarks/bench_layer.py measured (see docs/kernels-notes.md); keys are
``(op, rows, per_row, BN)``. Everything else falls back to ``heuristic``.
"""

from __future__ import annotations

__all__ = ["DECODE_MAX_TOKENS", "TUNED", "candidates", "decode_max_tokens", "heuristic", "lookup"]

# Measured on an NVIDIA H100 80GB HBM3 (benchmarks/bench_layer.py --tune, results/layer-h100.json 'tuned'):
# the fastest of configs.candidates per factor; keys (layout, rows, slots per row, BN).
TUNED: dict[tuple[str, int, int, int], dict] = {
    ("nibble", 4096, 1024, 1): {"BN": 1, "BLOCK_R": 8, "BLOCK_S": 256, "num_warps": 8, "num_stages": 2, "PREFETCH": True},
    ("nibble", 4096, 4128, 1): {"BN": 1, "BLOCK_R": 4, "BLOCK_S": 512, "num_warps": 8, "num_stages": 2},
    ("nibble", 4096, 1024, 16): {"BN": 16, "BLOCK_R": 1, "BLOCK_S": 128, "num_warps": 4, "num_stages": 2, "XF32": True},
    ("nibble", 4096, 4128, 16): {"BN": 16, "BLOCK_R": 1, "BLOCK_S": 128, "num_warps": 4, "num_stages": 2},
    ("nibble", 4096, 2080, 1): {"BN": 1, "BLOCK_R": 8, "BLOCK_S": 256, "num_warps": 8, "num_stages": 2, "PREFETCH": True},
    ("nibble", 4096, 2080, 16): {"BN": 16, "BLOCK_R": 1, "BLOCK_S": 128, "num_warps": 4, "num_stages": 2},
    ("delta", 4096, 1049, 1): {"BN": 1, "BLOCK_R": 4, "BLOCK_S": 256, "num_warps": 4, "num_stages": 2},
    ("delta", 4096, 4496, 1): {"BN": 1, "BLOCK_R": 4, "BLOCK_S": 512, "num_warps": 4, "num_stages": 2},
    ("delta", 4096, 1049, 16): {"BN": 16, "BLOCK_R": 1, "BLOCK_S": 256, "num_warps": 4, "num_stages": 2},
    ("delta", 4096, 4496, 16): {"BN": 16, "BLOCK_R": 2, "BLOCK_S": 256, "num_warps": 4, "num_stages": 2},
    ("nibble", 4096, 5504, 1): {"BN": 1, "BLOCK_R": 4, "BLOCK_S": 512, "num_warps": 8, "num_stages": 2},
    ("nibble", 4096, 5504, 16): {"BN": 16, "BLOCK_R": 1, "BLOCK_S": 128, "num_warps": 4, "num_stages": 2},
    ("nibble", 4096, 3328, 1): {"BN": 1, "BLOCK_R": 8, "BLOCK_S": 256, "num_warps": 8, "num_stages": 2, "PREFETCH": True},
    ("nibble", 4096, 3328, 16): {"BN": 16, "BLOCK_R": 1, "BLOCK_S": 128, "num_warps": 4, "num_stages": 2},
    ("delta", 4096, 5519, 1): {"BN": 1, "BLOCK_R": 4, "BLOCK_S": 512, "num_warps": 4, "num_stages": 2},
    ("delta", 4096, 5519, 16): {"BN": 16, "BLOCK_R": 2, "BLOCK_S": 256, "num_warps": 4, "num_stages": 2},
    ("nibble", 11008, 1536, 1): {"BN": 1, "BLOCK_R": 8, "BLOCK_S": 256, "num_warps": 8, "num_stages": 2, "PREFETCH": True},
    ("nibble", 11008, 1536, 16): {"BN": 16, "BLOCK_R": 1, "BLOCK_S": 128, "num_warps": 4, "num_stages": 2},
    ("nibble", 11008, 768, 1): {"BN": 1, "BLOCK_R": 16, "BLOCK_S": 256, "num_warps": 4, "num_stages": 2},
    ("nibble", 11008, 768, 16): {"BN": 16, "BLOCK_R": 2, "BLOCK_S": 128, "num_warps": 4, "num_stages": 2},
    ("delta", 11008, 1682, 1): {"BN": 1, "BLOCK_R": 4, "BLOCK_S": 256, "num_warps": 4, "num_stages": 2},
    ("delta", 11008, 1682, 16): {"BN": 16, "BLOCK_R": 1, "BLOCK_S": 256, "num_warps": 4, "num_stages": 2},
    ("nibble", 11008, 2048, 1): {"BN": 1, "BLOCK_R": 8, "BLOCK_S": 256, "num_warps": 8, "num_stages": 2, "PREFETCH": True},
    ("nibble", 11008, 2048, 16): {"BN": 16, "BLOCK_R": 1, "BLOCK_S": 256, "num_warps": 4, "num_stages": 2},
    ("nibble", 11008, 1248, 1): {"BN": 1, "BLOCK_R": 8, "BLOCK_S": 256, "num_warps": 8, "num_stages": 2, "PREFETCH": True},
    ("nibble", 11008, 1248, 16): {"BN": 16, "BLOCK_R": 1, "BLOCK_S": 128, "num_warps": 4, "num_stages": 2},
    ("delta", 11008, 2063, 1): {"BN": 1, "BLOCK_R": 4, "BLOCK_S": 512, "num_warps": 4, "num_stages": 2},
    ("delta", 11008, 2063, 16): {"BN": 16, "BLOCK_R": 2, "BLOCK_S": 256, "num_warps": 4, "num_stages": 2},
    ("nibble", 4096, 1280, 1): {"BN": 1, "BLOCK_R": 8, "BLOCK_S": 256, "num_warps": 8, "num_stages": 2, "PREFETCH": True},
    ("nibble", 4096, 768, 1): {"BN": 1, "BLOCK_R": 8, "BLOCK_S": 256, "num_warps": 8, "num_stages": 2, "PREFETCH": True},
    ("nibble", 4096, 1280, 16): {"BN": 16, "BLOCK_R": 1, "BLOCK_S": 128, "num_warps": 4, "num_stages": 2},
    ("nibble", 4096, 768, 16): {"BN": 16, "BLOCK_R": 1, "BLOCK_S": 128, "num_warps": 4, "num_stages": 2},
    ("nibble", 4096, 512, 1): {"BN": 1, "BLOCK_R": 16, "BLOCK_S": 256, "num_warps": 4, "num_stages": 2, "PREFETCH": True},
    ("nibble", 4096, 512, 16): {"BN": 16, "BLOCK_R": 1, "BLOCK_S": 128, "num_warps": 4, "num_stages": 2},
    ("delta", 4096, 1409, 1): {"BN": 1, "BLOCK_R": 4, "BLOCK_S": 512, "num_warps": 4, "num_stages": 2},
    ("delta", 4096, 713, 1): {"BN": 1, "BLOCK_R": 4, "BLOCK_S": 256, "num_warps": 4, "num_stages": 2},
    ("delta", 4096, 1409, 16): {"BN": 16, "BLOCK_R": 1, "BLOCK_S": 256, "num_warps": 4, "num_stages": 2},
    ("delta", 4096, 713, 16): {"BN": 16, "BLOCK_R": 2, "BLOCK_S": 256, "num_warps": 4, "num_stages": 2},
    ("nibble", 4096, 2048, 1): {"BN": 1, "BLOCK_R": 2, "BLOCK_S": 512, "num_warps": 4, "num_stages": 2},
    ("nibble", 4096, 2048, 16): {"BN": 16, "BLOCK_R": 1, "BLOCK_S": 256, "num_warps": 4, "num_stages": 2},
    ("nibble", 4096, 1248, 1): {"BN": 1, "BLOCK_R": 8, "BLOCK_S": 256, "num_warps": 8, "num_stages": 2, "PREFETCH": True},
    ("nibble", 4096, 1248, 16): {"BN": 16, "BLOCK_R": 1, "BLOCK_S": 128, "num_warps": 4, "num_stages": 2},
    ("delta", 4096, 2063, 1): {"BN": 1, "BLOCK_R": 4, "BLOCK_S": 512, "num_warps": 4, "num_stages": 2},
    ("delta", 4096, 2063, 16): {"BN": 16, "BLOCK_R": 2, "BLOCK_S": 256, "num_warps": 4, "num_stages": 2},
}

# Largest token count for which the streaming (decode) kernels beat decompress + cuBLAS; per layer shape
# ``(kind, out, in)`` when measured, else the default.
DECODE_MAX_TOKENS = 16

# DSF decode of two nibble factors in one launch (dsf_fused_matmul) instead of two. Measured slower on an H100
# (the spinning second-factor programs take SM slots from the first factor's tail): off.
FUSED_DSF = False

# Launch the decode kernels with programmatic dependent launch (Hopper+): each kernel prefetches its first weights
# and waits (griddepcontrol.wait) only before reading its input, so it overlaps the previous kernel's tail.
USE_PDL = True

# Token counts up to which the decode path runs one token per program (BN = 1, weights re-read from L2 per token)
# instead of packing the tokens (BN > 1).
DECODE_BN1_MAX_TOKENS = 2  # measured: BN = 1 wins at 2 tokens on most shapes, loses from 4

# Prefill: decompress factors in this many row chunks ("prefill": 1). "prefill_overlap" uses
# PREFILL_OVERLAP_CHUNKS for factors of at least PREFILL_CHUNK_MIN_BYTES (dense), decompressing chunk i + 1 on a
# side stream while the GEMM of chunk i runs; measured slower on an H100 (cuBLAS leaves no SMs to overlap).
PREFILL_CHUNKS = 1
PREFILL_OVERLAP_CHUNKS = 4
PREFILL_CHUNK_MIN_BYTES = 16 << 20

# nibble_unpack tiles, measured per (rows, slots per row); default otherwise.
UNPACK_TUNED: dict[tuple[int, int], dict] = {  # measured on an H100 (results/layer-h100.json 'unpack_table')
    (4096, 1024): {"block_r": 4, "block_g": 64, "num_warps": 8},
    (4096, 4128): {"block_r": 8, "block_g": 16, "num_warps": 4},
    (4096, 2080): {"block_r": 8, "block_g": 16, "num_warps": 4},
    (4096, 5504): {"block_r": 4, "block_g": 16, "num_warps": 4},
    (4096, 3328): {"block_r": 8, "block_g": 16, "num_warps": 4},
    (11008, 1536): {"block_r": 4, "block_g": 64, "num_warps": 8},
    (11008, 768): {"block_r": 4, "block_g": 64, "num_warps": 8},
    (11008, 2048): {"block_r": 4, "block_g": 16, "num_warps": 4},
    (11008, 1248): {"block_r": 8, "block_g": 32, "num_warps": 8},
    (4096, 1280): {"block_r": 8, "block_g": 16, "num_warps": 4},
    (4096, 768): {"block_r": 8, "block_g": 16, "num_warps": 4},
    (4096, 512): {"block_r": 4, "block_g": 64, "num_warps": 8},
    (4096, 2048): {"block_r": 4, "block_g": 16, "num_warps": 4},
    (4096, 1248): {"block_r": 8, "block_g": 16, "num_warps": 4},
}
UNPACK_DEFAULT = {"block_r": 8, "block_g": 16, "num_warps": 4}


def unpack_config(rows: int, per_row: int) -> dict:
    """Tiles of ``nibble_unpack`` for a matrix with ``rows`` rows and ``per_row`` slots per row."""
    return dict(UNPACK_TUNED.get((rows, per_row), UNPACK_DEFAULT))


def unpack_candidates() -> list[dict]:
    """Tiles an autotuning sweep times for ``nibble_unpack``."""
    return [{"block_r": r, "block_g": g, "num_warps": w} for r, g, w in
            [(4, 16, 4), (8, 16, 4), (8, 32, 8), (16, 16, 8), (4, 64, 8), (16, 32, 8)]]
DECODE_MAX_TOKENS_BY_SHAPE: dict[tuple[str, int, int], int] = {}


def decode_max_tokens(out_features: int, in_features: int, n_factors: int) -> int:
    """Token count up to which ``factorized_matmul`` / ``sparse_matmul`` take the decode path."""
    kind = "dsf" if n_factors == 2 else "single"
    return DECODE_MAX_TOKENS_BY_SHAPE.get((kind, out_features, in_features), DECODE_MAX_TOKENS)


def _pow2_floor(v: int) -> int:
    return 1 << max(v, 1).bit_length() - 1


def heuristic(op: str, rows: int, per_row: int, BN: int) -> dict:
    """A reasonable configuration without measurements: enough programs to fill 132 SMs several times,
    ~4-8 KB of weights per program per step, and 3-D gather tiles of at most ~4K elements when ``BN > 1``."""
    block_s = 256 if per_row >= 256 and BN <= 2 else 128
    if BN == 1:
        want = 8
    elif BN <= 4:
        want = 4
    else:
        want = 2
    block_r = max(1, min(want, _pow2_floor(max(rows // 512, 1))))
    if op == "delta":
        block_r = max(1, min(block_r, 4))
    return {"BN": BN, "BLOCK_R": block_r, "BLOCK_S": block_s, "num_warps": 4, "num_stages": 2}


def lookup(op: str, rows: int, per_row: int, BN: int) -> dict:
    """Tuned configuration for this key; else the tuned one of the nearest measured ``BN`` of the same matrix
    (with ``BN`` replaced); else ``heuristic``."""
    hit = TUNED.get((op, rows, per_row, BN))
    if hit is None:
        near = sorted((abs(k[3].bit_length() - BN.bit_length()), k[3]) for k in TUNED
                      if k[:3] == (op, rows, per_row) and (k[3] == 1) == (BN == 1))
        if near:
            hit = dict(TUNED[(op, rows, per_row, near[0][1])], BN=BN)
    return dict(hit or heuristic(op, rows, per_row, BN))


def candidates(op: str, BN: int) -> list[dict]:
    """The small search space an autotuning sweep times (benchmarks/bench_layer.py --tune)."""
    out = []
    if op == "delta":
        shapes = [(4, 256), (4, 512), (8, 256), (2, 512)] if BN == 1 else [(1, 128), (2, 128), (1, 256), (2, 256)]
        for block_r, block_s in shapes:
            for warps in (4, 8) if BN == 1 else (4,):
                out.append({"BN": BN, "BLOCK_R": block_r, "BLOCK_S": block_s, "num_warps": warps, "num_stages": 2})
        return out
    if BN == 1:
        for block_r, block_s, warps in [(2, 512, 4), (4, 512, 8), (8, 256, 4), (8, 256, 8), (16, 256, 4)]:
            for extra in ({}, {"PREFETCH": True}):
                out.append({"BN": 1, "BLOCK_R": block_r, "BLOCK_S": block_s, "num_warps": warps,
                            "num_stages": 2, **extra})
        return out
    shapes = [(2, 128), (4, 128), (2, 256), (4, 256)] if BN <= 4 else [(1, 128), (2, 128), (1, 256), (2, 256)]
    for block_r, block_s in shapes:
        for xf32 in (False, True):
            out.append({"BN": BN, "BLOCK_R": block_r, "BLOCK_S": block_s, "num_warps": 4, "num_stages": 2,
                        "XF32": xf32})
    return out
