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
        meta.json               step, world size, engine, ema_layout (how sharded EMA files cut each
                                tensor: FULL / DIM0_CHUNKS / FLAT_PARTITIONS) and ema_shapes (full shapes)
        COMMIT                  written last: only committed folders exist for readers

Exports (the trainer's EMA export, ``deepflow convert`` output)::

    <folder>/export.safetensors + <folder>/export.json (a ModelCard)     or
    <name>.safetensors + <name>.json beside it

Sample sets (``jobs/sample.py``)::

    <out>/sampling.json (settings + fingerprint), chunks/chunk-000123.npz, png/000123.png, captions.txt,
    samples.npz (ADM: arr_0 uint8 NHWC, arr_1 labels)

:func:`load_weights` accepts any of an export folder, an export ``.safetensors``, a checkpoint step folder or a
checkpoints folder (its newest committed step; a sharded EMA is joined from the ranks' files) and returns the weights
with their :class:`ModelCard`; :func:`open_weights` gives the same as a source read one tensor at a time and
:func:`export_checkpoint` turns any of them into an export that way.

Memory: weights are never held as a bytes buffer. :func:`write_safetensors` writes the header from the tensors'
specs, then each tensor as it comes (a gather in progress frees it right after), and :func:`iter_safetensors` reads
each tensor straight into its own tensor; so writing an export takes the tensor in hand, and reading one the
weights returned (the file format is safetensors' own, byte for byte).
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import re
import struct
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import IO, Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from deepflow.storage import Storage, join_url, read_url_text, split_url

__all__ = [
    "CHECKPOINT_CONFIG_NAME",
    "CHECKPOINT_META_NAME",
    "COMMIT_NAME",
    "DIM0_CHUNKS",
    "FLAT_PARTITIONS",
    "FULL",
    "SLICE_LAYOUTS",
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
    "WeightsSource",
    "TensorSpec",
    "TextFeatures",
    "ema_file_name",
    "export_checkpoint",
    "iter_safetensors",
    "iter_sharded_ema",
    "iter_weights",
    "join_slices",
    "load_weights",
    "open_weights",
    "parse_step_dir",
    "rank_state_name",
    "read_manifest",
    "read_safetensors",
    "safetensors_specs",
    "slice_full",
    "step_dir_name",
    "write_export",
    "write_safetensors",
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


# ------------------------------------------------------------------------------- safetensors, tensor by tensor
#: safetensors dtype names, in the order of the format's own dtype enum (a file lists larger dtypes first)
_SAFETENSORS_DTYPES: dict[torch.dtype, str] = {
    torch.bool: "BOOL", torch.uint8: "U8", torch.int8: "I8", torch.int16: "I16", torch.float16: "F16",
    torch.bfloat16: "BF16", torch.int32: "I32", torch.float32: "F32", torch.float64: "F64", torch.int64: "I64",
}
_DTYPES_BY_NAME = {name: dtype for dtype, name in _SAFETENSORS_DTYPES.items()}
_DTYPE_RANK = {dtype: index for index, dtype in enumerate(_SAFETENSORS_DTYPES)}
_MAX_HEADER_BYTES = 100_000_000  # as safetensors' own reader


@dataclass(frozen=True)
class TensorSpec:
    """Shape and dtype of one tensor of a safetensors file, known before its data (a gather not yet done)."""

    shape: tuple[int, ...]
    dtype: torch.dtype = torch.float32

    @classmethod
    def of(cls, tensor: torch.Tensor) -> TensorSpec:
        return cls(tuple(tensor.shape), tensor.dtype)

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def _file_order(specs: Mapping[str, TensorSpec]) -> list[str]:
    """safetensors' own order of the tensors in a file: larger dtypes first, then by name."""
    return sorted(specs, key=lambda name: (-_DTYPE_RANK[specs[name].dtype], name))


def _header(specs: Mapping[str, TensorSpec], metadata: dict[str, str] | None) -> tuple[bytes, dict[str, int]]:
    """The first bytes of the file (8-byte little-endian length + JSON, padded with spaces to a multiple of 8, as
    safetensors writes them) and each tensor's byte offset in the file."""
    entries: dict[str, Any] = {"__metadata__": metadata} if metadata else {}
    offsets: dict[str, int] = {}
    position = 0
    for name in _file_order(specs):
        spec = specs[name]
        offsets[name] = position
        entries[name] = {"dtype": _SAFETENSORS_DTYPES[spec.dtype], "shape": list(spec.shape),
                         "data_offsets": [position, position + spec.nbytes]}
        position += spec.nbytes
    text = json.dumps(entries, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    text += b" " * (-len(text) % 8)
    start = 8 + len(text)
    return struct.pack("<Q", len(text)) + text, {name: start + offset for name, offset in offsets.items()}


def _tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """The raw (little-endian) bytes of ``tensor`` on the CPU; no copy for a contiguous CPU tensor."""
    flat = tensor.detach().to("cpu").contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy())


def write_safetensors(
    handle: IO[bytes],
    specs: Mapping[str, TensorSpec],
    tensors: Iterable[tuple[str, torch.Tensor]],
    metadata: dict[str, str] | None = None,
) -> None:
    """A safetensors file on the seekable binary ``handle`` (at position 0) from ``tensors`` given one at a time, in
    any order: the header from ``specs`` first, then each tensor written at its place as it comes, so the caller may
    free it (or gather the next one into its memory) right after. Byte for byte what ``safetensors.torch.save``
    writes for the same tensors and metadata. ValueError for a name not in ``specs``, a tensor unlike its spec, or
    a spec never given a tensor (after every tensor was consumed)."""
    unknown = sorted({spec.dtype for spec in specs.values()} - set(_SAFETENSORS_DTYPES), key=str)
    if unknown:
        raise ValueError(f"safetensors: unsupported dtypes {unknown}")
    header, offsets = _header(specs, metadata)
    handle.write(header)
    written: set[str] = set()
    for name, tensor in tensors:
        spec = specs.get(name)
        if spec is None:
            raise ValueError(f"{name}: not one of the {len(specs)} tensors announced for this file")
        if TensorSpec.of(tensor) != spec:
            raise ValueError(f"{name}: {tuple(tensor.shape)} {tensor.dtype}, announced as {spec.shape} {spec.dtype}")
        handle.seek(offsets[name])
        handle.write(_tensor_bytes(tensor))
        written.add(name)
    missing = sorted(set(specs) - written)
    if missing:
        raise ValueError(f"{len(missing)} announced tensors were never given: {missing[:5]}")


def _read_header(handle: IO[bytes], where: str) -> dict[str, tuple[TensorSpec, int]]:
    """name -> (spec, byte offset in the file) from a safetensors file's header."""
    raw = handle.read(8)
    if len(raw) < 8:
        raise ValueError(f"{where}: not a safetensors file (shorter than its header)")
    (length,) = struct.unpack("<Q", raw)
    if length > _MAX_HEADER_BYTES:
        raise ValueError(f"{where}: not a safetensors file (header of {length} bytes)")
    try:
        header = json.loads(handle.read(length))
        header.pop("__metadata__", None)
        entries = {}
        for name, entry in header.items():
            spec = TensorSpec(tuple(int(d) for d in entry["shape"]), _DTYPES_BY_NAME[entry["dtype"]])
            begin, end = (int(offset) for offset in entry["data_offsets"])
            if end - begin != spec.nbytes:
                raise ValueError(f"{name}: {end - begin} bytes for {spec}")
            entries[name] = (spec, 8 + length + begin)
    except (ValueError, KeyError, TypeError, AttributeError) as error:
        raise ValueError(f"{where}: not a readable safetensors header ({error})") from None
    return entries


def _read_tensor(handle: IO[bytes], spec: TensorSpec, offset: int, where: str) -> torch.Tensor:
    """One tensor read straight into a new CPU tensor (no intermediate bytes object)."""
    tensor = torch.empty(spec.shape, dtype=spec.dtype)
    view = memoryview(tensor.reshape(-1).view(torch.uint8).numpy())
    handle.seek(offset)
    done = 0
    while done < len(view):
        count = handle.readinto(view[done:])  # type: ignore[attr-defined]
        if not count:
            raise ValueError(f"{where}: truncated (a tensor ends past the end of the file)")
        done += count
    return tensor


@contextlib.contextmanager
def _local_file(storage: Storage, name: str) -> Iterator[str]:
    """A local path of object ``name``: the file itself on local disks, else a (retried) download removed after."""
    if storage.is_local:
        if not storage.exists(name):
            raise FileNotFoundError(f"{storage.url_of(name)}: no such file")
        yield storage.path(name)
        return
    with tempfile.TemporaryDirectory(prefix="deepflow-weights-") as folder:
        path = os.path.join(folder, "weights.safetensors")
        storage.get_file(name, path)
        yield path


def safetensors_specs(storage: Storage, name: str) -> dict[str, TensorSpec]:
    """name -> spec of every tensor of the safetensors object ``name`` (reads only its header), in file order."""
    with storage.open_read(name) as handle:
        entries = _read_header(handle, storage.url_of(name))
    return {key: entries[key][0] for key in sorted(entries, key=lambda key: entries[key][1])}


def iter_safetensors(storage: Storage, name: str) -> Iterator[tuple[str, torch.Tensor]]:
    """The tensors of the safetensors object ``name``, in file order, each read into its own new CPU tensor when it
    is reached (memory: the tensors the caller keeps; a remote object is downloaded to a temporary file first)."""
    with _local_file(storage, name) as path, open(path, "rb") as handle:
        entries = _read_header(handle, storage.url_of(name))
        for key in sorted(entries, key=lambda key: entries[key][1]):
            spec, offset = entries[key]
            yield key, _read_tensor(handle, spec, offset, storage.url_of(name))


def read_safetensors(storage: Storage, name: str) -> dict[str, torch.Tensor]:
    """Every tensor of the safetensors object ``name`` (one copy of the data in memory, no bytes buffer)."""
    return dict(iter_safetensors(storage, name))


# ------------------------------------------------------------------------------------------- slice layouts
#: How a sharded engine cuts a parameter of full shape S over W ranks (checkpoint meta.json ``ema_layout``).
#: FULL: every rank holds the whole tensor (DDP, ZeRO-1/2).
FULL = "full"
#: ``torch.chunk(full, W, dim=0)[rank]`` (FSDP2 ``Shard(0)``): uneven chunks, ranks past the last chunk hold [0,...].
DIM0_CHUNKS = "dim0-chunks"
#: ``full.flatten()`` zero-padded to W * n elements, n = ceil(numel / W); rank r holds [r*n, (r+1)*n) (ZeRO-3).
FLAT_PARTITIONS = "flat-partitions"
SLICE_LAYOUTS = (FULL, DIM0_CHUNKS, FLAT_PARTITIONS)


def slice_full(full: torch.Tensor, layout: str, rank: int, world_size: int) -> torch.Tensor:
    """Rank ``rank``'s slice of ``full`` (shape S) in ``layout``: S (FULL), [<=ceil(S0/W), *S[1:]] (DIM0_CHUNKS) or
    [ceil(numel/W)] (FLAT_PARTITIONS). A view of ``full`` where possible."""
    if layout == FULL:
        return full
    if layout == DIM0_CHUNKS:
        chunks = full.chunk(world_size, dim=0)
        return chunks[rank] if rank < len(chunks) else full.new_zeros((0, *full.shape[1:]))
    if layout == FLAT_PARTITIONS:
        size = -(-full.numel() // world_size)
        piece = full.reshape(-1)[rank * size : (rank + 1) * size]
        if piece.numel() < size:
            piece = torch.cat([piece, piece.new_zeros(size - piece.numel())])
        return piece
    raise ValueError(f"unknown slice layout {layout!r} (known: {', '.join(SLICE_LAYOUTS)})")


def join_slices(pieces: Sequence[torch.Tensor], layout: str, shape: Sequence[int]) -> torch.Tensor:
    """The full tensor of shape ``shape`` from the slices of ranks 0..W-1 (W = len(pieces)) cut by
    :func:`slice_full`."""
    shape = torch.Size(shape)
    if layout == FULL or (len(pieces) == 1 and pieces[0].shape == shape):
        return pieces[0]
    if layout == DIM0_CHUNKS:
        full = torch.cat(list(pieces), dim=0)
    elif layout == FLAT_PARTITIONS:
        numel = shape.numel()
        if len(pieces) == 1:
            full = pieces[0].reshape(-1)[:numel].view(shape)
        else:
            full = torch.cat([piece.reshape(-1) for piece in pieces])[:numel].view(shape)
    else:
        raise ValueError(f"unknown slice layout {layout!r} (known: {', '.join(SLICE_LAYOUTS)})")
    if full.shape != shape:
        raise ValueError(
            f"{len(pieces)} {layout} slices make a tensor of shape {tuple(full.shape)}, expected {tuple(shape)}"
        )
    return full


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


def _export_names(url: str) -> tuple[str, str, str]:
    """(folder, weights name, card name) of an export ``url``: a folder or a ``.safetensors`` file."""
    if url.rstrip("/").endswith(".safetensors"):
        folder, weights_name = split_url(url.rstrip("/"))
        return folder, weights_name, weights_name[: -len(".safetensors")] + ".json"
    return url, EXPORT_WEIGHTS_NAME, EXPORT_META_NAME


def write_export(
    url: str,
    weights: Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]],
    card: ModelCard,
    storage_options: dict[str, Any] | None = None,
    specs: Mapping[str, TensorSpec] | None = None,
) -> str:
    """Write weights + card. ``url``: a folder (``export.safetensors`` + ``export.json`` in it) or a
    ``.safetensors`` file (its ``.json`` beside it). Returns the weights URL.

    ``weights``: a dict, or (name, tensor) pairs produced one at a time (a gather in progress, a checkpoint being
    read): then ``specs`` announces every tensor's shape and dtype, and each tensor is written into the file as it
    comes, so the memory this takes is the tensor in hand, never a copy of the model. Weights first (atomic: a
    temporary file renamed, or uploaded, by :meth:`Storage.write_file`), card last."""
    if specs is None:
        if not isinstance(weights, Mapping):
            raise TypeError("write_export: a stream of tensors needs their specs up front")
        specs = {name: TensorSpec.of(tensor) for name, tensor in weights.items()}
    pairs = weights.items() if isinstance(weights, Mapping) else weights
    folder, weights_name, meta_name = _export_names(url)
    storage = Storage(folder, storage_options)
    storage.write_file(weights_name, lambda handle: write_safetensors(handle, specs, pairs, {"format": "pt"}))
    storage.write_json(meta_name, card.model_dump(mode="json", exclude_none=True))
    return storage.url_of(weights_name)


def _read_card(storage: Storage, name: str) -> ModelCard:
    raw = storage.read_json(name)
    try:
        return ModelCard.model_validate(raw)
    except Exception as error:  # noqa: BLE001 - pydantic's message, with the file
        raise ValueError(f"{storage.url_of(name)}: not a model card ({str(error).splitlines()[0]})") from None


@dataclass
class WeightsSource:
    """Weights found by :func:`open_weights`: their card, every tensor's full spec, and ``tensors()``: the tensors
    read one at a time (each a new full CPU tensor; a sharded checkpoint's slices are joined tensor by tensor)."""

    url: str
    card: ModelCard
    specs: dict[str, TensorSpec]
    read: Callable[[], Iterator[tuple[str, torch.Tensor]]]

    def tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        return self.read()


def _file_source(storage: Storage, weights_name: str, card: ModelCard) -> WeightsSource:
    return WeightsSource(storage.url_of(weights_name), card, safetensors_specs(storage, weights_name),
                         lambda: iter_safetensors(storage, weights_name))


def _sharded_source(storage: Storage, card: ModelCard) -> WeightsSource:
    """The EMA of a checkpoint written by a sharded engine: every rank's ``ema/rank-RRRRR.safetensors`` joined,
    tensor by tensor, as meta.json's ``ema_layout``, ``world_size`` and ``ema_shapes`` (the full shapes) say."""
    meta = storage.read_json(CHECKPOINT_META_NAME) if storage.exists(CHECKPOINT_META_NAME) else {}
    if (not isinstance(meta, dict) or meta.get("ema_layout") not in SLICE_LAYOUTS or "world_size" not in meta
            or not isinstance(meta.get("ema_shapes"), dict)):
        raise ValueError(
            f"{storage.url}: the EMA is sharded over ranks (FSDP / ZeRO-3) and {CHECKPOINT_META_NAME} does not say "
            "how to join it (ema_layout, world_size, ema_shapes: written since this version); use the run's export "
            "(<output_dir>/export) instead"
        )
    layout, world = str(meta["ema_layout"]), int(meta["world_size"])
    names = [ema_file_name(rank) for rank in range(world)]
    absent = [name for name in names if not storage.exists(name)]
    if absent:
        raise FileNotFoundError(f"{storage.url}: the EMA of a {world}-rank run lacks {', '.join(absent)}")
    slices = safetensors_specs(storage, names[0])
    shapes = {name: tuple(shape) for name, shape in meta["ema_shapes"].items()}
    unknown = sorted(set(slices) - set(shapes))
    if unknown:
        raise ValueError(f"{storage.url}: EMA tensors {unknown[:5]} are not parameters of {card.model}")
    specs = {name: TensorSpec(shapes[name], spec.dtype) for name, spec in slices.items()}

    shapes = {name: spec.shape for name, spec in specs.items()}
    return WeightsSource(storage.url, card, specs, lambda: iter_sharded_ema(storage, layout, world, shapes))


def iter_sharded_ema(
    storage: Storage, layout: str, world_size: int, shapes: Mapping[str, Sequence[int]]
) -> Iterator[tuple[str, torch.Tensor]]:
    """The full EMA tensors of the step folder ``storage`` written by ``world_size`` ranks (``ema/rank-RRRRR``
    files cut by ``layout``), joined one tensor at a time in the order of ``shapes`` (name -> full shape): memory
    holds one tensor and its slices."""
    with contextlib.ExitStack() as stack:
        readers = [stack.enter_context(_SliceReader.open(storage, ema_file_name(rank))) for rank in range(world_size)]
        for name, shape in shapes.items():
            yield name, join_slices([reader.read(name) for reader in readers], layout, shape)


class _SliceReader:
    """One rank's EMA file, open for reading its tensors by name."""

    def __init__(self, handle: IO[bytes], entries: dict[str, tuple[TensorSpec, int]], where: str) -> None:
        self.handle, self.entries, self.where = handle, entries, where

    @classmethod
    @contextlib.contextmanager
    def open(cls, storage: Storage, name: str) -> Iterator[_SliceReader]:
        with _local_file(storage, name) as path, open(path, "rb") as handle:
            yield cls(handle, _read_header(handle, storage.url_of(name)), storage.url_of(name))

    def read(self, name: str) -> torch.Tensor:
        if name not in self.entries:
            raise ValueError(f"{self.where}: no tensor {name} (the ranks' EMA files do not match)")
        spec, offset = self.entries[name]
        return _read_tensor(self.handle, spec, offset, self.where)


def open_weights(url: str, storage_options: dict[str, Any] | None = None) -> WeightsSource:
    """The weights at ``url`` (an export folder, an export ``.safetensors``, a committed checkpoint step folder or a
    checkpoints folder: its newest committed step), not yet read. Errors name the URL and what was expected."""
    if url.rstrip("/").endswith(".safetensors"):
        folder, name, meta_name = _export_names(url)
        storage = Storage(folder, storage_options)
        if not storage.exists(meta_name):
            raise FileNotFoundError(f"{url}: no {meta_name} beside it naming the model (write it with "
                                    "deepflow convert or the trainer's export)")
        return _file_source(storage, name, _read_card(storage, meta_name))
    storage = Storage(url, storage_options)
    if storage.exists(EXPORT_WEIGHTS_NAME):
        return _file_source(storage, EXPORT_WEIGHTS_NAME, _read_card(storage, EXPORT_META_NAME))
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
    if storage.exists(full):
        return _file_source(storage, full, card)
    if storage.list(prefix="rank-", subdir="ema"):
        return _sharded_source(storage, card)
    raise FileNotFoundError(f"{storage.url_of(full)}: no EMA weights in this checkpoint")


def load_weights(url: str, storage_options: dict[str, Any] | None = None) -> tuple[dict[str, torch.Tensor], ModelCard]:
    """Weights + card from anything :func:`open_weights` accepts (a sharded checkpoint's EMA joined); memory: the
    weights returned (read tensor by tensor, no bytes buffer, no second copy)."""
    source = open_weights(url, storage_options)
    return dict(source.tensors()), source.card


def export_checkpoint(
    url: str,
    out: str,
    storage_options: dict[str, Any] | None = None,
    out_storage_options: dict[str, Any] | None = None,
) -> str:
    """Write the weights at ``url`` (a checkpoint, sharded or not, or another export) as an export at ``out``, one
    tensor at a time (memory: the largest tensor and its slices, never the model). Returns the weights URL."""
    source = open_weights(url, storage_options)
    return write_export(out, source.tensors(), source.card, out_storage_options, specs=source.specs)


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
