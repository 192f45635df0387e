"""The geometry of a ``Conv2d`` (everything but its weights), as the manifest's ``conv`` object stores it, and which
convolutions this format can represent (``groups == 1``, zero padding; ``unsupported_reason`` says why not).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from torch import nn

__all__ = ["ConvGeometry", "geometry_of", "int_at_least", "unsupported_reason"]


def _pair(value: Any, name: str, minimum: int) -> tuple[int, int]:
    if not (isinstance(value, Sequence) and len(value) == 2 and all(int_at_least(v, minimum) for v in value)):
        raise ValueError(f"{name} is {value!r}, expected two integers >= {minimum}")
    return int(value[0]), int(value[1])


def int_at_least(value: Any, minimum: int) -> bool:
    """Whether ``value`` is an ``int`` (not a ``bool``) of at least ``minimum``."""
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
            if not int_at_least(data.get(key), 1):
                raise ValueError(f"conv.{key} is {data.get(key)!r}, expected an integer >= 1")
        padding = data.get("padding")
        if not (isinstance(padding, Sequence) and len(padding) == 4 and all(int_at_least(p, 0) for p in padding)):
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
