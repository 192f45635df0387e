"""save_compressed / open_compressed: bit-exact round trip, shards, atomic writes, and every corruption's message."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from dsf_runtime import checkpoint
from dsf_runtime.checkpoint import (
    FILE_METADATA,
    INDEX_NAME,
    MANIFEST_NAME,
    SINGLE_FILE,
    CheckpointError,
    CompressedLayer,
    open_compressed,
    save_compressed,
)
from tests.dsf_runtime.helpers import random_sparse, single_thread  # noqa: F401 (autouse fixture)

FIX = "re-export the checkpoint"


def _layers() -> dict[str, CompressedLayer]:
    def dsf(layout, dtype, seed, **opts):
        factors = {"A": random_sparse(24, 16, 0.4, seed=seed), "B": random_sparse(16, 40, 0.4, seed=seed + 1)}
        return CompressedLayer.from_dense("dsf", factors, method="dsf", layout=layout, dtype=dtype, error=1.5,
                                          relative_error=0.01, **opts)

    return {
        "blocks.0.dense": dsf("dense", torch.float32, 0),
        "blocks.0.csr": dsf("csr", torch.float16, 2),
        "blocks.1.bitmask": dsf("bitmask", torch.bfloat16, 4),
        "blocks.1.bsr": dsf("bsr", torch.float16, 6, block_size=16),
        "blocks.2.single": CompressedLayer.from_dense(
            "single", {"W": random_sparse(24, 40, 0.5, seed=8)}, method="wanda", layout="bitmask",
            dtype=torch.float16, bias=random_sparse(1, 24, 1.0, seed=9)[0].half(),
        ),
    }


def _tensors() -> dict[str, torch.Tensor]:
    embed = random_sparse(50, 40, 1.0, seed=10)
    return {"embed.weight": embed, "norm.weight": torch.ones(40, dtype=torch.bfloat16),
            "head.weight": embed, "steps": torch.arange(3)}


def _save(directory: Path, **kwargs) -> Path:
    return save_compressed(directory, tensors=_tensors(), layers=_layers(),
                           config_source={"architectures": ["TinyForCausalLM"], "model_type": "tiny"},
                           info={"base_model": "tiny", "compression": {"density": 0.5}}, **kwargs)


@pytest.fixture
def saved(tmp_path: Path) -> Path:
    return _save(tmp_path / "ckpt")


def test_round_trip_is_bit_exact(saved: Path) -> None:
    layers, tensors = _layers(), _tensors()
    ckpt = open_compressed(saved)
    assert sorted(p.name for p in saved.iterdir()) == ["config.json", MANIFEST_NAME, SINGLE_FILE]
    for fqn, layer in layers.items():
        loaded = ckpt.load_layer(fqn)
        for attr in ("kind", "shape", "method", "error", "relative_error"):
            assert getattr(loaded, attr) == getattr(layer, attr)
        for key, factor in layer.factors.items():
            got = loaded.factors[key].to_tensors()
            for part, tensor in factor.to_tensors().items():
                assert got[part].dtype == tensor.dtype and torch.equal(got[part], tensor), (fqn, key, part)
        assert (layer.bias is None and loaded.bias is None) or torch.equal(loaded.bias, layer.bias)
    loaded = ckpt.load_tensors()
    assert sorted(loaded) == ["embed.weight", "norm.weight", "steps"]  # head.weight is tied: stored once
    assert all(torch.equal(loaded[k], tensors[k]) and loaded[k].dtype == tensors[k].dtype for k in loaded)
    assert ckpt.load_tensors(dtype=torch.float16)["steps"].dtype == torch.int64


def test_manifest_and_file_metadata(saved: Path) -> None:
    manifest = json.loads((saved / MANIFEST_NAME).read_text())
    assert manifest["format"] == "dsf-compressed" and manifest["format_version"] == 1
    assert (manifest["base_model"], manifest["architecture"], manifest["dtype"]) == ("tiny", "TinyForCausalLM", None)
    assert manifest["compression"] == {"density": 0.5}
    entry = manifest["layers"]["blocks.1.bsr"]
    layer = _layers()["blocks.1.bsr"]
    assert entry["inner_dim"] == layer.inner_dim <= 16 and entry["nnz"] == layer.nnz
    assert entry["density"] == pytest.approx(layer.nnz / (24 * 40)) and entry["bias"] is False
    assert entry["factors"]["A"]["block_size"] == 16 and entry["factors"]["A"]["index_dtype"] == "int32"
    assert manifest["layers"]["blocks.0.dense"]["inner_dim"] == 16  # the dense layout keeps k
    assert manifest["layers"]["blocks.2.single"]["inner_dim"] is None
    from safetensors import safe_open

    with safe_open(saved / SINGLE_FILE, "pt") as handle:
        assert handle.metadata() == {"format": "pt", "dsf_format": "dsf-compressed", "dsf_format_version": "1"}
        keys = list(handle.keys())
    assert "blocks.2.single.bias" in keys and not any(k.endswith(".weight") and "blocks" in k for k in keys)


def test_records(saved: Path) -> None:
    records = {r["name"]: r for r in open_compressed(saved).records()}
    layer = _layers()["blocks.2.single"]
    r = records["blocks.2.single"]
    summary = (r["kind"], r["method"], r["layouts"], r["shape"], r["inner_dim"])
    assert summary == ("single", "wanda", "bitmask", (24, 40), None)
    assert r["bytes"] == layer.nbytes and r["dense_fp16_bytes"] == 2 * 24 * 40 + (2 * 24 if layer.bias is not None else 0)
    assert records["blocks.1.bsr"]["layouts"] == "bsr/bsr" and records["blocks.0.dense"]["relative_error"] == 0.01


def test_config_directory_is_copied(tmp_path: Path) -> None:
    source = tmp_path / "base"
    source.mkdir()
    for name in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                 "chat_template.jinja", "model.safetensors", "pytorch_model.bin", "notes.txt"):
        (source / name).write_text("{}")
    out = save_compressed(tmp_path / "out", tensors={}, layers=_layers(), config_source=source)
    assert sorted(p.name for p in out.iterdir()) == [
        "chat_template.jinja", "config.json", MANIFEST_NAME, "generation_config.json", SINGLE_FILE,
        "tokenizer.json", "tokenizer_config.json",
    ]


def test_sharding_and_resave(tmp_path: Path) -> None:
    directory = _save(tmp_path / "ckpt", max_shard_bytes=2000)
    index = json.loads((directory / INDEX_NAME).read_text())
    shards = sorted(p.name for p in directory.glob("model-*.safetensors"))
    assert len(shards) > 2 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    assert sorted(set(index["weight_map"].values())) == shards and not (directory / SINGLE_FILE).exists()
    assert index["metadata"]["total_size"] == sum(t.nbytes for s in shards for t in load_file(directory / s).values())
    ckpt = open_compressed(directory)
    for fqn, layer in _layers().items():
        assert torch.equal(ckpt.load_layer(fqn).weight(), layer.weight())
        assert len({index["weight_map"][n] for n in index["weight_map"] if n.startswith(fqn + ".")}) == 1
    _save(directory)  # unsharded now: the stale shards and index go away
    assert sorted(p.name for p in directory.iterdir()) == ["config.json", MANIFEST_NAME, SINGLE_FILE]
    open_compressed(directory)


def test_interrupted_write_leaves_no_manifest(tmp_path: Path, monkeypatch) -> None:
    directory = _save(tmp_path / "ckpt", max_shard_bytes=2000)
    real_save = checkpoint.save_file
    calls = []

    def failing_save(tensors, filename, metadata=None):
        calls.append(filename)
        if len(calls) == 2:
            Path(filename).write_bytes(b"partial")
            raise OSError("disk full")
        real_save(tensors, filename, metadata=metadata)

    monkeypatch.setattr(checkpoint, "save_file", failing_save)
    with pytest.raises(OSError, match="disk full"):
        _save(directory, max_shard_bytes=2000)
    assert not (directory / MANIFEST_NAME).exists()
    assert not [p for p in directory.iterdir() if p.name.startswith(".")]  # no temporary file left behind
    with pytest.raises(CheckpointError) as info:
        open_compressed(directory)
    assert str(info.value) == (
        f"{directory / MANIFEST_NAME}: missing; the directory is incomplete (an interrupted write?) or not a "
        "compressed model; re-run `dsf compress` or `dsf export`"
    )


def test_save_rejects_bad_inputs_before_writing(tmp_path: Path) -> None:
    layers = _layers()
    bad_factor = layers["blocks.0.csr"].factors["A"]
    bad_factor.row_ptr[1] = 10_000
    tensors = {"blocks.0.dense.weight": torch.ones(2), "meta": torch.empty(2, device="meta")}
    with pytest.raises(ValueError) as info:
        save_compressed(tmp_path / "x", tensors=tensors, layers=layers, config_source={})
    assert str(info.value).splitlines() == [
        f"cannot save a compressed model to {tmp_path / 'x'}:",
        "  - 'blocks.0.dense.weight' belongs to compressed layer 'blocks.0.dense'; drop it from `tensors` "
        "(pass a bias as CompressedLayer.bias)",
        "  - 'meta' is not a dense tensor with data (got Tensor); pass real tensors",
        f"  - 'blocks.0.csr.A.row_ptr' decreases at row 1 (10000 -> {int(bad_factor.row_ptr[2])}); {FIX}",
    ]
    assert not (tmp_path / "x").exists()
    with pytest.raises(ValueError, match=r"info has unknown keys \['density'\]"):
        save_compressed(tmp_path / "x", tensors={}, layers={}, config_source={}, info={"density": 0.5})


def test_compressed_layer_checks_shapes() -> None:
    with pytest.raises(ValueError, match=r"factors A \[4, 3\], B \[2, 5\] do not form a \[4, 5\] layer"):
        CompressedLayer("dsf", (4, 5), {"A": _pack(4, 3), "B": _pack(2, 5)}, "m")
    with pytest.raises(ValueError, match=r"kind 'single' needs factors \['W'\], got \['A', 'B'\]"):
        CompressedLayer("single", (4, 5), {"A": _pack(4, 3), "B": _pack(3, 5)}, "m")
    with pytest.raises(ValueError, match=r"bias has shape \[5\], expected \[4\]"):
        CompressedLayer("single", (4, 5), {"W": _pack(4, 5)}, "m", bias=torch.ones(5))


def _pack(rows: int, cols: int):
    from dsf_runtime import pack

    return pack(torch.ones(rows, cols), "dense")


# ---------------------------------------------------------------- corruptions: each names the file and tensor


def _rewrite(path: Path, edit, metadata=FILE_METADATA) -> None:
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path, metadata=metadata)


def _error(directory: Path, load: str | None = None) -> str:
    with pytest.raises(CheckpointError) as info:
        ckpt = open_compressed(directory)
        if load == "tensors":
            ckpt.load_tensors()
        elif load:
            ckpt.load_layer(load)
    return str(info.value)


def test_unknown_manifest_version(saved: Path) -> None:
    manifest = json.loads((saved / MANIFEST_NAME).read_text())
    (saved / MANIFEST_NAME).write_text(json.dumps({**manifest, "format_version": 2}))
    assert _error(saved) == (
        f"{saved / MANIFEST_NAME}: format_version is 2, this reader knows 1; upgrade dsf-toolkit or re-export with "
        "this version"
    )
    (saved / MANIFEST_NAME).write_text(json.dumps({**manifest, "format": "other"}))
    assert _error(saved) == f"{saved / MANIFEST_NAME}: format is 'other', expected 'dsf-compressed'"
    (saved / MANIFEST_NAME).write_text("{not json")
    assert _error(saved).startswith(f"{saved / MANIFEST_NAME}: not valid JSON (")


def test_malformed_manifest_entry(saved: Path) -> None:
    manifest = json.loads((saved / MANIFEST_NAME).read_text())
    manifest["layers"]["blocks.0.csr"]["factors"]["A"]["layout"] = "coo"
    (saved / MANIFEST_NAME).write_text(json.dumps(manifest))
    assert _error(saved) == (
        f"{saved / MANIFEST_NAME}: layer 'blocks.0.csr' factor 'A' has layout 'coo', expected one of "
        f"['bitmask', 'bsr', 'csr', 'delta', 'dense', 'nibble', 'tile']; {FIX}"
    )


@pytest.mark.parametrize("cut", [8, 100, -1])
def test_truncated_file(saved: Path, cut: int) -> None:
    path = saved / SINGLE_FILE
    data = path.read_bytes()
    path.write_bytes(data[:cut])
    message = _error(saved)
    assert message.startswith(f"{path}: not a readable safetensors file (")
    assert message.endswith(f"); it is truncated or corrupted, {FIX}")


def test_corrupted_header(saved: Path) -> None:
    path = saved / SINGLE_FILE
    data = bytearray(path.read_bytes())
    data[8:12] = b"\x00\xff\x00\xff"
    path.write_bytes(bytes(data))
    assert _error(saved).startswith(f"{path}: not a readable safetensors file (Error while deserializing header")


def test_file_version(saved: Path) -> None:
    path = saved / SINGLE_FILE
    _rewrite(path, lambda t: None, metadata={**FILE_METADATA, "dsf_format_version": "7"})
    assert _error(saved) == (
        f"{path}: __metadata__ has dsf_format 'dsf-compressed' version '7', expected 'dsf-compressed' version "
        f"'1'; {FIX}"
    )


def test_missing_tensor(saved: Path) -> None:
    path = saved / SINGLE_FILE
    _rewrite(path, lambda t: t.pop("blocks.0.csr.B.col_idx"))
    assert _error(saved) == (
        f"{path}: tensor 'blocks.0.csr.B.col_idx' is missing (the manifest's layer 'blocks.0.csr' needs it); {FIX}"
    )


def test_unexpected_tensor(saved: Path) -> None:
    path = saved / SINGLE_FILE
    _rewrite(path, lambda t: t.update({"blocks.1.bsr.weight": torch.ones(2)}))
    message = _error(saved)
    assert message.startswith(f"{path}: unexpected tensor 'blocks.1.bsr.weight' (layer 'blocks.1.bsr' is compressed")


def test_dtype_not_matching_manifest(saved: Path) -> None:
    path = saved / SINGLE_FILE
    _rewrite(path, lambda t: t.update({"blocks.0.csr.A.values": t["blocks.0.csr.A.values"].float()}))
    assert _error(saved, "blocks.0.csr") == (
        f"{path}: 'blocks.0.csr.A.values' has dtype 'float32' but the manifest says 'float16'; re-export the "
        "checkpoint; the manifest and the tensors come from different writes"
    )
    _rewrite(path, lambda t: t.update({"blocks.0.csr.A.row_ptr": t["blocks.0.csr.A.row_ptr"].long()}))
    assert _error(saved, "blocks.0.csr") == f"{path}: 'blocks.0.csr.A.row_ptr' is int64, expected int32; {FIX}"


def test_shape_not_matching_manifest(saved: Path) -> None:
    path = saved / SINGLE_FILE
    name = "blocks.1.bitmask.B.bitmask"
    _rewrite(path, lambda t: t.update({name: t[name][:, :-1].contiguous()}))
    inner = _layers()["blocks.1.bitmask"].inner_dim
    assert _error(saved, "blocks.1.bitmask") == (
        f"{path}: 'blocks.1.bitmask.B.bitmask' has shape [{inner}, 4], expected [{inner}, 5]; {FIX}"
    )
    _rewrite(path, lambda t: t.update({"blocks.2.single.bias": torch.ones(3)}))
    assert _error(saved, "blocks.2.single") == (
        f"{path}: 'blocks.2.single.bias' is float32 [3], expected a float [24]; {FIX}"
    )


def test_bad_indices(saved: Path) -> None:
    path = saved / SINGLE_FILE

    def corrupt(t):
        t["blocks.0.csr.B.col_idx"][0] = 40
        t["blocks.0.csr.B.row_ptr"][-1] = 2**31 - 1

    _rewrite(path, corrupt)
    assert _error(saved, "blocks.0.csr").startswith(f"{path}: 'blocks.0.csr.B.row_ptr' ends at 2147483647, expected ")
    _rewrite(path, lambda t: t["blocks.0.csr.B.row_ptr"].__setitem__(-1, t["blocks.0.csr.B.values"].numel()))
    assert _error(saved, "blocks.0.csr") == (
        f"{path}: 'blocks.0.csr.B.col_idx' holds column 40 at position 0 (row 0), outside [0, 40); {FIX}"
    )


def test_shard_errors(tmp_path: Path) -> None:
    directory = _save(tmp_path / "ckpt", max_shard_bytes=2000)
    index = json.loads((directory / INDEX_NAME).read_text())
    name, shard = next(iter(index["weight_map"].items()))
    _rewrite(directory / shard, lambda t: t.pop(name))
    assert _error(directory) == f"{directory / shard}: tensor '{name}' listed in {INDEX_NAME} is missing; {FIX}"
    index["weight_map"][name] = "../elsewhere.safetensors"
    (directory / INDEX_NAME).write_text(json.dumps(index))
    assert _error(directory) == (
        f"{directory / INDEX_NAME}: shard name '../elsewhere.safetensors' is not a file name in the directory; {FIX}"
    )
    (directory / INDEX_NAME).write_text("[]")
    assert _error(directory).startswith(f"{directory / INDEX_NAME}: not a Hugging Face index with a 'weight_map'")
