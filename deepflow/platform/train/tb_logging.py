"""TensorBoard on rank 0 (local directory or object-store URL) and a console progress line on every rank.

Tags written by the trainer: ``loss/deep_<i>`` per branch, ``loss/acc``, ``loss/proj``, ``loss/total``,
``optim/grad_norm``, ``optim/lr``, ``optim/skipped_steps``, ``perf/images_per_s``, ``perf/tflops``, ``perf/mfu``,
``perf/peak_mem_gb``, ``perf/data_wait_frac``, ``eval/*``. A custom-scalars layout groups the charts by branch so
the dashboard opens organised. Every scalar row is also appended to ``scalars.jsonl`` next to the event files.

For a remote URL (s3://, gs://) the event files are written to a local folder under TMPDIR and uploaded through
:class:`deepflow.storage.Storage` (its retry policy) by :meth:`TrainLogger.sync`: every ``sync_every_s`` seconds,
after each checkpoint (the trainer calls it) and on :meth:`~TrainLogger.close`. Event files only grow, so uploading
a changed file again is idempotent: a sync that fails after the whole retry budget logs a warning and leaves the
files for the next sync; training goes on and no step is lost. ``close`` deletes the local folder only once
everything is on the store (otherwise it says where the files are).
"""

from __future__ import annotations

import json
import logging
import os
import resource
import shutil
import sys
import tempfile
import time
from typing import IO, Any

import numpy as np
import torch

from deepflow.storage import Storage

__all__ = ["SCALARS_FILE", "TrainLogger", "console_logger", "branch_layout", "peak_memory_gb", "peak_tflops_for",
           "read_scalars"]

#: every scalar row (JSON lines: {"step": N, tag: value, ...}) beside the event files
SCALARS_FILE = "scalars.jsonl"

log = logging.getLogger(__name__)

# Dense peak TFLOP/s by (device-name fragment, precision); tensor-core numbers for bf16/fp16, TF32 for fp32.
_PEAK_TFLOPS: list[tuple[str, dict[str, float]]] = [
    ("H200", {"bf16": 989.0, "fp16": 989.0, "fp32": 494.5}),
    ("H100", {"bf16": 989.0, "fp16": 989.0, "fp32": 494.5}),
    ("A100", {"bf16": 312.0, "fp16": 312.0, "fp32": 156.0}),
    ("L40", {"bf16": 181.0, "fp16": 181.0, "fp32": 90.5}),
    ("A10", {"bf16": 125.0, "fp16": 125.0, "fp32": 62.5}),
    ("V100", {"bf16": 125.0, "fp16": 125.0, "fp32": 15.7}),
]


def peak_tflops_for(device: torch.device, precision: str) -> float | None:
    """The device's dense peak TFLOP/s for ``precision``; None when unknown (CPU: set logging.peak_tflops)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for fragment, table in _PEAK_TFLOPS:
        if fragment in name:
            return table.get(precision)
    return None


def peak_memory_gb(device: torch.device) -> float:
    """Peak memory of this process so far, GB: CUDA allocations on a GPU, the resident set size on a CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # ru_maxrss is in KiB on Linux


def console_logger(rank: int) -> logging.Logger:
    """A logger that prefixes every line with the rank (rank 0 at INFO, others at WARNING)."""
    logger = logging.getLogger(f"deepflow.train.rank{rank}")
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter(f"%(asctime)s [rank{rank}] %(message)s", "%H:%M:%S"))
        logger.addHandler(handler)
        logger.propagate = False
    logger.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    return logger


def branch_layout(num_branches: int, ssl: bool) -> dict[str, dict[str, list[Any]]]:
    """Custom-scalars layout: one chart per branch + the combined terms, optimizer and performance charts."""
    losses: dict[str, list[Any]] = {
        f"branch {i}": ["Multiline", [f"loss/deep_{i}"]] for i in range(num_branches)
    }
    losses["all branches"] = ["Multiline", [r"loss/deep_\d+"]]
    extra = ["loss/total"] + (["loss/acc"] if num_branches > 1 else []) + (["loss/proj"] if ssl else [])
    losses["total, acceleration, SSL"] = ["Multiline", extra]
    return {
        "DeepFlow losses by branch": losses,
        "optimizer": {"grad norm": ["Multiline", ["optim/grad_norm"]], "learning rate": ["Multiline", ["optim/lr"]]},
        "performance": {
            "throughput": ["Multiline", ["perf/images_per_s"]],
            "TFLOP/s and MFU": ["Multiline", ["perf/tflops", "perf/mfu"]],
            "memory and data wait": ["Multiline", ["perf/peak_mem_gb", "perf/data_wait_frac"]],
        },
        "evaluation": {"metrics": ["Multiline", [r"eval/.*"]]},
    }


class TrainLogger:
    """Rank-0 TensorBoard writer with object-store sync; a no-op on other ranks (see the module doc)."""

    def __init__(
        self,
        url: str,
        enabled: bool,
        storage_options: dict[str, Any] | None = None,
        sync_every_s: float = 60.0,
    ) -> None:
        self.enabled = enabled
        self.url = url.rstrip("/")
        self.sync_every_s = sync_every_s
        self._last_sync = time.monotonic()
        self._uploaded: dict[str, tuple[int, int]] = {}  # relative name -> (size, mtime_ns) on the store
        self.writer: Any = None  # torch.utils.tensorboard.SummaryWriter on rank 0, while open
        self._jsonl: IO[str] | None = None
        self.local_dir = ""  # where the event files are written (a TMPDIR folder for remote URLs)
        if not enabled:
            return
        from torch.utils.tensorboard import SummaryWriter

        self.storage = Storage(self.url, storage_options)
        if self.storage.is_local:
            self.local_dir = self.storage.path("")
            os.makedirs(self.local_dir, exist_ok=True)
        else:  # continue the remote run's files (resume): bring them down first
            self.local_dir = tempfile.mkdtemp(prefix="tensorboard-")
            try:
                self.storage.get_tree("", self.local_dir)
            except BaseException:
                shutil.rmtree(self.local_dir, ignore_errors=True)
                raise
            self._uploaded = {name: _signature(path) for name, path in self._local_files().items()}
        self.writer = SummaryWriter(log_dir=self.local_dir, flush_secs=30)
        self._jsonl = open(os.path.join(self.local_dir, SCALARS_FILE), "a")

    def set_layout(self, layout: dict[str, dict[str, list[Any]]]) -> None:
        if self.writer is not None:
            self.writer.add_custom_scalars(layout)

    def scalars(self, step: int, values: dict[str, float]) -> None:
        if self.writer is None:
            return
        for tag, value in values.items():
            self.writer.add_scalar(tag, value, global_step=step)
        assert self._jsonl is not None
        self._jsonl.write(json.dumps({"step": step, **{k: float(v) for k, v in values.items()}}) + "\n")
        self._jsonl.flush()
        self._maybe_sync()

    def image(self, tag: str, image_chw_uint8: np.ndarray | torch.Tensor, step: int) -> None:
        """image: uint8 [3,H,W] (or [1,H,W])."""
        if self.writer is not None:
            self.writer.add_image(tag, image_chw_uint8, global_step=step, dataformats="CHW")

    def text(self, tag: str, text: str, step: int = 0) -> None:
        if self.writer is not None:
            self.writer.add_text(tag, text, global_step=step)

    def _maybe_sync(self) -> None:
        if time.monotonic() - self._last_sync > self.sync_every_s:
            self.sync()

    def sync(self) -> bool:
        """Flush and (remote URL) upload the files changed since the last upload. Never raises for storage
        errors: a failed upload is logged and retried by the next sync. True when the store is up to date."""
        if self.writer is None:
            return True
        self.writer.flush()
        assert self._jsonl is not None
        self._jsonl.flush()
        self._last_sync = time.monotonic()
        return self._upload()

    def close(self) -> None:
        """Close the writer, upload everything (retried) and only then delete the local folder."""
        if self.writer is None:
            return
        self.writer.close()
        assert self._jsonl is not None
        self._jsonl.close()
        self.writer = None
        if self.storage.is_local:
            return
        if self._upload():
            shutil.rmtree(self.local_dir, ignore_errors=True)
        else:
            log.warning("TensorBoard files of %s could not be uploaded; they are kept in %s (copy them there by "
                        "hand: the files only grow, so a later copy is complete)", self.url, self.local_dir)

    def _local_files(self) -> dict[str, str]:
        """Relative name (``/``-separated) -> local path of every file in the local folder."""
        files = {}
        for dirpath, _, filenames in os.walk(self.local_dir):
            for filename in filenames:
                path = os.path.join(dirpath, filename)
                files[os.path.relpath(path, self.local_dir).replace(os.sep, "/")] = path
        return files

    def _upload(self) -> bool:
        """Upload every local file that changed since its last upload; False (and a warning) if the store stayed
        unreachable for the whole retry budget or refused a file (the rest waits for the next attempt)."""
        if self.storage.is_local:
            return True
        for name, path in sorted(self._local_files().items()):
            signature = _signature(path)
            if self._uploaded.get(name) == signature:
                continue
            try:
                self.storage.put_file(path, name)
            except OSError as error:
                log.warning("TensorBoard upload to %s failed, retried at the next sync: %s",
                            self.storage.url_of(name), error)
                return False
            self._uploaded[name] = signature
        return True


def read_scalars(tensorboard_dir: str | os.PathLike[str]) -> list[dict[str, float]]:
    """The scalar rows a (local) TensorBoard folder's :data:`SCALARS_FILE` holds, in the order written (a resumed run
    appends, so a step may appear twice); [] when there is none yet. A line cut short by a kill is skipped."""
    path = os.path.join(tensorboard_dir, SCALARS_FILE)
    if not os.path.isfile(path):
        return []
    rows = []
    with open(path) as handle:
        for line in handle:
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return rows


def _signature(path: str) -> tuple[int, int]:
    """(size, mtime_ns) of a local file: it changed when either did."""
    stat = os.stat(path)
    return stat.st_size, stat.st_mtime_ns
