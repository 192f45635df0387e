"""validate() and from_tensors(): every inconsistency is a FormatError naming the tensor; hostile input never
reads out of bounds or hangs."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from hypothesis import event, given, settings
from hypothesis import strategies as st

from dsf_runtime.formats import BitmaskMatrix, BSRMatrix, CSRMatrix, DenseMatrix, FormatError, from_meta

from tests.dsf_runtime.helpers import single_thread  # noqa: F401 (autouse fixture)

FIX = "; re-export the checkpoint"
BLOCKS = "expected [b, b] with b in (16, 32, 64)"


def _csr() -> CSRMatrix:
    # [[0, 1, 2, 0, 0], [3, 0, 0, 0, 4], [0, 0, 0, 0, 0]]
    matrix = torch.tensor([[0, 1, 2, 0, 0], [3, 0, 0, 0, 4], [0, 0, 0, 0, 0]], dtype=torch.float16)
    return CSRMatrix.from_dense(matrix)


def _with(packed, **parts):
    return dataclasses.replace(packed, **{k: torch.tensor(v, dtype=getattr(packed, k).dtype) for k, v in parts.items()})


@pytest.mark.parametrize(
    ("parts", "message"),
    [
        ({"row_ptr": [1, 2, 4, 4]}, "'m.A.row_ptr' starts at 1, expected 0"),
        ({"row_ptr": [0, 3, 2, 4]}, "'m.A.row_ptr' decreases at row 1 (3 -> 2)"),
        ({"row_ptr": [0, 2, 4, 3]}, "'m.A.row_ptr' decreases at row 2 (4 -> 3)"),
        ({"row_ptr": [0, 2, 4, 9]}, "'m.A.row_ptr' ends at 9, expected 4 (the number of stored values)"),
        ({"row_ptr": [0, 2, 99, 4]}, "'m.A.row_ptr' decreases at row 2 (99 -> 4)"),
        ({"row_ptr": [0, -7, 4, 4]}, "'m.A.row_ptr' decreases at row 0 (0 -> -7)"),
        ({"col_idx": [1, 2, 0, 5]}, "'m.A.col_idx' holds column 5 at position 3 (row 1), outside [0, 5)"),
        ({"col_idx": [1, -2, 0, 4]}, "'m.A.col_idx' holds column -2 at position 1 (row 0), outside [0, 5)"),
        ({"col_idx": [2, 1, 0, 4]}, "'m.A.col_idx' is not strictly ascending within row 0 (position 1: 1 after 2)"),
        ({"col_idx": [1, 2, 4, 4]}, "'m.A.col_idx' is not strictly ascending within row 1 (position 3: 4 after 4)"),
    ],
)
def test_csr_index_errors(parts: dict, message: str) -> None:
    with pytest.raises(FormatError) as info:
        _with(_csr(), **parts).validate("m.A")
    assert str(info.value) == message + FIX
    assert info.value.tensor == message.split("'")[1]


def test_csr_dtype_and_shape_errors() -> None:
    packed = _csr()
    cases = [
        (
            dataclasses.replace(packed, values=packed.values.int()),
            "'m.A.values' is int32, expected float16 or bfloat16 or float32 or int8 or float8_e4m3fn",
        ),
        (dataclasses.replace(packed, col_idx=packed.col_idx.long()), "'m.A.col_idx' is int64, expected int16 or int32"),
        (dataclasses.replace(packed, row_ptr=packed.row_ptr.long()), "'m.A.row_ptr' is int64, expected int32"),
        (dataclasses.replace(packed, row_ptr=packed.row_ptr[:-1]), "'m.A.row_ptr' has shape [3], expected [4]"),
        (dataclasses.replace(packed, col_idx=packed.col_idx[:-1]), "'m.A.col_idx' has shape [3], expected [4]"),
        (dataclasses.replace(packed, values=packed.values.view(2, 2)), "'m.A.values' has shape [2, 2], expected [*]"),
        (dataclasses.replace(packed, shape=(3, 40000)), "'m.A.col_idx' is int16, expected int32"),
    ]
    for bad, message in cases:
        with pytest.raises(FormatError) as info:
            bad.validate("m.A")
        assert str(info.value) == message + FIX


def test_bitmask_errors() -> None:
    matrix = torch.tensor([[0, 1, 2], [3, 0, 0]], dtype=torch.float32)
    packed = BitmaskMatrix.from_dense(matrix)
    assert packed.bitmask.tolist() == [[0b110], [0b001]]
    cases = [
        ({"bitmask": [[0b111], [0b001]]}, "'m.W.bitmask' row 0 has 3 bits set but row_ptr gives it 2 values"),
        ({"bitmask": [[0b010], [0b101]]}, "'m.W.bitmask' row 0 has 1 bits set but row_ptr gives it 2 values"),
        ({"bitmask": [[0b110], [0b1001]]}, "'m.W.bitmask' sets padding bits beyond column 2 in row 1"),
        ({"row_ptr": [0, 1, 3]}, "'m.W.bitmask' row 0 has 2 bits set but row_ptr gives it 1 values"),
        ({"row_ptr": [0, 2, 2]}, "'m.W.row_ptr' ends at 2, expected 3 (the number of stored values)"),
        ({"bitmask": [[0b110, 0]], "row_ptr": [0, 2, 3]}, "'m.W.bitmask' has shape [1, 2], expected [2, 1]"),
    ]
    for parts, message in cases:
        with pytest.raises(FormatError) as info:
            _with(packed, **parts).validate("m.W")
        assert str(info.value) == message + FIX


def test_bsr_errors() -> None:
    matrix = torch.zeros(40, 40)
    matrix[0, 0] = matrix[0, 20] = matrix[20, 0] = 1.0
    packed = BSRMatrix.from_dense(matrix, block_size=16)
    assert packed.col_idx.tolist() == [0, 1, 0] and packed.row_ptr.tolist() == [0, 2, 3, 3]
    cases = [
        (_with(packed, col_idx=[0, 3, 0]), "'b.col_idx' holds block column 3 at position 1 (row 0), outside [0, 3)"),
        (
            _with(packed, col_idx=[1, 0, 0]),
            "'b.col_idx' is not strictly ascending within row 0 (position 1: 0 after 1)",
        ),
        (_with(packed, row_ptr=[0, 2, 3]), "'b.row_ptr' has shape [3], expected [4]"),
        (dataclasses.replace(packed, values=torch.zeros(3, 8, 8)), f"'b.values' has blocks of [8, 8], {BLOCKS}"),
        (dataclasses.replace(packed, values=torch.zeros(3, 16, 32)), f"'b.values' has blocks of [16, 32], {BLOCKS}"),
        (dataclasses.replace(packed, values=torch.zeros(3, 16)), "'b.values' has shape [3, 16], expected [*, *, *]"),
    ]
    for bad, message in cases:
        with pytest.raises(FormatError) as info:
            bad.validate("b")
        assert str(info.value) == message + FIX
    with pytest.raises(FormatError, match=r"'b.values' has 16x16 blocks, expected 32"):
        BSRMatrix.from_tensors(packed.to_tensors("b"), "b", (40, 40), block_size=32)


def test_dense_errors() -> None:
    packed = DenseMatrix.from_dense(torch.ones(2, 3))
    with pytest.raises(FormatError, match=r"^'d.values' has shape \[2, 3\], expected \[3, 2\]"):
        dataclasses.replace(packed, shape=(3, 2)).validate("d")


def test_missing_part_and_manifest_mismatch() -> None:
    packed = _csr()
    tensors = packed.to_tensors("x.A")
    del tensors["x.A.col_idx"]
    with pytest.raises(FormatError) as info:
        CSRMatrix.from_tensors(tensors, "x.A", (3, 5))
    assert str(info.value) == "'x.A.col_idx' is missing; re-export the checkpoint (it must hold every part)"
    for key, value, message in [
        ("dtype", "bfloat16", "'x.A.values' has dtype 'float16' but the manifest says 'bfloat16'"),
        ("index_dtype", "int32", "'x.A.col_idx' has index_dtype 'int16' but the manifest says 'int32'"),
        ("nnz", 5, "'x.A.values' has nnz 4 but the manifest says 5"),
    ]:
        meta = {**packed.meta(), key: value}
        with pytest.raises(FormatError, match="^" + message.replace("[", r"\[")):
            from_meta(packed.to_tensors("x.A"), "x.A", meta)
    with pytest.raises(FormatError, match=r"'x.A.row_ptr' has shape \[4\], expected \[5\]"):
        from_meta(packed.to_tensors("x.A"), "x.A", {**packed.meta(), "shape": [4, 5]})


@st.composite
def hostile(draw):
    """Arbitrary index tensors for a small matrix: consistent offsets with random indices, or random offsets."""
    layout = draw(st.sampled_from(["csr", "bitmask", "bsr"]))
    rows, cols = draw(st.integers(0, 40)), draw(st.integers(0, 40))
    n_rows = -(-rows // 16) if layout == "bsr" else rows
    if draw(st.booleans()):  # consistent offsets (the indices decide), sometimes off by one at the end
        counts = draw(st.lists(st.integers(0, 3), min_size=n_rows, max_size=n_rows))
        row_ptr = [0] + [sum(counts[: i + 1]) for i in range(n_rows)]
        nnz = row_ptr[-1] + draw(st.sampled_from([0, 0, 0, 1]))
    else:
        ints = st.integers(-3, 2**31 - 1) if draw(st.booleans()) else st.integers(-2, 12)
        n_ptr = n_rows + 1 + draw(st.sampled_from([0, 0, -1, 1]))
        row_ptr, nnz = draw(st.lists(ints, min_size=n_ptr, max_size=n_ptr)), draw(st.integers(0, 12))
    row_ptr = torch.tensor(row_ptr, dtype=torch.int32)
    if layout == "bsr":
        idx = torch.tensor(draw(st.lists(st.integers(-1, 3), min_size=nnz, max_size=nnz)), dtype=torch.int32)
        return BSRMatrix(torch.ones(nnz, 16, 16), idx, row_ptr, (rows, cols))
    if layout == "csr":
        idx = torch.tensor(draw(st.lists(st.integers(-1, 41), min_size=nnz, max_size=nnz)), dtype=torch.int16)
        return CSRMatrix(torch.ones(nnz, dtype=torch.float16), idx, row_ptr, (rows, cols))
    width = (cols + 7) // 8 + draw(st.sampled_from([0, 0, 0, 1]))
    byte = st.sampled_from([0, 1, 3, 128, 255]) | st.integers(0, 255)
    bits = torch.tensor(draw(st.lists(byte, min_size=rows * width, max_size=rows * width)), dtype=torch.uint8)
    return BitmaskMatrix(torch.ones(nnz), bits.view(rows, width), row_ptr, (rows, cols))


@settings(max_examples=300, deadline=None)
@given(packed=hostile())
def test_hostile_input_is_rejected_or_safe(packed) -> None:
    try:
        packed.validate("h")
    except FormatError as exc:
        assert exc.tensor.startswith("h.")
        event(f"rejected: {exc.tensor[2:]} {exc.problem.split()[0]}")
        return
    event("valid")
    dense = packed.to_dense()  # a validated matrix always unpacks, without reading out of bounds
    assert dense.shape == packed.shape
    if packed.layout != "bsr":
        assert int(torch.count_nonzero(dense)) == packed.nnz
