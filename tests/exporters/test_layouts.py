"""``convert_layout``: packed layouts and dtypes, bit-exact round trips, atomic output and clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

import exporters.layouts
from dsf_runtime import CheckpointError, from_pretrained, open_compressed
from exporters.config import ExportConfig
from exporters.layouts import convert_layout


def _tensors(directory: Path) -> dict[str, torch.Tensor]:
    out = {}
    for file in sorted(directory.glob("*.safetensors")):
        with safe_open(file, framework="pt") as f:
            out.update({k: f.get_tensor(k) for k in f.keys()})
    return out


def _assert_same_tensors(a: Path, b: Path) -> None:
    ta, tb = _tensors(a), _tensors(b)
    assert sorted(ta) == sorted(tb)
    for name in ta:
        assert ta[name].dtype == tb[name].dtype and torch.equal(ta[name], tb[name]), name


def _logits(directory: Path) -> torch.Tensor:
    ids = torch.randint(0, 49152, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return from_pretrained(directory)(input_ids=ids, use_cache=False).logits


@pytest.mark.parametrize("layout", ["csr", "bitmask", "bsr"])
def test_packed_to_dense_and_back_is_bit_exact(compressed_dir: Path, tmp_path: Path, layout: str) -> None:
    packed = convert_layout(compressed_dir, tmp_path / layout, ExportConfig(layout=layout, block_size=16))
    dense = convert_layout(packed, tmp_path / "dense", ExportConfig(layout="dense"))
    again = convert_layout(dense, tmp_path / "again", ExportConfig(layout=layout, block_size=16))
    _assert_same_tensors(packed, again)
    src, pk, dn = open_compressed(compressed_dir), open_compressed(packed), open_compressed(dense)
    for fqn, entry in src.layers.items():
        assert {f["layout"] for f in pk.layers[fqn]["factors"].values()} == {layout}
        p, d = pk.load_layer(fqn), dn.load_layer(fqn)
        for name, factor in p.factors.items():
            assert torch.equal(factor.to_dense(), d.factors[name].values), (fqn, name)
        if entry["kind"] == "dsf":  # the fixture's one empty inner index is dropped, nothing else
            assert p.inner_dim == entry["inner_dim"] - 1
        torch.testing.assert_close(p.weight(), src.load_layer(fqn).weight(), rtol=0, atol=1e-6)
    assert (packed / "tokenizer.json").read_bytes() == (compressed_dir / "tokenizer.json").read_bytes()
    assert json.loads((packed / "dsf_manifest.json").read_text())["base_model"] == "smollm2-135m-2blocks"


@pytest.mark.parametrize("layout", ["nibble", "delta", "tile"])
def test_kernel_layout_export_round_trips_and_runs(compressed_dir: Path, tmp_path: Path, layout: str) -> None:
    """The GPU kernels' layouts are written as files: their tensors reload bit for bit, decode to the source's
    matrices, and the model runs on the CPU (pure-torch path) like the csr export."""
    kernel = convert_layout(compressed_dir, tmp_path / layout, ExportConfig(layout=layout, dtype="float16"))
    csr = convert_layout(compressed_dir, tmp_path / "csr", ExportConfig(layout="csr", dtype="float16"))
    again = convert_layout(convert_layout(kernel, tmp_path / "dense", ExportConfig(layout="dense")),
                           tmp_path / "again", ExportConfig(layout=layout))
    _assert_same_tensors(kernel, again)
    ck, cc = open_compressed(kernel), open_compressed(csr)
    for fqn, entry in ck.layers.items():
        assert {f["layout"] for f in entry["factors"].values()} == {layout}
        if layout == "nibble":
            assert all(f["group"] == 16 and 1 <= f["per_group"] <= 16 for f in entry["factors"].values())
        k, c = ck.load_layer(fqn), cc.load_layer(fqn)
        for name, factor in k.factors.items():
            assert torch.equal(factor.to_dense(), c.factors[name].to_dense()), (fqn, name)
    torch.testing.assert_close(_logits(kernel), _logits(csr), rtol=2e-3, atol=2e-3)


def test_packed_export_runs_like_the_source(compressed_dir: Path, tmp_path: Path) -> None:
    packed = convert_layout(compressed_dir, tmp_path / "csr", ExportConfig(layout="csr", embedding="keep"))
    torch.testing.assert_close(_logits(packed), _logits(compressed_dir), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_dtype_casts_values_and_floating_tensors(compressed_dir: Path, tmp_path: Path, dtype: torch.dtype) -> None:
    name = str(dtype).removeprefix("torch.")
    out = convert_layout(compressed_dir, tmp_path / name, ExportConfig(layout="bitmask", dtype=name, embedding="keep"))
    ckpt, src = open_compressed(out), open_compressed(compressed_dir)
    assert ckpt.manifest["dtype"] == name
    fqn = "model.layers.1.mlp.up_proj"
    layer = ckpt.load_layer(fqn)
    assert {f.dtype for f in layer.factors.values()} == {dtype}
    a, b = (src.load_layer(fqn).factors[k].to_dense().to(dtype) for k in ("A", "B"))
    keep = (a != 0).any(dim=0) & (b != 0).any(dim=1)  # inner indices still non-empty after rounding
    assert torch.equal(layer.factors["A"].to_dense(), a[:, keep])
    assert torch.equal(layer.factors["B"].to_dense(), b[keep])
    assert ckpt.load_tensors()["model.embed_tokens.weight"].dtype == dtype


def test_shards_follow_max_shard_size(compressed_dir: Path, tmp_path: Path) -> None:
    out = convert_layout(compressed_dir, tmp_path / "sharded", ExportConfig(layout="csr", max_shard_size="30MB"))
    assert len(list(out.glob("model-*-of-*.safetensors"))) > 1 and (out / "model.safetensors.index.json").exists()
    _assert_same_tensors(out, convert_layout(compressed_dir, tmp_path / "one", ExportConfig(layout="csr")))


def test_refuses_a_non_empty_destination_and_overwrites_on_request(compressed_dir: Path, tmp_path: Path) -> None:
    dst = tmp_path / "taken"
    dst.mkdir()
    (dst / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match=r"taken already exists and is not empty; pass --overwrite"):
        convert_layout(compressed_dir, dst, ExportConfig())
    assert [p.name for p in dst.iterdir()] == ["keep.txt"]
    convert_layout(compressed_dir, dst, ExportConfig(), overwrite=True)
    assert (dst / "dsf_manifest.json").exists() and not (dst / "keep.txt").exists()


def test_refuses_to_write_into_its_source(compressed_dir: Path) -> None:
    with pytest.raises(ValueError, match="overlaps the source"):
        convert_layout(compressed_dir, compressed_dir / "inner", ExportConfig())


def test_a_failed_export_leaves_nothing_behind(compressed_dir: Path, tmp_path: Path, monkeypatch) -> None:
    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(exporters.layouts, "save_compressed", broken)
    with pytest.raises(OSError, match="disk full"):
        convert_layout(compressed_dir, tmp_path / "out", ExportConfig())
    assert list(tmp_path.iterdir()) == []


def test_broken_source_gives_the_checkpoint_error(compressed_dir: Path, tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    broken.mkdir()
    for path in compressed_dir.iterdir():
        if path.name != "dsf_manifest.json":
            (broken / path.name).symlink_to(path)
    with pytest.raises(CheckpointError, match=r"dsf_manifest.json: missing; the directory is incomplete"):
        convert_layout(broken, tmp_path / "out", ExportConfig())
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"layout": "coo"}, "--layout 'coo' is not a layout; expected auto or one of bitmask, bsr, csr, delta, dense, nibble, tile"),
        ({"block_size": 8}, "--block-size 8 is not a bsr block size; expected one of 16, 32, 64"),
        ({"dtype": "int8"}, "--dtype 'int8' is not a value dtype; expected one of bfloat16, float16, float32"),
        ({"max_shard_size": "lots"}, "--max-shard-size 'lots' is not a size; use e.g. 2GiB, 500MB or a number of bytes"),
    ],
)
def test_bad_settings_name_their_flag(fields: dict, message: str) -> None:
    with pytest.raises(ValueError) as info:
        ExportConfig(**fields)
    assert str(info.value) == message
