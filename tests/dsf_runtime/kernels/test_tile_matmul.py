"""The ``tile`` layout (bitmap per tile + packed values) and its tensor-core kernel ``tile_matmul``: every token count
1–64 and a few larger, odd shapes, empty and all-dense tiles, split-K, the DSF chain through ``dispatch``, against a
float64 reference with NaN-poisoned outputs; files round-tripped bit-exact; bad tensors named."""

import pytest
import torch

from dsf_runtime.formats import FormatError, TileMatrix, from_meta, pack, tile_bytes
from dsf_runtime.kernels.dispatch import linear
from dsf_runtime.kernels.tile_matmul import tile_matmul, tile_matmul_reference
from dsf_runtime.kernels.tile_unpack import tile_unpack
from tests.dsf_runtime.kernels.conftest import rel_err, sparse_random

TILES = [(16, 64), (32, 32), (64, 64)]


def _matrix(rows: int, cols: int, gen: torch.Generator, dtype=torch.float16) -> torch.Tensor:
    """~40% dense, plus an all-dense 16×32 block (rows 0..15, columns 0..31; a whole tile at 32×32 would need 32
    rows) and an empty band (rows 16..31: empty tiles)."""
    w = sparse_random(rows, cols, 0.4, dtype=torch.float32, gen=gen)
    w[:16, :32] = torch.randn(min(rows, 16), min(cols, 32), generator=gen) + 3.0
    w[16:32] = 0
    return w.to(dtype)


def _check(w: torch.Tensor, tokens: int, gen: torch.Generator, tile=(16, 64), config=None, device="cpu",
           bias=True) -> None:
    m = TileMatrix.from_dense(w, tile_rows=tile[0], tile_cols=tile[1])
    m.validate("w")
    x = torch.randn(tokens, w.shape[1], generator=gen).to(w.dtype)
    b = torch.randn(w.shape[0], generator=gen).to(w.dtype) if bias else None
    out = torch.full((tokens, w.shape[0]), float("nan"), dtype=w.dtype, device=device)
    y = tile_matmul(x.to(device), m.to(device), None if b is None else b.to(device), config=config, out=out)
    assert y is out
    assert rel_err(y, tile_matmul_reference(x, m, b)) <= (1e-2 if w.dtype == torch.float16 else 2e-2)


@pytest.mark.parametrize("tokens", range(1, 65))
def test_every_token_count_up_to_64(device, tokens):
    gen = torch.Generator().manual_seed(tokens)
    _check(_matrix(37, 83, gen), tokens, gen, TILES[tokens % 3], {"BN": (16, 32, 64)[tokens % 3]}, device)


@pytest.mark.parametrize("tokens", [100, 256])
def test_larger_batches_and_split_k(device, tokens):
    gen = torch.Generator().manual_seed(tokens)
    w = _matrix(50, 200, gen)
    _check(w, tokens, gen, (16, 64), {"BN": 64, "SPLIT_K": 1}, device)
    _check(w, tokens, gen, (16, 32), {"BN": 32, "SPLIT_K": 3}, device)  # partial sums added atomically


def test_bf16_fp32_and_edge_matrices(device):
    gen = torch.Generator().manual_seed(9)
    _check(_matrix(40, 70, gen, torch.bfloat16), 5, gen, device=device)
    _check(torch.zeros(20, 33), 4, gen, device=device, bias=True)  # every tile empty: y = bias
    _check(torch.randn(16, 64, generator=gen).half(), 3, gen, (16, 64), device=device)  # one all-dense tile
    _check(torch.randn(1, 1, generator=gen).half() + 1, 2, gen, (64, 64), {"SPLIT_K": 4}, device, bias=False)
    _check(torch.randn(70, 130, generator=gen), 6, gen, (32, 64), device=device)  # fp32 values, all-dense tiles
    _check(_matrix(20, 300, gen), 3, gen, (16, 64), {"SPLIT_K": 4}, device)  # 5 tile columns over 4 splits


@pytest.mark.parametrize("path", ["auto", "tile", "prefill", "materialize"])
def test_dsf_chain_through_dispatch(device, path):
    gen = torch.Generator().manual_seed(4)
    B = sparse_random(48, 83, 0.3, gen=gen)
    A = sparse_random(37, 48, 0.3, gen=gen)
    kA, kB = (TileMatrix.from_dense(f).to(device) for f in (A, B))
    x = torch.randn(9, 83, generator=gen).half()
    bias = torch.randn(37, generator=gen).half()
    y = linear(x.to(device), [kA, kB], bias.to(device), path=path)
    assert y.dtype == torch.float16
    assert rel_err(y, (x.double() @ B.double().T) @ A.double().T + bias.double()) <= 1e-2


@pytest.mark.parametrize("tile", TILES)
def test_tile_unpack_is_exact(device, tile):
    """The prefill/materialize paths' unpack kernel: the dense matrix bit for bit (empty, all-dense and edge tiles),
    into a strided ``out`` poisoned with NaN."""
    gen = torch.Generator().manual_seed(tile[0])
    for w in (_matrix(37, 83, gen), _matrix(40, 70, gen, torch.bfloat16), torch.zeros(20, 33, dtype=torch.float16),
              torch.randn(70, 130, generator=gen)):
        m = TileMatrix.from_dense(w, tile_rows=tile[0], tile_cols=tile[1]).to(device)
        buffer = torch.full((w.shape[0], w.shape[1] + 5), float("nan"), dtype=w.dtype, device=device)
        got = tile_unpack(m, buffer[:, 2 : 2 + w.shape[1]])
        assert torch.equal(got.cpu(), w), (tile, w.dtype)
        assert bool(buffer[:, :2].isnan().all() and buffer[:, 2 + w.shape[1]:].isnan().all())  # nothing outside
    assert tile_unpack(m, dtype=torch.float32).dtype == torch.float32
    with pytest.raises(ValueError, match=r"out must be \[70, 130\]"):
        tile_unpack(m, torch.empty(70, 129, device=device))


def test_files_round_trip_and_bytes():
    gen = torch.Generator().manual_seed(1)
    w = _matrix(45, 150, gen)
    for tile in TILES:
        m = pack(w, "tile", tile_rows=tile[0], tile_cols=tile[1])
        again = from_meta(m.to_tensors("w"), "w", m.meta())
        assert all(torch.equal(again.to_tensors()[k], t) for k, t in m.to_tensors().items())
        assert torch.equal(again.to_dense(), w)
        assert m.nbytes == tile_bytes(45, 150, int((w != 0).sum()), *tile)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda t: t.update({"w.tile_ptr": t["w.tile_ptr"].flip(0)}), r"'w.tile_ptr' starts at"),
        (lambda t: t["w.bitmap"].__setitem__((-1, -1), 0x80), "'w.bitmap' tile 8 sets bits outside the 45x150"),
        (lambda t: t["w.bitmap"].__setitem__((7, -1), 0x01), "'w.bitmap' tile 7 sets bits outside the 45x150"),
        (lambda t: t["w.bitmap"].__setitem__((2, 7), 0x80), "'w.bitmap' tile 2 sets bits outside the 45x150"),
        (lambda t: t["w.bitmap"].__setitem__((0, 0), t["w.bitmap"][0, 0] ^ 1), "'w.bitmap' tile 0 has"),
        (lambda t: t.update({"w.values": t["w.values"].int()}), "'w.values' is int32"),
    ],
)
def test_bad_tensors_name_the_tensor(change, message):
    m = pack(_matrix(45, 150, torch.Generator().manual_seed(2)), "tile")
    tensors = {k: v.clone() for k, v in m.to_tensors("w").items()}
    change(tensors)
    with pytest.raises(FormatError, match=message):
        from_meta(tensors, "w", m.meta())
    for bad in (8, 16.0, True):
        with pytest.raises(FormatError, match="tile_rows must be one of"):
            from_meta(m.to_tensors("w"), "w", m.meta() | {"tile_rows": bad})
