"""DSF-conv on a real layer (conv2 of ccexam's MNIST CNN, Hessian from real digits), the CNN options of DSFConfig,
the unfolded-input Hessian, and the factorized convolution's arithmetic."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from compress.conv.calibration import collect_hessians
from compress.conv.data import mnist_digits
from compress.conv.dsf_conv import CNN_DSF_OPTIONS, cnn_dsf_config, compress_conv
from compress.conv.models import mnist_cnn
from compress.solvers import DSFConfig, MagnitudeConfig, SparseGPTConfig, make_config, solve
from dsf_runtime.conv import CompressedConv, ConvGeometry, conv2d, conv_module_from_layer, geometry_of
from tests.dsf_runtime.helpers import single_thread  # noqa: F401 (autouse fixture)


@pytest.fixture(scope="module")
def real_layer() -> tuple[nn.Conv2d, torch.Tensor, torch.Tensor]:
    """ccexam MNIST conv2 (32→64, 3×3, weight [64, 288]), its H from 256 real digits, and those digits."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one summation order for H; restored, so later tests keep their threads
    model = mnist_cnn()
    digits = mnist_digits()[0][torch.randperm(10_000, generator=torch.Generator().manual_seed(0))[:256]]
    conv = model.features[3]
    hessian = collect_hessians(model, {"features.3": conv}, digits.split(128))["features.3"]
    torch.set_num_threads(threads)
    return conv, hessian, digits


def test_cnn_options_are_the_notebook_setting() -> None:
    config = cnn_dsf_config(0.25)
    assert (config.iters, config.finalize_iters, config.refit_right_iters) == (200, 200, 20)
    assert (config.input_scaling, config.square_density, config.refit_right) == (False, "cnn", True)
    assert cnn_dsf_config(0.25, iters=40).iters == 40
    defaults = DSFConfig(0.5)  # the LLM setting is untouched
    assert (defaults.input_scaling, defaults.refit_right, defaults.square_density) == (True, False, None)
    assert set(CNN_DSF_OPTIONS) <= {f for f in DSFConfig.__dataclass_fields__}


@pytest.mark.parametrize(("density", "square"), [(0.25, 0.16), (0.5, 0.25), (0.8, 0.4)])
def test_cnn_square_density_rule(real_layer, density: float, square: float) -> None:
    conv, hessian, _ = real_layer
    result = compress_conv(conv, hessian, cnn_dsf_config(density, iters=3, finalize_iters=3), name="features.3")
    assert result.layer.nnz == int(64 * 288 * density)
    assert result.layer.factors["A"].nnz == int(64 * 64 * square)  # the square factor [64, 64] is A (out < in·kh·kw)


def test_dsf_conv_beats_magnitude_and_sparsegpt_at_equal_nnz(real_layer) -> None:
    conv, hessian, _ = real_layer
    dsf = compress_conv(conv, hessian, cnn_dsf_config(0.25), name="features.3")
    magnitude = compress_conv(conv, hessian, MagnitudeConfig(0.25), name="features.3")
    sparsegpt = compress_conv(conv, hessian, SparseGPTConfig(0.25), name="features.3")
    dsf, magnitude, sparsegpt = dsf.layer, magnitude.layer, sparsegpt.layer
    assert dsf.kind == "dsf_conv" and magnitude.kind == sparsegpt.kind == "single_conv"
    assert dsf.nnz == magnitude.nnz == sparsegpt.nnz == int(64 * 288 * 0.25)
    assert dsf.relative_error < sparsegpt.relative_error < 0.5 * magnitude.relative_error
    assert dsf.relative_error < 0.2 * magnitude.relative_error


def test_refit_right_and_finalize_never_hurt(real_layer) -> None:
    conv, hessian, _ = real_layer
    weight = conv.weight.detach().reshape(64, -1)
    base = dict(iters=30, input_scaling=False, square_density="cnn")
    plain = solve(weight, hessian, make_config("dsf", 0.3, finalize=False, **base))
    final = solve(weight, hessian, make_config("dsf", 0.3, **base))
    refit = solve(weight, hessian, make_config("dsf", 0.3, refit_right=True, **base))
    assert refit.error <= final.error <= plain.error
    assert torch.equal(refit.masks["B"], final.masks["B"])  # the refit keeps B's support


def test_refit_right_reaches_fixed_mask_least_squares_optimum() -> None:
    g = torch.Generator().manual_seed(3)
    x = torch.randn(400, 24, generator=g, dtype=torch.float64) @ torch.randn(24, 24, generator=g, dtype=torch.float64)
    hessian = x.T @ x / 200
    weight = torch.randn(12, 24, generator=g, dtype=torch.float64)
    result = solve(weight, hessian, make_config("dsf", 0.6, refit_right=True, refit_right_iters=3000))
    a, b, mask = result.factors["A"], result.factors["B"], result.masks["B"]
    gradient = a.T @ (a @ b - weight) @ hessian  # zero on B's support at the optimum
    assert float(gradient[mask].abs().max()) < 1e-6 * float((a.T @ weight @ hessian).abs().max())


def test_input_scaling_off_is_scaling_with_unit_hessian_diagonal() -> None:
    g = torch.Generator().manual_seed(1)
    weight = torch.randn(16, 40, generator=g, dtype=torch.float64)
    x = torch.randn(100, 40, generator=g, dtype=torch.float64)
    hessian = x.T @ x
    d = hessian.diagonal().rsqrt()
    unit = hessian * d[:, None] * d[None, :]  # same H up to input scaling, unit diagonal
    off = solve(weight, hessian, make_config("dsf", 0.5, input_scaling=False, finalize=False, iters=10))
    on = solve(weight, unit, make_config("dsf", 0.5, finalize=False, iters=10))
    assert torch.allclose(off.weight(), on.weight(), atol=1e-9)


def test_unfolded_hessian_gives_the_output_error(real_layer) -> None:
    """tr(ΔW·H·ΔWᵀ) equals (2/N)·Σ‖conv(x, ΔW)‖² over the real calibration activations."""
    conv, hessian, digits = real_layer
    model = mnist_cnn().double()
    inputs = model.features[:3](digits.double())  # the input of conv2
    delta = torch.randn(64, 32, 3, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    direct = 2 / len(inputs) * F.conv2d(inputs, delta, padding=1).square().sum()
    via_h = ((delta.reshape(64, -1) @ hessian.double()) * delta.reshape(64, -1)).sum()
    assert torch.allclose(via_h, direct, rtol=1e-5)


class _StaticSameConv(nn.Conv2d):
    """The EfficientNet port's TF-"same" conv: a ZeroPad2d applied before F.conv2d."""

    def __init__(self, *args, pad: tuple[int, int, int, int], **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.static_padding = nn.ZeroPad2d(pad)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(self.static_padding(x), self.weight, self.bias, self.stride, self.padding, self.dilation)


GEOMETRIES = {
    "3x3_pad1": lambda: nn.Conv2d(6, 10, 3, padding=1, bias=True),
    "stride2_dilation2": lambda: nn.Conv2d(6, 10, 3, stride=2, padding=2, dilation=2),
    "5x3_same": lambda: nn.Conv2d(6, 10, (5, 3), padding="same"),
    "static_asymmetric": lambda: _StaticSameConv(6, 10, 3, stride=2, pad=(0, 1, 0, 1)),
    "1x1_expand": lambda: nn.Conv2d(6, 80, 1, bias=True),  # out >= in·kh·kw: square factor on the input side
}


@pytest.mark.parametrize("build", GEOMETRIES.values(), ids=GEOMETRIES.keys())
def test_unpruned_factorization_equals_the_conv(build) -> None:
    """Nothing pruned (A = I or B = I, the other the weight): float64 conv arithmetic is exact, and the runtime
    module (fp32) equals the original module."""
    conv = build()
    g = geometry_of(conv)
    x = torch.randn(3, 6, 13, 11, generator=torch.Generator().manual_seed(0))
    weight = conv.weight.detach().reshape(g.out_channels, -1)
    eye = torch.eye(min(weight.shape))
    factors = {"A": eye, "B": weight} if weight.shape[0] < weight.shape[1] else {"A": weight, "B": eye}
    inner = factors["B"].double().reshape(-1, 6, *g.kernel)
    chained = F.conv2d(conv2d(x.double(), inner, None, g), factors["A"].double()[:, :, None, None])
    direct = conv2d(x.double(), weight.double().reshape(conv.weight.shape), None, g)
    assert torch.allclose(chained, direct, rtol=0, atol=1e-12)
    layer = CompressedConv.from_dense("dsf_conv", factors, geometry=g, method="none", bias=conv.bias)
    with torch.no_grad():
        assert torch.allclose(conv_module_from_layer(layer)(x), conv(x), atol=1e-5)


def test_solved_factors_run_as_two_convs(real_layer) -> None:
    conv, hessian, digits = real_layer
    layer = compress_conv(conv, hessian, cnn_dsf_config(0.3, iters=20), name="features.3")
    module = conv_module_from_layer(layer)
    x = torch.randn(4, 32, 14, 14)
    expected = F.conv2d(x.double(), layer.conv_weight(torch.float64), conv.bias.double(), padding=1)
    with torch.no_grad():
        assert torch.allclose(module(x).double(), expected, atol=1e-4)


def test_unsupported_conv_error_names_the_layer() -> None:
    depthwise = nn.Conv2d(8, 8, 3, groups=8)
    with pytest.raises(ValueError) as info:
        compress_conv(depthwise, torch.eye(9), MagnitudeConfig(0.5), name="blocks.1.dw")
    assert str(info.value) == (
        "layer 'blocks.1.dw' is a grouped convolution (groups=8): each output channel sees only 1 of the 8 input "
        "channels, so the weight is not one [out, in·kh·kw] matrix; only groups=1 convolutions can be factorized"
    )
    circular = nn.Conv2d(8, 8, 3, padding=1, padding_mode="circular")
    with pytest.raises(ValueError, match="^layer 'c' uses padding_mode='circular'; only zero padding is supported$"):
        compress_conv(circular, torch.eye(72), MagnitudeConfig(0.5), name="c")


def test_density_too_low_names_the_layer(real_layer) -> None:
    conv, hessian, _ = real_layer
    with pytest.raises(ValueError, match="^layer 'features.3': density=0.03 is too low for DSF on a 64×288 layer"):
        compress_conv(conv, hessian, cnn_dsf_config(0.03), name="features.3")


def test_geometry_round_trip() -> None:
    g = geometry_of(_StaticSameConv(6, 10, 3, stride=2, pad=(0, 1, 2, 3)))
    assert g == ConvGeometry(6, 10, (3, 3), (2, 2), (2, 0, 3, 1), (1, 1))
    assert ConvGeometry.from_json(g.to_json()) == g
    assert g.output_size(13, 11) == (8, 5)  # as the module computes
