"""The rank-sharded, resumable precompute job: source images -> encoder -> webdataset shards + manifest.

Work split: the source's items are permuted with ``shuffle_seed`` (so every shard mixes classes), rank r of
w takes items ``perm[r::w]`` and cuts them into shards of ``samples_per_shard`` named
``shard-RRRR-NNNNNN.tar``.  The rank comes from ``RANK``/``WORLD_SIZE`` (torchrun), or from
``JOB_COMPLETION_INDEX`` with ``slices`` (one Kubernetes indexed-job pod per slice), or the command line.
No process group is needed: the commit protocol of :mod:`deepflow.data_pipeline.manifest` lets the last
rank to finish write the manifest.

Pipeline per rank: image decoding + preprocessing in DataLoader workers (``num_workers``), encoding in
the main process, shard serialisation + upload in a background thread, so the encoder stays busy.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler
from tqdm import tqdm

from .config import PrecomputeConfig, VaeEncoderConfig
from .encoders import build_encoder
from .manifest import MANIFEST_NAME, NULL_TEXT_NAME, ChannelStats, done_marker_name, finalize, read_done_markers
from .preprocess import encode_image_bytes, preprocess_image
from .shards import Block, build_shard, record_name, sha256_hex, shard_name
from .sources import CorruptImageError, Source, build_source
from deepflow.errors import USER_ERRORS, UserError, describe
from deepflow.ranks import read_dist_env
from deepflow.storage import Storage
from .text_encoders import build_text_encoder

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RankInfo:
    """This process's slice of the job and its local accelerator index."""

    rank: int
    world_size: int
    local_rank: int = 0


def resolve_rank(config: PrecomputeConfig, rank: int | None = None, world_size: int | None = None,
                 environ: dict[str, str] | None = None) -> RankInfo:
    """Rank and world size: explicit arguments, else torchrun's env, else a Kubernetes indexed job."""
    launch = read_dist_env(environ=environ, slices=config.slices)
    local_rank = launch.local_rank
    if rank is None and world_size is None:
        rank, world_size = launch.rank, launch.world_size
    rank = 0 if rank is None else rank
    world_size = 1 if world_size is None else world_size
    if not 0 <= rank < world_size:
        raise UserError(f"--rank: {rank} is outside 0..{world_size - 1} (world size {world_size})")
    return RankInfo(rank, world_size, local_rank)


def output_storage(config: PrecomputeConfig) -> Storage:
    """The storage of ``output.url``; a URL that cannot be opened raises :class:`UserError` naming the field."""
    output = config.output
    try:
        return Storage(output.url, output.storage_options, output.endpoint_url)
    except USER_ERRORS as error:
        raise UserError(f"output.url: {describe(error)}") from error


def build_encoders(config: PrecomputeConfig, device: torch.device) -> tuple[Any, Any]:
    """(image encoder, text encoder or None); a model that cannot be loaded raises :class:`UserError` naming its
    config section (``encoder`` / ``text_encoder``)."""
    with _named("encoder"):
        encoder = build_encoder(config.encoder, device)
    if config.text_encoder is None:
        return encoder, None
    with _named("text_encoder"):
        return encoder, build_text_encoder(config.text_encoder, device)


@contextmanager
def _named(section: str) -> Iterator[None]:
    """Re-raise user errors and load failures (OSError: no such model, hub offline) as ``<section>: <message>``."""
    try:
        yield
    except (*USER_ERRORS, OSError) as error:
        if isinstance(error, ConnectionError):
            raise
        message = describe(error)
        raise UserError(message if message.startswith(section) else f"{section}: {message}") from error


def resolve_device(name: str, local_rank: int) -> torch.device:
    if name == "auto":
        return torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    return torch.device(name)


def job_fingerprint(config: PrecomputeConfig, world_size: int, num_items: int) -> str:
    return f"{config.fingerprint()}-w{world_size}-n{num_items}"


def rank_shards(num_items: int, config: PrecomputeConfig, rank: int, world_size: int) -> list[np.ndarray]:
    """Source indices of each shard of ``rank``, in shard order."""
    order = np.arange(num_items)
    if config.shuffle_seed is not None:
        order = np.random.default_rng(config.shuffle_seed).permutation(num_items)
    mine = order[rank::world_size]
    size = config.output.samples_per_shard
    return [mine[start : start + size] for start in range(0, len(mine), size)]


# -- item loading (runs in DataLoader workers) ----------------------------------------------------------
@dataclass
class LoadedItem:
    key: str
    pixels: np.ndarray | None  # uint8 [C, R, R]
    label: int = -1
    captions: list[str] | None = None
    image_bytes: bytes | None = None
    error: str | None = None


class ItemDataset(Dataset[LoadedItem]):
    """Loads and preprocesses source item ``indices[i]``; a corrupt image gives an item with ``error``."""

    def __init__(self, source: Source, indices: np.ndarray, config: PrecomputeConfig, channels: int) -> None:
        self.source = source
        self.indices = indices
        self.preprocess = config.preprocess
        self.keep_image = config.output.keep_image
        self.jpeg_quality = config.output.jpeg_quality
        self.channels = channels

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, position: int) -> LoadedItem:
        index = int(self.indices[position])
        try:
            sample = self.source.load(index)
            pixels = preprocess_image(sample.image, self.preprocess.resolution, self.preprocess.resize, self.channels)
        except CorruptImageError as error:
            return LoadedItem(error.key, None, error=error.reason)
        except Exception as error:  # noqa: BLE001 - a bad image must never stop the job
            return LoadedItem(self.source.key(index), None, error=f"{type(error).__name__}: {error}")
        if sample.captions is not None and not [c for c in sample.captions if c.strip()]:
            return LoadedItem(sample.key, None, error="no caption")
        image_bytes = encode_image_bytes(pixels, self.keep_image, self.jpeg_quality) if self.keep_image else None
        return LoadedItem(sample.key, pixels, sample.label, sample.captions, image_bytes)


class ShardBatchSampler(Sampler[list[int]]):
    """Batches of positions that never cross a shard boundary."""

    def __init__(self, shard_sizes: list[int], batch_size: int) -> None:
        self.shard_sizes = shard_sizes
        self.batch_size = batch_size

    def __iter__(self) -> Iterator[list[int]]:
        start = 0
        for size in self.shard_sizes:
            for offset in range(0, size, self.batch_size):
                yield list(range(start + offset, start + min(offset + self.batch_size, size)))
            start += size

    def __len__(self) -> int:
        return sum(-(-size // self.batch_size) for size in self.shard_sizes)


def _collate(items: list[LoadedItem]) -> list[LoadedItem]:
    return items


def _reopen_source(worker_id: int) -> None:
    """DataLoader worker init: rebuild filesystem clients that must not be shared across a fork."""
    info = torch.utils.data.get_worker_info()
    source = info.dataset.source if info is not None else None
    if source is not None and hasattr(source, "__setstate__") and hasattr(source, "__getstate__"):
        source.__setstate__(source.__getstate__())


# -- the job ----------------------------------------------------------------------------------------------
@dataclass
class PendingShard:
    name: str
    keys: list[str] = field(default_factory=list)
    fields: dict[str, list[np.ndarray]] = field(default_factory=dict)
    captions: list[list[str]] = field(default_factory=list)
    images: list[bytes] = field(default_factory=list)
    skipped: list[dict[str, str]] = field(default_factory=list)

    def add(self, name: str, value: np.ndarray) -> None:
        self.fields.setdefault(name, []).append(value)


@dataclass
class PrecomputeSummary:
    rank: int
    world_size: int
    num_samples: int
    num_skipped: int
    shards_written: int
    shards_reused: int
    seconds: float
    encoder_seconds: float
    manifest: dict[str, Any] | None
    pipeline_seconds: float = 0.0  # from the first image read to the last shard committed (no model loading)


class PrecomputeJob:
    """One rank of the precompute job (see module docstring)."""

    def __init__(self, config: PrecomputeConfig, rank_info: RankInfo, progress: bool = True) -> None:
        self.config = config
        self.rank_info = rank_info
        self.progress = progress
        self.storage = output_storage(config)
        self.source = build_source(config.source)
        self.num_items = len(self.source) if config.limit is None else min(config.limit, len(self.source))
        self.fingerprint = job_fingerprint(config, rank_info.world_size, self.num_items)
        self.shards = rank_shards(self.num_items, config, rank_info.rank, rank_info.world_size)
        self.channels = self._resolve_channels()

    # -- bookkeeping ---------------------------------------------------------------------------------------
    def completed_shards(self) -> set[str]:
        """Names of this rank's shards whose record says they are complete (for this job)."""
        rank = self.rank_info.rank
        done = set()
        for name in self.storage.list(prefix=f"shard-{rank:04d}-", suffix=".json"):
            record = self.storage.read_json(name)
            if record.get("fingerprint") != self.fingerprint:
                raise UserError(f"output.url: {self.storage.url_of(name)} was written by another precompute job (fingerprint "
                                 f"{record.get('fingerprint')} != {self.fingerprint}); use a fresh output.url")
            done.add(record["name"])
        for name in self.storage.list(prefix=f".shard-{rank:04d}-"):  # temporaries of a killed local run
            self.storage.remove(name)
        return done

    def header(self, encoder: Any, text_encoder: Any) -> dict[str, Any]:
        """The job's description that goes into the manifest (identical on every rank)."""
        config = self.config
        resolution = config.preprocess.resolution
        channels = self.channels
        shape = encoder.output_shape(channels, resolution)
        fields = {name: {"dtype": dtype, "shape": shape} for name, dtype in encoder.field_dtypes.items()}
        fields["labels"] = {"dtype": "int64", "shape": []}
        header: dict[str, Any] = {
            "kind": encoder.kind,
            "shape": shape,
            "dtype": fields[encoder.stats_field]["dtype"],
            "resolution": resolution,
            "num_classes": self.source.num_classes,
            "class_names": self.source.class_names,
            "latent_scale": config.encoder.scale if isinstance(config.encoder, VaeEncoderConfig) else None,
            "has_flip": isinstance(config.encoder, VaeEncoderConfig) and config.encoder.flip_copy,
            "image_format": config.output.keep_image,
            "image_shape": [3, resolution, resolution] if config.output.keep_image else None,
            "encoder": encoder.describe(),
            "text": None,
            "has_captions": self.source.has_captions,
            "source": {**self.source.description, "num_items": self.num_items, "shuffle_seed": config.shuffle_seed},
            "preprocess": config.preprocess.model_dump(mode="json"),
            "samples_per_shard": config.output.samples_per_shard,
            "samples_per_block": config.output.samples_per_block,
            "fields": fields,
        }
        if text_encoder is not None:
            null = self.null_text = text_encoder.null()
            header["text"] = {
                "encoder": text_encoder.describe(),
                "max_length": int(null["text_emb"].shape[0]),
                "dim": int(null["text_emb"].shape[1]),
                "pooled_dim": int(null["text_pooled"].shape[0]),
                "null": NULL_TEXT_NAME,
            }
            length, dim, pooled = header["text"]["max_length"], header["text"]["dim"], header["text"]["pooled_dim"]
            fields["text_emb"] = {"dtype": "float16", "shape": [length, dim], "per": "caption"}
            fields["text_mask"] = {"dtype": "bool", "shape": [length], "per": "caption"}
            fields["text_pooled"] = {"dtype": "float16", "shape": [pooled], "per": "caption"}
            fields["caption_counts"] = {"dtype": "int32", "shape": []}
        return header

    def _resolve_channels(self) -> int:
        """The stored channel count: configured, 3 for the VAE, else the source's (first readable image)."""
        if isinstance(self.config.encoder, VaeEncoderConfig):
            return 3
        if self.config.preprocess.channels is not None:
            return self.config.preprocess.channels
        if self.source.grayscale is not None:
            return 1 if self.source.grayscale else 3
        for index in range(min(self.num_items, 64)):
            try:
                image = self.source.load(index).image
            except CorruptImageError:
                continue
            return preprocess_image(image, 1, "resize", None).shape[0]
        raise UserError(f"source: none of the first {min(self.num_items, 64)} images is readable")

    def write_null_text(self) -> None:
        from safetensors.numpy import save

        if self.rank_info.rank != 0 or self.storage.exists(NULL_TEXT_NAME):
            return
        null = self.null_text
        self.storage.write_bytes(NULL_TEXT_NAME, save({name: np.ascontiguousarray(v) for name, v in null.items()}))

    # -- shard writing (background thread) -----------------------------------------------------------------
    def _write_shard(self, pending: PendingShard, stats_field: str) -> None:
        arrays = {name: np.concatenate(parts) for name, parts in pending.fields.items()}
        block = Block(pending.keys, arrays, pending.captions if self.source.has_captions else None,
                      pending.images if self.config.output.keep_image else None, self.config.output.keep_image or "png")
        stats = ChannelStats()
        if pending.keys:
            values = arrays[stats_field]
            stats.update(values)
        data = build_shard(block, self.config.output.samples_per_block)
        self.storage.write_bytes(pending.name, data)
        record = {"name": pending.name, "num_samples": len(pending.keys), "sha256": sha256_hex(data),
                  "bytes": len(data), "skipped": pending.skipped, "stats": stats.to_json(),
                  "fingerprint": self.fingerprint}
        self.storage.write_json(record_name(pending.name), record)

    # -- main loop --------------------------------------------------------------------------------------------
    def run(self) -> PrecomputeSummary:
        config, rank, world = self.config, self.rank_info.rank, self.rank_info.world_size
        start = time.perf_counter()
        self.storage.makedirs()
        if self.storage.exists(MANIFEST_NAME):
            manifest = self.storage.read_json(MANIFEST_NAME)
            if manifest.get("fingerprint") != self.fingerprint:
                raise UserError(f"output.url: {self.storage.url_of(MANIFEST_NAME)} exists and belongs to another precompute "
                                 "job; use a fresh output.url")
            log.info("%s is already complete", self.storage.url)
            return PrecomputeSummary(rank, world, 0, 0, 0, len(self.shards), 0.0, 0.0, manifest)
        read_done_markers(self.storage, self.fingerprint)  # refuses markers of another job
        done = self.completed_shards()
        names = [shard_name(rank, index) for index in range(len(self.shards))]
        todo = [i for i, name in enumerate(names) if name not in done]
        device = resolve_device(config.device, self.rank_info.local_rank)
        encoder, text_encoder = build_encoders(config, device)
        if self.source.has_captions and text_encoder is None:
            raise UserError("text_encoder: the source has captions; configure a text encoder to embed them")
        header = self.header(encoder, text_encoder)
        if text_encoder is not None:
            self.write_null_text()

        todo_indices = [self.shards[i] for i in todo]
        dataset = ItemDataset(self.source, np.concatenate(todo_indices) if todo_indices else np.zeros(0, int), config,
                              self.channels)
        loader = DataLoader(dataset, batch_sampler=ShardBatchSampler([len(s) for s in todo_indices], config.batch_size),
                            num_workers=config.num_workers, collate_fn=_collate, worker_init_fn=_reopen_source,
                            prefetch_factor=4 if config.num_workers else None,
                            persistent_workers=False)
        total = sum(len(s) for s in self.shards)
        pipeline_start = time.perf_counter()
        bar = tqdm(total=total, initial=total - len(dataset), desc=f"precompute rank {rank}/{world}", unit="img",
                   disable=not self.progress, dynamic_ncols=True)
        encoder_seconds, num_samples, num_skipped = 0.0, 0, 0
        writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="shard-writer")
        pending_writes: list[Future[None]] = []
        shard_iter = iter(todo)
        current: PendingShard | None = None
        remaining = 0
        try:
            for items in loader:
                if current is None:
                    shard_index = next(shard_iter)
                    current = PendingShard(names[shard_index])
                    remaining = len(self.shards[shard_index])
                remaining -= len(items)
                good = [item for item in items if item.error is None]
                for item in items:
                    if item.error is not None:
                        current.skipped.append({"key": item.key, "error": item.error})
                        log.warning("skipping %s: %s", item.key, item.error)
                if good:
                    tick = time.perf_counter()
                    pixels = torch.from_numpy(np.stack([item.pixels for item in good]))
                    for name, value in encoder.encode(pixels).items():
                        current.add(name, value)
                    if text_encoder is not None:
                        captions = [[c for c in item.captions or [] if c.strip()] for item in good]
                        for name, value in text_encoder.encode([c for cs in captions for c in cs]).items():
                            current.add(name, value)
                        current.add("caption_counts", np.array([len(cs) for cs in captions], dtype=np.int32))
                        current.captions.extend(captions)
                    encoder_seconds += time.perf_counter() - tick
                    current.add("labels", np.array([item.label for item in good], dtype=np.int64))
                    current.keys.extend(item.key for item in good)
                    current.images.extend(item.image_bytes or b"" for item in good)
                num_samples += len(good)
                num_skipped += len(items) - len(good)
                bar.update(len(items))
                if remaining == 0:
                    while len(pending_writes) >= 2:  # back-pressure: at most two shards in flight
                        pending_writes.pop(0).result()
                    pending_writes.append(writer.submit(self._write_shard, current, encoder.stats_field))
                    current = None
                    if config.debug.sleep_per_shard_s:
                        time.sleep(config.debug.sleep_per_shard_s)
            for future in pending_writes:
                future.result()
            pipeline_seconds = time.perf_counter() - pipeline_start
        finally:
            writer.shutdown(wait=True)
            bar.close()
        self.storage.write_json(done_marker_name(rank), {"rank": rank, "world_size": world,
                                                         "fingerprint": self.fingerprint, "shards": names,
                                                         "header": header})
        manifest = finalize(self.storage, self.fingerprint, world, header)
        seconds = time.perf_counter() - start
        summary = PrecomputeSummary(rank, world, num_samples, num_skipped, len(todo), len(done), seconds,
                                    encoder_seconds, manifest, pipeline_seconds)
        print(f"precompute rank {rank}/{world}: {num_samples} samples encoded in {seconds:.2f}s "
              f"({num_samples / max(pipeline_seconds, 1e-9):.1f} samples/s; encoder {encoder_seconds:.2f}s), "
              f"{num_skipped} skipped, {len(todo)} shards written, {len(done)} already done"
              + (f"; manifest committed at {self.storage.url_of(MANIFEST_NAME)}" if manifest else ""), flush=True)
        return summary


def finalize_only(config: PrecomputeConfig, world_size: int) -> dict[str, Any] | None:
    """``--finalize``: merge the records into ``manifest.json`` once every rank has finished."""
    storage = output_storage(config)
    source = build_source(config.source)
    num_items = len(source) if config.limit is None else min(config.limit, len(source))
    fingerprint = job_fingerprint(config, world_size, num_items)
    markers = read_done_markers(storage, fingerprint)
    if not markers:
        raise UserError(f"output.url: {storage.url}: no rank has finished yet (no rank-*.done.json)")
    header = markers[min(markers)]["header"]
    return finalize(storage, fingerprint, world_size, header)


def run_precompute(config: PrecomputeConfig, rank: int | None = None, world_size: int | None = None,
                   progress: bool = True) -> PrecomputeSummary:
    """Run this process's slice of the precompute job (rank from arguments or the environment)."""
    return PrecomputeJob(config, resolve_rank(config, rank, world_size), progress).run()
