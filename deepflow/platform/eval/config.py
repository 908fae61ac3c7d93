"""The configuration of an evaluation run (``jobs/evaluate.py``): one pydantic model, loaded with
:func:`deepflow.configuration.load_validated` from an optional YAML file plus ``--set a.b=v`` overrides; every
command-line flag of the job is sugar for one field (see :mod:`deepflow.platform.eval.job`).

.. code-block:: yaml

    samples: s3://runs/xl3t/samples-cfg1/samples.npz   # ADM .npz: arr_0 uint8 NHWC (+ arr_1 labels)
    reference: s3://data/VIRTUAL_imagenet256_labeled.npz  # optional for self-referenced extractors (classifier)
    inception: s3://data/weights/pt_inception-2015-12-05-6726825d.pth  # or random_for_tests; omit: no FID
    extractors:
      - {kind: dinov2, options: {model: /weights/dinov2-large}}
      - {kind: classifier, options: {dataset: digits}}
    clip: {model: ViT-L-14, pretrained: /weights/clip.bin, captions: null}  # captions: beside the samples
    out: s3://runs/xl3t/eval/step-0400000.json
    tensorboard: s3://runs/xl3t/tensorboard
    step: 400000
    batch_size: 250
"""
from __future__ import annotations

from typing import Any, Literal

import torch
from pydantic import Field, field_validator, model_validator

from deepflow.configuration import ConfigSection
from deepflow.platform.eval.extractors import available_extractors, unknown_extractor_message

__all__ = ["RANDOM_INCEPTION", "ClipSection", "EvaluateConfig", "ExtractorSpec"]

#: the ``inception`` value that builds a randomly initialised Inception (tests only: meaningless numbers)
RANDOM_INCEPTION = "random_for_tests"


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
    #: FID Inception-v3 weights (path or URL) or "random_for_tests"; None: no Inception metrics
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
        if value is None:
            return None
        try:
            torch.device(value)
        except (RuntimeError, ValueError):
            raise ValueError(f"{value!r} is not a torch device (cpu, cuda, cuda:1, mps ...)") from None
        return value

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
        return self.device or ("cuda" if torch.cuda.is_available() else "cpu")

    def inception_weights(self) -> str | None:
        """The weights location of ``inception`` (None for random weights)."""
        return None if self.inception == RANDOM_INCEPTION else self.inception
