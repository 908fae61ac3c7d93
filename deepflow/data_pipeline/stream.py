"""The deterministic sample streams behind :class:`deepflow.data_pipeline.loader.ShardLoader`.

A dataset is read as ``S`` *streams* (``num_streams``, the unit of the order; independent of how many ranks or
reader threads serve them). The order is a pure function of the seed, the epoch, the stream, the manifest's
shard counts and the set of readable shards:

1. epoch e: every non-empty shard, permuted with a generator seeded by (seed, e) - the same everywhere;
2. stream s of S takes the *slots* ``s, s + S, s + 2S, ...`` of that permutation (disjoint);
3. the stream's slots are grouped, in order, into *windows* of at least ``shuffle_buffer`` samples (by the
   manifest's counts); a window is loaded whole and its samples are permuted with a generator seeded by
   (seed, e, s, window);
4. the stream's samples, epoch after epoch, are cut into *chunks* of ``chunk_size`` (a chunk may span windows
   and epochs: nothing is dropped); chunk c of stream s draws its randomness (latent noise, flips, caption
   choice) from a generator seeded by (seed, s, c).

A global batch is chunk c of every stream; a rank serves the streams ``rank::world_size``. So the samples and
their randomness of every step do not depend on the number of ranks (any number that divides ``S``).
The position of a stream is (epoch, window, offset in the window, chunks emitted), so a resumed loader jumps
straight to its window without reading what came before, and sees exactly the samples it would have seen.
Shuffle quality: samples mix within windows, windows arrive in a fresh order each epoch and a batch draws from S
different shards; the precompute job already permutes items across shards, so every shard holds a mix of classes.

Unreadable shards (``on_error="skip"``): readability is a property of the shard, not of who reads it. A shard is
*unreadable* when it is missing or corrupt (sha256 not the manifest's, not a tar, truncated, fields or sample
count not the manifest's). When the shard of slot i of epoch e is unreadable, the slot takes the first readable
shard of the slots i+1, i+2, ... (mod n) of the same permutation: a different neighbour every epoch, so the lost
share is spread over the dataset, and the substitute depends only on (seed, e, the set of readable shards). The
order therefore stays independent of the world size, the reader threads/workers and resumption. A stream
remembers the shards it found unreadable (shared with the other streams of its process, and carried by the
loader's state), so each is read once and reported once; with no readable shard at all the stream raises
:class:`NoReadableShardError` (``data.url: <url>: no readable shard (N corrupt, M missing)``), a user error that
every stream of every rank meets at its first chunk. With ``on_error="raise"`` the first unreadable shard raises
(:class:`~deepflow.data_pipeline.shards.ShardError` or ``FileNotFoundError``, naming its URL).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, MutableMapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import Any, NamedTuple

import numpy as np
import torch

from .encoders import to_unit_range
from .preprocess import decode_image_bytes
from .shards import Block, ShardError, concat_blocks, decode_shard, sha256_hex
from deepflow.artifacts import Manifest
from deepflow.configuration import ConfigError
from deepflow.errors import describe
from deepflow.storage import Storage

log = logging.getLogger(__name__)


def derive_seed(*parts: int) -> int:
    """A 63-bit seed from integers (stable across processes and platforms)."""
    state = np.random.SeedSequence([int(p) & 0xFFFFFFFFFFFFFFFF for p in parts]).generate_state(2, np.uint32)
    return int((int(state[0]) << 31) ^ int(state[1])) & ((1 << 63) - 1)


@dataclass
class Position:
    """Where a stream continues: next sample = window ``window`` of ``epoch`` at ``offset``; ``batches`` chunks
    were emitted before."""

    epoch: int = 0
    window: int = 0
    offset: int = 0
    batches: int = 0

    def to_json(self) -> dict[str, int]:
        return asdict(self)


@dataclass(frozen=True)
class StreamSpec:
    """Everything a reader (thread or worker process) needs to produce a stream's chunks (picklable)."""

    storage: Storage
    manifest: Manifest
    shards: tuple[tuple[str, int], ...]  # (name, num_samples), the loader's selection
    chunk_size: int
    num_streams: int
    shuffle_buffer: int
    seed: int
    flip: bool
    on_error: str
    verify_checksums: bool
    with_keys: bool
    decode_images: bool
    prefetch_shards: int
    url: str = ""  # the dataset URL as the user gave it (for messages); "" -> the storage URL


@dataclass(frozen=True)
class Unreadable:
    """A shard found unreadable: ``kind`` is ``"missing"`` or ``"corrupt"``; ``reason`` names its URL."""

    name: str
    kind: str
    reason: str

    def to_json(self) -> dict[str, str]:
        return asdict(self)


#: what :class:`SampleStream` knows to be unreadable: shard name -> record (may be shared by the streams of a
#: process: readability is a property of the shard)
UnreadableMap = MutableMapping[str, Unreadable]


class NoReadableShardError(ConfigError):
    """Not one shard of the dataset (the loader's selection) can be read: a user error (one line, exit 2) that
    every stream of every rank raises at its first chunk, so no rank is left waiting in a collective."""

    def __init__(self, url: str, corrupt: int, missing: int) -> None:
        super().__init__(f"data.url: {url}: no readable shard ({corrupt} corrupt, {missing} missing)")
        self.url, self.corrupt, self.missing = url, corrupt, missing

    def __reduce__(self) -> tuple[Any, ...]:  # picklable across DataLoader worker processes
        return type(self), (self.url, self.corrupt, self.missing)


class Slot(NamedTuple):
    """Place ``position`` of an epoch's shard permutation, holding shard ``name`` of ``count`` samples (manifest)."""

    position: int
    name: str
    count: int


def epoch_order(spec: StreamSpec, epoch: int) -> list[tuple[str, int]]:
    """Every non-empty shard (name, count) of the selection, in the permutation of ``epoch`` (same everywhere)."""
    shards = [s for s in spec.shards if s[1] > 0]
    order = np.random.default_rng(derive_seed(spec.seed, epoch, 0x5A4D)).permutation(len(shards))
    return [shards[i] for i in order]


def group_windows(slots: list[Slot], shuffle_buffer: int) -> list[list[Slot]]:
    """``slots`` cut, in order, into windows of at least ``shuffle_buffer`` samples (the last may hold fewer)."""
    windows: list[list[Slot]] = []
    current: list[Slot] = []
    filled = 0
    for slot in slots:
        current.append(slot)
        filled += slot.count
        if filled >= max(shuffle_buffer, 1):
            windows.append(current)
            current, filled = [], 0
    if current:
        windows.append(current)
    return windows


def stream_windows(spec: StreamSpec, epoch: int, stream: int,
                   order: list[tuple[str, int]] | None = None) -> list[list[Slot]]:
    """The windows of ``stream`` in ``epoch``: its slots ``stream::num_streams`` of :func:`epoch_order` (the
    shards the manifest puts there; an unreadable one is replaced when the window is loaded)."""
    order = epoch_order(spec, epoch) if order is None else order
    slots = [Slot(i, *order[i]) for i in range(stream, len(order), spec.num_streams)]
    return group_windows(slots, spec.shuffle_buffer)


def unreadable_kind(error: BaseException) -> str:
    """``"missing"`` for an absent object, else ``"corrupt"``."""
    return "missing" if isinstance(error, FileNotFoundError) else "corrupt"


class SampleStream:
    """Chunks of one stream, from ``start`` on (see module docstring).

    ``known``: the shards already known to be unreadable (shared by the streams of one process, or the stream's
    own); ``found`` collects the ones this stream discovered since the loader last took them (with a chunk).
    """

    def __init__(self, spec: StreamSpec, stream: int, known: UnreadableMap | None = None) -> None:
        self.spec = spec
        self.stream = stream
        self.checksums = {s.name: s.sha256 for s in spec.manifest.shards}
        self.fields = spec.manifest.fields
        self.kind = spec.manifest.kind
        self.scale = float(spec.manifest.latent_scale or 1.0)
        self.has_flip_copy = spec.manifest.has_flip
        self.has_text = spec.manifest.text is not None
        self.has_images = bool(spec.manifest.image_format) and spec.decode_images
        self.known: UnreadableMap = {} if known is None else known
        self.found: list[Unreadable] = []  # discovered since the last chunk was handed out
        self._fetcher: ThreadPoolExecutor | None = None
        self._fetches: dict[str, Future[bytes]] = {}

    # -- reading ---------------------------------------------------------------------------------------
    def _read_and_verify(self, name: str) -> bytes:
        """Shard bytes, checksum verified (runs in a fetch thread: hashing releases the GIL)."""
        data = self.spec.storage.read_bytes(name)
        expected = self.checksums.get(name)
        if self.spec.verify_checksums and expected and sha256_hex(data) != expected:
            raise ShardError(self.spec.storage.url_of(name),
                             "sha256 does not match the manifest (corrupt or truncated shard)")
        return data

    def _future(self, name: str) -> Future[bytes]:
        """The background read of ``name`` (started now unless it already was)."""
        if name not in self._fetches:
            if self._fetcher is None:
                self._fetcher = ThreadPoolExecutor(max_workers=2, thread_name_prefix="shard-fetch")
            self._fetches[name] = self._fetcher.submit(self._read_and_verify, name)
        return self._fetches[name]

    def _fetch(self, name: str) -> None:
        """Prefetch ``name`` unless it is known to be unreadable."""
        if name not in self.known:
            self._future(name)

    def _load_shard(self, name: str, count: int) -> Block | None:
        """The shard's samples, or None when it is unreadable (recorded; ``on_error="raise"``: raised)."""
        if name in self.known:
            self._fetches.pop(name, None)
            return None
        url = self.spec.storage.url_of(name)
        try:
            block = decode_shard(self._future(name).result(), url)
            self._check_block(block, url, count)
            return block
        except (ShardError, FileNotFoundError) as error:
            if self.spec.on_error == "raise":
                raise
            self._record(Unreadable(name, unreadable_kind(error), describe(error)))
            return None
        finally:
            self._fetches.pop(name, None)

    def _record(self, record: Unreadable) -> None:
        if record.name not in self.known:
            self.known[record.name] = record
            self.found.append(record)

    def _check_block(self, block: Block, url: str, count: int) -> None:
        """The fields and the sample count the manifest promises (:class:`ShardError` otherwise)."""
        for name, meta in self.fields.items():
            if name not in block.arrays:
                raise ShardError(url, f"field {name!r} listed in the manifest is missing")
            array = block.arrays[name]
            if list(array.shape[1:]) != list(meta["shape"]) or str(array.dtype) != meta["dtype"]:
                raise ShardError(url, f"field {name!r} is {array.dtype}{list(array.shape[1:])}, manifest says "
                                      f"{meta['dtype']}{meta['shape']}")
        if len(block) != count:
            raise ShardError(url, f"holds {len(block)} samples, the manifest says {count}")

    def _resolve(self, order: list[tuple[str, int]], slot: Slot) -> Block:
        """The samples of ``slot``: its shard, or when that is unreadable the first readable shard of the slots
        after it (mod n) in the same epoch permutation; :class:`NoReadableShardError` when there is none."""
        for step in range(len(order)):
            name, count = order[(slot.position + step) % len(order)]
            block = self._load_shard(name, count)
            if block is not None:
                return block
        raise self._no_readable(order)

    def _no_readable(self, order: list[tuple[str, int]]) -> NoReadableShardError:
        kinds = [self.known[name].kind for name, _ in order if name in self.known]
        return NoReadableShardError(self.spec.url or self.spec.storage.url, kinds.count("corrupt"),
                                    kinds.count("missing"))

    def _load_window(self, order: list[tuple[str, int]], window: list[Slot], upcoming: list[str]) -> Block:
        for slot in window:
            self._fetch(slot.name)
        for name in upcoming[: self.spec.prefetch_shards]:
            self._fetch(name)
        blocks = [self._resolve(order, slot) for slot in window]
        return blocks[0] if len(blocks) == 1 else concat_blocks(blocks)

    def _upcoming(self, epoch: int, windows: list[list[Slot]], window_index: int) -> list[str]:
        """Shards of the windows after ``window_index`` (into the next epoch when few are left), for prefetch."""
        upcoming = [slot.name for w in windows[window_index + 1 :] for slot in w if slot.name not in self.known]
        if len(upcoming) < self.spec.prefetch_shards:
            upcoming += [slot.name for w in stream_windows(self.spec, epoch + 1, self.stream) for slot in w]
        return upcoming

    # -- batches ---------------------------------------------------------------------------------------
    def batches(self, start: Position) -> Iterator[tuple[dict[str, Any], Position]]:
        """Infinite (chunk, position after the chunk) pairs; a chunk is a batch of ``chunk_size`` samples."""
        spec = self.spec
        epoch, window_index, offset, batch_index = start.epoch, start.window, start.offset, start.batches
        pieces: list[tuple[Block, np.ndarray, np.ndarray | None]] = []
        needed = spec.chunk_size
        while True:
            order = epoch_order(spec, epoch)
            windows = stream_windows(spec, epoch, self.stream, order)
            if not windows:
                raise ValueError(f"stream {self.stream}: no shards in epoch {epoch}")
            while window_index < len(windows):
                block = self._load_window(order, windows[window_index], self._upcoming(epoch, windows, window_index))
                count = len(block)
                if spec.shuffle_buffer > 0:
                    permutation = np.random.default_rng(
                        derive_seed(spec.seed, epoch, self.stream, window_index)).permutation(count)
                else:
                    permutation = np.arange(count)
                caption_offsets = None
                if self.has_text and count:
                    caption_offsets = np.concatenate([[0], np.cumsum(block.arrays["caption_counts"])])
                while offset < count:
                    take = min(needed, count - offset)
                    pieces.append((block, permutation[offset : offset + take], caption_offsets))
                    offset += take
                    needed -= take
                    if needed == 0:
                        next_position = Position(epoch, window_index, offset, batch_index + 1)
                        if offset >= count:
                            next_position = self._advance(next_position, len(windows))
                        yield self._assemble(pieces, batch_index), next_position
                        batch_index += 1
                        pieces, needed = [], spec.chunk_size
                window_index += 1
                offset = 0
            epoch, window_index, offset = epoch + 1, 0, 0

    @staticmethod
    def _advance(position: Position, num_windows: int) -> Position:
        if position.window + 1 < num_windows:
            return Position(position.epoch, position.window + 1, 0, position.batches)
        return Position(position.epoch + 1, 0, 0, position.batches)

    def _gather(self, pieces: list[tuple[Block, np.ndarray, np.ndarray | None]], name: str,
                rows: list[np.ndarray] | None = None) -> np.ndarray:
        parts = [block.arrays[name][index if rows is None else rows[i]] for i, (block, index, _) in enumerate(pieces)]
        return parts[0] if len(parts) == 1 else np.concatenate(parts)  # fancy indexing: always a writable copy

    def _assemble(self, pieces: list[tuple[Block, np.ndarray, np.ndarray | None]], batch_index: int) -> dict[str, Any]:
        """One chunk from sample index pieces; all randomness from the (seed, stream, chunk) generator.

        Draw order: flips [B], then the latent noise [B, C, H, W] (vae), then caption choices [B].
        """
        spec = self.spec
        generator = torch.Generator().manual_seed(derive_seed(spec.seed, self.stream, batch_index))
        size = spec.chunk_size
        flips = (torch.rand(size, generator=generator) < 0.5).numpy() if spec.flip else np.zeros(size, dtype=bool)
        flipped = np.flatnonzero(flips)
        batch: dict[str, Any] = {}
        if self.kind == "vae":
            mean, std = self._gather(pieces, "mean"), self._gather(pieces, "std")
            if len(flipped):
                if self.has_flip_copy:  # the exact posterior of the flipped image
                    mean[flipped] = self._gather(pieces, "mean_flip")[flipped]
                    std[flipped] = self._gather(pieces, "std_flip")[flipped]
                else:
                    mean[flipped] = mean[flipped][..., ::-1]
                    std[flipped] = std[flipped][..., ::-1]
            x = torch.randn(mean.shape, generator=generator)  # eps, then in place: (mean + std * eps) * scale
            x.mul_(torch.from_numpy(std)).add_(torch.from_numpy(mean)).mul_(self.scale)
        else:
            pixels = self._gather(pieces, "pixels")
            if len(flipped):
                pixels[flipped] = pixels[flipped][..., ::-1]
            tensor = torch.from_numpy(pixels)
            x = to_unit_range(tensor) if tensor.dtype == torch.uint8 else tensor.float()
        batch["x"] = x
        batch["y"] = torch.from_numpy(self._gather(pieces, "labels").astype(np.int64, copy=False))
        if self.has_text:
            choice = torch.rand(size, generator=generator).numpy()
            rows, start = [], 0
            for block, index, offsets in pieces:
                assert offsets is not None
                counts = block.arrays["caption_counts"][index]
                pick = np.minimum((choice[start : start + len(index)] * counts).astype(np.int64), counts - 1)
                rows.append(offsets[index] + pick)
                start += len(index)
            batch["text_emb"] = torch.from_numpy(self._gather(pieces, "text_emb", rows)).float()
            batch["text_mask"] = torch.from_numpy(self._gather(pieces, "text_mask", rows))
            batch["text_pooled"] = torch.from_numpy(self._gather(pieces, "text_pooled", rows)).float()
        if self.has_images:
            images = np.stack([decode_image_bytes(block.images[i], f"{block.keys[i]} image")  # type: ignore[index]
                               for block, index, _ in pieces for i in index])
            if len(flipped):
                images[flipped] = images[flipped][..., ::-1]
            batch["image"] = torch.from_numpy(images)
        if spec.with_keys:
            batch["key"] = [block.keys[i] for block, index, _ in pieces for i in index]
        return batch

    def close(self) -> None:
        if self._fetcher is not None:
            self._fetcher.shutdown(wait=False, cancel_futures=True)
            self._fetcher = None
            self._fetches.clear()

