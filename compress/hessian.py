"""Streaming accumulation of a linear layer's calibration Hessian ``H = (2/N)·Σ xxᵀ``.

The update is SparseGPT's ``add_batch`` (``IST-DASLab/sparsegpt``), which DSF copies verbatim: fp32, undamped,
rescaled on every batch so memory does not grow with the number of samples::

    H *= n / (n + t);  n += t;  x = sqrt(2 / n) · x;  H += xᵀx

``t`` is the number of *samples* in the batch: the leading dimension of a ``[t, ..., in]`` input (a batch of
sequences), or 1 for a 2-D ``[tokens, in]`` or 1-D ``[in]`` input. ``H`` is therefore the mean over samples of
``2·Σ_tokens xxᵀ``, exactly as in SparseGPT; no solver depends on the overall scale of ``H``.
"""

from __future__ import annotations

import math

import torch

__all__ = ["HessianAccumulator"]


class HessianAccumulator:
    """Running ``H = (2/N)·Σ xxᵀ`` [in, in] fp32 for one layer input.

    Args:
        in_features: width of the layer input.
        device: where ``H`` lives (CPU or CUDA); inputs on another device are moved there.

    Example:
        >>> acc = HessianAccumulator(4, "cpu")
        >>> acc.add_batch(torch.ones(2, 3, 4))
        >>> acc.nsamples, acc.hessian[0, 0].item()
        (2, 6.0)
    """

    def __init__(self, in_features: int, device: torch.device | str) -> None:
        if in_features < 1:
            raise ValueError(f"in_features must be positive, got {in_features}")
        self.in_features = in_features
        self.device = torch.device(device)
        self._hessian: torch.Tensor | None = torch.zeros(in_features, in_features, device=self.device)
        self._nsamples = 0

    @property
    def nsamples(self) -> int:
        """Number of samples ``N`` accumulated so far."""
        return self._nsamples

    @property
    def hessian(self) -> torch.Tensor:
        """The accumulated ``H`` [in, in] fp32 (the live buffer, not a copy).

        Raises:
            RuntimeError: after ``free()``.
        """
        if self._hessian is None:
            raise RuntimeError("the Hessian was freed; read .hessian before calling free()")
        return self._hessian

    @torch.inference_mode()  # works whether or not H was created in inference mode
    def add_batch(self, x: torch.Tensor) -> None:
        """Add one batch of layer inputs.

        Args:
            x: ``[t, ..., in]`` (``t`` samples), ``[tokens, in]`` or ``[in]`` (one sample); any float dtype.

        Raises:
            ValueError: if the last dimension is not ``in_features`` or ``x`` is not floating point.
            RuntimeError: after ``free()``.
        """
        hessian = self.hessian
        if not x.is_floating_point():
            raise ValueError(f"layer inputs must be floating point, got {x.dtype}")
        if x.dim() == 0 or x.shape[-1] != self.in_features:
            raise ValueError(
                f"input has shape {tuple(x.shape)}, expected [..., {self.in_features}] (the layer's in_features)"
            )
        batch = x.shape[0] if x.dim() >= 3 else 1
        rows = x.reshape(-1, self.in_features).to(self.device, torch.float32)
        hessian *= self._nsamples / (self._nsamples + batch)
        self._nsamples += batch
        rows = math.sqrt(2 / self._nsamples) * rows
        hessian.addmm_(rows.T, rows)

    def free(self) -> None:
        """Release ``H``; the accumulator cannot be used afterwards."""
        self._hessian = None
