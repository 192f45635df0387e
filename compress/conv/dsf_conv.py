"""DSF (and single-matrix pruning) of a ``Conv2d``: factor its flattened weight with a layer solver.

The weight ``[out, in, kh, kw]`` is flattened to ``W`` ``[out, in·kh·kw]`` and solved against the Hessian of the
unfolded input (``compress.conv.calibration``). A DSF result ``W ≈ A·B`` becomes two convolutions (kind
``dsf_conv``): ``B`` ``[k, in·kh·kw]`` is a ``kh×kw`` conv ``in → k`` with the layer's stride, padding and dilation,
``A`` ``[out, k]`` a ``1×1`` conv ``k → out`` carrying the bias (``docs/dsf-algorithm.md`` §1.6, fine-tune
recipe: ``nn.Sequential(conv_kxk(in→k, stride) = B, conv_1×1(k→out) = A)``). For ``out >= in·kh·kw`` the square
factor is on the input side, so the first conv is the square ``in·kh·kw → in·kh·kw`` one. A single-matrix method
(magnitude, SparseGPT, Wanda) gives kind ``single_conv``.

``CNN_DSF_OPTIONS`` is the setting of the DSF-vs-OBC CNN notebooks (§1.6): no input-norm scaling, square-factor
density ``max(0.16, density/2)``, 200 outer iterations, 200 ``finalize`` steps, then the ``get_at`` refit of the
right factor (20 steps).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from compress.solvers import DSFConfig, SolverConfig, solve
from dsf_runtime.conv import CompressedConv, geometry_of

__all__ = ["CNN_DSF_OPTIONS", "cnn_dsf_config", "compress_conv"]

CNN_DSF_OPTIONS: dict[str, Any] = {
    "iters": 200,
    "finalize_iters": 200,
    "input_scaling": False,
    "square_density": "cnn",
    "refit_right": True,
    "refit_right_iters": 20,
}


def cnn_dsf_config(density: float, **overrides: Any) -> DSFConfig:
    """``DSFConfig`` with the CNN setting (``CNN_DSF_OPTIONS``), any option overridable (e.g. ``iters=40``)."""
    return DSFConfig(density=density, **{**CNN_DSF_OPTIONS, **overrides})


@torch.no_grad()
def compress_conv(
    module: nn.Conv2d, hessian: torch.Tensor, config: SolverConfig, *, name: str | None = None
) -> CompressedConv:
    """Compress one convolution with a layer solver.

    Args:
        module: a supported ``Conv2d`` (``groups == 1``), weight ``[out, in, kh, kw]``.
        hessian: ``[in·kh·kw, in·kh·kw]`` from ``collect_hessians`` (``torch.eye`` for data-free).
        config: any solver config (``cnn_dsf_config(d)``, ``MagnitudeConfig(d)``, ...).
        name: the layer's name, for errors and logs.

    Returns:
        A ``CompressedConv`` (layout ``dense``, fp32) of kind ``dsf_conv`` or ``single_conv``, with the solver's
        layer error ``tr(ΔW·H·ΔWᵀ)``.

    Raises:
        ValueError: the module is not a supported convolution, or the solver rejects the layer (naming it).
    """
    geometry = geometry_of(module, name)
    weight = module.weight.detach().reshape(geometry.out_channels, geometry.fan_in)
    result = solve(weight, hessian, config, layer_name=name)
    kind = "dsf_conv" if result.kind == "dsf" else "single_conv"
    bias = None if module.bias is None else module.bias.detach().float()
    return CompressedConv.from_dense(
        kind, result.factors, geometry=geometry, method=config.method, bias=bias,  # type: ignore[attr-defined]
        error=result.error, relative_error=result.relative_error,
    )
