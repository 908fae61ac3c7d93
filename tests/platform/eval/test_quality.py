"""The small-data quality metric separates real held-out images from noise and blur."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from deepflow.platform.eval.quality import ClassifierQuality
from deepflow.platform.eval.quality_data import load_labelled_split


@pytest.fixture(scope="module")
def digits_quality(digits_cache) -> ClassifierQuality:
    """The digits classifier trained once per session (conftest.digits_cache), 150 reference images."""
    return ClassifierQuality.for_dataset("digits", cache_dir=digits_cache, num_reference=150)


def _blur(images: np.ndarray) -> torch.Tensor:
    x = torch.from_numpy(images[:, None].astype(np.float32))
    kernel = torch.ones(1, 1, 3, 3) / 9
    return F.conv2d(x, kernel, padding=1).round().clamp(0, 255).to(torch.uint8)


def test_real_scores_near_zero_and_noise_blur_clearly_worse(digits_quality: ClassifierQuality) -> None:
    unseen, unseen_labels = digits_quality.unseen_real  # held out, and not part of the reference statistics
    images, _, _ = load_labelled_split("digits", "test")
    assert len(unseen) == len(images) - 150
    real = digits_quality.score(unseen[:, None], unseen_labels)
    noise = digits_quality.score(np.random.default_rng(0).integers(0, 256, unseen[:, None].shape, np.uint8), unseen_labels)
    blur = digits_quality.score(_blur(unseen), unseen_labels)

    assert real["accuracy"] > 0.85
    assert noise["accuracy"] < 0.3
    assert blur["accuracy"] < real["accuracy"]
    assert real["fd"] < 0.25 * blur["fd"]
    assert blur["fd"] < noise["fd"]
    # Shuffled labels: same images, so the same FD, but the classes asked for are not the ones shown.
    shuffled = digits_quality.score(unseen[:, None], np.roll(unseen_labels, 1))
    assert shuffled["fd"] == pytest.approx(real["fd"])
    assert shuffled["accuracy"] < 0.3


def test_training_is_reproducible_and_cached(tmp_path, digits_quality: ClassifierQuality) -> None:
    again = ClassifierQuality.for_dataset("digits", cache_dir=tmp_path, num_reference=150)
    assert again.sha256 == digits_quality.sha256  # same seed -> bitwise the same classifier
    cached = list(tmp_path.glob("classifier-digits-*.safetensors"))
    assert len(cached) == 1
    assert ClassifierQuality.for_dataset("digits", cache_dir=tmp_path, num_reference=150).sha256 == again.sha256


def test_extractor_interface_and_errors(digits_quality: ClassifierQuality) -> None:
    images, _, _ = load_labelled_split("digits", "test")
    rgb = np.repeat(images[:4, None], 3, axis=1)
    feats = digits_quality(torch.from_numpy(rgb))
    assert feats.shape == (4, digits_quality.dim)
    assert torch.allclose(feats, digits_quality(torch.from_numpy(images[:4, None].copy())), atol=1e-5)
    with pytest.raises(TypeError, match="uint8"):
        digits_quality(torch.zeros(2, 1, 8, 8))
    with pytest.raises(ValueError, match="no quality classifier recipe"):
        ClassifierQuality.for_dataset("cifar10")


def test_to_moves_the_classifier_and_features_follow(digits_quality: ClassifierQuality) -> None:
    assert digits_quality.to("cpu") is digits_quality and digits_quality.device == torch.device("cpu")
    images, labels, _ = load_labelled_split("digits", "test")
    feats = digits_quality(images[:8, None])
    assert feats.device == digits_quality.device and feats.shape == (8, digits_quality.dim)
    assert digits_quality.class_accuracy(feats, labels[:8]) == digits_quality.class_accuracy(feats.numpy(), labels[:8])
