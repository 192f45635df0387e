"""What does ONNX Runtime (CPU) make of the exported models: does it fold the standard-op lowering back to dense
weights, and what do session creation (RSS growth, peak RSS, seconds) and calls cost against the dense model and the
``ai.dsf`` custom ops?

Full run (CPU, about 15 minutes on 2 shared cores; the four SmolLM2 exports are most of it)::

    python benchmarks/onnx_ort.py --out benchmarks/results/onnx-ort-cpu.json --note "shared machine"

``--quick`` (or ``--skip-full``) measures the single-layer models only (a few minutes); rows and facts of the other
scope already in ``--out`` are kept.

Models, built under ``--work-dir`` (outside the repository; removed afterwards unless ``--keep``):

* ``layer``: one 4096×11008 linear at 50% density, input ``x`` [n, 11008]. Dense ``MatMul`` of the same weight
  (fp32, fp16); a single sparse ``W`` (``exporters.onnx_export.layer_model``, kind ``single``) in csr and bitmask,
  fp32 and fp16; DSF ``A`` [4096, 4096] · ``B`` [4096, 11008], each factor at the density that gives the same
  total non-zeros, csr fp32.
* ``smollm2``: SmolLM2-135M (30 blocks), every linear but ``lm_head`` DSF with random factors at 50% total
  density (``dsf_runtime.save_compressed``), exported by ``exporters.onnx_export.export_onnx`` as csr fp32 and
  bitmask fp16; input ``input_ids`` [1, n]. Dense baseline: ``export_dense_fallback`` of the same directory,
  exported by the same ``torch.onnx.export`` call, fp32 and fp16.

Every compressed model is saved with custom ops; its standard-lowering twin is ``lower_to_standard`` of that graph
saved next to it and reading the same ``.data`` (exactly what ``export_onnx(lowering="standard")`` writes).

Method: each (model, optimization level, malloc setting) runs in a fresh Python process that imports onnxruntime
only (plus ``exporters.onnx_ops``, hence torch, for custom ops, whose session comes from ``make_session``), with
``intra_op_num_threads=--threads``. RSS is ``VmRSS`` of ``/proc/self/status`` before and after creating the
session; peak RSS is ``VmHWM`` (after creation, read with that ``VmRSS``, and after the calls; not ``ru_maxrss``,
which a child process inherits from the parent it was forked from). One read of the file is consistent
(``VmHWM`` >= ``VmRSS``), two reads need not be (the kernel's counters are approximate and it updates the high-water
mark lazily), so the peak after the calls is the highest ``VmHWM`` read so far. Per token count: one warm-up call,
then up to ``--repeats`` calls within ``--time-budget`` seconds (median, p20, p80); a warm-up slower than the
budget is the only timing (``warm: false``). Optimization levels: ``all`` (``ORT_ENABLE_ALL``, constant folding) and
``none`` (``ORT_DISABLE_ALL``); custom-op models ``all`` only (their nodes do not fold). SmolLM2 models without
custom ops are also measured at ``all`` under ``MALLOC_MMAP_THRESHOLD_=131072`` (glibc returns freed folding
temporaries to the OS). For dense and standard models at ``all`` the same process then creates a second session
with ``optimized_model_filepath`` and counts, in the optimized graph, the lowering's decoding nodes left
(``decode_nodes``), the ``MatMul``/``Gemm`` nodes fed by a 2-D initializer (``dense_matmuls``) and the initializer
megabytes (``optimized_weights_mb``); ``folded`` = no decoding node left.

Rows (``rows``), one per (model, opt, malloc, tokens): ``{"scope", "model", "kind", "layout", "dtype", "lowering",
"opt", "mmap_threshold", "tokens", "file_mb", "rss_before_mb", "rss_growth_mb", "rss_after_create_mb",
"peak_rss_create_mb", "peak_rss_mb", "create_s", "median_ms", "p20_ms", "p80_ms", "calls", "warm", "loadavg"}``
plus ``decode_nodes_in_file``, ``decode_nodes``, ``dense_matmuls``, ``optimized_weights_mb`` and ``folded`` where
probed. ``facts``: per scope, the weights' non-zeros and densities (and the SmolLM2 export seconds).
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# Measurement processes import nothing else at module level: their RSS is ONNX Runtime's. torch, onnx and the
# exporters are imported where the models are built.
logger = logging.getLogger("onnx_ort")

SCOPES = ("layer", "smollm2")
LAYER_SHAPE = (4096, 11008)
DENSITY = 0.5
TOKENS = (1, 64)
MMAP_THRESHOLD = 131072
_MATMULS = ("MatMul", "FusedMatMul", "Gemm")


@dataclass(frozen=True)
class Model:
    """One ONNX file to measure. ``lowering``: ``dense`` (no compression), ``custom`` or ``standard``."""

    scope: str
    name: str
    kind: str  # dense, single, dsf
    layout: str  # dense, csr, bitmask
    dtype: str
    lowering: str
    path: str
    file_mb: float


# ---------------------------------------------------------------------------------------------- building
def _file_mb(path: Path) -> float:
    """Megabytes of ``path`` plus the external data files its initializers point to."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    files = {path} | {path.parent / e.value for t in model.graph.initializer for e in t.external_data
                      if e.key == "location"}
    return round(sum(f.stat().st_size for f in files) / 2**20, 3)


def _save(model, path: Path) -> Path:
    import onnx

    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=path.name + ".data", size_threshold=1024)
    return path


def _lowered(custom: Path) -> Path:
    """The standard-lowering twin of a saved custom-op model: the graph rewritten by ``lower_to_standard``, the
    initializers still in the custom model's ``.data`` (what ``export_onnx(lowering="standard")`` writes)."""
    import onnx

    from exporters.onnx_lowering import lower_to_standard

    out = custom.with_name(custom.name.replace("-custom", "-standard"))
    onnx.save_model(lower_to_standard(onnx.load(str(custom), load_external_data=False)), str(out))
    return out


def _compressed_pair(scope: str, stem: str, kind: str, layout: str, dtype: str, custom: Path) -> list[Model]:
    standard = _lowered(custom)
    return [Model(scope, f"{stem}-{lowering}", kind, layout, dtype, lowering, str(p), _file_mb(p))
            for lowering, p in (("custom", custom), ("standard", standard))]


def _sparse(rows: int, cols: int, density: float, generator) -> Any:
    import torch

    return torch.randn(rows, cols, generator=generator) * (torch.rand(rows, cols, generator=generator) < density)


def build_layer(
    work: Path, shape: tuple[int, int] = LAYER_SHAPE, seed: int = 0
) -> tuple[list[Model], dict[str, Any]]:
    """The single-layer models of ``shape`` [out, in] at ``DENSITY`` (see the module docstring) under ``work``, and
    facts about the weights."""
    import onnx
    import torch

    from dsf_runtime import CompressedLayer
    from exporters.config import ExportConfig
    from exporters.onnx_export import layer_model

    generator = torch.Generator().manual_seed(seed)
    rows, cols = shape
    weight = _sparse(rows, cols, DENSITY, generator)
    single = CompressedLayer.from_dense("single", {"W": weight}, method="random", layout="csr")
    d = DENSITY * rows * cols / (rows * rows + rows * cols)  # per factor: A [rows, rows], B [rows, cols]
    factors = {"A": _sparse(rows, rows, d, generator), "B": _sparse(rows, cols, d, generator)}
    dsf = CompressedLayer.from_dense("dsf", factors, method="random", layout="csr")
    models = []
    for dtype in ("float32", "float16"):
        tag = {"float32": "fp32", "float16": "fp16"}[dtype]
        for layout in ("csr", "bitmask"):
            custom = _save(layer_model(single, ExportConfig(layout=layout, dtype=dtype)),
                           work / f"single-{layout}-{tag}-custom.onnx")
            models += _compressed_pair("layer", f"single-{layout}-{tag}", "single", layout, dtype, custom)
        # Dense baseline: one MatMul with Wᵀ [in, out], the graph layer_model would give a dense layer.
        wt = weight.T.contiguous().to(getattr(torch, dtype)).numpy()
        elem = onnx.helper.np_dtype_to_tensor_dtype(wt.dtype)
        graph = onnx.helper.make_graph(
            [onnx.helper.make_node("MatMul", ["x", "Wt"], ["y"])], "dense_linear",
            [onnx.helper.make_tensor_value_info("x", elem, ["n", cols])],
            [onnx.helper.make_tensor_value_info("y", elem, ["n", rows])],
            initializer=[onnx.numpy_helper.from_array(wt, "Wt")])
        reference = layer_model(single)
        dense = _save(onnx.helper.make_model(graph, opset_imports=reference.opset_import[:1],
                                             ir_version=reference.ir_version), work / f"dense-{tag}.onnx")
        models.append(Model("layer", f"dense-{tag}", "dense", "dense", dtype, "dense", str(dense), _file_mb(dense)))
    custom = _save(layer_model(dsf, ExportConfig(layout="csr", dtype="float32")), work / "dsf-csr-fp32-custom.onnx")
    models += _compressed_pair("layer", "dsf-csr-fp32", "dsf", "csr", "float32", custom)
    facts = {"shape": list(shape), "single_nnz": single.nnz, "dsf_nnz": dsf.nnz, "dsf_inner_dim": dsf.inner_dim,
             "dsf_factor_density": round(d, 4)}
    logger.info("layer: %s", facts)
    return models, facts


def _random_dsf(weight, generator):
    """Random DSF factors of a SmolLM2 linear at ``DENSITY`` total: the masked weight and a square identity plus
    sparse noise, each factor at the same density."""
    import torch

    from dsf_runtime import CompressedLayer

    out, inp = weight.shape
    k = min(out, inp)
    d = DENSITY * out * inp / (out * k + k * inp)
    masked = weight.float() * (torch.rand(out, inp, generator=generator) < d)
    square = torch.eye(k) + _sparse(k, k, d - 1 / k, generator) * (0.05 / math.sqrt(d * k))
    factors = {"A": masked, "B": square} if out >= inp else {"A": square, "B": masked}
    return CompressedLayer.from_dense("dsf", factors, method="random", layout="csr")


def _export_dense(src: Path, work: Path, dtype: str) -> Path:
    """The dense fallback of ``src`` through the ``torch.onnx.export`` call of ``export_onnx``."""
    import torch
    from transformers import AutoModelForCausalLM

    from exporters.dense_fallback import export_dense_fallback
    from exporters.onnx_lowering import MIN_OPSET

    hf = export_dense_fallback(src, work / f"hf-{dtype}", dtype=getattr(torch, dtype))
    model = AutoModelForCausalLM.from_pretrained(hf, dtype=getattr(torch, dtype)).eval()
    model.config.use_cache = False
    out = work / f"dense-{dtype}.onnx"
    program = torch.onnx.export(
        model, (), kwargs={"input_ids": torch.zeros(2, 8, dtype=torch.long)}, dynamo=True, opset_version=MIN_OPSET,
        input_names=["input_ids"], output_names=["logits"], dynamic_shapes={"input_ids": {0: "batch", 1: "sequence"}},
        external_data=True, verbose=False)
    program.save(str(out), external_data=True)
    shutil.rmtree(hf)
    return out


def build_smollm2(work: Path, seed: int = 0) -> tuple[list[Model], dict[str, Any]]:
    """The SmolLM2-135M models (see the module docstring) under ``work``, and facts about the factors."""
    import torch
    from transformers import AutoModelForCausalLM

    from compress.assets import smollm2_dir
    from dsf_runtime import save_compressed
    from exporters.config import ExportConfig
    from exporters.onnx_export import export_onnx

    generator = torch.Generator().manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir(), dtype=torch.float32)
    layers = {name: _random_dsf(m.weight.detach(), generator) for name, m in model.named_modules()
              if isinstance(m, torch.nn.Linear) and name != "lm_head"}
    tensors = {k: v for k, v in model.state_dict().items() if k.rpartition(".")[0] not in layers}
    src = save_compressed(work / "smollm2-dsf", tensors=tensors, layers=layers, config_source=smollm2_dir())
    del model, tensors
    nnz = sum(layer.nnz for layer in layers.values())
    total = sum(layer.shape[0] * layer.shape[1] for layer in layers.values())
    facts = {"linears": len(layers), "nnz": nnz, "dense_params": total, "density": round(nnz / total, 4)}
    models = []
    for layout, dtype, tag in (("csr", "float32", "fp32"), ("bitmask", "float16", "fp16")):
        start = time.perf_counter()
        custom = export_onnx(src, work / f"{layout}-{tag}-custom.onnx", ExportConfig(layout=layout, dtype=dtype))
        facts[f"export_s_{layout}_{tag}"] = round(time.perf_counter() - start, 1)
        models += _compressed_pair("smollm2", f"{layout}-{tag}", "dsf", layout, dtype, custom)
    for dtype, tag in (("float32", "fp32"), ("float16", "fp16")):
        start = time.perf_counter()
        dense = _export_dense(src, work, dtype)
        facts[f"export_s_dense_{tag}"] = round(time.perf_counter() - start, 1)
        models.append(Model("smollm2", f"dense-{tag}", "dense", "dense", dtype, "dense", str(dense), _file_mb(dense)))
    logger.info("smollm2: %s", facts)
    return models, facts


# ---------------------------------------------------------------------------------------------- measuring
def _status_mb() -> dict[str, float]:
    """The ``Vm*`` fields of one read of ``/proc/self/status``, in MiB: ``VmRSS`` (resident now), ``VmHWM`` (peak
    resident), ... One read is one snapshot of the kernel's counters, so its ``VmHWM`` >= its ``VmRSS``."""
    with open("/proc/self/status") as f:
        fields = (line.split(":", 1) for line in f if line.startswith("Vm"))
        return {name: int(value.split()[0]) / 1024 for name, value in fields}  # every Vm* field is in kB


def _feed(session, tokens: int) -> dict[str, np.ndarray]:
    """``input_ids`` [1, tokens] or ``x`` [tokens, in] in the input's dtype, seeded."""
    rng = np.random.default_rng(0)
    inp = session.get_inputs()[0]
    if inp.name == "input_ids":
        return {inp.name: rng.integers(0, 32000, (1, tokens), dtype=np.int64)}
    dtype = np.float16 if "float16" in inp.type else np.float32
    return {inp.name: rng.standard_normal((tokens, inp.shape[1])).astype(dtype)}


def _time_calls(session, feed: dict[str, np.ndarray], repeats: int, budget_s: float) -> dict[str, Any]:
    """A warm-up call, then up to ``repeats`` calls within ``budget_s`` (at least one); a warm-up slower than
    ``budget_s`` is the only timing."""
    start = time.perf_counter()
    session.run(None, feed)
    times = [time.perf_counter() - start]
    warm = times[0] <= budget_s
    if warm:
        times, spent = [], 0.0
        while len(times) < repeats and (not times or spent < budget_s):
            start = time.perf_counter()
            session.run(None, feed)
            times.append(time.perf_counter() - start)
            spent += times[-1]
    ms = 1e3 * np.array(times)
    return {"median_ms": round(float(np.median(ms)), 2), "p20_ms": round(float(np.percentile(ms, 20)), 2),
            "p80_ms": round(float(np.percentile(ms, 80)), 2), "calls": len(times), "warm": warm}


def _decode_nodes(model) -> int:
    """Nodes of the standard lowering's decoding in ``model``: ``lower_to_standard`` names every node it adds
    ``<node>/std/<step>_<i>``, and the final product with ``X`` ``<node>/std/matmul``."""
    return sum(1 for node in model.graph.node if "/std/" in node.name and not node.name.endswith("/std/matmul"))


def _graph_summary(model) -> dict[str, Any]:
    """Decoding nodes left, MatMul/Gemm nodes fed by a 2-D initializer, initializer megabytes."""
    import onnx

    inits = {t.name: t for t in model.graph.initializer}
    dense = sum(1 for node in model.graph.node if node.op_type in _MATMULS
                and any(name in inits and len(inits[name].dims) == 2 for name in node.input))
    nbytes = sum(math.prod(t.dims) * onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
                 for t in inits.values())
    return {"decode_nodes": _decode_nodes(model), "dense_matmuls": dense,
            "optimized_weights_mb": round(nbytes / 2**20, 1)}


def _probe(path: str, options, probe_dir: Path) -> dict[str, Any]:
    """Create a session that saves its optimized graph to ``probe_dir`` and summarize that graph."""
    import onnx
    import onnxruntime as ort

    optimized = probe_dir / "optimized.onnx"
    options.optimized_model_filepath = str(optimized)
    options.add_session_config_entry("session.optimized_model_external_initializers_file_name",
                                     optimized.name + ".data")
    options.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
    ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    summary = _graph_summary(onnx.load(str(optimized), load_external_data=False))
    summary["decode_nodes_in_file"] = _decode_nodes(onnx.load(path, load_external_data=False))
    summary["folded"] = summary["decode_nodes"] == 0 if summary["decode_nodes_in_file"] else None  # None: dense
    return summary


def measure_session(spec: dict[str, Any]) -> dict[str, Any]:
    """Measure one model in this process (meant to be a fresh one; see the module docstring).

    Args:
        spec: ``{"path", "lowering", "opt": "all" | "none", "tokens": [...], "threads", "repeats",
            "time_budget_s", "probe_dir": str | None}``.

    Returns:
        ``{"session": {rss/peak/create fields}, "calls": {tokens: timing}, "graph": probe summary or None}``.
    """
    import onnxruntime as ort

    levels = {"all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL, "none": ort.GraphOptimizationLevel.ORT_DISABLE_ALL}

    def options():
        o = ort.SessionOptions()
        o.graph_optimization_level = levels[spec["opt"]]
        o.intra_op_num_threads = spec["threads"]
        return o

    if spec["lowering"] == "custom":
        from exporters.onnx_ops import make_session  # registers the ai.dsf kernels; imports torch

        create = partial(make_session, spec["path"], session_options=options())
    else:
        create = partial(ort.InferenceSession, spec["path"], options(), providers=["CPUExecutionProvider"])
    before = _status_mb()["VmRSS"]
    start = time.perf_counter()
    session = create()
    create_s, status = time.perf_counter() - start, _status_mb()
    after, peak = status["VmRSS"], status["VmHWM"]
    created = {"create_s": round(create_s, 2), "rss_before_mb": round(before, 1),
               "rss_growth_mb": round(after - before, 1), "rss_after_create_mb": round(after, 1),
               "peak_rss_create_mb": round(peak, 1)}
    calls = {}
    for n in spec["tokens"]:
        calls[n] = _time_calls(session, _feed(session, n), spec["repeats"], spec["time_budget_s"])
        peak = max(peak, _status_mb()["VmHWM"])
        calls[n]["peak_rss_mb"] = round(peak, 1)
    del session
    graph = _probe(spec["path"], options(), Path(spec["probe_dir"])) if spec["probe_dir"] else None
    return {"session": created, "calls": calls, "graph": graph}


def _plan(model: Model, tokens: tuple[int, ...]) -> list[dict[str, Any]]:
    """The processes that measure ``model``: ``{"opt", "mmap_threshold", "probe"}`` each."""
    if model.lowering == "custom":
        return [{"opt": "all", "mmap_threshold": None, "probe": False}]
    runs = [{"opt": "all", "mmap_threshold": None, "probe": True}, {"opt": "none", "mmap_threshold": None, "probe": False}]
    if model.scope == "smollm2":
        runs.append({"opt": "all", "mmap_threshold": MMAP_THRESHOLD, "probe": False})
    return runs


def measure(model: Model, run: dict[str, Any], args: argparse.Namespace, work: Path) -> list[dict[str, Any]]:
    """One fresh process for ``model`` under ``run``; its rows, one per token count."""
    probe_dir = Path(tempfile.mkdtemp(prefix="probe-", dir=work)) if run["probe"] else None
    spec = {"path": model.path, "lowering": model.lowering, "opt": run["opt"], "tokens": list(args.tokens),
            "threads": args.threads, "repeats": args.repeats, "time_budget_s": args.time_budget,
            "probe_dir": str(probe_dir) if probe_dir else None}
    env = dict(os.environ)
    env.pop("MALLOC_MMAP_THRESHOLD_", None)
    if run["mmap_threshold"]:
        env["MALLOC_MMAP_THRESHOLD_"] = str(run["mmap_threshold"])
    proc = subprocess.run([sys.executable, __file__, "--measure-spec", json.dumps(spec)], check=False, env=env,
                          capture_output=True, text=True, timeout=1800)
    if probe_dir:
        shutil.rmtree(probe_dir, ignore_errors=True)
    if proc.returncode:
        raise RuntimeError(f"measuring {model.name} ({run}) failed:\n{proc.stderr[-3000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    base = {k: v for k, v in asdict(model).items() if k not in ("name", "path")}
    base = {**base, "model": model.name, "opt": run["opt"], "mmap_threshold": run["mmap_threshold"],
            "loadavg": round(os.getloadavg()[0], 2), **result["session"], **(result["graph"] or {})}
    return [{**base, "tokens": int(n), **timing} for n, timing in result["calls"].items()]


# ---------------------------------------------------------------------------------------------- results
def _meta(args: argparse.Namespace) -> dict[str, Any]:
    import onnx
    import onnxruntime
    import onnxruntime_extensions
    import torch
    import transformers

    def sh(*cmd: str) -> str | None:
        try:
            return subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=ROOT).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            return None

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor() or platform.machine())
    mem = next(int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines()
               if line.startswith("MemTotal"))
    return {
        "question": __doc__.split("\n\n", 1)[0].replace("\n", " "),
        "device": f"CPU {cpu}, {os.cpu_count()} cores, {mem / 2**20:.0f} GiB, ONNX Runtime CPUExecutionProvider "
                  f"({args.threads} intra-op threads)",
        "onnxruntime": onnxruntime.__version__, "onnxruntime_extensions": onnxruntime_extensions.__version__,
        "onnx": onnx.__version__, "torch": torch.__version__, "transformers": transformers.__version__,
        "python": platform.python_version(), "glibc": "-".join(platform.libc_ver()),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "git_sha": sh("git", "rev-parse", "HEAD"), "git_dirty": bool(sh("git", "status", "--porcelain")),
        "note": args.note,
        "settings": {"layer_shape": list(LAYER_SHAPE), "density": DENSITY, "tokens": list(args.tokens),
                     "threads": args.threads, "repeats": args.repeats, "time_budget_s": args.time_budget,
                     "mmap_threshold": MMAP_THRESHOLD},
    }


def _cell(value: Any) -> str:
    return "-" if value is None else f"{value:g}" if isinstance(value, float) else str(value)


def print_table(rows: list[dict[str, Any]]) -> None:
    """One line per measuring process: creation numbers, ms per call by token count, folding."""
    header = ["scope", "model", "opt", "mmap", "file MB", "growth MB", "peak@create MB", "after MB", "create s",
              *(f"ms n={n}" for n in sorted({r["tokens"] for r in rows})), "peak MB", "folded"]
    lines, seen = [header], {}
    for r in rows:
        key = (r["scope"], r["model"], r["opt"], r["mmap_threshold"])
        seen.setdefault(key, []).append(r)
    for (scope, model, opt, mmap), group in seen.items():
        first = group[0]
        ms = {r["tokens"]: r["median_ms"] for r in group}
        lines.append([scope, model, opt, "yes" if mmap else "", first["file_mb"], first["rss_growth_mb"],
                      first["peak_rss_create_mb"], first["rss_after_create_mb"], first["create_s"],
                      *(ms.get(n) for n in sorted({r["tokens"] for r in rows})), group[-1]["peak_rss_mb"],
                      first.get("folded")])
    lines = [[_cell(c) for c in line] for line in lines]
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    for line in lines:
        print("  ".join(c.rjust(w) if i > 1 else c.ljust(w) for i, (c, w) in enumerate(zip(line, widths))))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("--out", type=Path, help="JSON results; rows of scopes not run here are kept.")
    parser.add_argument("--work-dir", type=Path, default=Path(tempfile.gettempdir()) / "dsf-onnx-ort",
                        help="Where the models are built (several GB); must be outside the repository.")
    parser.add_argument("--keep", action="store_true", help="Keep --work-dir afterwards (default: remove it).")
    parser.add_argument("--quick", action="store_true", help="Single-layer models only (same as --skip-full).")
    parser.add_argument("--skip-full", action="store_true", help="Skip the SmolLM2-135M models.")
    parser.add_argument("--tokens", type=int, nargs="+", default=list(TOKENS), help="Token counts n per call.")
    parser.add_argument("--threads", type=int, default=2, help="ONNX Runtime intra-op threads.")
    parser.add_argument("--repeats", type=int, default=5, help="Timed calls per token count, at most.")
    parser.add_argument("--time-budget", type=float, default=3.0,
                        help="Seconds of timed calls per token count; a slower warm-up call is the only timing.")
    parser.add_argument("--note", default=None, help="Free text stored in the JSON (e.g. machine load).")
    parser.add_argument("--measure-spec", help=argparse.SUPPRESS)  # internal: the fresh measuring process
    args = parser.parse_args()
    if args.measure_spec:
        print(json.dumps(measure_session(json.loads(args.measure_spec))))
        return
    if args.out is None:
        parser.error("--out is required")
    work = args.work_dir.resolve()
    if work == ROOT or ROOT in work.parents:
        parser.error(f"--work-dir {work} is inside the repository; use a directory outside {ROOT}")
    logging.basicConfig(level=logging.WARNING, format="[%(name)s] %(message)s")
    logger.setLevel(logging.INFO)
    scopes = ("layer",) if args.quick or args.skip_full else SCOPES
    meta = _meta(args)
    start, loadavg_start = time.perf_counter(), os.getloadavg()
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    try:
        models, layer_facts = build_layer(work)
        facts = {"layer": layer_facts}
        if "smollm2" in scopes:
            smollm2, facts["smollm2"] = build_smollm2(work)
            models += smollm2
        built = time.perf_counter()
        rows = []
        for model in models:
            for run in _plan(model, args.tokens):
                rows += measure(model, run, args, work)
                logger.info("%s %s opt=%s mmap=%s: growth %.0f MB, create %.1f s, %s", model.scope, model.name,
                            run["opt"], run["mmap_threshold"], rows[-1]["rss_growth_mb"], rows[-1]["create_s"],
                            ", ".join(f"n={r['tokens']} {r['median_ms']:.0f} ms" for r in rows[-len(args.tokens):]))
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    old = json.loads(args.out.read_text()) if args.out.is_file() else {"rows": []}
    rows = [r for r in old["rows"] if r["scope"] not in scopes] + rows
    facts = {**{k: v for k, v in old.get("facts", {}).items() if k not in scopes}, **facts}
    results = {**meta, "facts": facts, "loadavg_start": list(loadavg_start),
               "loadavg_end": list(os.getloadavg()), "build_s": round(built - start, 1),
               "measure_s": round(time.perf_counter() - built, 1), "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print_table(rows)
    logger.info("wrote %s (%.0f s)", args.out, time.perf_counter() - start)


if __name__ == "__main__":
    main()
