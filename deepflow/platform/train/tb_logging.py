"""TensorBoard on rank 0 (local directory or object-store URL) and a console progress line on every rank.

Tags written by the trainer: ``loss/deep_<i>`` per branch, ``loss/acc``, ``loss/proj``, ``loss/total``,
``optim/grad_norm``, ``optim/lr``, ``optim/skipped_steps``, ``perf/images_per_s``, ``perf/tflops``, ``perf/mfu``,
``perf/peak_mem_gb``, ``perf/data_wait_frac``, ``eval/*``. A custom-scalars layout groups the charts by branch so
the dashboard opens organised. Every scalar row is also appended to ``scalars.jsonl`` next to the event files.

For a remote URL (s3://, gs://) the event files are written to a local directory and uploaded by :meth:`sync`
(every ``sync_every_s`` seconds and on close); event files only grow, so re-uploading them is idempotent.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
import tempfile
import time
from typing import Any

import fsspec
import numpy as np
import torch

__all__ = ["TrainLogger", "console_logger", "branch_layout", "peak_tflops_for"]

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
    """Rank-0 TensorBoard writer with object-store sync; a no-op on other ranks."""

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
        self.writer = None
        self._jsonl = None
        if not enabled:
            return
        from torch.utils.tensorboard import SummaryWriter

        self.fs, self.root = fsspec.core.url_to_fs(self.url, **(storage_options or {}))
        protocols = self.fs.protocol if isinstance(self.fs.protocol, (tuple, list)) else (self.fs.protocol,)
        self.is_local = "file" in protocols or "local" in protocols
        self.local_dir = self.root if self.is_local else tempfile.mkdtemp(prefix="tensorboard-")
        os.makedirs(self.local_dir, exist_ok=True)
        if not self.is_local:  # continue the remote run's files (resume): bring them down first
            try:
                self.fs.get(self.root + "/", self.local_dir + "/", recursive=True)
            except FileNotFoundError:
                pass
        self.writer = SummaryWriter(log_dir=self.local_dir, flush_secs=30)
        self._jsonl = open(os.path.join(self.local_dir, "scalars.jsonl"), "a")

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
        if not self.is_local and time.monotonic() - self._last_sync > self.sync_every_s:
            self.sync()

    def sync(self) -> None:
        """Flush and (for a remote URL) upload the event files."""
        if self.writer is None:
            return
        self.writer.flush()
        if self.is_local:
            return
        for dirpath, _, filenames in os.walk(self.local_dir):
            for filename in filenames:
                source = os.path.join(dirpath, filename)
                relative = os.path.relpath(source, self.local_dir).replace(os.sep, "/")
                self.fs.put_file(source, f"{self.root}/{relative}")
        self._last_sync = time.monotonic()

    def close(self) -> None:
        if self.writer is None:
            return
        self.sync()
        self.writer.close()
        assert self._jsonl is not None
        self._jsonl.close()
        if not self.is_local:
            self.sync_closed()

    def sync_closed(self) -> None:
        for dirpath, _, filenames in os.walk(self.local_dir):
            for filename in filenames:
                source = os.path.join(dirpath, filename)
                relative = os.path.relpath(source, self.local_dir).replace(os.sep, "/")
                self.fs.put_file(source, f"{self.root}/{relative}")
        shutil.rmtree(self.local_dir, ignore_errors=True)
        self.writer = None
