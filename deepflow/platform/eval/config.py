"""The configuration of an evaluation run (``jobs/evaluate.py``): one pydantic model, loaded with
:func:`deepflow.configuration.load_validated` from an optional YAML file plus ``--set a.b=v`` overrides; every
command-line flag of the job is sugar for one field (see :mod:`deepflow.platform.eval.job`).

.. code-block:: yaml

    samples: s3://runs/xl3t/samples-cfg1/samples.npz   # ADM .npz: arr_0 uint8 NHWC (+ arr_1 labels)
    reference: s3://data/VIRTUAL_imagenet256_labeled.npz  # optional for self-referenced extractors (classifier)
    inception: s3://data/weights/pt_inception-2015-12-05-6726825d.pth  # or auto, random_for_tests; omit: no FID
    extractors:
      - {kind: dinov2, options: {model: /weights/dinov2-large}}
      - {kind: classifier, options: {dataset: digits}}
    clip: {model: ViT-L-14, pretrained: /weights/clip.bin, captions: null}  # captions: beside the samples
    out: s3://runs/xl3t/eval/step-0400000.json
    tensorboard: s3://runs/xl3t/tensorboard
    step: 400000
    batch_size: 250

``inception: auto`` finds the weights (``inception.find_inception_weights``: $DEEPFLOW_INCEPTION_WEIGHTS, then the
DeepFlow and torch hub caches). :class:`ReferenceConfig` is the reference-statistics job
(:mod:`deepflow.platform.eval.reference_job`).
"""
from __future__ import annotations

from typing import Any, Literal

import torch
from pydantic import Field, field_validator, model_validator

from deepflow.configuration import ConfigSection
from deepflow.data_pipeline.config import PreprocessConfig, SourceConfig
from deepflow.platform.eval.extractors import available_extractors, unknown_extractor_message
from deepflow.platform.eval.inception import AUTO_WEIGHTS, find_inception_weights

__all__ = [
    "AUTO_INCEPTION", "RANDOM_INCEPTION", "ClipSection", "EvaluateConfig", "ExtractorSpec", "ReferenceConfig",
    "check_torch_device", "resolve_inception_weights",
]

#: the ``inception`` value that builds a randomly initialised Inception (tests only: meaningless numbers)
RANDOM_INCEPTION = "random_for_tests"
#: the ``inception`` value that finds the weights: $DEEPFLOW_INCEPTION_WEIGHTS, then the caches
AUTO_INCEPTION = AUTO_WEIGHTS


def resolve_inception_weights(inception: str | None) -> str | None:
    """The weights location of an ``inception`` field (None for random weights): ``auto`` is looked up, a path or URL
    is checked (``InceptionWeightsNotFoundError``, one line saying where to get the file, when missing)."""
    if inception is None or inception == RANDOM_INCEPTION:
        return None
    return find_inception_weights(inception)


def check_torch_device(value: str | None) -> str | None:
    """``value`` when it names a torch device (None allowed); ValueError otherwise."""
    if value is None:
        return None
    try:
        torch.device(value)
    except (RuntimeError, ValueError):
        raise ValueError(f"{value!r} is not a torch device (cpu, cuda, cuda:1, mps ...)") from None
    return value


def default_device(device: str | None) -> str:
    """``device``, or cuda when available, else cpu."""
    return device or ("cuda" if torch.cuda.is_available() else "cpu")


class ExtractorSpec(ConfigSection):
    """One feature extractor: a registered kind (``extractors.available_extractors()``) and its factory's options."""

    kind: str
    options: dict[str, Any] = Field(default_factory=dict)

    @field_validator("kind")
    @classmethod
    def _registered(cls, kind: str) -> str:
        if kind not in available_extractors():
            raise ValueError(unknown_extractor_message(kind))
        return kind


class ClipSection(ConfigSection):
    """CLIP score of the samples against their captions (open_clip); off while ``model`` is None."""

    model: str | None = None
    #: open_clip pretrained tag or local/storage weights; None: RANDOM weights (tests only)
    pretrained: str | None = None
    #: architecture overrides of ``open_clip.create_model`` (tiny models in tests)
    model_kwargs: dict[str, Any] = Field(default_factory=dict)
    #: caption file (.txt one per line / .json list), caption i for sample i; None: captions.txt beside the samples
    captions: str | None = None


class EvaluateConfig(ConfigSection):
    """Everything an evaluation run needs. Result keys: see :func:`deepflow.platform.eval.job.run`."""

    #: sample batch .npz (arr_0 uint8 NHWC, optional arr_1 int labels; -1 = none), any storage URL
    samples: str
    #: reference batch .npz (arr_0 and/or mu, sigma, mu_s, sigma_s); optional when every extractor has its own
    reference: str | None = None
    #: FID Inception-v3 weights (path or URL), "auto" (find them) or "random_for_tests"; None: no Inception metrics
    inception: str | None = None
    #: other feature extractors: fd_<name> each (+ class_accuracy for the classifier)
    extractors: list[ExtractorSpec] = Field(default_factory=list)
    clip: ClipSection = Field(default_factory=ClipSection)
    #: results JSON (any storage URL, written atomically)
    out: str | None = None
    #: TensorBoard log dir (any storage URL) for eval/<metric> scalars at ``step``
    tensorboard: str | None = None
    step: int = Field(default=0, ge=0)
    batch_size: int = Field(default=64, ge=1)
    #: torch device; None: cuda when available, else cpu
    device: str | None = None
    #: neighbourhood size of precision / recall
    k: int = Field(default=3, ge=1)
    #: "sqrtm": the ADM computation; "eigh": the same value ~5x faster on CPU
    fd_method: Literal["sqrtm", "eigh"] = "sqrtm"
    #: fsspec options for every URL of the run (S3 endpoints also come from AWS_ENDPOINT_URL)
    storage_options: dict[str, Any] = Field(default_factory=dict)
    #: a tqdm progress bar on feature extraction
    progress: bool = True

    @field_validator("samples", "reference", "inception", "out", "tensorboard")
    @classmethod
    def _not_blank(cls, value: str | None) -> str | None:
        if value is not None and not value.strip():
            raise ValueError("must not be empty (omit the field instead)")
        return value

    @field_validator("device")
    @classmethod
    def _torch_device(cls, value: str | None) -> str | None:
        return check_torch_device(value)

    @model_validator(mode="after")
    def _something_to_evaluate(self) -> EvaluateConfig:
        if self.inception is None and not self.extractors and self.clip.model is None:
            raise ValueError("extractors: nothing to evaluate: give an extractor (--extractor kind:k=v), Inception "
                             "weights (--inception-weights / --random-inception-for-tests) or a CLIP model "
                             "(--clip-model)")
        if self.inception is not None and self.reference is None:
            raise ValueError("reference: Inception metrics (fid, sfid, inception_score, precision, recall) need a "
                             "reference batch (--reference)")
        if self.inception is not None and any(spec.kind == "inception" for spec in self.extractors):
            raise ValueError("extractors: an 'inception' extractor and the inception field both ask for Inception "
                             "metrics: keep one")
        return self

    def resolved_device(self) -> str:
        """``device``, or cuda when available, else cpu."""
        return default_device(self.device)

    def inception_weights(self) -> str | None:
        """The weights location of ``inception`` (None for random weights; ``auto`` looked up, see
        :func:`resolve_inception_weights`)."""
        return resolve_inception_weights(self.inception)


class ReferenceConfig(ConfigSection):
    """A reference batch built from a dataset: images (``arr_0``) and/or feature statistics, written as an ADM .npz.

    Input: exactly one of ``source`` (any source section of the precompute job, preprocessed with ``preprocess``)
    and ``shards`` (a committed pixel shard set, or a latent one that kept its images). See
    :mod:`deepflow.platform.eval.reference_job`.
    """

    #: a precompute source section: fashion_mnist, digits, image_folder (ImageNet layout), coco, webdataset, emoji
    source: SourceConfig | None = None
    #: how a source image becomes the reference resolution (ignored for shards: they are stored preprocessed)
    preprocess: PreprocessConfig = Field(default_factory=PreprocessConfig)
    #: a shard set URL: dataset folder, its manifest.json, or a shard-name pattern inside it
    shards: str | None = None
    #: where the .npz goes (any storage URL, written atomically)
    out: str
    #: write the images as arr_0 (uint8 NHWC; precision/recall and other extractors later need them)
    images: bool = True
    #: FID Inception-v3 statistics mu/sigma (pool) and mu_s/sigma_s (spatial): weights path or URL, "auto" (find
    #: them) or "random_for_tests"; None: no Inception statistics
    inception: str | None = None
    #: other extractors: mu_<name>/sigma_<name> each
    extractors: list[ExtractorSpec] = Field(default_factory=list)
    #: use at most this many images (None: all)
    num_images: int | None = Field(default=None, ge=2)
    #: source items are permuted with this seed before taking num_images (an even subset of a class-sorted folder);
    #: null keeps the source order. Shards are read in manifest order (precompute already shuffled them).
    shuffle_seed: int | None = 0
    #: images per extractor call
    batch_size: int = Field(default=64, ge=1)
    #: threads decoding and preprocessing source images (0: in the main thread)
    num_workers: int = Field(default=4, ge=0)
    #: torch device; None: cuda when available, else cpu
    device: str | None = None
    #: fsspec options for ``shards`` and ``out`` (sources carry their own storage_options)
    storage_options: dict[str, Any] = Field(default_factory=dict)
    #: a tqdm progress bar
    progress: bool = True

    @field_validator("shards", "inception", "out")
    @classmethod
    def _not_blank(cls, value: str | None) -> str | None:
        if value is not None and not value.strip():
            raise ValueError("must not be empty (omit the field instead)")
        return value

    @field_validator("device")
    @classmethod
    def _torch_device(cls, value: str | None) -> str | None:
        return check_torch_device(value)

    @model_validator(mode="after")
    def _one_input_and_an_output(self) -> ReferenceConfig:
        if (self.source is None) == (self.shards is None):
            raise ValueError("source: give exactly one input: a dataset source (--source kind:key=value, or a "
                             "source: section) or a shard set (--shards URL)")
        if not self.images and self.inception is None and not self.extractors:
            raise ValueError("images: nothing to write: keep the images (images: true) or ask for statistics "
                             "(--inception-weights, --extractor kind:k=v)")
        if self.inception is not None and any(spec.kind == "inception" for spec in self.extractors):
            raise ValueError("extractors: an 'inception' extractor and the inception field both ask for Inception "
                             "statistics: keep one")
        return self

    def resolved_device(self) -> str:
        """``device``, or cuda when available, else cpu."""
        return default_device(self.device)

    def inception_weights(self) -> str | None:
        """The weights location of ``inception`` (see :func:`resolve_inception_weights`)."""
        return resolve_inception_weights(self.inception)
