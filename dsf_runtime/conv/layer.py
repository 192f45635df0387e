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

A ``CompressedConv`` composes the generic ``CompressedLayer`` (kind, shape, factors, bias, errors) with the
geometry; ``to_layer`` gives the generic layer that ``save_compressed`` writes (the ``conv`` object in its
``extra``) and ``from_layer`` rebuilds the convolution from one that ``CompressedCheckpoint.load_layer`` read.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from dsf_runtime.conv.geometry import ConvGeometry, int_at_least
from dsf_runtime.formats import pack, pack_factors
from dsf_runtime.layer import CompressedLayer

__all__ = ["CONV_FACTORS", "CompressedConv", "conv_entry_problem"]

# Factor names of each convolution kind.
CONV_FACTORS = {"dsf_conv": ("A", "B"), "single_conv": ("W",), "basis_conv": ("basis", "coeff")}


def _problem(
    kind: Any,
    shape: tuple[int, int],
    factors: Mapping[str, tuple[int, ...]],
    geometry: ConvGeometry,
    basis_channels: Sequence[int] | None,
    inner_dim: Any,
) -> str | None:
    """Why a convolution layer's kind, factor shapes, geometry, basis channels and ``inner_dim`` disagree, or
    None."""
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
    expected = _inner_dim(kind, factors)
    if inner_dim != expected:
        return f"has inner_dim {inner_dim!r}, but its factors give {expected!r}"
    return None


def _inner_dim(kind: str, factors: Mapping[str, tuple[int, ...]]) -> int | None:
    """``r`` (``A``'s columns) for ``dsf_conv``, ``p`` (``basis`` rows) for ``basis_conv``, None for ``single_conv``."""
    if kind == "dsf_conv":
        return factors["A"][1]
    return factors["basis"][0] if kind == "basis_conv" else None


def _parse_conv(conv: Any) -> tuple[ConvGeometry, tuple[int, ...] | None]:
    """The geometry and basis channels of a manifest ``conv`` object.

    Raises:
        ValueError: naming the field that is malformed.
    """
    try:
        geometry = ConvGeometry.from_json(conv)
    except ValueError as exc:
        raise ValueError(f"has an invalid conv object: {exc}") from None
    channels = conv.get("basis_channels")
    if channels is not None and not (isinstance(channels, list) and all(int_at_least(c, 0) for c in channels)):
        raise ValueError(f"has basis_channels {channels!r}, expected a list of output channel indices")
    return geometry, None if channels is None else tuple(channels)


@dataclass
class CompressedConv:
    """One compressed ``Conv2d`` (kinds ``dsf_conv``, ``single_conv``, ``basis_conv``; see the module docstring).

    Attributes:
        layer: the generic layer: kind, ``shape`` ``(out, in·kh·kw)``, factors, method, bias, errors, ``inner_dim``.
        geometry: kernel, stride, padding, dilation of the original convolution.
        basis_channels: for ``basis_conv``, the output channel of each ``basis`` row; None otherwise.

    Raises:
        ValueError: the layer's kind, factors, ``inner_dim`` or bias do not fit the geometry and basis channels.
    """

    layer: CompressedLayer
    geometry: ConvGeometry
    basis_channels: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.layer, CompressedLayer):
            raise TypeError(f"layer is a {type(self.layer).__name__}, expected a CompressedLayer")
        if not isinstance(self.geometry, ConvGeometry):
            raise ValueError(f"a {self.layer.kind} layer needs a ConvGeometry, got {type(self.geometry).__name__}")
        if self.basis_channels is not None:
            self.basis_channels = tuple(int(c) for c in self.basis_channels)
        shapes = {k: tuple(f.shape) for k, f in self.layer.factors.items()}
        problem = _problem(self.layer.kind, self.layer.shape, shapes, self.geometry, self.basis_channels,
                           self.layer.inner_dim)
        if problem:
            raise ValueError(problem)

    @classmethod
    def from_dense(
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
        inner_dim = _inner_dim(kind, {k: tuple(f.shape) for k, f in packed.items()})
        layer = CompressedLayer(kind, shape, packed, method, bias, error, relative_error, inner_dim)
        return cls(layer, geometry, None if basis_channels is None else tuple(basis_channels))

    @classmethod
    def from_layer(cls, layer: CompressedLayer) -> CompressedConv:
        """Rebuild from a generic layer read from a directory (``CompressedCheckpoint.load_layer``), its ``conv``
        object taken out of ``extra``.

        Raises:
            ValueError: the kind is not a convolution kind, or the ``conv`` object or the factors are malformed.
        """
        if layer.kind not in CONV_FACTORS:
            raise ValueError(f"kind is {layer.kind!r}, expected one of {sorted(CONV_FACTORS)}")
        geometry, channels = _parse_conv(layer.extra.get("conv"))
        extra = {k: v for k, v in layer.extra.items() if k != "conv"}
        return cls(dataclasses.replace(layer, extra=extra), geometry, channels)

    def to_layer(self) -> CompressedLayer:
        """The generic layer to save (``save_compressed``): ``layer`` with the manifest's ``conv`` object (geometry
        and, for ``basis_conv``, ``basis_channels``) in ``extra``."""
        conv = self.geometry.to_json()
        if self.basis_channels is not None:
            conv["basis_channels"] = list(self.basis_channels)
        return dataclasses.replace(self.layer, extra={**self.layer.extra, "conv": conv})

    def rest_channels(self) -> list[int]:
        """For ``basis_conv``: the output channels of the ``coeff`` rows (the non-basis ones, ascending)."""
        basis = set(self.basis_channels or ())
        return [c for c in range(self.layer.shape[0]) if c not in basis]

    def weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The flattened weight the factors represent, ``[out, in·kh·kw]`` (computed in fp32, cast to ``dtype``)."""
        kind, factors = self.layer.kind, self.layer.factors
        if kind == "dsf_conv":
            return (factors["A"].to_dense(torch.float32) @ factors["B"].to_dense(torch.float32)).to(dtype)
        if kind == "single_conv":
            return factors["W"].to_dense(dtype)
        basis = factors["basis"].to_dense(torch.float32)
        dense = basis.new_zeros(self.layer.shape)
        dense[list(self.basis_channels or ())] = basis
        dense[self.rest_channels()] = factors["coeff"].to_dense(torch.float32) @ basis
        return dense.to(dtype)

    def conv_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The equivalent ``Conv2d`` weight ``[out, in, kh, kw]``."""
        return self.weight(dtype).view(self.layer.shape[0], self.geometry.in_channels, *self.geometry.kernel)

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> CompressedConv:
        """A copy on ``device`` with factor values and bias cast to ``dtype``."""
        return CompressedConv(self.layer.to(device, dtype), self.geometry, self.basis_channels)


def conv_entry_problem(entry: Mapping[str, Any]) -> str | None:
    """Why a manifest entry of a convolution kind is malformed, or None (the generic checks of
    ``dsf_runtime.checkpoint`` — factor layouts, dtypes and 2-D shapes, bias flag — have passed)."""
    try:
        geometry, channels = _parse_conv(entry.get("conv"))
    except ValueError as exc:
        return str(exc)
    shapes = {k: tuple(m["shape"]) for k, m in entry["factors"].items()}
    return _problem(entry.get("kind"), tuple(entry["shape"]), shapes, geometry, channels, entry.get("inner_dim"))
