"""The one module that knows the on-storage layouts: datasets, checkpoints, exports, sample sets.

Dataset (written by ``deepflow.data_pipeline``)::

    <dataset>/shard-RRRR-NNNNNN.tar (+ .json record), rank-RRRR.done.json, text_null.safetensors,
              manifest.json            the commit, read as a typed :class:`Manifest`

Training checkpoints::

    <checkpoints>/step-0001000/
        engine/                 model + optimizer, engine-specific
        ema/full.safetensors    EMA (replicated engines) or ema/rank-00003.safetensors (sharded engines)
        state/rank-00003.json   per rank: data-loader position, RNG states
        config.yaml             the resolved run config
        model.json              the :class:`ModelCard` (what is needed to rebuild the model)
        meta.json               step, world size, engine
        COMMIT                  written last: only committed folders exist for readers

Exports (the trainer's EMA export, ``deepflow convert`` output)::

    <folder>/export.safetensors + <folder>/export.json (a ModelCard)     or
    <name>.safetensors + <name>.json beside it

Sample sets (``jobs/sample.py``)::

    <out>/sampling.json (settings + fingerprint), chunks/chunk-000123.npz, png/000123.png, captions.txt,
    samples.npz (ADM: arr_0 uint8 NHWC, arr_1 labels)

:func:`load_weights` accepts any of an export folder, an export ``.safetensors``, a checkpoint step folder or a
checkpoints folder (its newest committed step) and returns the weights with their :class:`ModelCard`.
"""
from __future__ import annotations

import json
import re
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import save as save_safetensors_bytes

from deepflow.storage import Storage, join_url, read_url_text, split_url

__all__ = [
    "CHECKPOINT_CONFIG_NAME",
    "CHECKPOINT_META_NAME",
    "COMMIT_NAME",
    "ENGINE_DIR",
    "EXPORT_META_NAME",
    "EXPORT_WEIGHTS_NAME",
    "MANIFEST_NAME",
    "MODEL_CARD_NAME",
    "NULL_TEXT_NAME",
    "SD_VAE_LATENT_SCALE",
    "CheckpointLayout",
    "Manifest",
    "ModelCard",
    "SampleSetLayout",
    "TextFeatures",
    "ema_file_name",
    "load_weights",
    "parse_step_dir",
    "rank_state_name",
    "read_manifest",
    "step_dir_name",
    "write_export",
]

# ------------------------------------------------------------------------------------------------ datasets
MANIFEST_NAME = "manifest.json"
NULL_TEXT_NAME = "text_null.safetensors"
MANIFEST_FORMAT = "deepflow-shards"
#: the Stable Diffusion VAE's latent scale (latents are stored multiplied by it; samples divided by it to decode)
SD_VAE_LATENT_SCALE = 0.18215


class _Open(BaseModel):
    """Known fields typed; unknown fields kept (newer writers may add some)."""

    model_config = ConfigDict(extra="allow")


class TextFeatures(_Open):
    """Caption embeddings of a dataset: the encoder that made them and their widths."""

    encoder: dict[str, Any] = Field(default_factory=dict)
    max_length: int
    dim: int
    pooled_dim: int
    null: str = NULL_TEXT_NAME


class ShardEntry(_Open):
    name: str
    num_samples: int
    sha256: str | None = None
    bytes: int | None = None


class Manifest(_Open):
    """``manifest.json`` of a dataset: what the samples are (``kind``, ``shape`` [C,H,W], classes or captions, the
    latent scale and encoder) and which shards hold them."""

    format: str = MANIFEST_FORMAT
    format_version: int = 1
    kind: Literal["vae", "pixel"]
    shape: list[int]
    num_classes: int = 0
    latent_scale: float | None = None
    encoder: dict[str, Any] = Field(default_factory=dict)
    text: TextFeatures | None = None
    has_captions: bool = False
    has_flip: bool = False
    image_format: str | None = None
    class_names: list[str] | None = None
    fields: dict[str, dict[str, Any]] = Field(default_factory=dict)
    num_samples: int = 0
    shards: list[ShardEntry] = Field(default_factory=list)

    @property
    def condition(self) -> Literal["class", "text"]:
        """What a model trained on it is conditioned on: caption embeddings ("text") or class labels."""
        return "text" if self.text is not None else "class"

    @property
    def vae_id(self) -> str | None:
        """The VAE that encoded the latents (a hub id or path), for decoding samples; None for pixel data."""
        return self.encoder.get("model") if self.kind == "vae" else None

    def to_json(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


def read_manifest(url: str, storage_options: dict[str, Any] | None = None) -> Manifest:
    """The committed manifest of the dataset folder ``url``; clear errors for a missing or foreign one."""
    storage = Storage(url, storage_options)
    try:
        raw = storage.read_json(MANIFEST_NAME)
    except FileNotFoundError:
        raise FileNotFoundError(
            f"{storage.url_of(MANIFEST_NAME)}: no manifest; the dataset is not (completely) precomputed"
        ) from None
    if not isinstance(raw, dict) or raw.get("format") != MANIFEST_FORMAT:
        raise ValueError(f"{storage.url_of(MANIFEST_NAME)}: not a {MANIFEST_FORMAT} manifest")
    return Manifest.model_validate(raw)


# --------------------------------------------------------------------------------------------- checkpoints
COMMIT_NAME = "COMMIT"
CHECKPOINT_CONFIG_NAME = "config.yaml"
CHECKPOINT_META_NAME = "meta.json"
MODEL_CARD_NAME = "model.json"
ENGINE_DIR = "engine"
_STEP_DIR = re.compile(r"^step-(\d{7,})$")


def step_dir_name(step: int) -> str:
    return f"step-{step:07d}"


def parse_step_dir(name: str) -> int | None:
    """The step of a ``step-NNNNNNN`` folder name; None for other names."""
    match = _STEP_DIR.match(name.rstrip("/").rsplit("/", 1)[-1])
    return int(match.group(1)) if match else None


def ema_file_name(rank: int | None) -> str:
    """EMA weights in a step folder: replicated (``rank`` None) or one rank's shard."""
    return "ema/full.safetensors" if rank is None else f"ema/rank-{rank:05d}.safetensors"


def rank_state_name(rank: int) -> str:
    return f"state/rank-{rank:05d}.json"


class CheckpointLayout:
    """Step folders under one checkpoints URL and their COMMIT markers."""

    def __init__(self, storage: Storage) -> None:
        self.storage = storage

    def step_url(self, step: int) -> str:
        return self.storage.url_of(step_dir_name(step))

    def step_storage(self, step: int) -> Storage:
        return self.storage.child(step_dir_name(step))

    def steps(self) -> list[tuple[int, bool]]:
        """(step, committed) for every step folder, oldest first."""
        found = []
        for name in self.storage.list(prefix="step-"):
            step = parse_step_dir(name)
            if step is not None:
                found.append((step, self.storage.exists(f"{name}/{COMMIT_NAME}")))
        return sorted(found)

    def committed_steps(self) -> list[int]:
        return [step for step, committed in self.steps() if committed]

    def newest_committed(self) -> int | None:
        committed = self.committed_steps()
        return committed[-1] if committed else None

    def commit(self, step: int, meta: dict[str, Any]) -> None:
        """Write the COMMIT marker of ``step`` (last, after every file of every rank)."""
        self.storage.write_json(f"{step_dir_name(step)}/{COMMIT_NAME}", meta)

    def remove(self, step: int) -> None:
        self.storage.remove_tree(step_dir_name(step))


# ------------------------------------------------------------------------------------------------- exports
EXPORT_WEIGHTS_NAME = "export.safetensors"
EXPORT_META_NAME = "export.json"


class ModelCard(_Open):
    """What is needed to rebuild a model from its weights and turn its samples into images.

    ``model`` + ``kwargs``: ``create_model(model, **kwargs)``; ``condition``: class labels or caption embeddings;
    ``kind``: latent ("vae", decoded with ``vae`` at ``latent_scale``) or pixel samples; ``data_url`` and
    ``manifest``: the training dataset (captions, null text, text encoder of text models).
    """

    model: str
    kwargs: dict[str, Any] = Field(default_factory=dict)
    condition: Literal["class", "text"] = "class"
    kind: Literal["vae", "pixel"] | None = None
    latent_scale: float | None = None
    vae: str | None = None
    data_url: str | None = None
    manifest: Manifest | None = None
    step: int | None = None
    ema: bool | None = None
    source: str | None = None

    @classmethod
    def for_dataset(cls, model: str, kwargs: dict[str, Any], manifest: Manifest | None, **fields: Any) -> ModelCard:
        """A card whose condition, kind, latent scale and VAE come from the training data's manifest."""
        if manifest is None:
            return cls(model=model, kwargs=kwargs, **fields)
        return cls(model=model, kwargs=kwargs, condition=manifest.condition, kind=manifest.kind,
                   latent_scale=manifest.latent_scale, vae=manifest.vae_id, manifest=manifest, **fields)


def write_export(
    url: str,
    weights: dict[str, torch.Tensor],
    card: ModelCard,
    storage_options: dict[str, Any] | None = None,
) -> str:
    """Write weights + card. ``url``: a folder (``export.safetensors`` + ``export.json`` in it) or a
    ``.safetensors`` file (its ``.json`` beside it). Weights first, card last. Returns the weights URL."""
    if url.endswith(".safetensors"):
        folder, weights_name = split_url(url)
        meta_name = weights_name[: -len(".safetensors")] + ".json"
    else:
        folder, weights_name, meta_name = url, EXPORT_WEIGHTS_NAME, EXPORT_META_NAME
    storage = Storage(folder, storage_options)
    tensors = {name: t.detach().to("cpu", copy=True).contiguous() for name, t in weights.items()}
    storage.write_bytes(weights_name, save_safetensors_bytes(tensors, metadata={"format": "pt"}))
    storage.write_json(meta_name, card.model_dump(mode="json", exclude_none=True))
    return storage.url_of(weights_name)


def _read_card(storage: Storage, name: str) -> ModelCard:
    raw = storage.read_json(name)
    try:
        return ModelCard.model_validate(raw)
    except Exception as error:  # noqa: BLE001 - pydantic's message, with the file
        raise ValueError(f"{storage.url_of(name)}: not a model card ({str(error).splitlines()[0]})") from None


def load_weights(url: str, storage_options: dict[str, Any] | None = None) -> tuple[dict[str, torch.Tensor], ModelCard]:
    """Weights + card from an export folder, an export ``.safetensors``, a committed checkpoint step folder or a
    checkpoints folder (newest committed step). Errors name the URL and what was expected there."""
    if url.rstrip("/").endswith(".safetensors"):
        folder, name = split_url(url)
        storage = Storage(folder, storage_options)
        meta_name = name[: -len(".safetensors")] + ".json"
        if not storage.exists(meta_name):
            raise FileNotFoundError(f"{url}: no {meta_name} beside it naming the model (write it with "
                                    "deepflow convert or the trainer's export)")
        return load_safetensors_bytes(storage.read_bytes(name)), _read_card(storage, meta_name)
    storage = Storage(url, storage_options)
    if storage.exists(EXPORT_WEIGHTS_NAME):
        return load_safetensors_bytes(storage.read_bytes(EXPORT_WEIGHTS_NAME)), _read_card(storage, EXPORT_META_NAME)
    if not storage.exists(MODEL_CARD_NAME):
        newest = CheckpointLayout(storage).newest_committed()
        if newest is None:
            raise FileNotFoundError(
                f"{url}: neither an export (export.safetensors + export.json), a checkpoint step folder "
                "(model.json + ema/), nor a checkpoints folder with a committed step-NNNNNNN"
            )
        storage = storage.child(step_dir_name(newest))
    elif not storage.exists(COMMIT_NAME):
        raise FileNotFoundError(f"{storage.url}: not committed (no {COMMIT_NAME}: its save did not finish); give a "
                                "committed step or the checkpoints folder (its newest committed step)")
    card = _read_card(storage, MODEL_CARD_NAME)
    full = ema_file_name(None)
    if not storage.exists(full):
        if storage.list(prefix="rank-", subdir="ema"):
            raise ValueError(
                f"{storage.url}: the EMA is sharded over ranks (FSDP / ZeRO-3); use the run's export "
                "(<output_dir>/export, written with checkpoint.export_ema) instead"
            )
        raise FileNotFoundError(f"{storage.url_of(full)}: no EMA weights in this checkpoint")
    return load_safetensors_bytes(storage.read_bytes(full)), card


# --------------------------------------------------------------------------------------------- sample sets
class SampleSetLayout:
    """Names inside a sample output folder (see the module doc)."""

    SETTINGS = "sampling.json"
    NPZ = "samples.npz"
    CAPTIONS = "captions.txt"
    CHUNKS = "chunks"
    PNG = "png"

    @staticmethod
    def chunk(index: int) -> str:
        return f"chunks/chunk-{index:06d}.npz"

    @staticmethod
    def png(index: int) -> str:
        return f"png/{index:06d}.png"

    @staticmethod
    def read_captions(url: str, storage_options: dict[str, Any] | None = None) -> list[str]:
        """Captions of a sample set (caption i for sample i; ``captions.txt`` or any caption file): ``.json`` (a list
        of strings, or {"captions": [...]}) or text (one caption per line, blank lines ignored)."""
        raw = read_url_text(url, storage_options)
        if url.endswith(".json"):
            try:
                data = json.loads(raw)
            except json.JSONDecodeError as error:
                raise ValueError(f"{url}: not valid JSON ({error})") from None
            if isinstance(data, dict):
                data = data.get("captions")
            if not isinstance(data, list) or not all(isinstance(c, str) for c in data):
                raise ValueError(f"{url}: expected a JSON list of caption strings (or {{\"captions\": [...]}})")
            captions = data
        else:
            captions = [line.strip() for line in raw.splitlines() if line.strip()]
        if not captions:
            raise ValueError(f"{url}: no captions")
        return captions

    @staticmethod
    def captions_url_for(samples_npz_url: str) -> str:
        """``captions.txt`` in the folder of a ``samples.npz`` URL."""
        folder, _ = split_url(samples_npz_url)
        return join_url(folder, SampleSetLayout.CAPTIONS)
