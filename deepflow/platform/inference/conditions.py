"""Condition plans: what sample ``i`` is conditioned on, and the null condition that classifier-free guidance
pushes away from. The only place that tells class-conditional from text-to-image generation.

- :class:`ClassPlan`: an int64 label per sample (``label_plan``: cyclic ``i % C``, a seeded shuffle of the cyclic
  labels, or a label file); the null condition is the extra class ``C`` (``num_classes``).
- :class:`TextPlan`: a caption per sample and its text condition ``{"text_emb" [b,L,D], "text_mask" [b,L],
  "text_pooled" [b,P]}`` (the dataset's stored embeddings, or the captions re-encoded with the encoder the dataset
  manifest records); the null condition is the dataset's empty-caption encoding (``text_null.safetensors``).

Builders: :func:`dataset_plan` (periodic evaluation: the training data's classes or captions) and
:func:`sampling_plan` (the batch sampling job: ``labels`` / ``captions`` / ``dataset`` settings). A caption dataset
is read through one :class:`~deepflow.platform.inference.prompts.DatasetHandle`: its manifest is read once per job.
"""
from __future__ import annotations

import io
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from deepflow.artifacts import ModelCard, SampleSetLayout
from deepflow.models.conditions import condition_to
from deepflow.platform.inference.prompts import (
    DatasetHandle,
    encode_prompts,
    encoder_null,
    open_dataset,
    text_encoder_config,
)
from deepflow.storage import read_url_bytes

__all__ = ["ClassPlan", "ConditionPlan", "TextPlan", "dataset_plan", "label_plan", "sampling_plan", "seed_for"]

TextCondition = dict[str, torch.Tensor]


def seed_for(*parts: int) -> int:
    """A 63-bit seed that is a function of ``parts`` only (e.g. (run seed, stream, sample index))."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1, dtype=np.uint64)[0] >> 1)


# ------------------------------------------------------------------------------------------------------ plans
@dataclass
class ClassPlan:
    """Class labels of samples 0..N-1 (``labels`` int64 [N]); null condition = class ``num_classes``."""

    labels: np.ndarray
    num_classes: int

    @property
    def null_label(self) -> int:
        return self.num_classes

    @property
    def null(self) -> None:
        return None

    def condition(self, indices: np.ndarray, device: torch.device) -> torch.Tensor:
        """int64 labels [b] of samples ``indices`` [b] on ``device``."""
        return torch.from_numpy(self.labels[indices]).to(device)

    def labels_of(self, indices: np.ndarray) -> np.ndarray:
        return self.labels[indices]

    def captions_of(self, indices: np.ndarray) -> None:
        return None


@dataclass
class TextPlan:
    """Captions of samples ``offset`` .. ``offset + n - 1`` and how to embed them; ``null``: the empty caption's
    encoding (``text_emb`` [L,D], ``text_mask`` [L], ``text_pooled`` [P]).

    ``embed(positions)`` -> the text condition of ``captions[positions]`` (positions = indices - offset).
    """

    captions: list[str]
    null: TextCondition
    embed: Callable[[np.ndarray], TextCondition]
    offset: int = 0

    @property
    def null_label(self) -> None:
        return None

    def condition(self, indices: np.ndarray, device: torch.device) -> TextCondition:
        """{"text_emb" float32 [b,L,D], "text_mask" bool [b,L], "text_pooled" float32 [b,P]} on ``device``."""
        return condition_to(self.embed(np.asarray(indices) - self.offset), device, dtype=torch.float32)

    def labels_of(self, indices: np.ndarray) -> np.ndarray:
        """-1 per sample (text samples have no class; the ADM .npz keeps an arr_1 anyway)."""
        return np.full(len(indices), -1, dtype=np.int64)

    def captions_of(self, indices: np.ndarray) -> list[str]:
        return [self.captions[int(i) - self.offset] for i in indices]


ConditionPlan = ClassPlan | TextPlan


# ------------------------------------------------------------------------------------------------------ labels
def label_plan(
    spec: str, num_samples: int, num_classes: int, seed: int, storage_options: dict[str, Any] | None = None
) -> np.ndarray:
    """int64 [num_samples] labels: "cyclic" (i % C), "shuffled" (seeded permutation of cyclic), or a label file
    URL (.npy, .json list, or whitespace-separated text)."""
    cyclic = np.arange(num_samples, dtype=np.int64) % num_classes
    if spec == "cyclic":
        return cyclic
    if spec == "shuffled":
        return cyclic[np.random.default_rng(seed_for(seed, 7)).permutation(num_samples)]
    raw = read_url_bytes(spec, storage_options)
    if spec.endswith(".npy"):
        labels = np.load(io.BytesIO(raw), allow_pickle=False)
    elif spec.endswith(".json"):
        labels = np.asarray(json.loads(raw))
    else:
        labels = np.asarray([int(token) for token in raw.decode().split()])
    labels = labels.astype(np.int64).reshape(-1)
    if labels.shape[0] < num_samples:
        raise ValueError(f"labels: {spec} has {labels.shape[0]} labels, fewer than num_samples={num_samples}")
    if labels.min() < 0 or labels.max() >= num_classes:
        raise ValueError(f"labels: {spec}: labels must lie in [0, {num_classes}), got [{labels.min()}, {labels.max()}]")
    return labels[:num_samples]


def _is_text_model(model: torch.nn.Module) -> bool:
    return getattr(model, "conditioning", "class") == "text"


# -------------------------------------------------------------------------------------------- periodic eval
def dataset_plan(
    model: torch.nn.Module,
    dataset: DatasetHandle | str,
    offset: int,
    count: int,
    storage_options: dict[str, Any] | None = None,
) -> ConditionPlan:
    """Samples ``offset`` .. ``offset + count - 1`` conditioned like the training data: class ``i % C``, or the
    first caption of dataset sample ``i`` (manifest order) with its stored embedding. ``dataset``: the training
    data's handle, or its URL (opened here with ``storage_options``, for a text model only: a class model reads
    nothing)."""
    if not _is_text_model(model):
        return ClassPlan(label_plan("cyclic", offset + count, model.num_classes, seed=0), model.num_classes)
    data = dataset if isinstance(dataset, DatasetHandle) else open_dataset(dataset, storage_options)
    stored = data.prompts(max(count, 1), start=offset)
    return TextPlan(stored.captions[:count], data.null_text(), lambda positions: stored.select(positions).cond, offset)


# ------------------------------------------------------------------------------------------- batch sampling
def sampling_plan(
    model: torch.nn.Module,
    card: ModelCard,
    *,
    num_samples: int,
    seed: int,
    labels: str = "cyclic",
    captions: str | None = None,
    dataset: str | None = None,
    text_batch_size: int = 256,
    storage_options: Callable[[str], dict[str, Any]] = lambda url: {},
    device: torch.device | str = "cpu",
) -> ConditionPlan:
    """The plan of the batch sampling job: ``labels`` for class models; ``captions`` ("dataset" or a caption file)
    and ``dataset`` (default: the training data of ``card``) for text models. ``storage_options(url)`` gives the
    options of each URL read."""
    if not _is_text_model(model):
        if captions is not None or dataset is not None:
            field = "captions" if captions is not None else "dataset"
            raise ValueError(f"{field}: applies to text-to-image models; {card.model} is class-conditional "
                             "(it takes labels)")
        return ClassPlan(label_plan(labels, num_samples, model.num_classes, seed, storage_options(labels)),
                         model.num_classes)
    if labels != "cyclic":
        raise ValueError(f"labels: applies to class-conditional models; {card.model} is text-to-image "
                         "(it takes captions)")
    return _caption_plan(card, num_samples, captions or "dataset", dataset, text_batch_size, storage_options,
                         torch.device(device))


def _caption_plan(
    card: ModelCard,
    num_samples: int,
    spec: str,
    dataset: str | None,
    text_batch_size: int,
    storage_options: Callable[[str], dict[str, Any]],
    device: torch.device,
) -> TextPlan:
    """Captions from the dataset or a file (cycled to ``num_samples``), embedded with the manifest's encoder; the
    dataset's stored embeddings when that encoder cannot be rebuilt (random weights) and the captions are its own."""
    data_url = dataset or card.data_url
    data = open_dataset(data_url, storage_options(data_url)) if data_url else None  # its manifest: read once, here
    manifest = card.manifest
    if data is not None and (dataset or manifest is None):
        manifest = data.manifest  # an explicit dataset describes the features
    if manifest is None or manifest.text is None:
        raise ValueError(f"dataset: {card.model} is a text-to-image model but no caption-dataset manifest is known "
                         "(model card 'manifest' / 'data_url'); give the caption dataset URL")
    if spec == "dataset":
        if data is None:
            raise ValueError("dataset: captions 'dataset' needs the caption dataset URL, and the model card names none")
        listed = data.captions(num_samples)
    else:
        listed = SampleSetLayout.read_captions(spec, storage_options(spec))
    chosen = [listed[i % len(listed)] for i in range(num_samples)]
    try:
        encoder_config = text_encoder_config(manifest)
    except ValueError:
        if spec != "dataset":
            raise
        assert data is not None
        stored = data.prompts(num_samples)
        return TextPlan(chosen, data.null_text(), lambda positions: stored.select(positions).cond)
    from deepflow.data_pipeline.text_encoders import build_text_encoder

    encoder = build_text_encoder(encoder_config.model_copy(update={"batch_size": text_batch_size}), device)
    null = data.null_text() if data is not None else encoder_null(encoder)

    def embed(positions: np.ndarray) -> TextCondition:
        return encode_prompts([chosen[int(p)] for p in positions], manifest, encoder=encoder).cond

    return TextPlan(chosen, null, embed)
