"""Commit protocol of a dataset directory, and the manifest.

Objects in a dataset directory, in the order they are written::

    text_null.safetensors        null caption embedding (text datasets; written first by rank 0)
    shard-RRRR-NNNNNN.tar        one shard (atomic write)
    shard-RRRR-NNNNNN.json       its record: count, sha256, skipped items, statistics  (the shard's commit)
    rank-RRRR.done.json          every shard of rank R is committed
    manifest.json                merge of all records, written last: the dataset's commit

A shard counts as done only when its record exists, has the same job fingerprint, and names the shard's
checksum; a re-run rewrites every other shard of its slice (same name, so never a duplicate).  Every rank
tries :func:`finalize` after writing its done marker; it writes the manifest only once all
``rank-*.done.json`` exist, so the last finisher commits (two simultaneous finishers write identical
bytes).  ``jobs/precompute.py --finalize`` runs the same step alone.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from .shards import SHARD_NAME_PATTERN, record_name
from deepflow.artifacts import MANIFEST_FORMAT, MANIFEST_NAME, NULL_TEXT_NAME
from deepflow.storage import Storage

log = logging.getLogger(__name__)

FORMAT_NAME = MANIFEST_FORMAT
FORMAT_VERSION = 1


def done_marker_name(rank: int) -> str:
    return f"rank-{rank:04d}.done.json"


class ChannelStats:
    """Running per-channel sum / sum of squares (float64) of an array ``[n, C, ...]``."""

    def __init__(self) -> None:
        self.sum: np.ndarray | None = None
        self.sum_squares: np.ndarray | None = None
        self.count = 0

    def update(self, values: np.ndarray) -> None:
        """Add ``values`` [n, C, ...]; uint8 pixels are measured as the model sees them, in [-1, 1]."""
        if values.ndim < 2 or values.shape[0] == 0:
            return
        if values.dtype == np.uint8:
            values = values.astype(np.float32) / 127.5 - 1.0
        as_float = values.astype(np.float64).swapaxes(0, 1).reshape(values.shape[1], -1)
        total, squares = as_float.sum(axis=1), np.square(as_float).sum(axis=1)
        if self.sum is None:
            self.sum, self.sum_squares = total, squares
        else:
            self.sum, self.sum_squares = self.sum + total, self.sum_squares + squares
        self.count += as_float.shape[1]

    def to_json(self) -> dict[str, Any]:
        return {"sum": None if self.sum is None else self.sum.tolist(),
                "sum_squares": None if self.sum_squares is None else self.sum_squares.tolist(),
                "count": self.count}


def merge_stats(records: list[dict[str, Any]], scale: float) -> dict[str, Any] | None:
    """Per-channel and overall mean/std of ``scale * x`` from shard records' sums."""
    parts = [r["stats"] for r in records if r["stats"]["count"]]
    if not parts:
        return None
    total = np.sum([p["sum"] for p in parts], axis=0)
    squares = np.sum([p["sum_squares"] for p in parts], axis=0)
    count = float(sum(p["count"] for p in parts))
    mean = total / count
    std = np.sqrt(np.maximum(squares / count - mean**2, 0.0))
    overall_mean = total.sum() / (count * len(total))
    overall_std = float(np.sqrt(max(squares.sum() / (count * len(total)) - overall_mean**2, 0.0)))
    return {"mean": (mean * scale).tolist(), "std": (std * scale).tolist(),
            "overall_mean": float(overall_mean * scale), "overall_std": overall_std * scale}


def read_done_markers(storage: Storage, fingerprint: str) -> dict[int, dict[str, Any]]:
    """The done markers of this job (by rank); a marker of another job is an error naming it."""
    markers = {}
    for name in storage.list(prefix="rank-", suffix=".done.json"):
        marker = storage.read_json(name)
        if marker.get("fingerprint") != fingerprint:
            raise ValueError(f"{storage.url_of(name)} belongs to another precompute job (fingerprint "
                             f"{marker.get('fingerprint')} != {fingerprint}); use a fresh output.url")
        markers[int(marker["rank"])] = marker
    return markers


def finalize(storage: Storage, fingerprint: str, world_size: int, header: dict[str, Any]) -> dict[str, Any] | None:
    """Write ``manifest.json`` if every rank's done marker exists; return it (None if ranks are missing).

    ``header`` carries the job's description (kind, shape, encoder, source, ...); the shard list, counts,
    checksums, skipped items and latent statistics are merged here from the shard records.
    """
    markers = read_done_markers(storage, fingerprint)
    missing = sorted(set(range(world_size)) - set(markers))
    if missing:
        log.info("manifest not written yet: ranks %s have not finished", missing)
        return None
    shard_names = sorted(name for marker in markers.values() for name in marker["shards"])
    records = [storage.read_json(record_name(name)) for name in shard_names]
    for name, record in zip(shard_names, records, strict=True):
        if record.get("fingerprint") != fingerprint or record.get("name") != name:
            raise ValueError(f"{storage.url_of(record_name(name))}: record does not belong to this job")
        if not SHARD_NAME_PATTERN.match(name):
            raise ValueError(f"{storage.url_of(name)}: not a shard name")
    skipped = [item for record in records for item in record["skipped"]]
    manifest = dict(header)
    manifest.update({
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "fingerprint": fingerprint,
        "world_size": world_size,
        "num_samples": int(sum(r["num_samples"] for r in records)),
        "num_skipped": len(skipped),
        "skipped": skipped,
        "shards": [{"name": r["name"], "num_samples": r["num_samples"], "sha256": r["sha256"], "bytes": r["bytes"]}
                   for r in records],
    })
    scale = manifest.get("latent_scale") or 1.0
    manifest["latent_stats"] = merge_stats(records, scale) if manifest.get("kind") == "vae" else None
    manifest["pixel_stats"] = merge_stats(records, 1.0) if manifest.get("kind") == "pixel" else None
    storage.write_json(MANIFEST_NAME, manifest)
    return manifest
