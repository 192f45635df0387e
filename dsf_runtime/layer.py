"""``CompressedLayer``: one compressed layer in memory, as the solvers produce it and the directory stores it."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from dsf_runtime.formats import PackedMatrix, pack, pack_factors

__all__ = ["FACTOR_NAMES", "CompressedLayer", "factor_problem"]

# Factor names of the linear layer kinds. Other kinds (the convolutions of ``dsf_runtime.conv``) are checked here
# only generically; their own reader checks the rest.
FACTOR_NAMES = {"dsf": ("A", "B"), "single": ("W",)}


@dataclass
class CompressedLayer:
    """One compressed layer as the directory stores it: a linear ``W ≈ A·B`` (kind ``dsf``) or one sparse ``W``
    (kind ``single``), or a layer of another kind (e.g. ``dsf_conv``) whose kind-specific fields are in ``extra``.

    Attributes:
        kind: ``"dsf"`` (factors ``A`` [out, r], ``B`` [r, in]), ``"single"`` (factor ``W`` [out, in]) or another
            kind (checked by its own reader, e.g. ``dsf_runtime.conv.CompressedConv.from_layer``).
        shape: ``(out, in)`` of the (flattened) weight.
        factors: packed matrices keyed by factor name (``A``/``B`` or ``W`` for the linear kinds).
        method: the solver that produced it (``"dsf"``, ``"sparsegpt"``, ``"wanda"``, ...).
        bias: ``[out]`` or None; stored with its own dtype.
        error: ``tr(ΔW·H·ΔWᵀ)`` or None; relative_error: ``error / tr(W·H·Wᵀ)`` or None.
        inner_dim: the manifest's ``inner_dim``: for ``dsf`` ``r`` (``A``'s columns; filled in when None), None for
            ``single``, what the producer of another kind sets.
        extra: the manifest entry's kind-specific fields (e.g. a convolution's ``conv`` object), written after
            the generic ones; empty for the linear kinds.
    """

    kind: str
    shape: tuple[int, int]
    factors: dict[str, PackedMatrix]
    method: str
    bias: torch.Tensor | None = None
    error: float | None = None
    relative_error: float | None = None
    inner_dim: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.shape = (int(self.shape[0]), int(self.shape[1]))
        self.error = None if self.error is None else float(self.error)
        self.relative_error = None if self.relative_error is None else float(self.relative_error)
        if self.bias is not None:
            self.bias = self.bias.detach()
        if self.kind == "dsf" and self.inner_dim is None and "A" in self.factors:
            self.inner_dim = self.factors["A"].shape[1]
        shapes = {k: tuple(f.shape) for k, f in self.factors.items()}
        problem = factor_problem(self.kind, self.shape, shapes, self.inner_dim)
        if problem:
            raise ValueError(problem)
        if self.bias is not None and tuple(self.bias.shape) != (self.shape[0],):
            raise ValueError(f"bias has shape {list(self.bias.shape)}, expected [{self.shape[0]}]")

    @classmethod
    def from_dense(
        cls,
        kind: str,
        factors: Mapping[str, torch.Tensor],
        *,
        method: str,
        bias: torch.Tensor | None = None,
        error: float | None = None,
        relative_error: float | None = None,
        layout: str = "dense",
        dtype: torch.dtype | None = None,
        scales: Mapping[str, torch.Tensor] | None = None,
        group_size: int | None = None,
        **opts: Any,
    ) -> CompressedLayer:
        """Pack dense factors (e.g. a solver's fp32 ``{"A": [out, k], "B": [k, in]}`` or ``{"W": [out, in]}``).

        ``layout="dense"`` keeps the inner dimension ``k`` (the compression output); other layouts drop empty
        inner indices (see ``pack_factors``). ``dtype`` casts the values; ``opts`` go to the layout
        (``block_size`` for ``bsr``). With ``scales`` (one ``[rows]`` tensor per factor), ``factors`` hold codes
        (int8, float8_e4m3fn; docs/format.md "Quantized values") packed as they are, keeping ``k``; a factor whose
        scales are ``[rows, ceil(cols / group_size)]`` holds int4 codes (int8 in [-7, 7]) with ``group_size``
        columns per scale, so the two factors of a DSF layer may hold different formats. From a solver's
        ``SolveResult``::

            CompressedLayer.from_dense(result.kind, result.factors, method="dsf", bias=linear.bias,
                                       error=result.error, relative_error=result.relative_error)
        """
        if kind not in FACTOR_NAMES or set(factors) != set(FACTOR_NAMES[kind]):
            raise ValueError(f"kind {kind!r} needs factors {FACTOR_NAMES.get(kind)}, got {sorted(factors)}")
        if scales is not None and set(scales) != set(factors):
            raise ValueError(f"scales for {sorted(scales)}, factors {sorted(factors)}: one scale tensor per factor")
        if group_size is not None and not any(s.dim() == 2 for s in (scales or {}).values()):
            raise ValueError(f"group_size {group_size} goes with int4 codes, whose scales are [rows, groups]; "
                             "no factor has such scales")
        if kind == "dsf":
            shape = (factors["A"].shape[0], factors["B"].shape[1])
        else:
            shape = tuple(factors["W"].shape)
        if scales is not None:
            packed = {k: pack(f, layout, scales=scales[k], group_size=group_size if scales[k].dim() == 2 else None,
                              **opts) for k, f in factors.items()}
        elif kind == "dsf":
            packed = pack_factors(factors["A"], factors["B"], layout, dtype=dtype, drop_empty=layout != "dense", **opts)
        else:
            packed = {"W": pack(factors["W"], layout, dtype=dtype, **opts)}
        return cls(kind, shape, packed, method, bias, error, relative_error)

    @property
    def nnz(self) -> int:
        return sum(f.nnz for f in self.factors.values())

    @property
    def nbytes(self) -> int:
        """Stored bytes of the factors and the bias."""
        bias = 0 if self.bias is None else self.bias.numel() * self.bias.element_size()
        return sum(f.nbytes for f in self.factors.values()) + bias

    def weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The dense weight of a linear kind's factors, ``[out, in]`` (computed in fp32, then cast to ``dtype``)."""
        if self.kind not in FACTOR_NAMES:
            raise ValueError(f"kind {self.kind!r} is not a linear kind; rebuild the layer with its own class "
                             "(e.g. dsf_runtime.conv.CompressedConv.from_layer)")
        if self.kind == "dsf":
            return (self.factors["A"].to_dense(torch.float32) @ self.factors["B"].to_dense(torch.float32)).to(dtype)
        return self.factors["W"].to_dense(dtype)

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> CompressedLayer:
        """A copy on ``device`` with factor values and bias cast to ``dtype``."""
        factors = {k: f.to(device, dtype) for k, f in self.factors.items()}
        bias = None if self.bias is None else self.bias.to(device=device, dtype=dtype or self.bias.dtype)
        return dataclasses.replace(self, factors=factors, bias=bias)

    def meta(self) -> dict[str, Any]:
        """The manifest entry of this layer: the generic fields, then ``extra``."""
        out, inp = self.shape
        return {
            "kind": self.kind,
            "method": self.method,
            "shape": [out, inp],
            "inner_dim": self.inner_dim,
            "nnz": self.nnz,
            "density": self.nnz / (out * inp) if out * inp else 0.0,
            "bias": self.bias is not None,
            "error": self.error,
            "relative_error": self.relative_error,
            "factors": {k: f.meta() for k, f in self.factors.items()},
            **self.extra,
        }


def factor_problem(
    kind: Any, shape: tuple[int, int], factors: Mapping[str, tuple[int, ...]], inner_dim: Any = None
) -> str | None:
    """Why a layer's kind, factor shapes and ``inner_dim`` disagree with ``shape`` (``(out, in)``), or None.

    The linear kinds (``FACTOR_NAMES``) are checked fully (an ``inner_dim`` of None is accepted for ``dsf``: it is
    filled in); another kind only generically: a non-empty name, at least one factor, ``inner_dim`` None or an
    integer >= 0.
    """
    if not isinstance(kind, str) or not kind:
        return f"kind is {kind!r}, expected a layer kind such as 'dsf' or 'single'"
    if not factors:
        return f"kind {kind!r} has no factors"
    if inner_dim is not None and (isinstance(inner_dim, bool) or not isinstance(inner_dim, int) or inner_dim < 0):
        return f"has inner_dim {inner_dim!r}, expected an integer >= 0 or null"
    if kind not in FACTOR_NAMES:
        return None
    if tuple(sorted(factors)) != FACTOR_NAMES[kind]:
        return f"kind {kind!r} needs factors {list(FACTOR_NAMES[kind])}, got {sorted(factors)}"
    out, inp = shape
    if kind == "single":
        ok = tuple(factors["W"]) == (out, inp)
    else:
        (a0, a1), (b0, b1) = factors["A"], factors["B"]
        ok = a0 == out and b1 == inp and a1 == b0
    if not ok:
        found = ", ".join(f"{k} {list(v)}" for k, v in sorted(factors.items()))
        return f"factors {found} do not form a [{out}, {inp}] layer"
    expected = factors["A"][1] if kind == "dsf" else None
    if inner_dim is not None and inner_dim != expected:
        return f"has inner_dim {inner_dim}, but its factors give {expected}"
    return None
