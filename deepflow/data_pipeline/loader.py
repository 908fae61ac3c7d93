"""Training loader over a precomputed dataset (see docs/architecture.md, "Data").

```python
loader = ShardLoader("s3://bucket/imagenet256-sdvae", batch_size=32, rank=r, world_size=w, num_workers=2,
                     shuffle_buffer=1000, seed=0, flip=True, storage_options=None, on_error="skip")
for batch in loader:   # infinite
    batch["x"]         # float32 [B, C, H, W]: (mean + std * eps) * latent_scale, or pixels in [-1, 1]
    batch["y"]         # int64 [B] class labels (-1 for caption datasets)
    batch["text_emb"], batch["text_mask"], batch["text_pooled"]   # caption datasets: float32 [B, L, D],
                       # bool [B, L], float32 [B, P]; one caption per sample drawn each step
    batch["image"]     # uint8 [B, 3, R, R] when the dataset keeps images (flipped like x)
state = loader.state_dict()    # JSON-able; a new loader + load_state_dict(state) continues exactly
```

The sample order and every random draw are pure functions of (seed, epoch, rank, worker, batch index)
(:mod:`deepflow.data_pipeline.stream`); the state is each worker's position.  With ``num_workers = K > 0``
K logical workers (threads by default, or DataLoader processes) are served round-robin, so a resumed loader
(same ``num_workers``, ``world_size`` and ``batch_size``) continues exactly; the order depends on
``num_workers``.

``url`` is a dataset directory, its ``manifest.json``, or a pattern of shard names inside it
(``.../shard-0000-*.tar``, ``.../shard-{0000..0003}-000000.tar``) to use a subset.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import io
import logging
import posixpath
import queue
import threading
import warnings
from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from deepflow.artifacts import MANIFEST_NAME, Manifest, read_manifest
from deepflow.storage import Storage
from .shards import Block, decode_shard
from .stream import Position, SampleStream, StreamSpec, worker_windows

log = logging.getLogger(__name__)

STATE_VERSION = 1


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


def _tag(batch: dict[str, Any], worker: int, position: Position, stream: SampleStream) -> dict[str, Any]:
    batch["_worker"] = worker
    batch["_position"] = position.to_json()
    batch["_corrupt"] = list(stream.corrupt)
    stream.corrupt.clear()
    return batch


@dataclasses.dataclass
class _Failure:
    error: BaseException


class _ThreadWorkers:
    """K background threads, one per logical worker, each filling its own bounded queue; the consumer
    takes batches round-robin starting at logical worker ``first``.

    Threads suffice: the per-batch work (object-store reads, sha256, tar slicing, numpy gathers, torch
    sampling) runs in C code that releases the GIL, and nothing is copied between processes.
    """

    def __init__(self, spec: StreamSpec, positions: list[Position], first: int, prefetch: int = 2) -> None:
        self.spec = spec
        self.first = first
        self.stop = threading.Event()
        self.queues: list[queue.Queue[Any]] = [queue.Queue(maxsize=prefetch) for _ in positions]
        self.threads = [threading.Thread(target=self._run, args=(k, positions[k]), daemon=True,
                                         name=f"shard-loader-{spec.rank}-{k}") for k in range(len(positions))]
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

    def _run(self, worker: int, position: Position) -> None:
        stream = SampleStream(self.spec, worker)
        try:
            for batch, after in stream.batches(position):
                if not self._put(worker, _tag(batch, worker, after, stream)):
                    return
        except BaseException as error:  # noqa: BLE001 - handed to the consumer thread
            self._put(worker, _Failure(error))
        finally:
            stream.close()

    def __iter__(self) -> Iterator[dict[str, Any]]:
        index = self.first
        while True:
            worker = index % len(self.queues)
            while True:
                try:
                    item = self.queues[worker].get(timeout=1.0)
                    break
                except queue.Empty:
                    if not self.threads[worker].is_alive() and self.queues[worker].empty():
                        raise RuntimeError(f"loader worker thread {worker} ended without a batch") from None
            if isinstance(item, _Failure):
                raise item.error
            yield item
            index += 1

    def close(self) -> None:
        self.stop.set()
        for worker_queue in self.queues:
            while not worker_queue.empty():
                worker_queue.get_nowait()
        for thread in self.threads:
            thread.join(timeout=10)


class _WorkerStreams(IterableDataset[dict[str, Any]]):
    """DataLoader dataset: physical worker j serves logical worker (j + rotation) % K."""

    def __init__(self, spec: StreamSpec, positions: list[Position], rotation: int) -> None:
        self.spec = spec
        self.positions = positions
        self.rotation = rotation

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        physical = 0 if info is None else info.id
        logical = (physical + self.rotation) % self.spec.num_logical_workers
        spec = self.spec
        if info is not None:  # a forked worker: filesystem clients (event loops, sockets) must not be shared
            torch.set_num_threads(1)
            spec = dataclasses.replace(spec, storage=spec.storage.reopen())
        stream = SampleStream(spec, logical)
        try:
            for batch, position in stream.batches(self.positions[logical]):
                yield _tag(batch, logical, position, stream)
        finally:
            stream.close()


class ShardLoader:
    """Infinite, resumable, per-rank loader of a precomputed dataset (contract in docs/architecture.md).

    Args:
        url: dataset directory URL (``file://``, ``s3://``, ``gs://``, a local path), its manifest, or a
            shard-name pattern inside it.
        batch_size: samples per batch on this rank.
        rank, world_size: this rank and the number of ranks (disjoint shards per rank and epoch).
        num_workers: DataLoader worker processes (0: read in this process, with background prefetch).
        shuffle_buffer: minimum samples shuffled together (a window of whole shards); 0: no shuffling
            within shards (shard order is still permuted per epoch).
        seed: base seed of the order and of all draws.
        flip: random horizontal flip (exact with a VAE ``flip_copy``, else the latent/pixels are mirrored).
        storage_options: fsspec options (e.g. ``{"client_kwargs": {"endpoint_url": ...}}``).
        on_error: ``"skip"`` (warn with the shard URL, count, continue) or ``"raise"`` for a corrupt shard.
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
        self.num_logical_workers = max(1, num_workers)
        usable = sum(1 for _, count in shards if count > 0)
        if usable < world_size * self.num_logical_workers:
            raise ValueError(f"{url}: {usable} non-empty shards cannot feed {world_size} ranks x "
                             f"{self.num_logical_workers} workers; precompute with smaller output.samples_per_shard "
                             "or use fewer workers")
        self.num_workers = num_workers
        self.batch_size = batch_size
        self.rank, self.world_size = rank, world_size
        self.seed, self.shuffle_buffer = seed, shuffle_buffer
        self.spec = StreamSpec(
            storage=self.storage, manifest=self.manifest, shards=tuple(shards), batch_size=batch_size, rank=rank,
            world_size=world_size, num_logical_workers=self.num_logical_workers, shuffle_buffer=shuffle_buffer,
            seed=seed, flip=flip, on_error=on_error, verify_checksums=verify_checksums, with_keys=with_keys,
            decode_images=decode_images, prefetch_shards=prefetch_shards,
        )
        self.num_samples = sum(count for _, count in shards)
        self._positions = [Position() for _ in range(self.num_logical_workers)]
        self._batches = 0
        self.corrupt_shards: list[str] = []  # distinct URLs of skipped shards
        self.corrupt_skips = 0  # times a shard was skipped (once per epoch that reaches it)
        self._active: Any = None

    # -- information -------------------------------------------------------------------------------------
    @property
    def samples_per_epoch(self) -> float:
        """Average samples per rank and epoch (exact per-rank counts vary with the shard split)."""
        return self.num_samples / self.world_size

    def epoch_samples(self, epoch: int) -> int:
        """Samples this rank reads in ``epoch`` (all its logical workers; from the manifest's counts)."""
        return sum(count for worker in range(self.num_logical_workers)
                   for window in worker_windows(self.spec, epoch, worker) for _, count in window)

    @property
    def epoch(self) -> int:
        """Epoch of the worker that serves the next batch."""
        return self._positions[self._batches % self.num_logical_workers].epoch

    @property
    def stats(self) -> dict[str, Any]:
        return {"batches": self._batches, "epoch": self.epoch, "corrupt_shards": list(self.corrupt_shards),
                "num_corrupt_shards": len(self.corrupt_shards), "corrupt_skips": self.corrupt_skips}

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
    def _consume(self, batch: dict[str, Any]) -> dict[str, Any]:
        worker = batch.pop("_worker")
        position = batch.pop("_position")
        corrupt = batch.pop("_corrupt")
        expected = self._batches % self.num_logical_workers
        if worker != expected:
            raise RuntimeError(f"loader out of order: batch from worker {worker}, expected {expected}")
        self._positions[worker] = Position(**position) if isinstance(position, dict) else position
        self._batches += 1
        for url in corrupt:
            warnings.warn(f"skipped corrupt shard {url} (see the log for the reason)", RuntimeWarning, stacklevel=3)
            self.corrupt_skips += 1
            if url not in self.corrupt_shards:
                self.corrupt_shards.append(url)
        return batch

    def __iter__(self) -> Iterator[dict[str, Any]]:
        self.close()
        positions = [Position(**p.to_json()) for p in self._positions]
        first = self._batches % self.num_logical_workers
        dataset = _WorkerStreams(self.spec, positions, rotation=first)
        if self.num_workers == 0:
            iterator: Any = iter(dataset)
        elif self.worker_mode == "thread":
            iterator = _ThreadWorkers(self.spec, positions, first)
            self._active = iterator
            return self._generate(iter(iterator))
        else:
            loader = DataLoader(dataset, batch_size=None, num_workers=self.num_workers, prefetch_factor=2,
                                persistent_workers=False, pin_memory=False)
            iterator = iter(loader)
        self._active = iterator
        return self._generate(iterator)

    def _generate(self, iterator: Iterator[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        for batch in iterator:
            yield self._consume(batch)

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
        """JSON-able position after the last batch handed out."""
        return {
            "version": STATE_VERSION,
            "batches": self._batches,
            "workers": [p.to_json() for p in self._positions],
            "rank": self.rank,
            "world_size": self.world_size,
            "num_workers": self.num_workers,
            "batch_size": self.batch_size,
            "seed": self.seed,
            "shuffle_buffer": self.shuffle_buffer,
            "corrupt_shards": list(self.corrupt_shards),
            "corrupt_skips": self.corrupt_skips,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from ``state`` (from :meth:`state_dict` of a loader with the same settings)."""
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"loader state: unsupported version {state.get('version')!r}")
        for name in ("rank", "world_size", "num_workers", "batch_size", "seed", "shuffle_buffer"):
            if state.get(name) != getattr(self, name):
                raise ValueError(f"loader state: {name} is {state.get(name)!r} in the checkpoint but "
                                 f"{getattr(self, name)!r} now; an exact resume needs the same value")
        workers = state["workers"]
        if len(workers) != self.num_logical_workers:
            raise ValueError(f"loader state: {len(workers)} worker positions, expected {self.num_logical_workers}")
        self.close()
        self._positions = [Position(**w) for w in workers]
        self._batches = int(state["batches"])
        self.corrupt_shards = list(state.get("corrupt_shards", []))
        self.corrupt_skips = int(state.get("corrupt_skips", 0))


def read_shards(url: str, storage_options: dict[str, Any] | None = None) -> Iterator[tuple[str, Block]]:
    """Every shard of a committed dataset in manifest order, decoded: (shard name, block) pairs.

    For inspection and tests (no shuffling, no sampling); the arrays hold the stored values.
    """
    storage = Storage(split_dataset_url(url)[0], storage_options)
    for shard in read_manifest(storage.url, storage.storage_options).shards:
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
