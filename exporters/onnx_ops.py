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
(``b`` for ``bsr``, 0 otherwise). The Python kernels registered here are a float32 CPU correctness reference:
they call ``dsf_runtime.ops`` (the runtime's pure-torch path, which decodes row chunks of every factor per call).
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Sequence
from functools import cache
from pathlib import Path

import numpy as np
import onnx
import torch

from dsf_runtime.formats import BitmaskMatrix, BSRMatrix, CSRMatrix
from dsf_runtime.modules import linear

__all__ = [
    "DOMAIN",
    "DOMAIN_VERSION",
    "DSF_LINEAR",
    "SPARSE_LINEAR",
    "ONNX_LAYOUTS",
    "factor_inputs",
    "make_session",
    "register_python_ops",
]

logger = logging.getLogger(__name__)

DOMAIN = "ai.dsf"
DOMAIN_VERSION = 1
DSF_LINEAR = "DSFLinear"
SPARSE_LINEAR = "SparseLinear"
# Layouts with an ``ai.dsf`` encoding, and the name of each one's index part.
ONNX_LAYOUTS: dict[str, str] = {"csr": "col_idx", "bitmask": "bitmask", "bsr": "col_idx"}
_MATRICES = {"csr": CSRMatrix, "bitmask": BitmaskMatrix, "bsr": BSRMatrix}
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


def _packed(layout: str, values: np.ndarray, index: np.ndarray, row_ptr: np.ndarray, shape: tuple[int, int]):
    """The packed matrix (``dsf_runtime.formats``) of one factor given as numpy arrays."""
    tensors = {part: _tensor(a) for part, a in zip(factor_inputs(layout), (values, index, row_ptr))}
    return _MATRICES[layout].from_tensors(tensors, "", shape, validate=False)


def _dsf_linear_kernel(x, a_values, a_index, a_row_ptr, b_values, b_index, b_row_ptr, **attrs) -> np.ndarray:
    """``Y = (X·Bᵀ)·Aᵀ``; X [..., in_features] float32 -> Y [..., out_features] float32."""
    out, inner, cols = attrs["out_features"], attrs["inner_dim"], attrs["in_features"]
    a = _packed(attrs["layout"], a_values, a_index, a_row_ptr, (out, inner))
    b = _packed(attrs["layout"], b_values, b_index, b_row_ptr, (inner, cols))
    return linear(_tensor(x), [a, b]).numpy()


def _sparse_linear_kernel(x, w_values, w_index, w_row_ptr, **attrs) -> np.ndarray:
    """``Y = X·Wᵀ``; X [..., in_features] float32 -> Y [..., out_features] float32."""
    w = _packed(attrs["layout"], w_values, w_index, w_row_ptr, (attrs["out_features"], attrs["in_features"]))
    return linear(_tensor(x), [w]).numpy()


def _import_extensions():
    try:
        import onnxruntime_extensions
    except ImportError as exc:
        raise ImportError(f"onnxruntime-extensions is not installed; {_EXTENSIONS_HINT}") from exc
    return onnxruntime_extensions


@cache
def register_python_ops() -> str:
    """Register the float32 Python kernels of ``ai.dsf::DSFLinear`` and ``ai.dsf::SparseLinear`` (once per
    process) and return the onnxruntime-extensions library path to pass to
    ``SessionOptions.register_custom_ops_library``.

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
    return ext.get_library_path()


def _cast_float16_nodes(model: onnx.ModelProto) -> int:
    """Wrap every float16 ``ai.dsf`` node in Casts to and from float32, in place; returns how many were wrapped.

    The values' dtype is read from the initializers feeding the node (``load_external_data=False`` is enough).
    """
    graph = model.graph
    dtypes = {t.name: t.data_type for t in graph.initializer}
    wrapped, nodes = 0, []
    for node in graph.node:
        if node.domain != DOMAIN or dtypes.get(node.input[1]) != onnx.TensorProto.FLOAT16:
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

    Models without ``ai.dsf`` nodes (``--lowering standard``) need no registration and load as usual.

    Args:
        path: the ``.onnx`` file; its external data stays next to it and is resolved relative to it.
        providers: execution providers, default ``["CPUExecutionProvider"]``. With ``CUDAExecutionProvider`` the
            ``ai.dsf`` nodes still run on the CPU (the Python kernels declare no device), and ONNX Runtime copies
            their inputs and outputs between device and host.
        session_options: an ``onnxruntime.SessionOptions`` to extend (default: a new one).

    Raises:
        ImportError: the model has ``ai.dsf`` nodes and onnxruntime-extensions is not installed.
    """
    import onnxruntime as ort

    path = Path(path)
    options = session_options or ort.SessionOptions()
    providers = list(providers or ["CPUExecutionProvider"])
    model = onnx.load(str(path), load_external_data=False)
    if not any(node.domain == DOMAIN for node in model.graph.node):
        return ort.InferenceSession(str(path), options, providers=providers)
    options.register_custom_ops_library(register_python_ops())
    if _cast_float16_nodes(model):
        logger.info("%s: float16 ai.dsf nodes run through float32 casts (Python kernels take float32 only)", path)
        options.add_session_config_entry(
            "session.model_external_initializers_file_folder_path", str(path.resolve().parent)
        )
        return ort.InferenceSession(model.SerializeToString(), options, providers=providers)
    return ort.InferenceSession(str(path), options, providers=providers)
