"""How fast does one DSF / single-sparse layer run against cuBLAS dense, torch CSR and torch 2:4, by batch size?

One unattended run (``dsf bench layer`` or ``python -m benchmarks.bench_layer --out benchmarks/results/layer-h100.json``):
shapes 4096×4096, 11008×4096, 4096×11008 and SmolLM2's 576×576, 192×576, 1536×576, 576×1536; batch 1…2048;
DSF at total density 0.5 and 0.3 with DSF's factor budgets (square factor 0.16 / 0.25, rounded to balanced groups by
``propose_balanced_split``), single sparse matrices at the same densities; balanced (``nibble``) layouts for all
rows and the unstructured ``delta`` layout for a subset. Each row times ``dispatch.linear(x, factors, path=p)`` for
the paths that fit the batch (``auto`` always; ``decode``, ``prefill``, ``materialize``) against ``F.linear`` dense.
Method: weights rotated over copies larger than the 50 MB L2, CUDA-graph replays timed with CUDA events, median of
repeats, dense measured in the same run (``benchmarks.common.time_calls``).

``--tune`` first times the kernels' candidate configs (``dsf_runtime.kernels.tuning``) for the fp16 cases and
writes the fastest per shape into a tuning file (default: the one shipped for this GPU,
``dsf_runtime/kernels/tuned/<gpu>.json``), which the sweep then uses.

Rows (``results["rows"]``): ``{"shape", "kind", "density", "batch", "dtype", "dense_us", "ours_us", "csr_us",
"semi24_us"}`` plus ``format``, ``path`` (the fastest), ``paths_us``, ``auto_us``, ``nnz_density``, ``bytes``,
``gbps``, ``rel_err``. ``ours_us``: the fastest path. ``csr_us``: torch CSR with int32 indices (cuSPARSE); for DSF
both factors chained. ``semi24_us``: a 2:4 matrix of the layer's shape (``to_sparse_semi_structured``,
cuSPARSELt), density-0.5 rows only.

``--codes int8,fp8,int4`` adds rows with dtype ``"int8"``, ``"fp8"`` or ``"int4"``: DSF 0.5 and 0.3 in the ``nibble``
layout with codes of the decoded factors' values (round to nearest; int8/fp8 with fp16 row scales, int4 with fp16
scales per 128 columns; docs/format.md "Quantized values"; the decode kernel converts and scales the codes in
registers), fp16 activations, against fp16 cuBLAS, at batches 1 and 16 (issue 11's speed goal: ≥ 2.0× at batch 1
with int8).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import DRY_RUN_CAVEAT, caveat_lines, run_meta, time_calls  # noqa: E402
from compress.solvers.split import propose_balanced_split, square_factor_density  # noqa: E402
from dsf_runtime.formats import DeltaMatrix, NibbleMatrix  # noqa: E402
from dsf_runtime.formats.nibble import balance_mask  # noqa: E402
from dsf_runtime.kernels import configs, tuning  # noqa: E402
from dsf_runtime.kernels.dispatch import linear  # noqa: E402

SHAPE_SETS = {
    "llama": [(4096, 11008), (11008, 4096), (4096, 4096)],
    "smollm2": [(576, 576), (192, 576), (1536, 576), (576, 1536)],
}
BATCHES = (1, 16, 2048, 2, 4, 8, 64, 256)  # priority order; rows are sorted afterwards
DENSITIES = (0.5, 0.3)  # of the balanced (nibble) rows; the delta and bf16 rows are at 0.5
DELTA_BATCHES = (1, 16, 2048)  # batches that also time the unstructured delta layout
# --cpu-dry-run: both kinds and layouts through the decode (batch 1) and prefill (batch 17 > DECODE_MAX_TOKENS) paths,
# interpreted, in under a minute (materialize, above 64 tokens, is left out: the interpreter takes seconds per call).
DRY_RUN_SHAPES = ((16, 32),)
DRY_RUN_BATCHES = (1, 17)
DRY_RUN_DENSITIES = (0.5,)
DRY_RUN_SECONDS = 40.0
L2_BYTES = 50e6
CODE_FORMATS = ("int8", "fp8", "int4")  # --codes
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16,
          **dict.fromkeys(CODE_FORMATS, torch.float16)}  # codes: fp16 scales, fp16 compute


# ---------------------------------------------------------------------------------------------- weights
def _single_group(density: float) -> tuple[int, int]:
    """(N, G) with N/G <= density, as close as possible, preferring G = 16."""
    best = None
    for g in range(16, 1, -1):
        n = math.floor(density * g + 1e-9)
        if n >= 1 and (best is None or n / g > best[0] / best[1] + 1e-9):
            best = (n, g)
    return best


def _random_mask(rows: int, cols: int, density: float, device) -> torch.Tensor:
    keep = int(round(rows * cols * density))
    mask = torch.zeros(rows * cols, dtype=torch.bool, device=device)
    mask[torch.randperm(rows * cols, device=device)[:keep]] = True
    return mask.view(rows, cols)


def make_case(shape, kind: str, density: float, layout: str, dtype, device) -> dict:
    """Random factors of one benchmark case: ``{"factors": [dense...], "meta": {...}}`` (A first for DSF)."""
    m, n = shape
    rnd = lambda r, c: torch.randn(r, c, device=device) * (1.0 / math.sqrt(c))  # noqa: E731
    if kind == "dsf":
        p = propose_balanced_split(shape, density)
        (ra, ca), (rb, cb) = p["A_shape"], p["B_shape"]
        if layout == "nibble":
            ma = balance_mask(torch.rand(ra, ca, device=device), p["N_A"], 16)
            mb = balance_mask(torch.rand(rb, cb, device=device), p["N_B"], 16)
            meta = {"N_A": p["N_A"], "N_B": p["N_B"], "group": 16}
        else:  # unstructured at DSF's own split
            asp = square_factor_density(m, n)
            k = min(m, n)
            rest = (density * m * n - asp * k * k) / (m * n)
            da, db = (asp, rest) if p["square"] == "A" else (rest, asp)
            ma, mb = _random_mask(ra, ca, da, device), _random_mask(rb, cb, db, device)
            meta = {"density_A": da, "density_B": db}
        factors = [(rnd(ra, ca) * ma).to(dtype), (rnd(rb, cb) * mb).to(dtype)]
    else:
        if layout == "nibble":
            nn, g = _single_group(density)
            mask = balance_mask(torch.rand(m, n, device=device), nn, g)
            meta = {"N": nn, "group": g}
        else:
            mask, meta = _random_mask(m, n, density, device), {}
        factors = [(rnd(m, n) * mask).to(dtype)]
    nnz = sum(int((f != 0).sum()) for f in factors)
    meta.update(nnz_density=nnz / (m * n), layout=layout)
    return {"factors": factors, "meta": meta}


def value_codes(factor: torch.Tensor, name: str) -> tuple[torch.Tensor, dict, torch.Tensor]:
    """Round-to-nearest codes of a float factor in format ``name`` (``CODE_FORMATS``; int4 with 128 columns per
    scale): the dense codes ``[rows, cols]`` (int4 as int8), their ``from_dense`` options (``scales``, int4's
    ``group_size``) and the decoded factor (code · scale, fp16)."""
    from compress.quantize import quantize_rtn, value_format

    fmt = value_format(name)
    q = quantize_rtn(factor.float(), fmt)
    codes = torch.zeros(factor.shape, dtype=torch.int8 if name == "int4" else fmt.code_dtype, device=factor.device)
    codes[q.mask] = fmt.unpack(q.codes, q.mask).to(codes.dtype)
    options = {"scales": q.scales} if fmt.per_row else {"scales": q.scales.reshape(factor.shape[0], -1),
                                                         "group_size": fmt.group_size}
    return codes, options, q.dequantize().half()


def _prepare(case: dict, layout: str) -> list:
    """The case's factors in the kernel layout ``layout`` (``NibbleMatrix`` with the case's group, or
    ``DeltaMatrix``); a case with ``"codes"`` as ``NibbleMatrix`` codes with their scales."""
    if "codes" in case:
        return [NibbleMatrix.from_dense(c, group=case["meta"].get("group", 16), **o) for c, o in case["codes"]]
    if layout == "nibble":
        return [NibbleMatrix.from_dense(f, group=case["meta"].get("group", 16)) for f in case["factors"]]
    return [DeltaMatrix.from_dense(f) for f in case["factors"]]


def n_copies(nbytes: float) -> int:
    """Copies whose total exceeds 2.5× the L2, so every call streams from HBM."""
    return max(2, min(256, math.ceil(2.5 * L2_BYTES / max(nbytes, 1))))


def _copies(ks: list) -> list[list]:
    """``ks`` and copies of it (tensors cloned), ``n_copies`` of the factors' bytes in all."""
    per_factor = [tuning.weight_copies(k, n_copies(sum(k.nbytes for k in ks))) for k in ks]
    return [list(c) for c in zip(*per_factor)]


# ---------------------------------------------------------------------------------------------- timing
def _time(fns, batch: int, repeats: int) -> dict:
    return time_calls(fns, calls=30 if batch <= 16 else (10 if batch <= 256 else 4), repeats=repeats)


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    if torch.isnan(y).any():
        return float("nan")
    return float((y.double() - ref).norm() / ref.norm().clamp_min(1e-30))


def _poison(device) -> None:
    """Fill cached free memory (large and small pools) with NaN so that unwritten outputs show up as NaN."""
    if device.type != "cuda":
        return
    free = torch.cuda.mem_get_info(device)[0]
    big = torch.full((min(int(free * 0.3), 4 << 30) // 2,), float("nan"), dtype=torch.float16, device=device)
    small = [torch.full((1 << 17,), float("nan"), dtype=torch.float16, device=device) for _ in range(64)]
    del big, small


def _reference(x: torch.Tensor, factors: list[torch.Tensor]) -> torch.Tensor:
    h = x.double()
    for f in reversed(factors):
        h = h @ f.double().t()
    return h


def _ours_fn(x, ks, path):
    return lambda: linear(x, ks, path=path)


def _paths_for(kind: str, batch: int) -> list[str]:
    """Paths timed per row (``dispatch.PATHS``): ``auto`` (what a model runs) and the explicit paths that can win at
    this batch; ``materialize`` only for DSF (for one factor it is ``prefill``)."""
    paths = ["auto"]
    if batch <= 256:
        paths.append("decode")
    if batch > configs.DECODE_MAX_TOKENS:
        paths.append("prefill")
    if batch > 64 and kind == "dsf":
        paths.append("materialize")
    return paths


def _csr(dense: torch.Tensor) -> torch.Tensor:
    c = dense.to_sparse_csr()
    return torch.sparse_csr_tensor(c.crow_indices().int(), c.col_indices().int(), c.values(), c.shape)


def time_csr(case, x, batch, repeats) -> dict | None:
    try:
        mats = [_csr(f) for f in case["factors"]]
        nbytes = sum(m.values().numel() * 6 for m in mats)
        copies = [mats] + [[m.clone() for m in mats] for _ in range(n_copies(nbytes) - 1)]

        def run(ms):
            h = x.t()
            for mtx in reversed(ms):
                h = mtx @ h
            return h.t()

        out = run(copies[0])
        err = _rel_err(out, _reference(x, case["factors"]))
        r = _time([lambda ms=ms: run(ms) for ms in copies], batch, repeats)
        r["rel_err"] = err
        return r
    except Exception as exc:  # cuSPARSE refusing a dtype or shape
        _sync()
        return {"us": None, "error": repr(exc)[:200]}


def time_semi24(shape, x, dtype, batch, repeats) -> dict | None:
    try:
        from torch.sparse import to_sparse_semi_structured

        m, n = shape
        w = torch.randn(m, n, device=x.device, dtype=dtype)
        mask = torch.tensor([1, 1, 0, 0], dtype=torch.bool, device=x.device).repeat(m, n // 4)
        w24 = w * mask
        copies = [to_sparse_semi_structured(w24.clone()) for _ in range(n_copies(m * n * 1.125))]
        err = _rel_err(F.linear(x, copies[0]), x.double() @ w24.double().t())
        r = _time([lambda c=c: F.linear(x, c) for c in copies], batch, repeats)
        r["rel_err"] = err
        return r
    except Exception as exc:
        _sync()
        return {"us": None, "error": repr(exc)[:200]}


# ---------------------------------------------------------------------------------------------- tuning
def _tune_cases(shapes):
    """``(shape, kind, density, layout)`` of the fp16 cases ``--tune`` measures."""
    for shape in shapes:
        for kind in ("dsf", "single"):
            for density, layout in ((0.5, "nibble"), (0.3, "nibble"), (0.5, "delta")):
                yield tuple(shape), kind, density, layout


def tune_all(shapes, out: Path | None, *, bns=(1, 16), timer=None, device: str | None = None, log=print) -> dict:
    """Tune the decode kernels (``tuning.tune``) for every fp16 case of ``shapes`` and write the fastest configs
    into ``out`` (default: the shipped tuning file of this GPU), which ``configs`` then reads. ``timer`` and
    ``device`` (the GPU name the results are filed under; default this GPU's): see ``tuning.tune``.

    Returns:
        ``tuning.tune``'s result plus ``"file"``.
    """
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    found: dict = {"device": device or configs.device_name(dev), "matmul": [], "unpack": [], "timings": []}
    t = time.time()
    for shape, kind, density, layout in _tune_cases(shapes):
        torch.manual_seed(0)
        ks = _prepare(make_case(shape, kind, density, layout, torch.float16, dev), layout)
        part = tuning.tune([ks], bns=bns, timer=timer, copies=n_copies(sum(k.nbytes for k in ks)),
                           device=found["device"])
        for key in ("matmul", "unpack", "timings"):
            found[key] += part[key]
    out = Path(out) if out else tuning.shipped_path(found["device"])
    tuning.write_tuning(out, found, source="benchmarks/bench_layer.py --tune")
    if out.parent != configs.TUNED_DIR:
        configs.use_tuning_file(out)
    log(f"tuned {len(found['matmul'])} kernel and {len(found['unpack'])} unpack keys in {time.time() - t:.0f}s "
        f"into {out}")
    return dict(found, file=str(out))


# ---------------------------------------------------------------------------------------------- precompile
def _run_once(fns) -> float:
    """A tuning timer that only launches (compiles) each candidate once."""
    fns[0]()
    return 0.0


def _warm_job(job: dict) -> str:
    """Worker: build one case at its real shape and run every path (and, with ``tune``, every candidate config)
    once, so that Triton compiles into its shared on-disk cache exactly the kernels the timed run launches."""
    try:
        torch.manual_seed(0)
        if job.get("tuning_file"):
            configs.use_tuning_file(job["tuning_file"])
        dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        shape, kind, density, layout, dname = job["case"]
        dtype = DTYPES[dname]
        case = make_case(tuple(shape), kind, density, layout, dtype, dev)
        ks = _prepare(case, layout)
        if job.get("tune"):
            tuning.tune([ks], bns=job["tune_bns"], timer=_run_once, copies=1)
        for batch in job["batches"]:
            x = torch.randn(batch, shape[1], device=dev, dtype=dtype)
            for path in _paths_for(kind, batch):
                _ours_fn(x, ks, path)()
        _sync()
        return f"ok {job['case']}"
    except Exception as exc:  # noqa: BLE001 - reported; the timed run will meet it again
        return f"FAILED {job['case']}: {exc!r}"[:300]


def precompile(shapes, batches, *, tune: bool, workers: int, delta_batches, bf16: bool,
               tuning_file: str | None = None, tune_bns=(1, 16), log=print) -> None:
    """Compile all kernels of the sweep in ``workers`` parallel processes (Triton's cache is shared)."""
    import concurrent.futures as cf
    import multiprocessing as mp

    jobs: dict = {}
    for shape in shapes:
        for batch in batches or (None,):
            for kind, density, layout, dname in _cases(batch or 1, shape, delta_batches, bf16):
                key = (tuple(shape), kind, density, layout, dname)
                job = jobs.setdefault(key, {"case": [list(shape), kind, density, layout, dname], "batches": [],
                                            "tune": tune and dname == "float16", "tune_bns": tune_bns,
                                            "tuning_file": tuning_file})
                if batch is not None:
                    job["batches"].append(batch)
    t = time.time()
    with cf.ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context("spawn")) as ex:
        for msg in ex.map(_warm_job, list(jobs.values())):
            if not msg.startswith("ok"):
                log(msg)
    log(f"precompiled {len(jobs)} cases in {time.time() - t:.0f}s with {workers} workers")


# ---------------------------------------------------------------------------------------------- sweep
def probe_pdl(dev) -> dict:
    """Check that decode kernels launched with programmatic dependent launch capture, replay and compute right;
    switch ``configs.USE_PDL`` off (and say why) if not."""
    if dev.type != "cuda" or not configs.USE_PDL:
        return {"used": False}
    try:
        case = make_case((512, 1024), "dsf", 0.5, "nibble", torch.float16, dev)
        ks = _prepare(case, "nibble")
        x = torch.randn(1, 1024, device=dev, dtype=torch.float16)
        fn = _ours_fn(x, ks, "decode")
        ref = _reference(x, case["factors"])
        time_calls([fn], calls=8, repeats=2)  # compiles and warms up
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            y = fn()
        y.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        err = _rel_err(y, ref)
        if not err <= 1e-2:
            raise RuntimeError(f"relative error {err} under PDL graph replay")
        return {"used": True, "rel_err": err}
    except Exception as exc:
        _sync()
        configs.USE_PDL = False
        return {"used": False, "error": repr(exc)[:300]}


METHOD = ("weights rotated over copies > 2.5x the 50 MB L2; calls captured in one CUDA graph (30 per graph at "
          "batch <= 16, 10 up to 256, 4 above); CUDA-event timing of graph replays; median of repeats")


def _cases(batch: int, shape, delta_batches, bf16: bool, densities=DENSITIES, codes: tuple[str, ...] = ()):
    """``(kind, density, layout, dtype name)`` of the rows of one shape and batch."""
    out = []
    for kind in ("dsf", "single"):
        for density in densities:
            out.append((kind, density, "nibble", "float16"))
    if batch in (1, 16):
        out += [("dsf", density, "nibble", name) for name in codes for density in densities]
    if batch in delta_batches:
        out += [("dsf", 0.5, "delta", "float16"), ("single", 0.5, "delta", "float16")]
    if bf16 and batch in (1, 16) and shape in SHAPE_SETS["llama"]:
        out.append(("dsf", 0.5, "nibble", "bfloat16"))
    return out


def bench_layer(shapes=None, batches=BATCHES, *, out: Path | None = None, repeats: int = 5, max_seconds: float = 270.0,
                delta_batches=DELTA_BATCHES, bf16: bool = True, densities=DENSITIES,
                csr_max_batch: int = 16, codes: tuple[str, ...] = (), log=print) -> dict:
    """Run the sweep and return ``{"meta", "rows", "skipped"}``; writes ``out`` (JSON) and ``out`` .md if given.

    Without CUDA (tests: ``TRITON_INTERPRET=1``, tiny ``shapes``) it runs every code path on the CPU with wall-clock
    stand-in timings; those numbers mean nothing."""
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    shapes = shapes or SHAPE_SETS["llama"] + SHAPE_SETS["smollm2"]
    t0 = time.time()
    results = {"meta": run_meta(dev, method=METHOD, packages=("triton",)) | {"dry_run": dev.type != "cuda"},
               "rows": [], "skipped": []}
    results["meta"]["pdl"] = probe_pdl(dev)
    name = configs.device_name(dev)
    table = configs.tables().get(name, {})
    results["meta"]["tuning"] = {"device": name, "matmul_keys": len(table.get("matmul", {})),
                                 "unpack_keys": len(table.get("unpack", {}))}
    for shape in shapes:
        m, n = shape
        case_cache: dict = {}
        dense_copies: dict = {}
        semi: dict = {}
        for batch in batches:
            for kind, density, layout, dname in _cases(batch, shape, delta_batches, bf16, densities, codes):
                if time.time() - t0 > max_seconds:
                    results["skipped"].append([list(shape), kind, density, batch, dname, layout])
                    continue
                dtype = DTYPES[dname]
                key = (kind, density, layout, dname)
                if key not in case_cache:
                    case = make_case(shape, kind, density, layout, dtype, dev)
                    if dname in CODE_FORMATS:  # the reference is the decoded factors: code · scale
                        coded = [value_codes(f, dname) for f in case["factors"]]
                        case["codes"] = [(c, o) for c, o, _ in coded]
                        case["factors"] = [decoded for _, _, decoded in coded]
                    ks = _prepare(case, layout)
                    nb = sum(k.nbytes for k in ks)
                    copies = _copies(ks)
                    case_cache[key] = (case, copies, nb)
                case, copies, nb = case_cache[key]
                if dname not in dense_copies:
                    w = torch.randn(m, n, device=dev, dtype=dtype)
                    dense_copies[dname] = [w] + [w.clone() for _ in range(n_copies(2 * m * n) - 1)]
                x = torch.randn(batch, n, device=dev, dtype=dtype)
                dkey = (dname, batch)
                if dkey not in semi:
                    semi[dkey] = {"dense": _time([lambda w=w: F.linear(x, w) for w in dense_copies[dname]], batch,
                                                 repeats)}
                    semi[dkey]["semi24"] = time_semi24(shape, x, dtype, batch, repeats)
                row = _measure_row(shape, kind, density, layout, dname, batch, x, case, copies, nb, semi[dkey],
                                   repeats, csr_max_batch)
                results["rows"].append(row)
                log(_fmt(row))
        if out:
            write(results, out)
        del case_cache, dense_copies, semi
        torch.cuda.empty_cache()
    results["meta"]["seconds"] = round(time.time() - t0, 1)
    if out:
        write(results, out)
    return results


def _measure_row(shape, kind, density, layout, dname, batch, x, case, copies, nb, base, repeats, csr_max_batch):
    check = batch in (1, 16, 2048) or batch == 256
    err = None
    paths = {}
    for path in _paths_for(kind, batch):
        if check:
            _poison(x.device)
            y = _ours_fn(x, copies[0], path)()
            err = max(err or 0.0, _rel_err(y, _reference(x, case["factors"])))
        paths[path] = _time([_ours_fn(x, ks, path) for ks in copies], batch, repeats)["us"]
    best = min(paths, key=paths.get)
    csr = time_csr(case, x, batch, repeats) if batch <= csr_max_batch else None
    s24 = base["semi24"] if density == 0.5 else None
    act = batch * shape[1] * x.element_size() + batch * shape[0] * x.element_size()
    return {
        "shape": list(shape), "kind": kind, "density": density, "batch": batch, "dtype": dname,
        "dense_us": round(base["dense"]["us"], 3), "ours_us": round(paths[best], 3),
        "csr_us": None if not csr or csr.get("us") is None else round(csr["us"], 3),
        "semi24_us": None if not s24 or s24.get("us") is None else round(s24["us"], 3),
        "format": layout, "path": best, "paths_us": {k: round(v, 3) for k, v in paths.items()},
        "auto_us": round(paths["auto"], 3),
        "nnz_density": round(case["meta"]["nnz_density"], 4), "factors": case["meta"],
        "bytes": nb, "gbps": round((nb + act) / paths[best] / 1e3, 1),
        "speedup": round(base["dense"]["us"] / paths[best], 3), "rel_err": err,
        "csr_note": None if not csr else csr.get("error") or csr.get("capture_error"),
        "semi24_note": None if not s24 else s24.get("error") or s24.get("capture_error"),
    }


def _fmt(r: dict) -> str:
    f = lambda v: "-" if v is None else f"{v:.1f}"  # noqa: E731
    return (f"{r['shape'][0]:>5}x{r['shape'][1]:<5} {r['kind']:6} d={r['density']:.1f} {r['format']:6} {r['dtype']:8} "
            f"b={r['batch']:<4} dense {f(r['dense_us']):>7} ours {f(r['ours_us']):>7} ({r['path']:11}) "
            f"x{r['speedup']:.2f} csr {f(r['csr_us']):>8} 2:4 {f(r['semi24_us']):>7} err {r['rel_err']}")


def markdown(results: dict) -> str:
    """Markdown table of the rows (speedup = dense / ours)."""
    m = results["meta"]
    lines = [f"# Layer benchmark on {m['device']} (torch {m['torch']}, triton {m['triton']}, {m['date']})", "",
             *caveat_lines(m), "| shape | kind | density | format | dtype | batch | dense µs | ours µs | path "
             "| ours/dense speedup | CSR µs | 2:4 µs | GB/s | rel err |", "|" + "---|" * 14]
    for r in sorted(results["rows"], key=lambda r: (r["shape"], r["kind"], r["format"], r["density"], r["dtype"],
                                                    r["batch"])):
        f = lambda v: "–" if v is None else f"{v:.1f}"  # noqa: E731
        err = "–" if r.get("rel_err") is None else f"{r['rel_err']:.1e}"
        lines.append(f"| {r['shape'][0]}×{r['shape'][1]} | {r['kind']} | {r['density']} | {r['format']} | {r['dtype']} "
                     f"| {r['batch']} | {f(r['dense_us'])} | {f(r['ours_us'])} | {r['path']} | {r['speedup']:.2f}× "
                     f"| {f(r['csr_us'])} | {f(r['semi24_us'])} | {r['gbps']} | {err} |")
    return "\n".join(lines) + "\n"


def write(results: dict, out: Path) -> None:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1))
    out.with_suffix(".md").write_text(markdown(results))


def parser() -> argparse.ArgumentParser:
    """The command line of ``main`` (``dsf bench layer`` mirrors it)."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/layer.json"), help="JSON output (a .md table "
                    "is written beside it)")
    ap.add_argument("--shapes", choices=["all", "llama", "smollm2"], default="all", help="shape set")
    ap.add_argument("--batches", default=",".join(map(str, BATCHES)), help="comma-separated batch sizes")
    ap.add_argument("--tune", action="store_true", help="time the kernels' candidate configs per factor first and "
                    "write the fastest into --tuning-file (dsf_runtime.kernels.tuning)")
    ap.add_argument("--tune-shapes", choices=["all", "llama", "smollm2"], default="llama", help="shapes to tune")
    ap.add_argument("--tuning-file", type=Path, default=None, help="tuning JSON that --tune writes (merged into it "
                    "if it exists; default: dsf_runtime/kernels/tuned/<this gpu>.json, shipped with the package)")
    ap.add_argument("--repeats", type=int, default=5, help="graph replays per measurement (median reported)")
    ap.add_argument("--max-seconds", type=float, default=270.0, help="stop starting new rows after this")
    ap.add_argument("--no-bf16", action="store_true", help="skip the bf16 rows")
    ap.add_argument("--codes", default="", help="comma-separated code formats (int8, fp8, int4): add DSF rows "
                    "with those codes (nibble layout, decoded in registers) at batches 1 and 16")
    ap.add_argument("--precompile-workers", type=int, default=0, help="compile all kernels first in this many "
                    "processes (Triton's cache is shared); 0 = compile lazily in the timing process")
    ap.add_argument("--cpu-dry-run", action="store_true", help="without a GPU, exercise the code paths on the CPU "
                    f"on the tiny shapes {DRY_RUN_SHAPES}, batches {DRY_RUN_BATCHES} and densities {DRY_RUN_DENSITIES} "
                    "in the Triton interpreter "
                    "(TRITON_INTERPRET=1, set by `dsf bench layer`; under a minute); not a speed measurement")
    return ap


def _code_formats(text: str) -> tuple[str, ...]:
    """``--codes`` as a tuple of ``CODE_FORMATS``; exits naming a bad one."""
    names = tuple(n for n in text.split(",") if n)
    bad = [n for n in names if n not in CODE_FORMATS]
    if bad:
        raise SystemExit(f"--codes: unknown format {bad[0]!r}; valid: {', '.join(CODE_FORMATS)}")
    return names


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    if not torch.cuda.is_available() and not args.cpu_dry_run:
        print("bench_layer needs a CUDA GPU; --cpu-dry-run checks the code paths on the CPU", file=sys.stderr)
        return 2
    shapes = None if args.shapes == "all" else SHAPE_SETS[args.shapes]
    batches = tuple(int(b) for b in args.batches.split(","))
    delta_batches, densities = DELTA_BATCHES, DENSITIES
    if args.cpu_dry_run and not torch.cuda.is_available():
        if os.environ.get("TRITON_INTERPRET") != "1":
            print("--cpu-dry-run needs TRITON_INTERPRET=1 and DSF_INTERPRET_KERNELS=1 in the environment "
                  "(`dsf bench layer --cpu-dry-run` sets both)", file=sys.stderr)
            return 2
        shapes, batches, delta_batches = list(DRY_RUN_SHAPES), DRY_RUN_BATCHES, DRY_RUN_BATCHES
        densities = DRY_RUN_DENSITIES
        args.repeats, args.no_bf16, args.tune = 1, True, False
        args.max_seconds = min(args.max_seconds, DRY_RUN_SECONDS)
        print(DRY_RUN_CAVEAT)
    all_shapes = shapes or SHAPE_SETS["llama"] + SHAPE_SETS["smollm2"]
    tune_bns = (1, 16)
    common = dict(workers=args.precompile_workers, delta_batches=delta_batches, bf16=not args.no_bf16)
    tuned = None
    if args.tune:
        tune_shapes = [s for s in all_shapes if args.tune_shapes == "all" or s in SHAPE_SETS[args.tune_shapes]]
        if args.precompile_workers:
            precompile(tune_shapes, (), tune=True, tune_bns=tune_bns, **{**common, "bf16": False})
        tuned = tune_all(tune_shapes, args.tuning_file, bns=tune_bns)
    if args.precompile_workers:
        precompile(all_shapes, batches, tune=False, tuning_file=tuned and tuned["file"], **common)
    res = bench_layer(shapes, batches, out=args.out, repeats=args.repeats, max_seconds=args.max_seconds,
                      delta_batches=delta_batches, bf16=not args.no_bf16, densities=densities,
                      codes=_code_formats(args.codes))
    if tuned:
        res["tuned"] = tuned
        write(res, args.out)
    table = Path(args.out).with_suffix(".md")
    if table.is_file():
        print(table.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
