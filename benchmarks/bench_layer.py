"""How fast does one DSF / single-sparse layer run against cuBLAS dense, torch CSR and torch 2:4, by batch size?

One unattended run (``dsf bench layer`` or ``python benchmarks/bench_layer.py --out benchmarks/results/layer-h100.json``):
shapes 4096×4096, 11008×4096, 4096×11008 and SmolLM2's 576×576, 192×576, 1536×576, 576×1536; batch 1…2048;
DSF at total density 0.5 and 0.3 with DSF's factor budgets (square factor 0.16 / 0.25, rounded to balanced groups by
``propose_balanced_split``), single sparse matrices at the same densities; balanced (``nibble``) layouts for all
rows and the unstructured ``delta`` layout for a subset. Method: weights rotated over copies larger than the 50 MB
L2, CUDA-graph replays timed with CUDA events, median of repeats, dense measured in the same run.

Rows (``results["rows"]``): ``{"shape", "kind", "density", "batch", "dtype", "dense_us", "ours_us", "csr_us",
"semi24_us"}`` plus ``format``, ``path``, ``paths_us``, ``nnz_density``, ``bytes``, ``gbps``, ``rel_err``.
``csr_us``: torch CSR with int32 indices (cuSPARSE); for DSF both factors chained. ``semi24_us``: a 2:4 matrix of
the layer's shape (``to_sparse_semi_structured``, cuSPARSELt), density-0.5 rows only.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dsf_runtime.kernels import (  # noqa: E402
    KernelMatrix,
    balance_mask,
    factorized_matmul,
    prepare_factor,
    propose_balanced_split,
    sparse_matmul,
)
from dsf_runtime.kernels import configs  # noqa: E402
from dsf_runtime.kernels.timing import eager_time, graph_time  # noqa: E402

SHAPE_SETS = {
    "llama": [(4096, 11008), (11008, 4096), (4096, 4096)],
    "smollm2": [(576, 576), (192, 576), (1536, 576), (576, 1536)],
}
BATCHES = (1, 16, 2048, 2, 4, 8, 64, 256)  # priority order; rows are sorted afterwards
L2_BYTES = 50e6
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}


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
            asp = 0.16 if m == n else 0.25
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


def _prepare(case: dict, layout: str) -> list[KernelMatrix]:
    out = []
    for f in case["factors"]:
        g = case["meta"].get("group", 16)
        out.append(prepare_factor(f, layout=layout, group=g))
    return out


def _clone(k: KernelMatrix) -> KernelMatrix:
    c = lambda t: None if t is None else t.clone()  # noqa: E731
    return KernelMatrix(k.layout, k.shape, c(k.values), c(k.index), c(k.row_ptr), k.group, k.per_group, k.nnz)


def n_copies(nbytes: float) -> int:
    """Copies whose total exceeds 2.5× the L2, so every call streams from HBM."""
    return max(2, min(256, math.ceil(2.5 * L2_BYTES / max(nbytes, 1))))


# ---------------------------------------------------------------------------------------------- timing
def _cpu_time(fns, calls: int, repeats: int) -> dict:
    """Wall-clock stand-in used only by the CPU dry run (TRITON_INTERPRET=1): checks the code paths, not speed."""
    for f in fns[:1]:
        f()
    start = time.perf_counter()
    for f in fns[: min(len(fns), 2)]:
        f()
    return {"us": (time.perf_counter() - start) * 1e6 / min(len(fns), 2), "p20": None, "p80": None,
            "graphed": False}


def _time(fns, batch: int, repeats: int) -> dict:
    calls = 30 if batch <= 16 else (10 if batch <= 256 else 4)
    if not torch.cuda.is_available():
        return _cpu_time(fns, calls, repeats)
    try:
        return graph_time(fns, calls=calls, repeats=repeats)
    except Exception as exc:  # e.g. an op that refuses capture
        _sync()
        r = eager_time(fns, calls=calls, repeats=repeats)
        r["capture_error"] = repr(exc)[:200]
        return r


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


def _ours_fn(kind, x, ks, path):
    if path == "decode_nopdl":
        inner = _ours_fn(kind, x, ks, "decode")

        def run():
            old, configs.USE_PDL = configs.USE_PDL, False
            try:
                return inner()
            finally:
                configs.USE_PDL = old

        return run
    if kind == "dsf":
        return lambda kk=ks: factorized_matmul(x, kk[0], kk[1], path=path)
    return lambda kk=ks: sparse_matmul(x, kk[0], path=path)


def _paths_for(kind: str, batch: int, layout: str = "nibble") -> list[str]:
    """Paths timed per row (the fastest is reported); "decode_nopdl" and "decode_fused" show what PDL and the
    fused one-launch kernel change at batch 1."""
    if batch == 1:
        extra = ["decode_nopdl"] + (["decode_fused"] if kind == "dsf" and layout == "nibble" else [])
        return ["decode"] + (extra if layout == "nibble" else [])
    if batch < 16:
        return ["decode", "decode_bn1"] if layout == "nibble" else ["decode"]
    if batch == 16:
        return ["decode"]
    if batch <= 64:
        return ["decode", "prefill"]
    mat = ["materialize"] if kind == "dsf" else []
    return (["decode"] if batch <= 256 else []) + ["prefill"] + mat


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
def tune_case(ks: list[KernelMatrix], kind: str, bns=(1, 16), repeats: int = 5, warm_only: bool = False) -> list[dict]:
    """Time ``configs.candidates`` for every factor and token block; keep the best in ``configs.TUNED``.

    With ``warm_only`` every candidate just runs once (compiles) and nothing is timed or kept."""
    from dsf_runtime.kernels.delta_matmul import delta_matmul
    from dsf_runtime.kernels.nibble_matmul import nibble_matmul
    from dsf_runtime.kernels.pack_activations import pack_activations

    found = []
    dev = ks[0].device
    for bn in bns:
        for idx, k in enumerate(ks):
            first = idx == len(ks) - 1  # the factor that reads x (B for DSF)
            rows, cols = k.shape
            per_row = k.slots if k.layout == "nibble" else k.slots // max(rows, 1)
            key = (k.layout, rows, per_row, bn)
            if key in configs.TUNED:
                continue
            x0 = torch.randn(bn, cols, device=dev, dtype=k.dtype if first else torch.float32)
            xins = {False: x0 if bn == 1 else pack_activations(x0, bn),
                    True: x0 if bn == 1 else pack_activations(x0, bn, dtype=torch.float32)}
            op = nibble_matmul if k.layout == "nibble" else delta_matmul
            out_dtype = torch.float32 if (kind == "dsf" and first) else k.dtype
            copies = [k] if warm_only else [k] + [_clone(k) for _ in range(n_copies(k.nbytes) - 1)]
            best = None
            for cfg in configs.candidates(k.layout, bn):
                xin = xins[bool(cfg.get("XF32")) and first]
                if warm_only:
                    try:
                        op(xin, k, n_tokens=bn, out_dtype=out_dtype, config=cfg)
                    except Exception:  # the timed tuning records it
                        pass
                    continue
                fns = [lambda kk=kk, c=cfg, xx=xin: op(xx, kk, n_tokens=bn, out_dtype=out_dtype, config=c)
                       for kk in copies]
                try:
                    t = _time(fns, 1, repeats)["us"]
                except Exception as exc:  # a config that does not compile or launch
                    _sync()
                    found.append({"key": list(key), "cfg": cfg, "error": repr(exc)[:200]})
                    continue
                found.append({"key": list(key), "cfg": cfg, "us": t, "bytes": k.nbytes})
                if best is None or t < best[0]:
                    best = (t, cfg)
            if best:
                configs.TUNED[key] = dict(best[1])
                found.append({"key": list(key), "best": best[1], "us": best[0], "gbps": k.nbytes / best[0] / 1e3})
    return found


def tune_unpack(ks: list[KernelMatrix], repeats: int = 5, warm_only: bool = False) -> list[dict]:
    """Time ``configs.unpack_candidates`` of ``nibble_unpack`` per nibble factor; keep the best."""
    from dsf_runtime.kernels.nibble_unpack import nibble_unpack

    found = []
    for k in ks:
        key = (k.shape[0], k.slots)
        if k.layout != "nibble" or (key in configs.UNPACK_TUNED and not warm_only):
            continue
        out = torch.empty(k.shape, dtype=k.dtype, device=k.device)
        copies = [k] if warm_only else [k] + [_clone(k) for _ in range(n_copies(k.nbytes) - 1)]
        best = None
        for cfg in configs.unpack_candidates():
            fns = [lambda kk=kk, c=cfg: nibble_unpack(kk, out, **c) for kk in copies]
            if warm_only:
                fns[0]()
                continue
            t = _time(fns, 1, repeats)["us"]
            found.append({"key": ["unpack", *key], "cfg": cfg, "us": t})
            if best is None or t < best[0]:
                best = (t, cfg)
        if best:
            configs.UNPACK_TUNED[key] = best[1]
            found.append({"key": ["unpack", *key], "best": best[1], "us": best[0],
                          "gbps_written": k.shape[0] * k.shape[1] * 2 / best[0] / 1e3})
    return found


def tune_all(shapes, *, bns=(1, 16), delta: bool = True, log=print) -> list[dict]:
    """Tune the decode kernels of every fp16 case of ``shapes`` (fills ``configs.TUNED``)."""
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    found = []
    t = time.time()
    for shape in shapes:
        for kind in ("dsf", "single"):
            for density, layout in ((0.5, "nibble"), (0.3, "nibble")) + (((0.5, "delta"),) if delta else ()):
                torch.manual_seed(0)
                case = make_case(shape, kind, density, layout, torch.float16, dev)
                ks = _prepare(case, layout)
                found += tune_case(ks, kind, bns)
                found += tune_unpack(ks)
    log(f"tuned {len(configs.TUNED)} kernel keys in {time.time() - t:.0f}s")
    return found


# ---------------------------------------------------------------------------------------------- precompile
def _warm_job(job: dict) -> str:
    """Worker: build one case at its real shape and run every path/config once, so Triton compiles (into the
    shared cache) exactly the kernels the timed sweep will launch."""
    try:
        torch.manual_seed(0)
        configs.TUNED.update(job.get("tuned") or {})
        configs.UNPACK_TUNED.update(job.get("unpack_tuned") or {})
        dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        shape, kind, density, layout, dname = job["case"]
        dtype = DTYPES[dname]
        case = make_case(tuple(shape), kind, density, layout, dtype, dev)
        ks = _prepare(case, layout)
        if job.get("tune"):
            tune_case(ks, kind, job["tune_bns"], repeats=1, warm_only=True)
            tune_unpack(ks, warm_only=True)
        for batch in job["batches"]:
            x = torch.randn(batch, shape[1], device=dev, dtype=dtype)
            for path in _paths_for(kind, batch, layout):
                _ours_fn(kind, x, ks, path)()
        _sync()
        return f"ok {job['case']}"
    except Exception as exc:  # reported, the timed sweep will meet it again
        return f"FAILED {job['case']}: {exc!r}"[:300]


def precompile(shapes, batches, *, tune: bool, workers: int, delta_batches, bf16: bool, tuned: dict | None = None,
               tune_bns=(1, 16), log=print) -> None:
    """Compile all kernels of the sweep in ``workers`` parallel processes (Triton's on-disk cache is shared)."""
    import concurrent.futures as cf
    import multiprocessing as mp

    jobs: dict = {}
    for shape in shapes:
        for batch in batches or (None,):
            for kind, density, layout, dname in _cases(batch or 1, shape, delta_batches, bf16):
                key = (tuple(shape), kind, density, layout, dname)
                job = jobs.setdefault(key, {"case": [list(shape), kind, density, layout, dname], "batches": [],
                                            "tune": tune and dname == "float16", "tune_bns": tune_bns,
                                            "tuned": dict(tuned or {}),
                                            "unpack_tuned": dict(configs.UNPACK_TUNED)})
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
        fn = _ours_fn("dsf", x, ks, "decode")
        ref = _reference(x, case["factors"])
        graph_time([fn], calls=8, repeats=2)
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


def _meta() -> dict:
    def sh(*cmd):
        try:
            return subprocess.run(cmd, capture_output=True, text=True, timeout=10).stdout.strip()
        except Exception:
            return None

    import triton

    return {
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "driver": sh("nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"),
        "torch": torch.__version__, "cuda": torch.version.cuda, "triton": triton.__version__,
        "python": platform.python_version(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "git_sha": os.environ.get("DSF_GIT_SHA") or sh("git", "-C", str(Path(__file__).resolve().parents[1]),
                                                        "rev-parse", "HEAD"),
        "git_dirty": bool(sh("git", "-C", str(Path(__file__).resolve().parents[1]), "status", "--porcelain",
                             "dsf_runtime/kernels", "benchmarks")),
        "method": "weights rotated over copies > 2.5x the 50 MB L2; calls captured in one CUDA graph (30 per graph "
                  "at batch <= 16, 10 up to 256, 4 above); CUDA-event timing of graph replays; median of repeats",
    }


def _cases(batch: int, shape, delta_batches, bf16: bool):
    out = []
    for kind in ("dsf", "single"):
        for density in (0.5, 0.3):
            out.append((kind, density, "nibble", "float16"))
    if batch in delta_batches:
        out += [("dsf", 0.5, "delta", "float16"), ("single", 0.5, "delta", "float16")]
    if bf16 and batch in (1, 16) and shape in SHAPE_SETS["llama"]:
        out.append(("dsf", 0.5, "nibble", "bfloat16"))
    return out


def bench_layer(shapes=None, batches=BATCHES, *, out: Path | None = None, tune: bool = False,
                repeats: int = 5, max_seconds: float = 270.0, delta_batches=(1, 16, 2048), bf16: bool = True,
                csr_max_batch: int = 16, log=print) -> dict:
    """Run the sweep and return ``{"meta", "rows", "tuned"}``; writes ``out`` (JSON) and ``out`` .md if given.

    Without CUDA (tests: ``TRITON_INTERPRET=1``, tiny ``shapes``) it runs every code path on the CPU with wall-clock
    stand-in timings; those numbers mean nothing."""
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    shapes = shapes or SHAPE_SETS["llama"] + SHAPE_SETS["smollm2"]
    t0 = time.time()
    results = {"meta": _meta(), "rows": [], "tuned": [], "skipped": []}
    results["meta"]["pdl"] = probe_pdl(dev)
    for shape in shapes:
        m, n = shape
        case_cache: dict = {}
        dense_copies: dict = {}
        semi: dict = {}
        for batch in batches:
            for kind, density, layout, dname in _cases(batch, shape, delta_batches, bf16):
                if time.time() - t0 > max_seconds:
                    results["skipped"].append([list(shape), kind, density, batch, dname, layout])
                    continue
                dtype = DTYPES[dname]
                key = (kind, density, layout, dname)
                if key not in case_cache:
                    case = make_case(shape, kind, density, layout, dtype, dev)
                    ks = _prepare(case, layout)
                    if tune and dname == "float16":
                        results["tuned"] += tune_case(ks, kind)
                    nb = sum(k.nbytes for k in ks)
                    copies = [ks] + [[_clone(k) for k in ks] for _ in range(n_copies(nb) - 1)]
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
    results["tuned_table"] = {"|".join(map(str, k)): v for k, v in configs.TUNED.items()}
    results["unpack_table"] = {"|".join(map(str, k)): v for k, v in configs.UNPACK_TUNED.items()}
    if out:
        write(results, out)
    return results


def _measure_row(shape, kind, density, layout, dname, batch, x, case, copies, nb, base, repeats, csr_max_batch):
    check = batch in (1, 16, 2048) or batch == 256
    err = None
    paths = {}
    for path in _paths_for(kind, batch, layout):
        if check:
            _poison(x.device)
            y = _ours_fn(kind, x, copies[0], path)()
            err = max(err or 0.0, _rel_err(y, _reference(x, case["factors"])))
        paths[path] = _time([_ours_fn(kind, x, ks, path) for ks in copies], batch, repeats)["us"]
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
             "| shape | kind | density | format | dtype | batch | dense µs | ours µs | path | ours/dense speedup | "
             "CSR µs | 2:4 µs | GB/s | rel err |", "|" + "---|" * 14]
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


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/layer.json"), help="JSON output (a .md table "
                    "is written beside it)")
    ap.add_argument("--shapes", choices=["all", "llama", "smollm2"], default="all", help="shape set")
    ap.add_argument("--batches", default=",".join(map(str, BATCHES)), help="comma-separated batch sizes")
    ap.add_argument("--tune", action="store_true", help="time the decode-kernel configs per factor first")
    ap.add_argument("--tune-shapes", choices=["all", "llama", "smollm2"], default="llama", help="shapes to tune")
    ap.add_argument("--repeats", type=int, default=5, help="graph replays per measurement (median reported)")
    ap.add_argument("--max-seconds", type=float, default=270.0, help="stop starting new rows after this")
    ap.add_argument("--no-bf16", action="store_true", help="skip the bf16 rows")
    ap.add_argument("--precompile-workers", type=int, default=0, help="compile all kernels first in this many "
                    "processes (Triton's cache is shared); 0 = compile lazily in the timing process")
    ap.add_argument("--cpu-dry-run", action="store_true", help="without a GPU, exercise every code path on the CPU "
                    "(needs TRITON_INTERPRET=1 and tiny shapes; the timings mean nothing)")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available() and not args.cpu_dry_run:
        print("bench_layer needs a CUDA GPU", file=sys.stderr)
        return 2
    shapes = None if args.shapes == "all" else SHAPE_SETS[args.shapes]
    batches = tuple(int(b) for b in args.batches.split(","))
    all_shapes = shapes or SHAPE_SETS["llama"] + SHAPE_SETS["smollm2"]
    tune_bns = (1, 16)
    common = dict(workers=args.precompile_workers, delta_batches=(1, 16, 2048), bf16=not args.no_bf16)
    tuned_rows = []
    if args.tune:
        tune_shapes = [s for s in all_shapes if args.tune_shapes == "all" or s in SHAPE_SETS[args.tune_shapes]]
        if args.precompile_workers:
            precompile(tune_shapes, (), tune=True, tune_bns=tune_bns, **{**common, "bf16": False})
        tuned_rows = tune_all(tune_shapes, bns=tune_bns)
    if args.precompile_workers:
        precompile(all_shapes, batches, tune=False, tuned=configs.TUNED, **common)
    res = bench_layer(shapes, batches, out=args.out, repeats=args.repeats, max_seconds=args.max_seconds,
                      bf16=not args.no_bf16)
    res["tuned"] = tuned_rows
    write(res, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
