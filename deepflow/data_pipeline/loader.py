"""Training loader over a precomputed dataset (see docs/architecture.md, "Data").

```python
loader = ShardLoader("s3://bucket/imagenet256-sdvae", batch_size=32, rank=r, world_size=w, streams=64,
                     num_workers=2, shuffle_buffer=1000, seed=0, flip=True, storage_options=None, on_error="skip")
for batch in loader:   # infinite
    batch["x"]         # float32 [B, C, H, W]: (mean + std * eps) * latent_scale, or pixels in [-1, 1]
    batch["y"]         # int64 [B] class labels (-1 for caption datasets)
    batch["text_emb"], batch["text_mask"], batch["text_pooled"]   # caption datasets: float32 [B, L, D],
                       # bool [B, L], float32 [B, P]; one caption per sample drawn each step
    batch["image"]     # uint8 [B, 3, R, R] when the dataset keeps images (flipped like x)
    batch["streams"]   # list[int]: the stream of each chunk of ``loader.chunk_size`` rows, in row order
state = loader.state_dict()    # JSON-able; a new loader + load_state_dict(state) continues exactly
```

The dataset is read as ``streams`` sample streams (:mod:`deepflow.data_pipeline.stream`): the sample order and
every random draw are pure functions of (seed, epoch, stream, chunk index). A batch of rank r is one chunk of
each of its streams ``r::world_size`` (``chunk_size = batch_size * world_size / streams`` rows each), so the
global batch, its order and its randomness are the same on any number of ranks that divides ``streams``; the
state is each stream's position (:meth:`ShardLoader.merge_states` joins the ranks' states into one that any
world size loads). ``num_workers`` background readers (threads by default, or DataLoader processes) serve the
rank's streams; they change the speed, never the order.

``url`` is a dataset directory, its ``manifest.json``, or a pattern of shard names inside it
(``.../shard-0000-*.tar``, ``.../shard-{0000..0003}-000000.tar``) to use a subset.

Unreadable shards (missing, or corrupt: checksum, tar, fields or sample count not the manifest's): with
``on_error="skip"`` a stream puts the next readable shard of the epoch permutation in an unreadable shard's place
(:mod:`deepflow.data_pipeline.stream`), so the order stays a function of (seed, the set of readable shards,
step) on any world size, reader count and after a resume. The loader logs each unreadable shard once (one
``WARNING`` line naming its URL and the reason, on the rank that met it), lists them in :attr:`ShardLoader.unreadable`
(``stats``) and in its state (a resumed loader does not read them again). No readable shard at all raises
:class:`~deepflow.data_pipeline.stream.NoReadableShardError` (a ``ConfigError``: ``data.url: <url>: no readable
shard (N corrupt, M missing)``); with ``on_error="raise"`` the first unreadable shard raises ``ShardError`` /
``FileNotFoundError`` naming it. Errors of reader threads and worker processes reach the consumer with their type
and message.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import io
import logging
import pickle
import posixpath
import queue
import threading
from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from deepflow.artifacts import MANIFEST_NAME, Manifest, read_manifest
from deepflow.storage import Storage
from .shards import Block, ShardError, decode_shard
from .stream import Position, SampleStream, StreamSpec, Unreadable, UnreadableMap, stream_windows

log = logging.getLogger(__name__)

STATE_VERSION = 2


def split_dataset_url(url: str) -> tuple[str, str | None]:
    """(directory URL, shard-name pattern or None) for a directory, manifest or pattern URL."""
    base = url.rstrip("/")
    head, tail = posixpath.split(base)
    if tail == MANIFEST_NAME:
        return head, None
    if any(ch in tail for ch in "*?[{"):
        return head, tail
    return base, None


def expand_pattern(pattern: str) -> list[str]:
    import braceexpand

    return list(braceexpand.braceexpand(pattern))


@dataclasses.dataclass
class _Chunk:
    """One stream's chunk for one batch, with the stream's position after it and the unreadable shards it found
    while reading it."""

    stream: int
    batch: dict[str, Any]
    position: dict[str, int]
    unreadable: list[Unreadable]


def _shard_failure(url: str, reason: str) -> _Failure:
    return _Failure(ShardError(url, reason))


@dataclasses.dataclass
class _Failure:
    """An error of a reader thread or worker process, handed to the consumer (which raises it)."""

    error: BaseException

    def __reduce__(self) -> tuple[Any, ...]:
        """Pickles with the error's type and message (``ShardError`` takes two arguments; an unpicklable error
        becomes a ``RuntimeError`` with its type and message)."""
        error = self.error
        if isinstance(error, ShardError):
            return _shard_failure, (error.url, error.reason)
        try:
            pickle.loads(pickle.dumps(error))
        except Exception:  # noqa: BLE001 - whatever the error holds
            error = RuntimeError(f"{type(error).__name__}: {error}")
        return _Failure, (error,)


def _group_items(spec: StreamSpec, streams: list[int], positions: dict[int, Position],
                 known: UnreadableMap | None = None) -> Iterator[list[_Chunk]]:
    """For each batch index: the next chunk of every stream of the group ``streams`` (in that order).

    ``known``: shards known to be unreadable, shared by the group's streams (and updated by them)."""
    known = {} if known is None else known
    readers = [SampleStream(spec, stream, known) for stream in streams]
    iterators = [reader.batches(positions[stream]) for reader, stream in zip(readers, streams)]
    try:
        while True:
            item = []
            for reader, iterator in zip(readers, iterators):
                batch, after = next(iterator)
                item.append(_Chunk(reader.stream, batch, after.to_json(), list(reader.found)))
                reader.found.clear()
            yield item
    finally:
        for reader in readers:
            reader.close()


class _ThreadWorkers:
    """K background threads, one per group of streams, each filling its own bounded queue; the consumer takes one
    item from every queue per batch.

    Threads suffice: the per-batch work (object-store reads, sha256, tar slicing, numpy gathers, torch
    sampling) runs in C code that releases the GIL, and nothing is copied between processes.
    """

    def __init__(self, spec: StreamSpec, groups: list[list[int]], positions: dict[int, Position],
                 known: UnreadableMap, prefetch: int = 2) -> None:
        self.stop = threading.Event()
        self.queues: list[queue.Queue[Any]] = [queue.Queue(maxsize=prefetch) for _ in groups]
        self.threads = [threading.Thread(target=self._run, args=(k, spec, group, positions, known), daemon=True,
                                         name=f"shard-loader-{k}") for k, group in enumerate(groups)]
        for thread in self.threads:
            thread.start()

    def _put(self, worker: int, item: Any) -> bool:
        while not self.stop.is_set():
            try:
                self.queues[worker].put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _run(self, worker: int, spec: StreamSpec, group: list[int], positions: dict[int, Position],
             known: UnreadableMap) -> None:
        try:
            for item in _group_items(spec, group, positions, known):
                if not self._put(worker, item):
                    return
        except BaseException as error:  # noqa: BLE001 - handed to the consumer thread
            self._put(worker, _Failure(error))

    def _get(self, worker: int) -> Any:
        while True:
            try:
                item = self.queues[worker].get(timeout=1.0)
            except queue.Empty:
                if not self.threads[worker].is_alive() and self.queues[worker].empty():
                    raise RuntimeError(f"loader reader thread {worker} ended without a batch") from None
                continue
            if isinstance(item, _Failure):
                raise item.error
            return item

    def __iter__(self) -> Iterator[list[_Chunk]]:
        while True:
            yield [chunk for worker in range(len(self.queues)) for chunk in self._get(worker)]

    def close(self) -> None:
        self.stop.set()
        for worker_queue in self.queues:
            while not worker_queue.empty():
                worker_queue.get_nowait()
        for thread in self.threads:
            thread.join(timeout=10)


class _GroupDataset(IterableDataset[list[_Chunk]]):
    """DataLoader dataset: worker process j serves stream group j (one item per batch index); the DataLoader
    hands items out round-robin, so K consecutive items make one batch. An error ends the worker's items with a
    :class:`_Failure` (its type and message intact; the DataLoader's own wrapper would turn it into a traceback
    text)."""

    def __init__(self, spec: StreamSpec, groups: list[list[int]], positions: dict[int, Position],
                 known: dict[str, Unreadable]) -> None:
        self.spec = spec
        self.groups = groups
        self.positions = positions
        self.known = known

    def __iter__(self) -> Iterator[list[_Chunk]]:
        info = get_worker_info()
        group = self.groups[0 if info is None else info.id]
        spec = self.spec
        if info is not None:  # a forked worker: filesystem clients (event loops, sockets) must not be shared
            torch.set_num_threads(1)
            spec = dataclasses.replace(spec, storage=spec.storage.reopen())
        try:
            yield from _group_items(spec, group, self.positions, dict(self.known))
        except Exception as error:  # noqa: BLE001 - raised again in the consumer
            yield _Failure(error)  # type: ignore[misc]


def _process_batches(loader: DataLoader[list[_Chunk]], groups: int) -> Iterator[list[_Chunk]]:
    iterator = iter(loader)
    while True:
        item: list[_Chunk] = []
        for _ in range(groups):
            part = next(iterator)
            if isinstance(part, _Failure):
                raise part.error
            item += part
        yield item


def _concat(chunks: list[_Chunk]) -> dict[str, Any]:
    """The rank's batch: the chunks' rows in stream order (tensors along dim 0, lists joined)."""
    batch: dict[str, Any] = {}
    for name, first in chunks[0].batch.items():
        values = [chunk.batch[name] for chunk in chunks]
        if isinstance(first, torch.Tensor):
            batch[name] = values[0] if len(values) == 1 else torch.cat(values)
        else:
            batch[name] = [item for value in values for item in value]
    batch["streams"] = [chunk.stream for chunk in chunks]
    return batch


class ShardLoader:
    """Infinite, resumable, per-rank loader of a precomputed dataset (contract in docs/architecture.md).

    Args:
        url: dataset directory URL (``file://``, ``s3://``, ``gs://``, a local path), its manifest, or a
            shard-name pattern inside it.
        batch_size: samples per batch on this rank.
        rank, world_size: this rank and the number of ranks (each serves the streams ``rank::world_size``).
        num_workers: background readers of this rank's streams (0: read in this process, with background
            prefetch of shards); at most one per stream. Speed only: the order does not depend on it.
        shuffle_buffer: minimum samples shuffled together in a stream (a window of whole shards); 0: no
            shuffling within shards (shard order is still permuted per epoch).
        seed: base seed of the order and of all draws.
        flip: random horizontal flip (exact with a VAE ``flip_copy``, else the latent/pixels are mirrored).
        storage_options: fsspec options (e.g. ``{"client_kwargs": {"endpoint_url": ...}}``).
        on_error: for an unreadable (missing or corrupt) shard: ``"skip"`` (log it once, count it, read the next
            readable shard of the epoch permutation in its place) or ``"raise"``.
        streams: sample streams of the global batch (a multiple of ``world_size`` dividing
            ``batch_size * world_size``); None: ``world_size * max(1, num_workers)``.
        endpoint_url: S3 endpoint (else from storage_options / ``AWS_ENDPOINT_URL``).
        verify_checksums: compare each shard's sha256 with the manifest (catches silent corruption).
        with_keys: add ``batch["key"]``, the source keys (debugging, tests).
        decode_images: decode kept images into ``batch["image"]`` (when the dataset has them).
        prefetch_shards: shards read ahead in background threads.
        worker_mode: ``"thread"`` (default: background threads, no inter-process copies; the work releases
            the GIL) or ``"process"`` (torch DataLoader worker processes).
    """

    def __init__(
        self,
        url: str,
        batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        num_workers: int = 0,
        shuffle_buffer: int = 1000,
        seed: int = 0,
        flip: bool = True,
        storage_options: dict[str, Any] | None = None,
        on_error: str = "skip",
        *,
        streams: int | None = None,
        endpoint_url: str | None = None,
        verify_checksums: bool = True,
        with_keys: bool = False,
        decode_images: bool = True,
        prefetch_shards: int = 2,
        worker_mode: str = "thread",
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside 0..{world_size - 1}")
        if on_error not in ("skip", "raise"):
            raise ValueError(f"on_error must be 'skip' or 'raise', got {on_error!r}")
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        if worker_mode not in ("thread", "process"):
            raise ValueError(f"worker_mode must be 'thread' or 'process', got {worker_mode!r}")
        self.num_streams = streams or world_size * max(1, num_workers)
        self.chunk_size = _chunk_size(batch_size, world_size, self.num_streams)
        self.worker_mode = worker_mode
        directory, pattern = split_dataset_url(url)
        self.storage = Storage(directory, storage_options, endpoint_url)
        self.manifest: Manifest = read_manifest(self.storage.url, self.storage.storage_options)
        shards = [(s.name, int(s.num_samples)) for s in self.manifest.shards]
        if pattern is not None:
            names = set(expand_pattern(pattern))
            shards = [s for s in shards if s[0] in names or any(fnmatch.fnmatchcase(s[0], p) for p in names)]
            if not shards:
                raise ValueError(f"{url}: the pattern matches no shard of the manifest")
        usable = sum(1 for _, count in shards if count > 0)
        if usable < self.num_streams:
            raise ValueError(f"{url}: {usable} non-empty shards cannot feed {self.num_streams} streams; precompute "
                             "with smaller output.samples_per_shard or use fewer streams")
        self.streams = list(range(rank, self.num_streams, world_size))
        workers = min(max(1, num_workers), len(self.streams))
        self.groups = [self.streams[k::workers] for k in range(workers)]
        self.num_workers = num_workers
        self.batch_size = batch_size
        self.rank, self.world_size = rank, world_size
        self.seed, self.shuffle_buffer = seed, shuffle_buffer
        self.spec = StreamSpec(
            storage=self.storage, manifest=self.manifest, shards=tuple(shards), chunk_size=self.chunk_size,
            num_streams=self.num_streams, shuffle_buffer=shuffle_buffer, seed=seed, flip=flip, on_error=on_error,
            verify_checksums=verify_checksums, with_keys=with_keys, decode_images=decode_images,
            prefetch_shards=prefetch_shards, url=url,
        )
        self.num_samples = sum(count for _, count in shards)
        self._positions = {stream: Position() for stream in self.streams}
        self._found: dict[int, list[Unreadable]] = {stream: [] for stream in self.streams}  # stream's discoveries
        self._unreadable: dict[str, Unreadable] = {}  # every unreadable shard known to this rank, first first
        self._batches = 0
        self._active: Any = None

    # -- information -------------------------------------------------------------------------------------
    @property
    def samples_per_epoch(self) -> float:
        """Average samples per rank and epoch (exact per-rank counts vary with the shard split)."""
        return self.num_samples / self.world_size

    def epoch_samples(self, epoch: int) -> int:
        """Samples this rank reads in ``epoch`` (all its streams; from the manifest's counts: a substitute for an
        unreadable shard may hold another count)."""
        return sum(slot.count for stream in self.streams
                   for window in stream_windows(self.spec, epoch, stream) for slot in window)

    @property
    def epoch(self) -> int:
        """The lowest epoch of this rank's streams."""
        return min(position.epoch for position in self._positions.values())

    @property
    def unreadable(self) -> dict[str, Unreadable]:
        """Shard name -> record of every distinct shard known to be unreadable on this rank, in the order they
        were met: the ones this rank's streams met in the batches handed out, and all those of a loaded state
        (of every stream, when it was merged). Each is read once and counted once."""
        return dict(self._unreadable)

    @property
    def stats(self) -> dict[str, Any]:
        return {"batches": self._batches, "epoch": self.epoch,
                "unreadable_shards": [self.storage.url_of(name) for name in self._unreadable],
                "num_unreadable_shards": len(self._unreadable)}

    def null_text(self) -> dict[str, torch.Tensor] | None:
        """The empty caption's encoding (for CFG): ``text_emb`` float32 [L, D], ``text_mask`` bool [L],
        ``text_pooled`` float32 [P]; None for datasets without captions."""
        text = self.manifest.text
        if not text:
            return None
        from safetensors.numpy import load

        arrays = load(self.storage.read_bytes(text.null))
        return {name: torch.from_numpy(value).float() if value.dtype.kind == "f" else torch.from_numpy(value)
                for name, value in arrays.items()}

    # -- iteration ---------------------------------------------------------------------------------------------
    def _consume(self, chunks: list[_Chunk]) -> dict[str, Any]:
        chunks.sort(key=lambda chunk: self.streams.index(chunk.stream))
        if [chunk.stream for chunk in chunks] != self.streams:
            raise RuntimeError(f"loader out of order: chunks of streams {[c.stream for c in chunks]}, "
                               f"expected {self.streams}")
        for chunk in chunks:
            self._positions[chunk.stream] = Position(**chunk.position)
            for record in chunk.unreadable:
                self._note_unreadable(chunk.stream, record)
        self._batches += 1
        return _concat(chunks)

    def _note_unreadable(self, stream: int, record: Unreadable) -> None:
        """Count and log a newly met unreadable shard (once per rank; another stream's rediscovery is dropped)."""
        if record.name in self._unreadable:
            return
        self._unreadable[record.name] = record
        self._found[stream].append(record)
        log.warning(f"data: skipping {record.kind} shard {record.reason}; a readable shard takes its place in "
                    f"every epoch ({len(self._unreadable)} unreadable so far)")

    def __iter__(self) -> Iterator[dict[str, Any]]:
        self.close()
        positions = {stream: Position(**p.to_json()) for stream, p in self._positions.items()}
        known = dict(self._unreadable)  # shared by this iteration's readers (threads: one dict)
        if self.num_workers == 0:
            iterator: Any = _group_items(self.spec, self.streams, positions, known)
        elif self.worker_mode == "thread":
            iterator = _ThreadWorkers(self.spec, self.groups, positions, known)
            self._active = iterator
            return self._generate(iter(iterator))
        else:
            loader = DataLoader(_GroupDataset(self.spec, self.groups, positions, known), batch_size=None,
                                num_workers=len(self.groups), prefetch_factor=2, persistent_workers=False,
                                pin_memory=False, collate_fn=_identity)
            self._active = iter(loader)
            return self._generate(_process_batches(self._active, len(self.groups)))
        self._active = iterator
        return self._generate(iterator)

    def _generate(self, iterator: Iterator[list[_Chunk]]) -> Iterator[dict[str, Any]]:
        for chunks in iterator:
            yield self._consume(chunks)

    def close(self) -> None:
        """Stop worker processes / prefetch threads of the current iteration."""
        active, self._active = self._active, None
        if active is None:
            return
        if isinstance(active, _ThreadWorkers):
            active.close()
            return
        shutdown = getattr(active, "_shutdown_workers", None)
        if shutdown is not None:
            shutdown()
        elif hasattr(active, "close"):
            active.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass

    # -- resumption --------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """JSON-able position of this rank's streams after the last batch handed out (see :meth:`merge_states`)."""
        return {
            "version": STATE_VERSION,
            "num_streams": self.num_streams,
            "chunk_size": self.chunk_size,
            "seed": self.seed,
            "shuffle_buffer": self.shuffle_buffer,
            "streams": {str(stream): {"position": self._positions[stream].to_json(),
                                      "unreadable": [record.to_json() for record in self._found[stream]]}
                        for stream in self.streams},
        }

    @staticmethod
    def merge_states(states: list[dict[str, Any]]) -> dict[str, Any]:
        """One state from the states of all ranks (every stream once); any world size dividing the streams
        loads it."""
        merged = dict(states[0])
        merged["streams"] = {key: value for state in states for key, value in state["streams"].items()}
        return merged

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from ``state`` (:meth:`state_dict` of a loader with the same streams, chunk size, seed and
        shuffle buffer, or :meth:`merge_states` of all ranks' states; the world size may differ)."""
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"loader state: unsupported version {state.get('version')!r} (written by an older "
                             "version of the loader: resume with that version or start a new run)")
        for name in ("num_streams", "chunk_size", "seed", "shuffle_buffer"):
            if state.get(name) != getattr(self, name):
                raise ValueError(f"loader state: {name} is {state.get(name)!r} in the checkpoint but "
                                 f"{getattr(self, name)!r} now; an exact resume needs the same value")
        missing = [stream for stream in self.streams if str(stream) not in state["streams"]]
        if missing:
            raise ValueError(f"loader state: no position for streams {missing[:5]} (merge every rank's state)")
        self.close()
        for stream in self.streams:
            entry = state["streams"][str(stream)]
            self._positions[stream] = Position(**entry["position"])
            self._found[stream] = [Unreadable(**record) for record in entry.get("unreadable", [])]
        self._unreadable = {record["name"]: Unreadable(**record)  # every stream's, not only this rank's
                            for entry in state["streams"].values() for record in entry.get("unreadable", [])}
        self._batches = 0


def _identity(item: Any) -> Any:
    return item


def _chunk_size(batch_size: int, world_size: int, streams: int) -> int:
    """Rows per stream and batch; the streams must split evenly over the ranks and the global batch."""
    if streams % world_size:
        raise ValueError(f"{streams} streams cannot be split evenly over {world_size} ranks (use a number of "
                         f"ranks that divides {streams})")
    global_batch = batch_size * world_size
    if global_batch % streams:
        raise ValueError(f"the global batch of {global_batch} samples cannot be split into {streams} streams "
                         "(the number of streams must divide it)")
    return global_batch // streams


def read_shards(
    url: str, storage_options: dict[str, Any] | None = None, manifest: Manifest | None = None
) -> Iterator[tuple[str, Block]]:
    """Every shard of a committed dataset in manifest order, decoded: (shard name, block) pairs.

    For inspection, prompts and tests (no shuffling, no sampling); the arrays hold the stored values. ``manifest``:
    the dataset's manifest when the caller has read it already (it is not read again).
    """
    storage = Storage(split_dataset_url(url)[0], storage_options)
    if manifest is None:
        manifest = read_manifest(storage.url, storage.storage_options)
    for shard in manifest.shards:
        yield shard.name, decode_shard(storage.read_bytes(shard.name), storage.url_of(shard.name))


def describe_batch(batch: dict[str, Any]) -> str:
    """One line with the shapes and dtypes of a batch (for logs)."""
    out = io.StringIO()
    for name, value in batch.items():
        if isinstance(value, torch.Tensor):
            out.write(f"{name}: {value.dtype} {list(value.shape)}  ")
        else:
            out.write(f"{name}: {type(value).__name__}[{len(value)}]  ")
    return out.getvalue().strip()
