"""Fixtures of the eval tests: a trained digits classifier in a cache folder, and small digits sample batches."""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest

from deepflow.storage import write_url_bytes


def write_npz(url: str, **arrays: np.ndarray) -> None:
    """An .npz of ``arrays`` at ``url`` (any storage URL)."""
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    write_url_bytes(url, buffer.getvalue())


@pytest.fixture(scope="session")
def digits_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A DEEPFLOW_CACHE folder holding the trained digits classifier (trained once per session, ~6 s)."""
    from deepflow.platform.eval.quality import ClassifierQuality

    cache = tmp_path_factory.mktemp("deepflow-cache")
    ClassifierQuality.for_dataset("digits", cache_dir=cache)
    return cache


@pytest.fixture(scope="session")
def digits_batches(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """ADM .npz batches of scikit-learn digits (8x8 grayscale, NHWC): "real" (the held-out images not in the
    classifier's reference, arr_1 their labels), "text" (the same images, arr_1 = -1), "noise" (uniform noise,
    real labels), "reference" (arr_0 only: the classifier's reference images)."""
    from deepflow.platform.eval.quality_data import load_labelled_split

    images, labels, _ = load_labelled_split("digits", "test")
    half = len(images) // 2  # ClassifierQuality.for_dataset's default reference split
    unseen, unseen_labels = images[half:, :, :, None], labels[half:]
    folder = tmp_path_factory.mktemp("digits-batches")
    paths = {name: folder / f"{name}.npz" for name in ("real", "text", "noise", "reference")}
    write_npz(str(paths["real"]), arr_0=unseen, arr_1=unseen_labels)
    write_npz(str(paths["text"]), arr_0=unseen, arr_1=np.full(len(unseen), -1, np.int64))
    noise = np.random.default_rng(0).integers(0, 256, unseen.shape, dtype=np.uint8)
    write_npz(str(paths["noise"]), arr_0=noise, arr_1=unseen_labels)
    write_npz(str(paths["reference"]), arr_0=images[:half, :, :, None])
    return paths
