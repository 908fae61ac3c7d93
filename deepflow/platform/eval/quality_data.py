"""Labelled train / held-out splits of the small datasets the quality classifier knows."""
from __future__ import annotations

import numpy as np
from PIL import Image

from deepflow.data_pipeline.config import DigitsSourceConfig, FashionMnistSourceConfig
from deepflow.data_pipeline.preprocess import preprocess_image
from deepflow.data_pipeline.sources import digits_source, fashion_mnist_source

DIGITS_TRAIN_COUNT = 1500  # scikit-learn digits has no official split: the first 1500 train, the last 297 are held out
QUALITY_DATASETS = ("fashion_mnist", "digits")


def load_labelled_split(
    dataset: str, split: str, pad: int = 0, resize_to: int | None = None
) -> tuple[np.ndarray, np.ndarray, int]:
    """(uint8 images [N, S, S], int64 labels [N], num_classes) of ``dataset``'s ``split`` ("train" | "test").

    ``resize_to``: bicubic resize with the data pipeline's own preprocessing (so real images match the shards the
    models train on); ``pad``: a black border added afterwards.
    """
    images, labels, num_classes = _load(dataset, split)
    if resize_to is not None and resize_to != images.shape[-1]:
        images = np.stack([
            preprocess_image(Image.fromarray(image, mode="L"), resize_to, "resize", 1)[0] for image in images
        ])
    if pad:
        images = np.pad(images, ((0, 0), (pad, pad), (pad, pad)))
    return images, labels, num_classes


def _load(dataset: str, split: str) -> tuple[np.ndarray, np.ndarray, int]:
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    if dataset == "fashion_mnist":
        source = fashion_mnist_source(FashionMnistSourceConfig(kind="fashion_mnist", split=split))
        return source.images, source.labels, source.num_classes
    if dataset == "digits":
        source = digits_source(DigitsSourceConfig(kind="digits"))
        part = slice(0, DIGITS_TRAIN_COUNT) if split == "train" else slice(DIGITS_TRAIN_COUNT, None)
        return source.images[part], source.labels[part], source.num_classes
    raise ValueError(f"no quality classifier for dataset {dataset!r}; known: {list(QUALITY_DATASETS)}")
