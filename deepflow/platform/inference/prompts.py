"""Captions and their text conditions for sampling and evaluating text-to-image models.

Shapes: n prompts, L text tokens (the dataset's ``text.max_length``), D per-token width (``text.dim``), P pooled
width (``text.pooled_dim``). A :class:`Prompts` holds n caption strings and the matching text condition
``{"text_emb": float [n,L,D], "text_mask": bool [n,L], "text_pooled": float [n,P]}`` (the loader's batch keys,
see ``deepflow.models.conditions``; float16 as stored in the shards, float32 when encoded here).

A caption dataset is opened once (:func:`open_dataset`, which reads its manifest) and passed around as a
:class:`DatasetHandle`; everything read from it goes through the handle and its one manifest:
- :meth:`DatasetHandle.prompts`: the first samples of its shards in manifest order, each with its FIRST caption and
  the embedding the precompute job stored for it (nothing is re-encoded); :meth:`DatasetHandle.captions`: the same
  caption strings without the embeddings;
- :meth:`DatasetHandle.null_text`: the null condition for classifier-free guidance, the empty caption's encoding
  stored by the precompute job (``text_null.safetensors``);
- :meth:`DatasetHandle.text_encoder_config`: the text encoder the manifest records (``text.encoder``: same library,
  model, pooling, max length), with which :func:`encode_prompts` encodes caption strings so that the embeddings match
  the training ones. It takes a bare :class:`Manifest` too (a model card carries one without its dataset).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import numpy as np
import torch

from deepflow.artifacts import Manifest, TextFeatures, read_manifest
from deepflow.data_pipeline.loader import read_shards, split_dataset_url
from deepflow.models.conditions import TEXT_KEYS
from deepflow.storage import Storage

__all__ = [
    "DatasetHandle",
    "Prompts",
    "encode_prompts",
    "encoder_null",
    "normalize_caption",
    "open_dataset",
    "text_encoder_config",
]

TextCondition = dict[str, torch.Tensor]


@dataclass
class Prompts:
    """n captions and their text condition (float embeddings: float16 as stored or float32, bool mask) on the CPU."""

    captions: list[str]
    cond: TextCondition

    def __post_init__(self) -> None:
        n = len(self.captions)
        for key in TEXT_KEYS:
            if key not in self.cond:
                raise ValueError(f"prompts: the text condition lacks {key!r}")
            if self.cond[key].shape[0] != n:
                raise ValueError(f"prompts: {n} captions but {key} has {self.cond[key].shape[0]} rows")

    def __len__(self) -> int:
        return len(self.captions)

    def select(self, indices: Sequence[int] | np.ndarray) -> "Prompts":
        """Rows ``indices`` (each taken modulo n, so a short caption list cycles)."""
        rows = torch.as_tensor(np.asarray(indices, dtype=np.int64) % len(self), dtype=torch.long)
        return Prompts([self.captions[int(i)] for i in rows], {k: v[rows] for k, v in self.cond.items()})


def _text_section(manifest: Manifest, url: str) -> TextFeatures:
    if manifest.text is None:
        raise ValueError(f"{url}: not a caption dataset (manifest 'text' is null): no captions or text embeddings")
    return manifest.text


def _float32(arrays: dict[str, np.ndarray]) -> TextCondition:
    return {k: torch.from_numpy(v.astype(np.float32) if v.dtype.kind == "f" else v.copy()) for k, v in arrays.items()}


# ------------------------------------------------------------------------------------------------ the dataset
def open_dataset(url: str, storage_options: dict[str, Any] | None = None) -> DatasetHandle:
    """The dataset at ``url`` (a folder, its ``manifest.json`` or a shard pattern), its manifest read once, here.

    Every shard of the manifest is used (a shard pattern only locates the folder), as the data loader's inspection
    reader :func:`deepflow.data_pipeline.loader.read_shards` does."""
    return DatasetHandle(url, storage_options, read_manifest(split_dataset_url(url)[0], storage_options))


@dataclass(frozen=True, eq=False)
class DatasetHandle:
    """One opened dataset: its URL, storage options and manifest (read once, by :func:`open_dataset`; build one
    directly from a manifest already read, e.g. the data loader's, to read none). The methods read shards and the
    null text through this manifest and never read it again; :meth:`null_text` is cached after its first read."""

    url: str
    storage_options: dict[str, Any] | None
    manifest: Manifest

    @cached_property
    def storage(self) -> Storage:
        """The dataset folder (shards, manifest and null text live there)."""
        return Storage(split_dataset_url(self.url)[0], self.storage_options)

    @property
    def text(self) -> TextFeatures:
        """The manifest's text features; ValueError if this is not a caption dataset."""
        return _text_section(self.manifest, self.url)

    def null_text(self) -> TextCondition:
        """The empty caption's encoding: ``text_emb`` float32 [L,D], ``text_mask`` bool [L], ``text_pooled`` float32
        [P] (read on the first call, the same tensors afterwards: do not modify them in place)."""
        return dict(self._null_text)

    @cached_property
    def _null_text(self) -> TextCondition:
        from safetensors.numpy import load

        return _float32(load(self.storage.read_bytes(self.text.null)))

    def text_encoder_config(self) -> Any:
        """The data pipeline's text-encoder config that reproduces the manifest's ``text.encoder``."""
        return text_encoder_config(self.manifest, self.url)

    def prompts(self, count: int, caption_index: int = 0, start: int = 0) -> Prompts:
        """Prompts number ``start`` .. ``start + count - 1``: prompt p is sample ``p mod n`` of the shards in manifest
        order (n samples; a small dataset cycles) with its caption number ``caption_index`` (or its last one if it
        has fewer) and the stored embedding (``text_emb`` [count,L,D], ``text_mask`` [count,L], ``text_pooled``
        [count,P]), kept in the stored float16 (convert with ``condition_to(..., dtype=torch.float32)``). Reads
        shards in order and stops once the range is covered."""
        if count < 1 or start < 0:
            raise ValueError(f"dataset prompts: need count >= 1 and start >= 0, got count={count}, start={start}")
        _ = self.text  # a caption dataset, or one clear error
        captions: list[str] = []
        parts: dict[str, list[np.ndarray]] = {k: [] for k in TEXT_KEYS}
        stop = start + count
        position = 0  # prompt number of the next sample read (grows over repeated passes)
        while position < stop:
            seen = 0
            for name, block in read_shards(self.url, self.storage_options, self.manifest):
                size = len(block)
                seen += size
                lo, hi = max(start, position), min(stop, position + size)
                if lo < hi:
                    if block.captions is None or "caption_counts" not in block.arrays:
                        raise ValueError(f"{self.url}/{name}: the shard holds no captions")
                    counts = block.arrays["caption_counts"].astype(np.int64)
                    offsets = np.concatenate([[0], np.cumsum(counts)])
                    local = np.arange(lo - position, hi - position)
                    chosen = np.minimum(caption_index, counts[local] - 1)
                    captions.extend(block.captions[int(i)][int(c)] for i, c in zip(local, chosen))
                    for key in TEXT_KEYS:
                        parts[key].append(np.array(block.arrays[key][offsets[local] + chosen]))
                position += size
                if position >= stop:
                    break
            if seen == 0:
                raise ValueError(f"{self.url}: the dataset has no samples")
        cond = {key: torch.from_numpy(np.concatenate(parts[key])) for key in TEXT_KEYS}
        return Prompts(captions, cond)

    def captions(self, count: int, caption_index: int = 0) -> list[str]:
        """The caption strings of :meth:`prompts` (same samples, same caption choice) without keeping any
        embedding: shards are streamed one at a time; cycles when the dataset is smaller than ``count``."""
        if count < 1:
            raise ValueError(f"dataset captions: count must be >= 1, got {count}")
        _ = self.text  # a caption dataset, or one clear error
        captions: list[str] = []
        for name, block in read_shards(self.url, self.storage_options, self.manifest):
            if block.captions is None:
                raise ValueError(f"{self.url}/{name}: the shard holds no captions")
            for sample in block.captions[: count - len(captions)]:
                captions.append(sample[min(caption_index, len(sample) - 1)])
            if len(captions) >= count:
                break
        if not captions:
            raise ValueError(f"{self.url}: the dataset has no samples")
        return [captions[i % len(captions)] for i in range(count)]


# ------------------------------------------------------------------------------------------- text encoding
def normalize_caption(caption: str) -> str:
    """One line: runs of whitespace (newlines included) become one space (for caption files)."""
    return " ".join(caption.split())


def text_encoder_config(manifest: Manifest, url: str = "dataset") -> Any:
    """The data pipeline's text-encoder config that reproduces the manifest's ``text.encoder`` description (a pure
    function of the manifest: a model card's manifest works without its dataset; ``url`` names it in errors)."""
    from deepflow.data_pipeline.config import OpenClipTextConfig, TransformersTextConfig

    text = _text_section(manifest, url)
    described = dict(text.encoder)
    name = described.get("name")
    if name == "transformers":
        return TransformersTextConfig(
            kind="transformers", model=described["model"], revision=described.get("revision"),
            max_length=int(described.get("max_length", text.max_length)), pooling=described.get("pooling", "auto"),
            dynamic_padding=bool(described.get("dynamic_padding", False)),
        )
    if name == "open_clip":
        if described.get("pretrained") is None:
            raise ValueError(
                "the dataset's open_clip text encoder had random weights (pretrained: null): captions cannot be "
                "re-encoded identically; use the dataset's own captions instead"
            )
        return OpenClipTextConfig(kind="open_clip", model=described["model"], pretrained=described["pretrained"],
                                  model_kwargs=described.get("model_kwargs") or {})
    raise ValueError(f"unknown text encoder {name!r} in the dataset manifest (text.encoder.name)")


def encoder_null(encoder: Any) -> TextCondition:
    """The empty caption encoded by ``encoder`` (a data-pipeline text encoder), as
    :meth:`DatasetHandle.null_text` gives it: ``text_emb`` float32 [L,D], ``text_mask`` bool [L], ``text_pooled``
    float32 [P]."""
    return _float32(encoder.null())


def encode_prompts(
    captions: Sequence[str], manifest: Manifest, device: torch.device | str = "cpu", encoder: Any = None
) -> Prompts:
    """Encode ``captions`` (n strings) with the dataset's text encoder (built from the manifest unless ``encoder``
    is given): float32 ``text_emb`` [n,L,D], bool ``text_mask`` [n,L], float32 ``text_pooled`` [n,P], L padded to
    the manifest's ``text.max_length`` as in training."""
    from deepflow.data_pipeline.text_encoders import build_text_encoder

    text = _text_section(manifest, "dataset")
    captions = list(captions)
    if encoder is None:
        encoder = build_text_encoder(text_encoder_config(manifest), torch.device(device))
    arrays = encoder.encode(captions)
    cond = _float32({k: arrays[k] for k in TEXT_KEYS})
    length, dim = text.max_length, text.dim
    if tuple(cond["text_emb"].shape[1:]) != (length, dim) or cond["text_pooled"].shape[1] != text.pooled_dim:
        raise ValueError(
            f"re-encoded captions have text_emb {tuple(cond['text_emb'].shape[1:])} / text_pooled "
            f"{cond['text_pooled'].shape[1]}, the dataset [{length}, {dim}] / {text.pooled_dim}"
        )
    return Prompts(captions, cond)
