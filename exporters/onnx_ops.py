"""The ``ai.dsf`` ONNX operator domain and its ONNX Runtime implementation (onnxruntime-extensions Python ops).

Two operators, both computing a linear layer without bias (a bias is a standard ``Add`` after the node):

``ai.dsf::DSFLinear(X, A_values, A_index, A_row_ptr, B_values, B_index, B_row_ptr) -> Y``
    ``Y = (X·Bᵀ)·Aᵀ`` with ``A`` [out_features, inner_dim] and ``B`` [inner_dim, in_features].
``ai.dsf::SparseLinear(X, W_values, W_index, W_row_ptr) -> Y``
    ``Y = X·Wᵀ`` with ``W`` [out_features, in_features].

``X`` is ``[..., in_features]`` and ``Y`` ``[..., out_features]``, both of the values' dtype (float32 or float16).
Each factor is three tensors (``values``, index, ``row_ptr``) in the layout named by the ``layout`` attribute
(docs/format.md):

* ``csr``: values ``[nnz]``, col_idx int16/int32 ``[nnz]``, row_ptr int32 ``[rows + 1]``;
* ``bitmask``: values ``[nnz]``, bitmask uint8 ``[rows, ceil(cols / 8)]``, row_ptr int32 ``[rows + 1]``;
* ``bsr``: values ``[nblocks, b, b]``, col_idx int32 ``[nblocks]``, row_ptr int32 ``[ceil(rows / b) + 1]``.

Integer attributes: ``out_features``, ``in_features``, ``inner_dim`` (``DSFLinear`` only) and ``block_size``
(``b`` for ``bsr``, 0 otherwise).

ONNX Runtime runs them through onnxruntime-extensions Python ops (CPU) that compute with the torch runtime's own
``dsf_runtime.modules.linear``: the compiled CPU kernel for ``bitmask`` (``BitmaskMatrix.matmul``), the pure-torch
path for ``csr`` and ``bsr``. ``make_session`` checks every ``ai.dsf`` node before the session exists
(``check_dsf_nodes``): its attributes against its inputs, and the runtime's own ``validate`` of the layout on every
factor given as an initializer (monotone ``row_ptr`` ending at nnz, indices inside the matrix, bitmask popcounts),
so a malformed model is a ``ValueError`` naming the file, node and input. A node whose factors are all
initializers (every exported model) then keeps them *resident*: the validated arrays become torch tensors
(``torch.from_numpy``, no copy) in a registry of this process, and the session's in-memory graph calls
``ai.dsf::ResidentLinear(X)`` (an operator of the session only, never of a file) instead, so no call copies,
casts or re-validates the weights, and float16 values reach the kernel as float16. A node fed by values computed at
run time keeps its inputs and its kernel repeats the checks on every call; there a failed check ends the process
with the message on stderr, because onnxruntime-extensions turns a Python exception into ``std::terminate``, but
never reads out of bounds.
"""

from __future__ import annotations

import itertools
import logging
import os
import warnings
import weakref
from collections.abc import Sequence
from functools import cache
from pathlib import Path

import numpy as np
import onnx
import torch
from google.protobuf.message import DecodeError

from dsf_runtime.formats import BitmaskMatrix, BSRMatrix, CSRMatrix, FormatError, PackedMatrix
from dsf_runtime.modules import linear

__all__ = [
    "DOMAIN",
    "DOMAIN_VERSION",
    "DSF_LINEAR",
    "SPARSE_LINEAR",
    "ONNX_LAYOUTS",
    "check_dsf_nodes",
    "factor_inputs",
    "make_session",
    "register_python_ops",
]

logger = logging.getLogger(__name__)

DOMAIN = "ai.dsf"
DOMAIN_VERSION = 1
DSF_LINEAR = "DSFLinear"
SPARSE_LINEAR = "SparseLinear"
# The in-memory operator of a session whose factors are resident: ``ResidentLinear(X) -> Y``, attribute ``key``.
RESIDENT_LINEAR = "ResidentLinear"
# Layouts with an ``ai.dsf`` encoding, and the name of each one's index part.
ONNX_LAYOUTS: dict[str, str] = {"csr": "col_idx", "bitmask": "bitmask", "bsr": "col_idx"}
_MATRICES = {"csr": CSRMatrix, "bitmask": BitmaskMatrix, "bsr": BSRMatrix}
# Validated factors of the resident nodes of live sessions, outermost first, by ``ResidentLinear`` key.
_RESIDENT: dict[str, list[PackedMatrix]] = {}
_SESSION_IDS = itertools.count()
_REEXPORT = "re-export it with `dsf export --onnx`"
_EXTENSIONS_HINT = "install it with `pip install onnxruntime-extensions` (needed to run ai.dsf custom ops)"


def factor_inputs(layout: str) -> tuple[str, str, str]:
    """Part names, in input order, of one factor of ``layout``: ``("values", <index part>, "row_ptr")``."""
    if layout not in ONNX_LAYOUTS:
        raise ValueError(f"layout {layout!r} has no ai.dsf encoding; expected one of {sorted(ONNX_LAYOUTS)}")
    return ("values", ONNX_LAYOUTS[layout], "row_ptr")


def _tensor(array: np.ndarray) -> torch.Tensor:
    """A torch view of an input buffer (read-only: the kernels never write to it)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(np.ascontiguousarray(array))


def _sizes(op: str) -> tuple[str, ...]:
    """The size attributes of ``op`` (``DSF_LINEAR`` or ``SPARSE_LINEAR``)."""
    return ("out_features", "in_features", "inner_dim") if op == DSF_LINEAR else ("out_features", "in_features")


def _factor_shapes(op: str, attrs: dict) -> dict[str, tuple[int, int]]:
    """Factor name -> ``(rows, cols)`` the attributes of ``op`` give."""
    out, cols = attrs["out_features"], attrs["in_features"]
    if op == DSF_LINEAR:
        return {"A": (out, attrs["inner_dim"]), "B": (attrs["inner_dim"], cols)}
    return {"W": (out, cols)}


def _check_attributes(op: str, attrs: dict) -> None:
    """Raise a ValueError naming ``op`` when its ``layout`` is unknown or a size attribute is not a positive
    integer."""
    if attrs.get("layout") not in _MATRICES:
        raise ValueError(f"{DOMAIN}::{op}: layout attribute {attrs.get('layout')!r} is not one of {sorted(_MATRICES)}")
    for name in _sizes(op):
        if not isinstance(attrs.get(name), int) or attrs[name] <= 0:
            raise ValueError(f"{DOMAIN}::{op}: attribute {name} is {attrs.get(name)!r}, expected a positive integer")


def _check_width(op: str, width: int, attrs: dict) -> None:
    """Raise a ValueError naming ``op`` when ``X`` has ``width`` features but ``in_features`` says otherwise."""
    if width != attrs["in_features"]:
        raise ValueError(f"{DOMAIN}::{op}: X has {width} features, but in_features is {attrs['in_features']}")


def _packed(op: str, name: str, attrs: dict, arrays: Sequence[np.ndarray], shape: tuple[int, int]):
    """The packed matrix (``dsf_runtime.formats``) of factor ``name`` (``"A"``, ``"B"``, ``"W"``) given as numpy
    arrays, after the runtime's own ``validate``; a FormatError becomes a ValueError naming ``op`` and the input."""
    layout = attrs["layout"]
    tensors = {f"{name}.{part}": _tensor(a) for part, a in zip(factor_inputs(layout), arrays)}
    options = {"block_size": attrs.get("block_size")} if layout == "bsr" else {}
    try:
        return _MATRICES[layout].from_tensors(tensors, name, shape, validate=True, **options)
    except FormatError as exc:
        raise ValueError(f"{DOMAIN}::{op}: input '{exc.tensor}' {exc.problem} (layout {layout!r}, attributes give "
                         f"{name} {list(shape)})") from None


def _factors(op: str, attrs: dict, arrays: Sequence[np.ndarray]) -> list:
    """The validated packed factors of a node from its attributes and its inputs after ``X``."""
    _check_attributes(op, attrs)
    shapes = _factor_shapes(op, attrs)
    return [_packed(op, name, attrs, arrays[3 * i:3 * i + 3], shape) for i, (name, shape) in enumerate(shapes.items())]


def _dsf_linear_kernel(x, a_values, a_index, a_row_ptr, b_values, b_index, b_row_ptr, **attrs) -> np.ndarray:
    """``Y = (X·Bᵀ)·Aᵀ``; X [..., in_features] float32 -> Y [..., out_features] float32, after the node's
    checks."""
    factors = _factors(DSF_LINEAR, attrs, (a_values, a_index, a_row_ptr, b_values, b_index, b_row_ptr))
    _check_width(DSF_LINEAR, x.shape[-1], attrs)
    return linear(_tensor(x), factors).numpy()


def _sparse_linear_kernel(x, w_values, w_index, w_row_ptr, **attrs) -> np.ndarray:
    """``Y = X·Wᵀ``; X [..., in_features] float32 -> Y [..., out_features] float32, after the node's checks."""
    factors = _factors(SPARSE_LINEAR, attrs, (w_values, w_index, w_row_ptr))
    _check_width(SPARSE_LINEAR, x.shape[-1], attrs)
    return linear(_tensor(x), factors).numpy()


def _resident_linear_kernel(x, key: str) -> np.ndarray:
    """``Y = F₀·(…·X)`` with the resident factors registered under ``key``; X [..., in] float32 -> Y [..., out]
    float32 (``torch.from_numpy`` both ways, no copy)."""
    factors = _RESIDENT.get(key)
    if factors is None:
        raise ValueError(f"{DOMAIN}::{RESIDENT_LINEAR}: no resident factors under key {key!r} (the session that "
                         "registered them was closed)")
    if x.shape[-1] != factors[-1].shape[1]:
        raise ValueError(f"{DOMAIN}::{RESIDENT_LINEAR}: X has {x.shape[-1]} features, the factors expect "
                         f"{factors[-1].shape[1]}")
    return linear(_tensor(x), factors).numpy()


def _node_attributes(node: onnx.NodeProto) -> dict:
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    return {k: v.decode() if isinstance(v, bytes) else v for k, v in attrs.items()}


def _static_width(model: onnx.ModelProto, name: str) -> int | None:
    """The last dimension of graph input ``name`` when it is a fixed number, else None."""
    for value in model.graph.input:
        dims = value.type.tensor_type.shape.dim
        if value.name == name and dims and dims[-1].HasField("dim_value"):
            return dims[-1].dim_value
    return None


def check_dsf_nodes(model: onnx.ModelProto, path: Path) -> dict[int, list[PackedMatrix] | None]:
    """Check every ``ai.dsf`` node of ``model`` (loaded from ``path``, external data resolved next to it) before a
    session runs it: op type, attributes, the width of ``X`` where it is a graph input of fixed width, and every
    factor given as initializers (``validate`` of its layout).

    Returns:
        For every ``ai.dsf`` node, by its index in ``model.graph.node``: its validated factors (outermost first,
        tensors sharing memory with the arrays read from the file) when all of them are initializers, else None.

    Raises:
        ValueError: ``"<path>: node '<name>': ai.dsf::<op>: <problem>; re-export it ..."``.
    """
    initializers = {t.name: t for t in model.graph.initializer}
    checked: dict[int, list[PackedMatrix] | None] = {}
    for index, node in enumerate(model.graph.node):
        if node.domain != DOMAIN:
            continue
        checked[index] = None
        try:
            if node.op_type not in (DSF_LINEAR, SPARSE_LINEAR):
                raise ValueError(f"unknown operator {DOMAIN}::{node.op_type}, expected {DSF_LINEAR} or {SPARSE_LINEAR}")
            attrs = _node_attributes(node)
            _check_attributes(node.op_type, attrs)
            width = _static_width(model, node.input[0])
            if width is not None:
                _check_width(node.op_type, width, attrs)
            if all(name in initializers for name in node.input[1:]):
                arrays = [onnx.numpy_helper.to_array(initializers[n], str(path.parent)) for n in node.input[1:]]
                checked[index] = _factors(node.op_type, attrs, arrays)
        except (ValueError, OSError) as exc:
            raise ValueError(f"{path}: node {node.name or node.output[0]!r}: {exc}; {_REEXPORT}") from exc
    return checked


def _import_extensions():
    try:
        import onnxruntime_extensions
    except ImportError as exc:
        raise ImportError(f"onnxruntime-extensions is not installed; {_EXTENSIONS_HINT}") from exc
    return onnxruntime_extensions


@cache
def register_python_ops() -> str:
    """Register the float32 Python kernels of ``ai.dsf::DSFLinear``, ``ai.dsf::SparseLinear`` and the
    session-only ``ai.dsf::ResidentLinear`` (once per process) and return the onnxruntime-extensions library path to
    pass to ``SessionOptions.register_custom_ops_library``.

    The index inputs are declared type-agnostic (int16, int32 or uint8 by layout). onnxruntime-extensions'
    Python ops cannot take float16 tensors; ``make_session`` inserts casts for float16 models.
    """
    ext = _import_extensions()
    d = ext.PyCustomOpDef
    factor = [d.dt_float, d.undefined, d.dt_int32]
    ints = {"out_features": d.dt_int64, "in_features": d.dt_int64, "block_size": d.dt_int64}
    ext.onnx_op(
        op_type=f"{DOMAIN}::{DSF_LINEAR}",
        inputs=[d.dt_float, *factor, *factor],
        outputs=[d.dt_float],
        attrs={"layout": d.dt_string, "inner_dim": d.dt_int64, **ints},
    )(_dsf_linear_kernel)
    ext.onnx_op(
        op_type=f"{DOMAIN}::{SPARSE_LINEAR}",
        inputs=[d.dt_float, *factor],
        outputs=[d.dt_float],
        attrs={"layout": d.dt_string, **ints},
    )(_sparse_linear_kernel)
    ext.onnx_op(
        op_type=f"{DOMAIN}::{RESIDENT_LINEAR}", inputs=[d.dt_float], outputs=[d.dt_float], attrs={"key": d.dt_string},
    )(_resident_linear_kernel)
    return ext.get_library_path()


def _make_resident(model: onnx.ModelProto, checked: dict[int, list[PackedMatrix] | None], session: int) -> list[str]:
    """Replace every ``ai.dsf`` node whose factors ``check_dsf_nodes`` validated by ``ResidentLinear(X)`` (in place;
    float16 ``X`` and ``Y`` through Casts, the Python kernels take float32), register its factors in ``_RESIDENT``
    and drop the initializers no node reads any more (ONNX Runtime then never loads them). Returns the keys."""
    graph = model.graph
    keys, nodes, replaced = [], [], set()
    for index, node in enumerate(graph.node):
        factors = checked.get(index)
        if factors is None:
            nodes.append(node)
            continue
        key = f"{session}/{index}/{node.name or node.output[0]}"
        _RESIDENT[key] = factors
        keys.append(key)
        replaced.update(node.input[1:])
        x, y = node.input[0], node.output[0]
        half = factors[0].dtype == torch.float16
        if half:
            nodes.append(onnx.helper.make_node("Cast", [x], [f"{key}/x_f32"], to=onnx.TensorProto.FLOAT))
            x, y = f"{key}/x_f32", f"{key}/y_f32"
        nodes.append(onnx.helper.make_node(RESIDENT_LINEAR, [x], [y], name=node.name, domain=DOMAIN, key=key))
        if half:
            nodes.append(onnx.helper.make_node("Cast", [y], [node.output[0]], to=onnx.TensorProto.FLOAT16))
    del graph.node[:]
    graph.node.extend(nodes)
    used = {name for node in nodes for name in node.input}
    for i in reversed(range(len(graph.initializer))):
        if graph.initializer[i].name in replaced - used:
            del graph.initializer[i]
    return keys


def _release(keys: list[str]) -> None:
    """Drop the resident factors of a closed session."""
    for key in keys:
        _RESIDENT.pop(key, None)


def _cast_float16_nodes(model: onnx.ModelProto) -> int:
    """Wrap every float16 ``DSFLinear``/``SparseLinear`` node in Casts to and from float32, in place; returns how
    many were wrapped.

    The values' dtype is read from the initializers feeding the node (``load_external_data=False`` is enough).
    """
    graph = model.graph
    dtypes = {t.name: t.data_type for t in graph.initializer}
    wrapped, nodes = 0, []
    for node in graph.node:
        if (node.domain != DOMAIN or node.op_type == RESIDENT_LINEAR
                or dtypes.get(node.input[1]) != onnx.TensorProto.FLOAT16):
            nodes.append(node)
            continue
        tag = f"{node.name or node.output[0]}_f32"
        cast_in = []
        for i, name in enumerate(node.input):
            if i == 0 or (i - 1) % 3 == 0:  # X and each factor's values
                cast_in.append(onnx.helper.make_node("Cast", [name], [f"{tag}_in{i}"], to=onnx.TensorProto.FLOAT))
                node.input[i] = f"{tag}_in{i}"
        out = node.output[0]
        node.output[0] = f"{tag}_out"
        cast_out = onnx.helper.make_node("Cast", [node.output[0]], [out], to=onnx.TensorProto.FLOAT16)
        nodes.extend([*cast_in, node, cast_out])
        wrapped += 1
    if wrapped:
        del graph.node[:]
        graph.node.extend(nodes)
    return wrapped


def make_session(
    path: str | os.PathLike,
    providers: Sequence[str] | None = None,
    session_options=None,
):
    """An ``onnxruntime.InferenceSession`` for an exported model, with the ``ai.dsf`` Python kernels registered.

    Models without ``ai.dsf`` nodes (``--lowering standard``) need no registration and load as usual. Nodes whose
    factors are initializers become ``ResidentLinear`` nodes of the session's in-memory graph (the module
    docstring); their factors stay registered in this process until the session is garbage-collected.

    Args:
        path: the ``.onnx`` file; its external data stays next to it and is resolved relative to it.
        providers: execution providers, default ``["CPUExecutionProvider"]``. With ``CUDAExecutionProvider`` the
            ``ai.dsf`` nodes still run on the CPU (the Python kernels declare no device), and ONNX Runtime copies
            their inputs and outputs between device and host.
        session_options: an ``onnxruntime.SessionOptions`` to extend (default: a new one).

    Raises:
        ImportError: the model has ``ai.dsf`` nodes and onnxruntime-extensions is not installed.
        ValueError: naming ``path`` when it is not a readable ONNX model, an ``ai.dsf`` node fails
            ``check_dsf_nodes``, or ONNX Runtime refuses it (truncated, random or wrong-offset files, missing or
            short external data).
    """
    import onnxruntime as ort

    path = Path(path)
    options = session_options or ort.SessionOptions()
    providers = list(providers or ["CPUExecutionProvider"])
    try:
        model = onnx.load(str(path), load_external_data=False)
    except (DecodeError, OSError, ValueError, RuntimeError) as exc:
        raise ValueError(f"{path}: not a readable ONNX model ({type(exc).__name__}: {exc}); {_REEXPORT}") from exc
    checked = check_dsf_nodes(model, path)
    if not checked:
        return _session(ort, str(path), options, providers, path)
    options.register_custom_ops_library(register_python_ops())
    keys = _make_resident(model, checked, next(_SESSION_IDS))
    if _cast_float16_nodes(model):
        logger.info("%s: float16 ai.dsf nodes run through float32 casts (Python kernels take float32 only)", path)
    options.add_session_config_entry("session.model_external_initializers_file_folder_path",
                                     str(path.resolve().parent))
    try:
        session = _session(ort, model.SerializeToString(), options, providers, path)
    except BaseException:
        _release(keys)
        raise
    weakref.finalize(session, _release, keys)
    return session


def _session(ort, source: str | bytes, options, providers: list[str], path: Path):
    """``ort.InferenceSession(source, ...)``, its refusal a ValueError naming ``path``."""
    try:
        return ort.InferenceSession(source, options, providers=providers)
    except _ort_errors() as exc:
        raise ValueError(f"{path}: ONNX Runtime cannot load it ({type(exc).__name__}: {exc}); {_REEXPORT}") from exc


def _ort_errors() -> tuple[type[Exception], ...]:
    """The exception types ONNX Runtime raises for a model it refuses (they derive from Exception only)."""
    from onnxruntime.capi import onnxruntime_pybind11_state as state

    names = ("Fail", "InvalidArgument", "InvalidGraph", "InvalidProtobuf", "NoSuchFile", "NoModel", "RuntimeException",
             "NotImplemented")
    return (RuntimeError, OSError, *(getattr(state, n) for n in names if hasattr(state, n)))
