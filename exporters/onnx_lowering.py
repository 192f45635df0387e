"""Lower ``ai.dsf`` nodes to standard ONNX operators (opset >= 18), so stock ONNX Runtime runs the model.

Every factor keeps its packed initializers (values, int16/int32 column indices or uint8 bitmask, int32 row
offsets) and is decoded inside the graph into its dense transpose ``Fᵀ`` [cols, rows]:

* ``csr``: row ids from ``row_ptr`` (``ScatterElements(add)`` of ones at the row starts, then ``CumSum``),
  flat positions ``col·rows + row``, ``ScatterND`` into zeros;
* ``bitmask``: ``BitShift``/``BitwiseAnd`` unpack the bits, an exclusive ``CumSum`` over them gives each element
  its position among the values (stored in row-major order), ``Where`` sends clear bits to an appended zero and
  ``Gather`` places the values (no ``NonZero``: ONNX Runtime does not constant-fold it);
* ``bsr``: block rows from ``row_ptr`` as for ``csr``, ``ScatterND`` of the blocks into a zero block grid,
  ``Transpose``/``Reshape``/``Slice`` to the unpadded transpose.

then ``Y = MatMul(X, Wᵀ)``, where ``DSFLinear`` forms ``Wᵀ = (A·B)ᵀ = MatMul(Bᵀ, Aᵀ)`` in the graph. All of
this depends on initializers only, so ONNX Runtime's constant folding (any optimization level but
``ORT_DISABLE_ALL``) replaces it by one dense ``Wᵀ`` per layer when the session is created: the file stays packed,
the memory at run time is that of the dense model (keeping ``A`` and ``B`` apart would fold to ``out·r + r·in``
dense elements, up to 1.5x the dense layer). See docs/onnx.md for measurements.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from exporters.onnx_ops import DOMAIN, DSF_LINEAR, SPARSE_LINEAR, factor_inputs

__all__ = ["MIN_OPSET", "lower_to_standard"]

logger = logging.getLogger(__name__)

MIN_OPSET = 18  # BitwiseAnd


class _Builder:
    """Collects the nodes and constant initializers that replace one ``ai.dsf`` node, with unique names."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.nodes: list[onnx.NodeProto] = []
        self.constants: list[TensorProto] = []
        self._count = 0

    def name(self, hint: str) -> str:
        self._count += 1
        return f"{self.prefix}/{hint}_{self._count}"

    def const(self, hint: str, array: np.ndarray) -> str:
        name = self.name(hint)
        self.constants.append(numpy_helper.from_array(np.asarray(array), name))
        return name

    def ints(self, hint: str, *values: int) -> str:
        """An int64 [len(values)] constant (shapes, axes, slice bounds)."""
        return self.const(hint, np.array(values, np.int64))

    def op(self, op_type: str, inputs: list[str], hint: str, **attrs) -> str:
        out = self.name(hint)
        self.nodes.append(helper.make_node(op_type, inputs, [out], name=out, **attrs))
        return out

    def fill(self, shape: list[int], elem_type: int, value: int = 0) -> str:
        """``ConstantOfShape``: a tensor of ``shape`` filled with ``value`` (costs no file bytes)."""
        scalar = helper.make_tensor("value", elem_type, [1], [value])
        return self.op("ConstantOfShape", [self.ints("shape", *shape)], "fill", value=scalar)

    def row_ids(self, row_ptr: str, n_rows: int, total: int, index_type: int) -> str:
        """[total] of ``index_type`` (int32/int64): the row owning each stored entry, from an int32
        ``[n_rows + 1]`` offset array: ones added at each row start ``row_ptr[1:n_rows]``, then a running sum."""
        rp = row_ptr if index_type == TensorProto.INT32 else self.op("Cast", [row_ptr], "row_ptr", to=index_type)
        starts = self.op("Slice", [rp, self.ints("one", 1), self.ints("rows", n_rows)], "starts")
        ones = self.fill([max(n_rows - 1, 0)], index_type, 1)
        marks = self.op("ScatterElements", [self.fill([total + 1], index_type), starts, ones], "marks",
                        axis=0, reduction="add")
        counted = self.op("CumSum", [marks, self.const("axis", np.array(0, np.int64))], "cumsum")
        return self.op("Slice", [counted, self.ints("zero", 0), self.ints("total", total)], "row_ids")


def _index_type(numel: int) -> int:
    """int32 for index arithmetic while every position fits (halves the memory of constant folding), else int64."""
    return TensorProto.INT32 if numel < 2**31 else TensorProto.INT64


@dataclass(frozen=True)
class _Factor:
    """One factor's inputs: initializer names in ``factor_inputs`` order, their dims, the matrix shape, dtype."""

    parts: list[str]
    dims: list[list[int]]
    shape: tuple[int, int]
    dtype: int


def _csr_transposed(b: _Builder, f: _Factor) -> str:
    rows, cols = f.shape
    values, col_idx, row_ptr = f.parts
    itype = _index_type(rows * cols)
    row = b.row_ids(row_ptr, rows, f.dims[0][0], itype)
    col = b.op("Cast", [col_idx], "col", to=itype)
    n_rows = b.const("rows", np.array(rows, helper.tensor_dtype_to_np_dtype(itype)))
    flat = b.op("Add", [b.op("Mul", [col, n_rows], "col_x_rows"), row], "flat")
    flat = b.op("Cast", [flat], "flat64", to=TensorProto.INT64)  # ScatterND takes int64 indices only
    flat = b.op("Unsqueeze", [flat, b.ints("axis", 1)], "flat_idx")
    dense = b.op("ScatterND", [b.fill([cols * rows], f.dtype), flat, values], "scatter")
    return b.op("Reshape", [dense, b.ints("shape", cols, rows)], "dense_t")


def _bitmask_transposed(b: _Builder, f: _Factor) -> str:
    rows, cols = f.shape
    values, bitmask, _ = f.parts
    expanded = b.op("Unsqueeze", [bitmask, b.ints("axis", -1)], "bytes")
    shifts = b.const("shifts", np.arange(8, dtype=np.uint8))
    bits = b.op("BitwiseAnd", [b.op("BitShift", [expanded, shifts], "shifted", direction="RIGHT"),
                               b.const("one", np.array(1, np.uint8))], "bits")
    bits = b.op("Reshape", [bits, b.ints("shape", rows, f.dims[1][1] * 8)], "bit_rows")
    bits = b.op("Slice", [bits, b.ints("zero", 0), b.ints("cols", cols), b.ints("axis", 1)], "bit_cols")
    flat_bits = b.op("Reshape", [bits, b.ints("shape", rows * cols)], "flat_bits")
    # A set bit at p takes values[set bits before p] (values are in row-major order); a clear bit takes the
    # appended zero at index nnz. Integer Where only: ONNX Runtime has no CPU float16 Where to fold with.
    itype = _index_type(rows * cols + 1)
    counts = b.op("Cast", [flat_bits], "counts", to=itype)
    position = b.op("CumSum", [counts, b.const("axis", np.array(0, np.int64))], "position", exclusive=1)
    mask = b.op("Cast", [flat_bits], "mask", to=TensorProto.BOOL)
    nnz = b.const("nnz", np.array(f.dims[0][0], helper.tensor_dtype_to_np_dtype(itype)))
    position = b.op("Where", [mask, position, nnz], "source")
    zero = b.const("zero", np.zeros(1, helper.tensor_dtype_to_np_dtype(f.dtype)))
    padded = b.op("Concat", [values, zero], "padded_values", axis=0)
    dense = b.op("Gather", [padded, position], "dense_flat", axis=0)
    dense = b.op("Reshape", [dense, b.ints("shape", rows, cols)], "dense")
    return b.op("Transpose", [dense], "dense_t", perm=[1, 0])


def _bsr_transposed(b: _Builder, f: _Factor) -> str:
    rows, cols = f.shape
    values, col_idx, row_ptr = f.parts
    n_blocks, block = f.dims[0][0], f.dims[0][1]
    n_brows, n_bcols = -(-rows // block), -(-cols // block)
    axis1 = b.ints("axis", 1)
    brow = b.op("Unsqueeze", [b.row_ids(row_ptr, n_brows, n_blocks, TensorProto.INT64), axis1], "brow")
    bcol = b.op("Unsqueeze", [b.op("Cast", [col_idx], "bcol64", to=TensorProto.INT64), axis1], "bcol")
    idx = b.op("Concat", [brow, bcol], "idx", axis=1)
    grid = b.op("ScatterND", [b.fill([n_brows, n_bcols, block, block], f.dtype), idx, values], "grid")
    grid = b.op("Transpose", [grid], "grid_t", perm=[1, 3, 0, 2])  # [bcol, j, brow, i]
    padded = b.op("Reshape", [grid, b.ints("shape", n_bcols * block, n_brows * block)], "padded_t")
    return b.op("Slice", [padded, b.ints("zero", 0, 0), b.ints("end", cols, rows), b.ints("axes", 0, 1)], "dense_t")


_DECODERS = {"csr": _csr_transposed, "bitmask": _bitmask_transposed, "bsr": _bsr_transposed}


def _factor(initializers: dict[str, TensorProto], parts: list[str], shape: tuple[int, int]) -> _Factor:
    missing = [p for p in parts if p not in initializers]
    if missing:
        raise ValueError(f"{DOMAIN} input {missing[0]!r} is not an initializer; only exported models can be lowered")
    protos = [initializers[p] for p in parts]
    return _Factor(parts, [list(t.dims) for t in protos], shape, protos[0].data_type)


def _product(b: _Builder, transposed: list[str], dtype: int) -> str:
    """``(A·B)ᵀ = Bᵀ·Aᵀ`` in float32, cast back to ``dtype``: ONNX Runtime has no CPU float16 MatMul to
    constant-fold with, and would otherwise multiply the factors out on every call."""
    if dtype == TensorProto.FLOAT:
        return b.op("MatMul", transposed, "weight_t")
    wide = [b.op("Cast", [t], "factor_f32", to=TensorProto.FLOAT) for t in transposed]
    return b.op("Cast", [b.op("MatMul", wide, "weight_t_f32")], "weight_t", to=dtype)


def _lower_node(node: onnx.NodeProto, initializers: dict[str, TensorProto]) -> _Builder:
    """The standard-op replacement of one ``ai.dsf`` node; its output keeps the node's output name."""
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    layout = attrs["layout"].decode()
    factor_inputs(layout)  # raises for a layout without an ai.dsf encoding
    out, cols = int(attrs["out_features"]), int(attrs["in_features"])
    if node.op_type == DSF_LINEAR:
        inner = int(attrs["inner_dim"])
        factors = {"B": (list(node.input[4:7]), (inner, cols)), "A": (list(node.input[1:4]), (out, inner))}
    elif node.op_type == SPARSE_LINEAR:
        factors = {"W": (list(node.input[1:4]), (out, cols))}
    else:
        raise ValueError(f"unknown operator {DOMAIN}::{node.op_type}; expected {DSF_LINEAR} or {SPARSE_LINEAR}")
    b = _Builder(f"{node.name or node.output[0]}/std")
    decoded = [_factor(initializers, parts, shape) for parts, shape in factors.values()]
    transposed = [_DECODERS[layout](b, f) for f in decoded]
    weight_t = transposed[0] if len(transposed) == 1 else _product(b, transposed, decoded[0].dtype)
    b.nodes.append(helper.make_node("MatMul", [node.input[0], weight_t], [node.output[0]], name=f"{b.prefix}/matmul"))
    return b


def lower_to_standard(model: onnx.ModelProto) -> onnx.ModelProto:
    """Replace every ``ai.dsf`` node of ``model`` (in place) by standard operators; returns ``model``.

    Args:
        model: an exported model whose ``ai.dsf`` inputs are initializers; its external data need not be loaded
            (only initializer dims and dtypes are read).

    Raises:
        ValueError: the default-domain opset is below 18, or a node is not a known ``ai.dsf`` operator.
    """
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    if opset < MIN_OPSET:
        raise ValueError(f"--lowering standard needs opset >= {MIN_OPSET} (BitwiseAnd), the model has {opset}")
    graph = model.graph
    initializers = {t.name: t for t in graph.initializer}
    nodes, constants, replaced_inputs, lowered = [], [], set(), 0
    for node in graph.node:
        if node.domain != DOMAIN:
            nodes.append(node)
            continue
        built = _lower_node(node, initializers)
        nodes.extend(built.nodes)
        constants.extend(built.constants)
        replaced_inputs.update(node.input)
        lowered += 1
    del graph.node[:]
    graph.node.extend(nodes)
    # The bitmask decoding does not read row_ptr (it is implied by the bits): drop what no node reads any more.
    used = {name for node in nodes for name in node.input}
    for i in reversed(range(len(graph.initializer))):
        name = graph.initializer[i].name
        if name in replaced_inputs and name not in used:
            del graph.initializer[i]
    graph.initializer.extend(constants)
    kept = [o for o in model.opset_import if o.domain != DOMAIN]
    del model.opset_import[:]
    model.opset_import.extend(kept)
    logger.info("lowered %d %s nodes to standard operators", lowered, DOMAIN)
    return model
