"""Compressed convolutions in memory and in the manifest (docs/format.md, "Convolution layers").

A ``Conv2d`` with weight ``[out, in, kh, kw]`` is compressed as its flattened weight ``W`` ``[out, in·kh·kw]``
(column order ``(in, kh, kw)``, the order of ``weight.reshape(out, -1)`` and of ``F.unfold``) plus its geometry:

* kind ``dsf_conv``: ``W ≈ A·B``; ``B`` ``[r, in·kh·kw]`` is a ``kh×kw`` conv ``in → r`` with the layer's stride,
  padding and dilation, ``A`` ``[out, r]`` a ``1×1`` conv ``r → out``;
* kind ``single_conv``: one sparse ``W``;
* kind ``basis_conv``: ``basis`` ``[p, in·kh·kw]`` are the filters of the output channels ``basis_channels``;
  every other output channel (ascending order) is a linear combination of the basis outputs, with the rows of
  ``coeff`` ``[out − p, p]`` as weights.

The bias ``[out]`` is always the bias of the final output channel. Only ``groups == 1`` and zero padding are
representable; ``unsupported_reason`` says why a module is not.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from dsf_runtime.formats import PackedMatrix, pack, pack_factors
from dsf_runtime.layer import CompressedLayer

__all__ = [
    "CONV_FACTORS",
    "CompressedConv",
    "ConvGeometry",
    "conv_entry_problem",
    "geometry_of",
    "unsupported_reason",
]

# Factor names of each convolution kind.
CONV_FACTORS = {"dsf_conv": ("A", "B"), "single_conv": ("W",), "basis_conv": ("basis", "coeff")}


def _pair(value: Any, name: str, minimum: int) -> tuple[int, int]:
    if not (isinstance(value, Sequence) and len(value) == 2 and all(_int_at_least(v, minimum) for v in value)):
        raise ValueError(f"{name} is {value!r}, expected two integers >= {minimum}")
    return int(value[0]), int(value[1])


def _int_at_least(value: Any, minimum: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= minimum


@dataclass(frozen=True)
class ConvGeometry:
    """Everything of a ``Conv2d`` but its weights.

    Attributes:
        in_channels, out_channels: channel counts.
        kernel: ``(kh, kw)``; stride: ``(sh, sw)``; dilation: ``(dh, dw)``.
        padding: zero padding ``(top, left, bottom, right)`` (the order of ONNX ``pads``).
        groups: always 1 for a compressed layer (kept so the manifest states it).
    """

    in_channels: int
    out_channels: int
    kernel: tuple[int, int]
    stride: tuple[int, int] = (1, 1)
    padding: tuple[int, int, int, int] = (0, 0, 0, 0)
    dilation: tuple[int, int] = (1, 1)
    groups: int = 1

    @property
    def fan_in(self) -> int:
        """Columns of the flattened weight: ``in_channels·kh·kw``."""
        return self.in_channels * self.kernel[0] * self.kernel[1]

    @property
    def symmetric_padding(self) -> tuple[int, int] | None:
        """``(ph, pw)`` when top == bottom and left == right, else None."""
        top, left, bottom, right = self.padding
        return (top, left) if (top, left) == (bottom, right) else None

    def output_size(self, height: int, width: int) -> tuple[int, int]:
        """Spatial output size for an ``[N, in, height, width]`` input."""
        top, left, bottom, right = self.padding
        out_h = (height + top + bottom - self.dilation[0] * (self.kernel[0] - 1) - 1) // self.stride[0] + 1
        out_w = (width + left + right - self.dilation[1] * (self.kernel[1] - 1) - 1) // self.stride[1] + 1
        return out_h, out_w

    def to_json(self) -> dict[str, Any]:
        """The manifest's ``conv`` object (without ``basis_channels``)."""
        return {
            "in_channels": self.in_channels,
            "out_channels": self.out_channels,
            "kernel": list(self.kernel),
            "stride": list(self.stride),
            "padding": list(self.padding),
            "dilation": list(self.dilation),
            "groups": self.groups,
        }

    @classmethod
    def from_json(cls, data: Any) -> ConvGeometry:
        """Parse a manifest ``conv`` object.

        Raises:
            ValueError: naming the field that is missing or out of range.
        """
        if not isinstance(data, Mapping):
            raise ValueError(f"conv is {type(data).__name__}, expected an object")
        for key in ("in_channels", "out_channels"):
            if not _int_at_least(data.get(key), 1):
                raise ValueError(f"conv.{key} is {data.get(key)!r}, expected an integer >= 1")
        padding = data.get("padding")
        if not (isinstance(padding, Sequence) and len(padding) == 4 and all(_int_at_least(p, 0) for p in padding)):
            raise ValueError(f"conv.padding is {padding!r}, expected [top, left, bottom, right], integers >= 0")
        if data.get("groups") != 1:
            raise ValueError(f"conv.groups is {data.get('groups')!r}; only groups == 1 is supported")
        return cls(
            in_channels=data["in_channels"],
            out_channels=data["out_channels"],
            kernel=_pair(data.get("kernel"), "conv.kernel", 1),
            stride=_pair(data.get("stride"), "conv.stride", 1),
            padding=tuple(int(p) for p in padding),  # type: ignore[arg-type]
            dilation=_pair(data.get("dilation"), "conv.dilation", 1),
        )


def unsupported_reason(module: nn.Module) -> str | None:
    """Why ``module`` cannot be compressed as a convolution of this format, or None when it can.

    Supported: ``nn.Conv2d`` with ``groups == 1`` and zero padding (any stride, padding, dilation), and ``Conv2d``
    subclasses whose only extra is a ``static_padding`` ``ZeroPad2d``/``Identity`` applied first (the TF-"same"
    convolutions of EfficientNet ports).
    """
    if not isinstance(module, nn.Conv2d):
        return f"is a {type(module).__name__}, not a Conv2d"
    if module.groups != 1:
        return (
            f"is a grouped convolution (groups={module.groups}): each output channel sees only "
            f"{module.in_channels // module.groups} of the {module.in_channels} input channels, so the weight is not "
            "one [out, in·kh·kw] matrix; only groups=1 convolutions can be factorized"
        )
    if module.padding_mode != "zeros":
        return f"uses padding_mode={module.padding_mode!r}; only zero padding is supported"
    if type(module) is not nn.Conv2d and not _is_padding(getattr(module, "static_padding", None)):
        return (
            f"is a {type(module).__name__}, a Conv2d subclass whose forward may differ from F.conv2d "
            "(only a 'static_padding' ZeroPad2d/Identity is understood)"
        )
    return None


def _is_padding(module: nn.Module | None) -> bool:
    """A ``ZeroPad2d``, or an identity: ``nn.Identity`` or a parameter-free module class named ``Identity``
    (the EfficientNet ports define their own)."""
    if isinstance(module, (nn.ZeroPad2d, nn.Identity)):
        return True
    return (type(module).__name__ == "Identity" and isinstance(module, nn.Module)
            and not any(True for _ in module.parameters()) and not any(True for _ in module.children()))


def geometry_of(module: nn.Module, name: str | None = None) -> ConvGeometry:
    """The geometry of a supported convolution, its ``static_padding`` folded into ``padding``.

    Raises:
        ValueError: naming the module and the reason (``unsupported_reason``).
    """
    reason = unsupported_reason(module)
    if reason:
        raise ValueError(f"layer {name!r} {reason}" if name else f"module {reason}")
    left, right, top, bottom = (int(p) for p in module._reversed_padding_repeated_twice)
    static = getattr(module, "static_padding", None)
    if isinstance(static, nn.ZeroPad2d):
        s_left, s_right, s_top, s_bottom = static.padding
        left, right, top, bottom = left + s_left, right + s_right, top + s_top, bottom + s_bottom
    return ConvGeometry(
        in_channels=module.in_channels,
        out_channels=module.out_channels,
        kernel=tuple(module.kernel_size),  # type: ignore[arg-type]
        stride=tuple(module.stride),  # type: ignore[arg-type]
        padding=(top, left, bottom, right),
        dilation=tuple(module.dilation),  # type: ignore[arg-type]
    )


def _problem(
    kind: Any,
    shape: tuple[int, int],
    factors: Mapping[str, tuple[int, ...]],
    geometry: ConvGeometry,
    basis_channels: Sequence[int] | None,
) -> str | None:
    """Why a convolution layer's kind, factor shapes, geometry and basis channels disagree, or None."""
    if kind not in CONV_FACTORS:
        return f"kind is {kind!r}, expected one of {sorted(CONV_FACTORS)}"
    if tuple(sorted(factors)) != tuple(sorted(CONV_FACTORS[kind])):
        return f"kind {kind!r} needs factors {list(CONV_FACTORS[kind])}, got {sorted(factors)}"
    out, fan_in = shape
    if (out, fan_in) != (geometry.out_channels, geometry.fan_in):
        return (
            f"has shape {[out, fan_in]}, but its conv geometry needs [out_channels, in_channels·kh·kw] = "
            f"{[geometry.out_channels, geometry.fan_in]}"
        )
    found = ", ".join(f"{k} {list(v)}" for k, v in sorted(factors.items()))
    if kind == "single_conv":
        ok = tuple(factors["W"]) == (out, fan_in)
    elif kind == "dsf_conv":
        (a0, a1), (b0, b1) = factors["A"], factors["B"]
        ok = a0 == out and b1 == fan_in and a1 == b0
    else:
        (p, b1), (c0, c1) = factors["basis"], factors["coeff"]
        ok = b1 == fan_in and c1 == p and p + c0 == out
        channels = list(basis_channels or [])
        if ok and (len(channels) != p or len(set(channels)) != p or not all(0 <= c < out for c in channels)):
            return f"has basis_channels {channels!r}, expected {p} distinct output channels in [0, {out})"
    if not ok:
        return f"factors {found} do not form a {kind} layer of shape [{out}, {fan_in}]"
    if kind != "basis_conv" and basis_channels is not None:
        return f"kind {kind!r} has basis_channels; only basis_conv layers have them"
    return None


@dataclass
class CompressedConv(CompressedLayer):
    """One compressed ``Conv2d`` (kinds ``dsf_conv``, ``single_conv``, ``basis_conv``; see the module docstring).

    Attributes (besides ``CompressedLayer``'s; ``shape`` is ``(out, in·kh·kw)``):
        geometry: kernel, stride, padding, dilation of the original convolution.
        basis_channels: for ``basis_conv``, the output channel of each ``basis`` row; None otherwise.
    """

    geometry: ConvGeometry | None = None
    basis_channels: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        self.shape = (int(self.shape[0]), int(self.shape[1]))
        self.error = None if self.error is None else float(self.error)
        self.relative_error = None if self.relative_error is None else float(self.relative_error)
        if self.bias is not None:
            self.bias = self.bias.detach()
        if self.basis_channels is not None:
            self.basis_channels = tuple(int(c) for c in self.basis_channels)
        if not isinstance(self.geometry, ConvGeometry):
            raise ValueError(f"a {self.kind} layer needs a ConvGeometry, got {type(self.geometry).__name__}")
        shapes = {k: tuple(f.shape) for k, f in self.factors.items()}
        problem = _problem(self.kind, self.shape, shapes, self.geometry, self.basis_channels)
        if problem:
            raise ValueError(problem)
        if self.bias is not None and tuple(self.bias.shape) != (self.shape[0],):
            raise ValueError(f"bias has shape {list(self.bias.shape)}, expected [{self.shape[0]}]")

    @classmethod
    def from_dense(  # type: ignore[override]
        cls,
        kind: str,
        factors: Mapping[str, torch.Tensor],
        *,
        geometry: ConvGeometry,
        method: str,
        bias: torch.Tensor | None = None,
        error: float | None = None,
        relative_error: float | None = None,
        basis_channels: Sequence[int] | None = None,
        layout: str = "dense",
        dtype: torch.dtype | None = None,
        **opts: Any,
    ) -> CompressedConv:
        """Pack dense 2-D factors (``A`` [out, k] + ``B`` [k, in·kh·kw]; ``W``; ``basis`` + ``coeff``).

        ``dsf_conv`` factors go through ``pack_factors`` (layouts other than ``dense`` drop empty inner
        channels); the others are packed one by one.
        """
        if kind == "dsf_conv" and set(factors) == {"A", "B"}:
            packed = pack_factors(factors["A"], factors["B"], layout, dtype=dtype, drop_empty=layout != "dense", **opts)
        elif kind in CONV_FACTORS and set(factors) == set(CONV_FACTORS[kind]):
            packed = {k: pack(v, layout, dtype=dtype, **opts) for k, v in factors.items()}
        else:
            raise ValueError(f"kind {kind!r} needs factors {CONV_FACTORS.get(kind)}, got {sorted(factors)}")
        shape = (geometry.out_channels, geometry.fan_in)
        return cls(kind, shape, packed, method, bias, error, relative_error, geometry,
                   None if basis_channels is None else tuple(basis_channels))

    @classmethod
    def from_entry(
        cls, entry: Mapping[str, Any], factors: dict[str, PackedMatrix], bias: torch.Tensor | None
    ) -> CompressedConv:
        """Rebuild from a manifest entry (already checked by ``conv_entry_problem``) and its loaded factors."""
        conv = entry["conv"]
        channels = conv.get("basis_channels")
        return cls(
            entry["kind"], tuple(entry["shape"]), factors, entry.get("method", "unknown"), bias,
            entry.get("error"), entry.get("relative_error"), ConvGeometry.from_json(conv),
            None if channels is None else tuple(channels),
        )

    @property
    def inner_dim(self) -> int | None:
        """``r`` for ``dsf_conv``, the number of basis filters for ``basis_conv``, None for ``single_conv``."""
        if self.kind == "dsf_conv":
            return self.factors["A"].shape[1]
        return self.factors["basis"].shape[0] if self.kind == "basis_conv" else None

    def rest_channels(self) -> list[int]:
        """For ``basis_conv``: the output channels of the ``coeff`` rows (the non-basis ones, ascending)."""
        basis = set(self.basis_channels or ())
        return [c for c in range(self.shape[0]) if c not in basis]

    def weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The flattened weight the factors represent, ``[out, in·kh·kw]`` (computed in fp32, cast to ``dtype``)."""
        if self.kind == "dsf_conv":
            return (self.factors["A"].to_dense(torch.float32) @ self.factors["B"].to_dense(torch.float32)).to(dtype)
        if self.kind == "single_conv":
            return self.factors["W"].to_dense(dtype)
        basis = self.factors["basis"].to_dense(torch.float32)
        dense = basis.new_zeros(self.shape)
        dense[list(self.basis_channels or ())] = basis
        dense[self.rest_channels()] = self.factors["coeff"].to_dense(torch.float32) @ basis
        return dense.to(dtype)

    def conv_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The equivalent ``Conv2d`` weight ``[out, in, kh, kw]``."""
        assert self.geometry is not None
        return self.weight(dtype).view(self.shape[0], self.geometry.in_channels, *self.geometry.kernel)

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> CompressedConv:
        """A copy on ``device`` with factor values and bias cast to ``dtype``."""
        factors = {k: f.to(device, dtype) for k, f in self.factors.items()}
        bias = None if self.bias is None else self.bias.to(device=device, dtype=dtype or self.bias.dtype)
        return CompressedConv(self.kind, self.shape, factors, self.method, bias, self.error, self.relative_error,
                              self.geometry, self.basis_channels)

    def meta(self) -> dict[str, Any]:
        """The manifest entry: ``CompressedLayer.meta()`` plus the ``conv`` object."""
        assert self.geometry is not None
        entry = super().meta()
        entry["conv"] = self.geometry.to_json()
        if self.basis_channels is not None:
            entry["conv"]["basis_channels"] = list(self.basis_channels)
        return entry


def conv_entry_problem(entry: Mapping[str, Any]) -> str | None:
    """Why a manifest entry of a convolution kind is malformed, or None (factor layouts and dtypes are checked
    by the caller)."""
    try:
        geometry = ConvGeometry.from_json(entry.get("conv"))
    except ValueError as exc:
        return f"has an invalid conv object: {exc}"
    channels = entry["conv"].get("basis_channels")
    if channels is not None and not (isinstance(channels, list) and all(_int_at_least(c, 0) for c in channels)):
        return f"has basis_channels {channels!r}, expected a list of output channel indices"
    shapes = {k: tuple(m["shape"]) for k, m in entry["factors"].items()}
    return _problem(entry.get("kind"), tuple(entry["shape"]), shapes, geometry, channels)
