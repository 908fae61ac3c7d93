"""The feature-extractor registry: ``build_extractor(kind, device=None, **options)`` for every kind registered here.

Kinds and their options:

- ``inception``: the FID Inception-v3 (``weights=`` path or URL; None: random weights, tests only). Also has
  ``forward_all`` (pool, spatial, logits) for sFID and IS: a :class:`MultiOutputExtractor`;
- ``dinov2``: DINOv2 CLS features (``model=`` hub id or local path, ``image_size=``);
- ``clip``: an open_clip image tower (``model_name=``, ``pretrained=``);
- ``classifier``: the small-data classifier of ``quality.py`` (``dataset=``, ``seed=``, ``cache_dir=``,
  ``num_reference=``); it carries its own reference statistics (:class:`SelfReferencedExtractor`) and scores class
  accuracy (:class:`LabelScorer`).

Every extractor satisfies :class:`FeatureExtractor`: ``.name``, ``.dim``, ``.to(device)`` (returns the extractor) and
a call mapping uint8 images [B, 3|1, H, W] to float32 features [B, dim]. A new metric backbone is one
:func:`register_extractor` call (its class in its own module); :func:`build_extractor` checks the options against the
factory's signature and the result against the protocol, so callers never probe with ``hasattr``.
"""
from __future__ import annotations

import difflib
import inspect
from pathlib import Path
from typing import Any, Callable, Protocol, runtime_checkable

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "ExtractorOptionsError",
    "FeatureExtractor",
    "LabelScorer",
    "MultiOutputExtractor",
    "SelfReferencedExtractor",
    "UnknownExtractorError",
    "available_extractors",
    "build_extractor",
    "extractor_options",
    "register_extractor",
    "unknown_extractor_message",
]


@runtime_checkable
class FeatureExtractor(Protocol):
    """uint8 images [B, 3|1, H, W] -> float32 features [B, dim], on the device given to ``to``."""

    name: str
    dim: int

    def __call__(self, images: Tensor) -> Tensor: ...

    def to(self, device: str | torch.device) -> FeatureExtractor: ...


@runtime_checkable
class MultiOutputExtractor(FeatureExtractor, Protocol):
    """An extractor with several outputs per image (Inception: pool [B, 2048], spatial [B, 2023], logits [B, 1008]).

    ``forward_all`` returns an object with ``pool``, ``spatial`` and ``logits`` tensors.
    """

    def forward_all(self, images: Tensor) -> Any: ...


@runtime_checkable
class SelfReferencedExtractor(FeatureExtractor, Protocol):
    """An extractor that carries the statistics of its own reference set: (mu [dim], sigma [dim, dim]) float64."""

    reference_stats: tuple[np.ndarray, np.ndarray]
    #: human-readable identity of that reference (dataset split, weights hash), recorded with every result
    reference_id: str


@runtime_checkable
class LabelScorer(FeatureExtractor, Protocol):
    """An extractor whose features also classify: ``class_accuracy(features [N, dim], labels [N]) -> float``."""

    num_classes: int

    def class_accuracy(self, features: np.ndarray | Tensor, labels: np.ndarray | Tensor) -> float: ...


class UnknownExtractorError(ValueError):
    """``build_extractor`` got a kind nobody registered; the message lists the registered kinds, close ones first."""


class ExtractorOptionsError(ValueError):
    """Options a kind's factory does not accept (or required ones missing); the message lists the accepted ones."""


ExtractorFactory = Callable[..., FeatureExtractor]
_EXTRACTORS: dict[str, ExtractorFactory] = {}


def register_extractor(kind: str, factory: ExtractorFactory, *, overwrite: bool = False) -> None:
    """Make ``build_extractor(kind, **options)`` call ``factory(**options)``.

    The factory's signature documents (and :func:`build_extractor` enforces) the accepted options; it must return a
    :class:`FeatureExtractor` (with ``name``, ``dim``, ``to`` and a call).
    """
    if kind in _EXTRACTORS and not overwrite:
        raise ValueError(f"feature extractor kind {kind!r} is already registered (pass overwrite=True to replace it)")
    _EXTRACTORS[kind] = factory


def available_extractors() -> list[str]:
    """The registered kinds, sorted."""
    return sorted(_EXTRACTORS)


def unknown_extractor_message(kind: str) -> str:
    """``unknown feature extractor 'x' (registered: close, matches, first, then, the, rest)``: one line."""
    registered = available_extractors()
    close = difflib.get_close_matches(kind, registered, n=len(registered), cutoff=0.5)
    ordered = close + [name for name in registered if name not in close]
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return f"unknown feature extractor {kind!r} (registered: {', '.join(ordered)}){hint}"


def extractor_options(kind: str) -> list[str]:
    """Names of the options ``kind``'s factory accepts (``["**options"]`` for a factory taking any)."""
    if kind not in _EXTRACTORS:
        raise UnknownExtractorError(unknown_extractor_message(kind))
    parameters = inspect.signature(_EXTRACTORS[kind]).parameters.values()
    return [("**" if p.kind is p.VAR_KEYWORD else "") + p.name for p in parameters if p.kind is not p.VAR_POSITIONAL]


def build_extractor(kind: str, device: str | torch.device | None = None, **options: Any) -> FeatureExtractor:
    """Build a registered feature extractor and place it on ``device`` (None: where the factory left it, the CPU).

    Raises :class:`UnknownExtractorError` for a kind nobody registered, :class:`ExtractorOptionsError` for options
    its factory does not take, and ``TypeError`` if the factory returns no :class:`FeatureExtractor`.
    """
    if kind not in _EXTRACTORS:
        raise UnknownExtractorError(unknown_extractor_message(kind))
    factory = _EXTRACTORS[kind]
    _check_options(kind, factory, options)
    extractor = factory(**options)
    if not isinstance(extractor, FeatureExtractor):
        missing = [a for a in ("name", "dim", "to", "__call__") if not hasattr(extractor, a)]
        raise TypeError(f"feature extractor kind {kind!r}: the factory returned a {type(extractor).__name__} "
                        f"without {', '.join(missing)} (see extractors.FeatureExtractor)")
    return extractor if device is None else extractor.to(device)


def _check_options(kind: str, factory: ExtractorFactory, options: dict[str, Any]) -> None:
    """Raise :class:`ExtractorOptionsError` when ``factory(**options)`` would not bind: unknown options first, then
    missing required ones."""
    try:
        signature = inspect.signature(factory)
    except (TypeError, ValueError):  # builtins without a signature: let the call decide
        return
    parameters = signature.parameters
    accepted = ", ".join(extractor_options(kind)) or "none"
    if not any(p.kind is p.VAR_KEYWORD for p in parameters.values()):
        unknown = [name for name in options if name not in parameters]
        if unknown:
            listed = ", ".join(map(repr, unknown))
            raise ExtractorOptionsError(f"feature extractor {kind!r}: unknown option(s) {listed} (options: {accepted})")
    try:
        signature.bind(**options)
    except TypeError as error:
        raise ExtractorOptionsError(f"feature extractor {kind!r}: {error} (options: {accepted})") from None


# ------------------------------------------------------------------------------------------- built-in kinds
def _inception_factory(weights: str | None = None, cache_dir: str | None = None) -> FeatureExtractor:
    from deepflow.platform.eval.inception import FIDInceptionExtractor

    return FIDInceptionExtractor(weights=weights, cache_dir=cache_dir)


def _dinov2_factory(model: str = "facebook/dinov2-large", image_size: int = 224) -> FeatureExtractor:
    from deepflow.platform.eval.feature_extractors import DinoV2Extractor

    return DinoV2Extractor(model=model, image_size=image_size)


def _clip_factory(model_name: str = "ViT-L-14", pretrained: str | None = None) -> FeatureExtractor:
    from deepflow.platform.eval.feature_extractors import ClipImageExtractor

    return ClipImageExtractor(model_name=model_name, pretrained=pretrained)


def _classifier_factory(
    dataset: str, seed: int = 0, cache_dir: str | Path | None = None, num_reference: int | None = None
) -> FeatureExtractor:
    from deepflow.platform.eval.quality import ClassifierQuality

    return ClassifierQuality.for_dataset(dataset, seed=seed, cache_dir=cache_dir, num_reference=num_reference)


register_extractor("inception", _inception_factory)
register_extractor("classifier", _classifier_factory)
register_extractor("dinov2", _dinov2_factory)
register_extractor("clip", _clip_factory)
