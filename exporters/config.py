"""``ExportConfig``: what an export writes (layout, value dtype, block size, shard size), checked up front."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch

from dsf_runtime.formats import AUTO, BLOCK_SIZES, LAYOUTS, VALUE_DTYPES
from exporters._files import parse_size

__all__ = ["EMBEDDINGS", "ExportConfig"]

EMBEDDINGS = ("int8", "keep")  # how the input embedding is stored

_DTYPES = {name: dtype for dtype, name in VALUE_DTYPES.items()}


@dataclass(frozen=True)
class ExportConfig:
    """Settings of ``dsf export``; every field maps to the flag of the same name.

    Attributes:
        layout: ``auto`` (each factor in the smallest of ``dsf_runtime.formats.AUTO_LAYOUTS``), or a key of
            ``dsf_runtime.formats.LAYOUTS`` for every factor (``nibble`` needs at most 16 non-zeros per group of 16
            columns: any matrix fits, balanced DSF factors fit tightly).
        dtype: ``float16``, ``bfloat16`` or ``float32`` for factor values and floating tensors; None keeps them.
        block_size: ``b`` of ``bsr`` blocks (16, 32 or 64); ignored by the other layouts.
        max_shard_size: safetensors shard limit, e.g. ``"2GiB"``, ``"500MB"`` or bytes.
        embedding: ``int8`` stores the input embedding (and the output layer tied to it) as int8 with one scale per
            row (``dsf_runtime.quantized``; a quarter of fp32's bytes, half of fp16's); ``keep`` stores it as it is.

    Raises:
        ValueError: on any bad value, naming its flag.
    """

    layout: str = AUTO
    dtype: str | None = None
    block_size: int = 32
    max_shard_size: str | int = "2GiB"
    embedding: str = "int8"

    def __post_init__(self) -> None:
        if self.embedding not in EMBEDDINGS:
            raise ValueError(f"--embedding {self.embedding!r}: expected one of {', '.join(EMBEDDINGS)}")
        if self.layout != AUTO and self.layout not in LAYOUTS:
            raise ValueError(
                f"--layout {self.layout!r} is not a layout; expected {AUTO} or one of {', '.join(sorted(LAYOUTS))}"
            )
        if self.dtype is not None and self.dtype not in _DTYPES:
            raise ValueError(
                f"--dtype {self.dtype!r} is not a value dtype; expected one of {', '.join(sorted(_DTYPES))}"
            )
        if self.block_size not in BLOCK_SIZES:
            raise ValueError(
                f"--block-size {self.block_size} is not a bsr block size; expected one of "
                f"{', '.join(map(str, BLOCK_SIZES))}"
            )
        parse_size(self.max_shard_size)

    @property
    def torch_dtype(self) -> torch.dtype | None:
        """The value dtype as a ``torch.dtype`` (None: keep the stored dtypes)."""
        return None if self.dtype is None else _DTYPES[self.dtype]

    @property
    def max_shard_bytes(self) -> int:
        return parse_size(self.max_shard_size)

    def layout_options(self) -> dict[str, Any]:
        """Keyword options of ``dsf_runtime.formats.pack`` for this layout (``block_size`` for ``bsr``)."""
        return {"block_size": self.block_size} if self.layout == "bsr" else {}

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
