"""The feature-extractor registry: ``build_extractor(kind, **options)`` for every kind registered here.

Kinds: "inception" (FID Inception-v3, ``weights=`` path or URL), "dinov2" (``model=`` hub id or path), "clip"
(``model_name=``, ``pretrained=``), "classifier" (``dataset=``, ``seed=``: the small-data classifier of
``quality.py``). An extractor has ``.name``, ``.dim`` and maps uint8 [B, 3|1, H, W] to float32 features [B, dim];
the Inception one also has ``forward_all`` (pool, spatial, logits) for sFID and IS. A new metric backbone is one
factory added here (and its class in its own module).
"""
from __future__ import annotations

from typing import Any, Callable, Protocol, runtime_checkable

from torch import Tensor

__all__ = ["FeatureExtractor", "available_extractors", "build_extractor", "register_extractor"]


@runtime_checkable
class FeatureExtractor(Protocol):
    """uint8 images [B, 3|1, H, W] -> float32 features [B, dim]."""

    name: str
    dim: int

    def __call__(self, images: Tensor) -> Tensor: ...


ExtractorFactory = Callable[..., FeatureExtractor]
_EXTRACTORS: dict[str, ExtractorFactory] = {}


def register_extractor(kind: str, factory: ExtractorFactory, *, overwrite: bool = False) -> None:
    """Make ``build_extractor(kind, **options)`` call ``factory(**options)``."""
    if kind in _EXTRACTORS and not overwrite:
        raise ValueError(f"feature extractor kind {kind!r} is already registered (pass overwrite=True to replace it)")
    _EXTRACTORS[kind] = factory


def available_extractors() -> list[str]:
    return sorted(_EXTRACTORS)


def build_extractor(kind: str, **options: Any) -> FeatureExtractor:
    """Build a registered feature extractor: "inception" (weights=), "dinov2" (model=), "clip" (model_name=,
    pretrained=), "classifier" (dataset=, seed=: the small-data classifier of quality.py), or any kind added
    with ``register_extractor``."""
    if kind not in _EXTRACTORS:
        raise ValueError(f"unknown feature extractor {kind!r}; registered: {available_extractors()}")
    return _EXTRACTORS[kind](**options)


def _inception_factory(**options: Any) -> FeatureExtractor:
    from deepflow.platform.eval.inception import FIDInceptionExtractor

    return FIDInceptionExtractor(**options)


def _dinov2_factory(**options: Any) -> FeatureExtractor:
    from deepflow.platform.eval.feature_extractors import DinoV2Extractor

    return DinoV2Extractor(**options)


def _clip_factory(**options: Any) -> FeatureExtractor:
    from deepflow.platform.eval.feature_extractors import ClipImageExtractor

    return ClipImageExtractor(**options)


def _classifier_factory(**options: Any) -> FeatureExtractor:
    from deepflow.platform.eval.quality import ClassifierQuality

    return ClassifierQuality.for_dataset(**options)


register_extractor("inception", _inception_factory)
register_extractor("classifier", _classifier_factory)
register_extractor("dinov2", _dinov2_factory)
register_extractor("clip", _clip_factory)


def __getattr__(name: str) -> Any:
    """``evaluate_samples`` and ``ReferenceBatch`` live in eval_batches.py (which imports this module)."""
    if name in ("evaluate_samples", "ReferenceBatch"):
        from deepflow.platform import eval_batches

        return getattr(eval_batches, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
