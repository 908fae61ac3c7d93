"""The extractor registry's interface: every kind is built on a device, has .to/.name/.dim; errors name the kind."""
from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path

import numpy as np
import pytest
import torch

from deepflow.platform.eval import extractors
from deepflow.platform.eval.extractors import (
    ExtractorOptionsError,
    FeatureExtractor,
    LabelScorer,
    MultiOutputExtractor,
    SelfReferencedExtractor,
    UnknownExtractorError,
    available_extractors,
    build_extractor,
    extractor_options,
    register_extractor,
)
from deepflow.platform.eval.quality import ClassifierQuality


def test_classifier_built_on_a_device_has_the_full_interface(digits_cache: Path) -> None:
    quality = build_extractor("classifier", device="cpu", dataset="digits", cache_dir=str(digits_cache))
    assert isinstance(quality, ClassifierQuality) and hasattr(quality, "to")
    assert isinstance(quality, FeatureExtractor) and isinstance(quality, SelfReferencedExtractor)
    assert isinstance(quality, LabelScorer) and not isinstance(quality, MultiOutputExtractor)
    assert quality.to("cpu") is quality and quality.device == torch.device("cpu")
    assert quality.name == "classifier" and quality.dim == 128 and quality.num_classes == 10
    mu, sigma = quality.reference_stats
    assert mu.shape == (128,) and sigma.shape == (128, 128)
    assert "digits held-out split" in quality.reference_id and quality.sha256[:16] in quality.reference_id
    images = torch.zeros(3, 1, 8, 8, dtype=torch.uint8)
    feats = quality(images)
    assert feats.shape == (3, 128) and feats.device == torch.device("cpu")
    assert 0.0 <= quality.class_accuracy(feats, np.zeros(3, np.int64)) <= 1.0
    with pytest.raises(ValueError, match="2 labels for 3"):
        quality.class_accuracy(feats, np.zeros(2, np.int64))


def test_default_cache_dir_comes_from_the_environment(digits_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DEEPFLOW_CACHE", str(digits_cache))
    quality = build_extractor("classifier", device="cpu", dataset="digits")  # loads, does not train again
    assert quality.to("cpu") is quality
    assert len(list(digits_cache.glob("classifier-digits-*.safetensors"))) == 1


def test_every_registered_kind_builds_with_to_name_and_dim(tmp_path: Path, digits_cache: Path) -> None:
    from transformers import Dinov2Config, Dinov2Model

    Dinov2Model(Dinov2Config(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                             image_size=28, patch_size=14)).save_pretrained(tmp_path / "dino")
    options = {
        "inception": {"weights": None},
        "dinov2": {"model": str(tmp_path / "dino"), "image_size": 28},
        "clip": {"model_name": "ViT-S-32", "pretrained": None},
        "classifier": {"dataset": "digits", "cache_dir": str(digits_cache)},
    }
    assert set(options) <= set(available_extractors())
    images = torch.randint(0, 256, (2, 3, 16, 16), dtype=torch.uint8)
    for kind, kwargs in options.items():
        with pytest.warns(UserWarning, match="RANDOM") if kind == "inception" else nullcontext():
            extractor = build_extractor(kind, device="cpu", **kwargs)
        assert isinstance(extractor, FeatureExtractor), kind
        assert extractor.to("cpu") is extractor, kind
        assert extractor.name == kind and extractor.dim > 0
        assert extractor(images).shape == (2, extractor.dim), kind
    with pytest.warns(UserWarning, match="RANDOM"):
        assert isinstance(build_extractor("inception", weights=None), MultiOutputExtractor)


def test_unknown_kind_is_one_line_naming_the_registered_kinds_close_matches_first() -> None:
    with pytest.raises(UnknownExtractorError) as caught:
        build_extractor("clasifier")
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith("unknown feature extractor 'clasifier' (registered: classifier, ")
    assert "did you mean 'classifier'?" in message
    for kind in ("inception", "dinov2", "clip"):
        assert kind in message
    far = str(pytest.raises(UnknownExtractorError, build_extractor, "zzz").value)
    assert "did you mean" not in far and ", ".join(available_extractors()) in far
    assert isinstance(caught.value, ValueError)


def test_bad_options_name_the_kind_and_the_accepted_options() -> None:
    assert extractor_options("classifier") == ["dataset", "seed", "cache_dir", "num_reference"]
    with pytest.raises(ExtractorOptionsError, match=r"'classifier'.*datset.*options: dataset, seed"):
        build_extractor("classifier", datset="digits")
    with pytest.raises(ExtractorOptionsError, match="missing a required argument: 'dataset'"):
        build_extractor("classifier")


def test_a_factory_must_return_a_complete_extractor() -> None:
    class NoTo:
        name, dim = "no_to", 1

        def __call__(self, images: torch.Tensor) -> torch.Tensor:
            return images.float().mean(dim=(1, 2, 3))[:, None]

    register_extractor("test_no_to", lambda: NoTo(), overwrite=True)
    try:
        with pytest.raises(TypeError, match="'test_no_to'.*without to"):
            build_extractor("test_no_to")
    finally:
        extractors._EXTRACTORS.pop("test_no_to")
