"""Basis convolutions: exactness when the basis spans the filters, selection and data-aware fitting on a real layer
(ccexam MNIST conv2, Hessian from real digits), bias handling, fine-tuning and errors."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from compress.conv.basis import basis_conv, basis_params, basis_size_for_params, fit_coefficients, select_basis
from compress.conv.calibration import collect_hessians
from compress.conv.data import mnist_digits
from compress.conv.finetune import finetune
from compress.conv.metrics import kl_divergence, logits
from compress.conv.models import mnist_cnn
from dsf_runtime.conv import conv_module_from_layer, geometry_of, replace_conv, to_standard
from tests.dsf_runtime.helpers import single_thread  # noqa: F401 (autouse fixture)


@pytest.fixture(scope="module")
def real() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """ccexam's MNIST CNN, the Hessian of conv2 ('features.3') from 256 real digits, and those digits."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one summation order for H; restored, so later tests keep their threads
    model = mnist_cnn()
    digits = mnist_digits()[0][torch.randperm(10_000, generator=torch.Generator().manual_seed(1))[:256]]
    hessian = collect_hessians(model, {"features.3": model.features[3]}, digits.split(128))["features.3"]
    torch.set_num_threads(threads)
    return model, hessian, digits


def _low_rank_conv(rank: int, bias: bool) -> nn.Conv2d:
    """A 12→16 3×3 conv whose 16 filters span a ``rank``-dimensional space."""
    g = torch.Generator().manual_seed(0)
    conv = nn.Conv2d(12, 16, 3, padding=1, bias=bias)
    with torch.no_grad():
        conv.weight.copy_((torch.randn(16, rank, generator=g) @ torch.randn(rank, 108, generator=g)).view(16, 12, 3, 3))
    return conv


@pytest.mark.parametrize("selection", ["greedy", "qr"])
@pytest.mark.parametrize("bias", [False, True])
def test_basis_spanning_the_filters_is_exact(selection: str, bias: bool) -> None:
    conv = _low_rank_conv(6, bias)
    layer = basis_conv(conv, 6, selection=selection, name="c")
    assert layer.layer.kind == "basis_conv" and layer.layer.inner_dim == 6 and len(set(layer.basis_channels)) == 6
    assert layer.layer.relative_error < 1e-9
    x = torch.randn(2, 12, 9, 9)
    with torch.no_grad():
        expected = conv(x)
        assert torch.allclose(conv_module_from_layer(layer)(x), expected, atol=1e-4)
        assert torch.allclose(to_standard(conv_module_from_layer(layer))(x), expected, atol=1e-4)


def test_all_filters_kept_reproduces_the_real_layer(real) -> None:
    model, hessian, digits = real
    conv = model.features[3]
    layer = basis_conv(conv, 64, hessian, name="features.3")
    assert layer.layer.error == 0 and layer.layer.factors["coeff"].shape == (0, 64)
    assert sorted(layer.basis_channels) == list(range(64))
    assert torch.equal(layer.conv_weight(), conv.weight.detach())  # the very filters, permuted back
    x = model.features[:3](digits[:8])
    with torch.no_grad():
        assert torch.allclose(conv_module_from_layer(layer)(x), conv(x), rtol=0, atol=1e-5)


def test_greedy_is_the_best_first_pick_and_qr_the_largest_norm() -> None:
    g = torch.Generator().manual_seed(2)
    w = torch.randn(7, 20, generator=g, dtype=torch.float64)
    gram = w @ w.T

    def error(basis: list[int]) -> float:
        coeff = fit_coefficients(gram, basis)
        rest = [c for c in range(7) if c not in basis]
        return float((w[rest] - coeff @ w[basis]).square().sum())

    first = select_basis(gram, 1, "greedy")[0]
    assert error([first]) == pytest.approx(min(error([j]) for j in range(7)))
    assert select_basis(gram, 1, "qr")[0] == int(gram.diagonal().argmax())
    greedy = error(select_basis(gram, 3, "greedy"))
    best = min(error(list(c)) for c in itertools.combinations(range(7), 3))
    assert best <= greedy <= 1.5 * best


def test_data_aware_fit_beats_data_free_on_the_real_layer(real) -> None:
    model, hessian, _ = real
    conv = model.features[3]
    aware = basis_conv(conv, 16, hessian, name="features.3")
    free = basis_conv(conv, 16, None, name="features.3")
    weight = conv.weight.detach().reshape(64, -1).double()
    h = hessian.double()

    def h_error(layer) -> float:
        delta = layer.weight(torch.float64) - weight
        return float(((delta @ h) * delta).sum())

    assert h_error(aware) == pytest.approx(aware.layer.error, rel=1e-4)
    assert h_error(aware) < 0.8 * h_error(free)
    assert aware.layer.nnz == basis_params(geometry_of(conv), 16) == 16 * 288 + 48 * 16


def test_basis_size_for_params() -> None:
    g = geometry_of(nn.Conv2d(32, 64, 3))
    assert basis_size_for_params(g, 64 * 288 // 4) == 13  # 13·288 + 51·13 = 4407 <= 4608 < 14·288 + 50·14
    assert basis_size_for_params(g, 64 * 288) == 64
    with pytest.raises(ValueError) as info:
        basis_size_for_params(g, 300, "features.3")
    assert str(info.value) == (
        "layer 'features.3': a budget of 300 weights cannot hold one basis filter (needs 351); raise the budget or "
        "keep this layer dense"
    )


@pytest.mark.parametrize("n_basis", [0, 65, 2.5])
def test_basis_out_of_range_names_the_layer(real, n_basis) -> None:
    model, hessian, _ = real
    with pytest.raises(ValueError) as info:
        basis_conv(model.features[3], n_basis, hessian, name="features.3")
    assert str(info.value) == (
        f"layer 'features.3': a basis of {n_basis!r} filters does not fit a layer with 64 output channels; "
        "pass 1 <= n_basis <= 64"
    )


def test_bad_selection_and_hessian(real) -> None:
    model, hessian, _ = real
    bad_selection = r"^layer 'features.3': selection must be one of \('greedy', 'qr'\), got 'svd'$"
    with pytest.raises(ValueError, match=bad_selection):
        basis_conv(model.features[3], 8, hessian, selection="svd", name="features.3")
    with pytest.raises(ValueError, match=r"^layer 'features.3': hessian has shape \(9, 9\), expected \(288, 288\)"):
        basis_conv(model.features[3], 8, torch.eye(9), name="features.3")
    with pytest.raises(ValueError, match="^layer 'dw' is a grouped convolution"):
        basis_conv(nn.Conv2d(4, 4, 3, groups=4), 2, name="dw")


def test_finetune_lowers_the_kl_and_keeps_the_structure(real) -> None:
    model, hessian, digits = real
    student = mnist_cnn()
    layer = basis_conv(student.features[3], 8, hessian, name="features.3")
    replace_conv(student, {"features.3": layer})
    reference = logits(model, digits)
    before = kl_divergence(reference, logits(student, digits))
    tuned = finetune(student, model, {"features.3": layer}, list(digits.split(64)), steps=30, lr=1e-3)
    after = kl_divergence(reference, logits(student, digits))
    assert after < 0.7 * before
    new = tuned["features.3"]
    assert new.layer.kind == "basis_conv" and new.basis_channels == layer.basis_channels and new.layer.error is None
    assert new.layer.factors["coeff"].shape == layer.layer.factors["coeff"].shape
    with torch.no_grad():
        x = model.features[:3](digits[:4])
        expected = F.conv2d(x, new.conv_weight(), new.layer.bias, padding=1)
        assert torch.allclose(student.features[3](x), expected, atol=1e-4)
