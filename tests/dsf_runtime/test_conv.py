"""Compressed convolutions in the directory format: round trips of every kind and layout, the generic reader on a
CNN directory, ``load_compressed_into``, the standard (``nn.Conv2d``) forms, and the exact text of the validation
errors."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dsf_runtime.checkpoint import CheckpointError, CompressedLayer, open_compressed, save_compressed
from dsf_runtime.conv import (
    CompressedConv,
    conv_module_from_layer,
    from_standard,
    geometry_of,
    load_compressed_into,
    load_conv_layer,
    open_conv_checkpoint,
    replace_conv,
    to_standard,
)
from tests.dsf_runtime.helpers import random_sparse, single_thread  # noqa: F401 (autouse fixture)


class _StaticPadConv(nn.Conv2d):
    """A TF-"same" conv as in EfficientNet ports: asymmetric zero padding applied before F.conv2d."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.static_padding = nn.ZeroPad2d((0, 1, 0, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(self.static_padding(x), self.weight, self.bias, self.stride, self.padding, self.dilation)


class Tiny(nn.Module):
    """conv_a (dsf_conv) – BN – conv_b (basis_conv, stride 2, asymmetric padding) – conv_c (single_conv) – fc."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv_a, self.bn = nn.Conv2d(4, 6, 3, padding=1, bias=True), nn.BatchNorm2d(6)
        self.conv_b = _StaticPadConv(6, 8, 3, stride=2, bias=False)
        self.conv_c = nn.Conv2d(8, 5, 1, bias=True, dilation=1)
        self.fc = nn.Linear(5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv_c(self.conv_b(torch.relu(self.bn(self.conv_a(x)))))
        return self.fc(x.mean((2, 3)))


def _layers(model: Tiny, layout: str = "dense") -> dict[str, CompressedConv]:
    a_geometry, b_geometry, c_geometry = (geometry_of(m) for m in (model.conv_a, model.conv_b, model.conv_c))
    return {
        "conv_a": CompressedConv.from_dense(
            "dsf_conv", {"A": random_sparse(6, 6, 0.5, seed=1), "B": random_sparse(6, 36, 0.5, seed=2)},
            geometry=a_geometry, method="dsf", bias=model.conv_a.bias, layout=layout),
        "conv_b": CompressedConv.from_dense(
            "basis_conv", {"basis": random_sparse(3, 54, 1.0, seed=3), "coeff": random_sparse(5, 3, 1.0, seed=4)},
            geometry=b_geometry, method="basis", basis_channels=(6, 0, 3), layout=layout),
        "conv_c": CompressedConv.from_dense(
            "single_conv", {"W": random_sparse(5, 8, 0.5, seed=5)}, geometry=c_geometry, method="magnitude",
            bias=model.conv_c.bias, layout=layout, error=1.5, relative_error=0.25),
    }


def _save(model: Tiny, layers: dict[str, CompressedConv], directory: Path) -> Path:
    tensors = {k: v for k, v in model.state_dict().items() if k.split(".")[0] not in layers}
    return save_compressed(directory, tensors=tensors, layers={k: v.to_layer() for k, v in layers.items()},
                           config_source={"architectures": ["Tiny"]})


@pytest.mark.parametrize("layout", ["dense", "csr", "bitmask"])
def test_round_trip_every_kind(layout: str, tmp_path) -> None:
    model = Tiny()
    layers = _layers(model, layout)
    ckpt = open_conv_checkpoint(_save(model, layers, tmp_path / "m"))
    entry = ckpt.manifest["layers"]["conv_b"]
    assert list(entry) == ["kind", "method", "shape", "inner_dim", "nnz", "density", "bias", "error",
                           "relative_error", "factors", "conv"]
    assert entry["conv"] == {
        "in_channels": 6, "out_channels": 8, "kernel": [3, 3], "stride": [2, 2], "padding": [0, 0, 1, 1],
        "dilation": [1, 1], "groups": 1, "basis_channels": [6, 0, 3],
    }
    assert [ckpt.layers[n]["inner_dim"] for n in layers] == [layers["conv_a"].layer.inner_dim, 3, None]
    for name, layer in layers.items():
        loaded = load_conv_layer(ckpt, name)
        assert loaded.to_layer().meta() == layer.to_layer().meta() and loaded.layer.extra == {}
        assert loaded.geometry == layer.geometry and loaded.basis_channels == layer.basis_channels
        assert torch.equal(loaded.weight(), layer.weight())
    assert [r["kind"] for r in ckpt.records()] == ["dsf_conv", "basis_conv", "single_conv"]


def test_the_generic_reader_keeps_conv_fields_in_extra(tmp_path) -> None:
    """``open_compressed`` knows no convolution: it opens a CNN directory (``dsf inspect``) and loads each layer as a
    generic ``CompressedLayer`` whose ``extra`` holds the ``conv`` object, which ``from_layer`` turns back."""
    model = Tiny()
    layers = _layers(model)
    ckpt = open_compressed(_save(model, layers, tmp_path / "m"))
    generic = ckpt.load_layer("conv_b")
    assert type(generic) is CompressedLayer and generic.kind == "basis_conv" and generic.inner_dim == 3
    assert generic.extra == {"conv": ckpt.layers["conv_b"]["conv"]}
    assert generic.meta() == layers["conv_b"].to_layer().meta()
    assert torch.equal(CompressedConv.from_layer(generic).weight(), layers["conv_b"].weight())
    with pytest.raises(ValueError, match="^kind 'basis_conv' is not a linear kind"):
        generic.weight()
    linear = CompressedLayer.from_dense("single", {"W": torch.ones(2, 3)}, method="x")
    with pytest.raises(ValueError, match=r"^kind is 'single', expected one of \['basis_conv', 'dsf_conv'"):
        CompressedConv.from_layer(linear)


def test_load_compressed_into_matches_the_swapped_model(tmp_path) -> None:
    model = Tiny()
    with torch.no_grad():
        model.bn.running_mean.uniform_(-1, 1)
    layers = _layers(model, "csr")
    expected = replace_conv(copy.deepcopy(model), layers).eval()
    loaded = load_compressed_into(Tiny(), _save(model, layers, tmp_path / "m"))
    x = torch.randn(2, 4, 9, 9)
    with torch.no_grad():
        assert torch.equal(loaded(x), expected(x))
    assert torch.equal(loaded.bn.running_mean, model.bn.running_mean)


def test_runtime_modules_equal_the_dense_conv_and_the_standard_form() -> None:
    model = Tiny()
    x = torch.randn(2, 8, 10, 10)
    for name, layer in _layers(model).items():
        module = conv_module_from_layer(layer)
        original = copy.deepcopy(getattr(model, name))
        with torch.no_grad():
            original.weight.copy_(layer.conv_weight())
            xin = x[:, : layer.geometry.in_channels]
            assert torch.allclose(module(xin), original(xin), atol=1e-5), name
            standard = to_standard(module)
            assert torch.allclose(standard(xin), module(xin), atol=1e-5), name
        back = from_standard(standard, layer)
        assert torch.allclose(back.weight(), layer.weight(), atol=1e-6) and back.layer.error is None
        assert back.basis_channels == layer.basis_channels and back.geometry == layer.geometry
        if layer.layer.bias is not None:
            assert torch.allclose(back.layer.bias, layer.layer.bias, atol=1e-6)


def _edit_manifest(directory: Path, edit) -> None:
    path = directory / "dsf_manifest.json"
    manifest = json.loads(path.read_text())
    edit(manifest["layers"])
    path.write_text(json.dumps(manifest))


@pytest.mark.parametrize(
    ("edit", "problem"),
    [
        (lambda layers: layers["conv_a"]["conv"].update(groups=2),
         "layer 'conv_a' has an invalid conv object: conv.groups is 2; only groups == 1 is supported"),
        (lambda layers: layers["conv_a"].pop("conv"),
         "layer 'conv_a' has an invalid conv object: conv is NoneType, expected an object"),
        (lambda layers: layers["conv_a"]["conv"].update(padding=[1, 1]),
         "layer 'conv_a' has an invalid conv object: conv.padding is [1, 1], expected [top, left, bottom, right], "
         "integers >= 0"),
        (lambda layers: layers["conv_b"]["conv"].update(basis_channels=[6, 6, 3]),
         "layer 'conv_b' has basis_channels [6, 6, 3], expected 3 distinct output channels in [0, 8)"),
        (lambda layers: layers["conv_c"]["conv"].update(kernel=[3, 3]),
         "layer 'conv_c' has shape [5, 8], but its conv geometry needs [out_channels, in_channels·kh·kw] = [5, 72]"),
        (lambda layers: layers["conv_c"]["conv"].update(basis_channels=[1]),
         "layer 'conv_c' kind 'single_conv' has basis_channels; only basis_conv layers have them"),
        (lambda layers: layers["conv_b"].update(inner_dim=4),
         "layer 'conv_b' has inner_dim 4, but its factors give 3"),
    ],
)
def test_bad_conv_entries_are_rejected(edit, problem: str, tmp_path) -> None:
    """The conv reader rejects them, at open and when loading the layer; the generic reader does not look."""
    directory = _save(Tiny(), _layers(Tiny()), tmp_path / "m")
    _edit_manifest(directory, edit)
    expected = f"{directory / 'dsf_manifest.json'}: {problem}; re-export the checkpoint"
    with pytest.raises(CheckpointError) as info:
        open_conv_checkpoint(directory)
    assert str(info.value) == expected
    with pytest.raises(CheckpointError) as info:
        load_compressed_into(Tiny(), directory)
    assert str(info.value) == expected
    ckpt = open_compressed(directory)
    name = problem.split("'")[1]
    with pytest.raises(CheckpointError) as info:
        load_conv_layer(ckpt, name)
    assert str(info.value) == expected


def test_generic_checks_still_apply_to_conv_entries(tmp_path) -> None:
    directory = _save(Tiny(), _layers(Tiny()), tmp_path / "m")
    _edit_manifest(directory, lambda layers: layers["conv_b"].update(factors={}))
    with pytest.raises(CheckpointError) as info:
        open_compressed(directory)
    assert str(info.value) == (
        f"{directory / 'dsf_manifest.json'}: layer 'conv_b' kind 'basis_conv' has no factors; re-export the checkpoint"
    )


def test_load_into_the_wrong_model(tmp_path) -> None:
    directory = _save(Tiny(), _layers(Tiny()), tmp_path / "m")

    class Wider(Tiny):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(5, 4)

    with pytest.raises(CheckpointError) as info:
        load_compressed_into(Wider(), directory)
    assert str(info.value) == (
        f"{directory / 'model.safetensors'}: 'fc.bias' has shape [3], Wider expects [4]; the checkpoint does "
        "not fit this model; build the model it was compressed from"
    )

    class Extra(Tiny):
        def __init__(self) -> None:
            super().__init__()
            self.head = nn.Linear(3, 3)

    with pytest.raises(CheckpointError, match="'head.weight' is missing; the checkpoint does not fit this model"):
        load_compressed_into(Extra(), directory)

    class Strided(Tiny):
        def __init__(self) -> None:
            super().__init__()
            self.conv_c = nn.Conv2d(8, 5, 1, stride=2)

    with pytest.raises(ValueError, match=r"^module 'conv_c' has geometry ConvGeometry\(.*stride=\(2, 2\)"):
        load_compressed_into(Strided(), directory)


def test_layer_validation_errors() -> None:
    geometry = geometry_of(nn.Conv2d(4, 6, 3))
    layer = CompressedConv.from_dense("single_conv", {"W": torch.ones(6, 36)}, geometry=geometry, method="x").layer
    with pytest.raises(ValueError, match=r"^has shape \[6, 36\], but its conv geometry needs .* = \[6, 72\]$"):
        CompressedConv(layer, geometry_of(nn.Conv2d(8, 6, 3)))
    with pytest.raises(ValueError, match=r"^has inner_dim 5, but its factors give None$"):
        CompressedConv(CompressedLayer("single_conv", (6, 36), layer.factors, "x", inner_dim=5), geometry)
    not_a_layer = r"^factors A \[5, 6\], B \[6, 36\] do not form a dsf_conv layer of shape \[6, 36\]$"
    with pytest.raises(ValueError, match=not_a_layer):
        CompressedConv.from_dense("dsf_conv", {"A": torch.ones(5, 6), "B": torch.ones(6, 36)}, geometry=geometry,
                                  method="x")
    with pytest.raises(ValueError, match=r"^has basis_channels \[0, 9\], expected 2 distinct output channels in"):
        CompressedConv.from_dense("basis_conv", {"basis": torch.ones(2, 36), "coeff": torch.ones(4, 2)},
                                  geometry=geometry, method="x", basis_channels=(0, 9))
