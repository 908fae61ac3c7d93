"""ADM-protocol evaluation of whole sample batches: FID, sFID, Inception Score, precision, recall (+ other FDs).

Sample and reference batches are ADM ``.npz`` files (``arr_0``: uint8 NHWC images) on any fsspec URL, or arrays in
memory. A reference may instead (or also) carry precomputed Inception statistics ``mu``/``sigma`` (pool_3) and
``mu_s``/``sigma_s`` (spatial), as ``VIRTUAL_imagenet256_labeled.npz`` does; precision/recall then still use its
images. Arrays are read from the zip member in batches (a 50k x 256 x 256 x 3 batch is 9.8 GB), never unpickled.
"""
from __future__ import annotations

import logging
import zipfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import fsspec
import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from deepflow.platform.eval.extractors import FeatureExtractor
from deepflow.platform.eval.metrics import (
    feature_statistics,
    frechet_distance,
    inception_score,
    precision_recall,
)

log = logging.getLogger(__name__)

ImageSource = str | np.ndarray | Tensor


def _npz_member_names(url: str, storage_options: dict | None) -> list[str]:
    with fsspec.open(url, "rb", **(storage_options or {})) as raw, zipfile.ZipFile(raw) as archive:
        return [name[: -len(".npy")] for name in archive.namelist() if name.endswith(".npy")]


def read_npz_array(url: str, key: str, storage_options: dict | None = None) -> np.ndarray:
    """One array of an .npz on any fsspec URL (allow_pickle=False)."""
    with fsspec.open(url, "rb", **(storage_options or {})) as raw, np.load(raw, allow_pickle=False) as data:
        if key not in data.files:
            raise KeyError(f"{url}: no array {key!r} (has {data.files})")
        return data[key]


def _read_npy_header(stream: Any) -> tuple[tuple[int, ...], bool, np.dtype]:
    """(shape, fortran_order, dtype) of a .npy stream positioned at its start."""
    version = np.lib.format.read_magic(stream)
    if version == (1, 0):
        return np.lib.format.read_array_header_1_0(stream)
    if version == (2, 0):
        return np.lib.format.read_array_header_2_0(stream)
    raise ValueError(f"unsupported .npy format version {version}")


def iter_npz_batches(
    url: str, key: str = "arr_0", batch_size: int = 64, storage_options: dict | None = None
) -> Iterator[np.ndarray]:
    """Stream ``key`` of an .npz in batches along axis 0 without loading the whole array. Yields [b, ...]."""
    with fsspec.open(url, "rb", **(storage_options or {})) as raw, zipfile.ZipFile(raw) as archive:
        member = f"{key}.npy"
        if member not in archive.namelist():
            raise KeyError(f"{url}: no array {key!r} in the npz")
        with archive.open(member) as stream:
            shape, fortran, dtype = _read_npy_header(stream)
            if fortran or dtype.hasobject:
                raise ValueError(f"{url}:{key}: Fortran-ordered or object arrays are not supported")
            row_bytes = int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize
            for start in range(0, shape[0], batch_size):
                rows = min(batch_size, shape[0] - start)
                buffer = stream.read(rows * row_bytes)
                if len(buffer) != rows * row_bytes:
                    raise ValueError(f"{url}:{key}: truncated at row {start}")
                yield np.frombuffer(buffer, dtype=dtype).reshape(rows, *shape[1:])


def _nhwc_batches(source: ImageSource, batch_size: int, storage_options: dict | None) -> Iterator[np.ndarray]:
    if isinstance(source, str):
        yield from iter_npz_batches(source, "arr_0", batch_size, storage_options)
        return
    array = source.cpu().numpy() if isinstance(source, Tensor) else np.asarray(source)
    for start in range(0, array.shape[0], batch_size):
        yield array[start : start + batch_size]


def _count(source: ImageSource, storage_options: dict | None) -> int:
    if isinstance(source, str):
        with fsspec.open(source, "rb", **(storage_options or {})) as raw, zipfile.ZipFile(raw) as archive:
            with archive.open("arr_0.npy") as stream:
                return int(_read_npy_header(stream)[0][0])
    return int(source.shape[0])


def nhwc_uint8_to_nchw(batch: np.ndarray) -> Tensor:
    """uint8 [B, H, W] / [B, H, W, 1|3] (numpy) -> uint8 tensor [B, 1|3, H, W]."""
    if batch.dtype != np.uint8:
        raise ValueError(f"sample images must be uint8 NHWC (the ADM format), got dtype {batch.dtype}")
    if batch.ndim == 3:
        batch = batch[..., None]
    if batch.ndim != 4 or batch.shape[-1] not in (1, 3):
        raise ValueError(f"sample images must be [N, H, W, 3|1] (NHWC), got shape {batch.shape}")
    batch = np.ascontiguousarray(batch) if batch.flags.writeable else np.array(batch)  # streamed rows are read-only
    return torch.from_numpy(batch).permute(0, 3, 1, 2)


@torch.no_grad()
def extract_features(
    source: ImageSource,
    extractor: FeatureExtractor,
    batch_size: int = 64,
    device: str | torch.device = "cpu",
    storage_options: dict | None = None,
) -> dict[str, np.ndarray]:
    """Features of every image: {"feats": [N, D]} and, for Inception, also "spatial" [N, 2023], "logits" [N, 1008]."""
    total = _count(source, storage_options)
    outputs: dict[str, list[np.ndarray]] = {}
    bar = tqdm(total=total, desc=f"{extractor.name} features", unit="img", leave=False)
    for batch in _nhwc_batches(source, batch_size, storage_options):
        images = nhwc_uint8_to_nchw(batch).to(device)
        if hasattr(extractor, "forward_all"):
            out = extractor.forward_all(images)
            parts = {"feats": out.pool, "spatial": out.spatial, "logits": out.logits}
        else:
            parts = {"feats": extractor(images)}
        for name, value in parts.items():
            outputs.setdefault(name, []).append(value.float().cpu().numpy())
        bar.update(len(batch))
    bar.close()
    if not outputs:
        raise ValueError("no images to evaluate")
    return {name: np.concatenate(chunks) for name, chunks in outputs.items()}


@dataclass
class ReferenceBatch:
    """A reference batch: images (uint8 NHWC or an .npz URL with arr_0) and/or precomputed Inception statistics.

    Features are computed once per extractor name and cached, so periodic in-training evaluations pay only once.
    """

    images: ImageSource | None = None
    stats: dict[str, np.ndarray] = field(default_factory=dict)  # mu, sigma, mu_s, sigma_s
    storage_options: dict | None = None
    _cache: dict[str, dict[str, np.ndarray]] = field(default_factory=dict, repr=False)

    @classmethod
    def load(cls, url: str, storage_options: dict | None = None) -> "ReferenceBatch":
        """Read an ADM reference .npz: arr_0 stays on storage (streamed), statistics are loaded."""
        names = _npz_member_names(url, storage_options)
        stats = {k: read_npz_array(url, k, storage_options) for k in ("mu", "sigma", "mu_s", "sigma_s") if k in names}
        if "arr_0" not in names and not {"mu", "sigma"} <= stats.keys():
            raise ValueError(f"reference {url} has neither images (arr_0) nor statistics (mu, sigma): {names}")
        return cls(images=url if "arr_0" in names else None, stats=stats, storage_options=storage_options)

    def features(self, extractor: FeatureExtractor, batch_size: int, device: str | torch.device) -> dict[str, np.ndarray]:
        if extractor.name not in self._cache:
            if self.images is None:
                raise ValueError(f"reference has no images: cannot compute {extractor.name} features")
            self._cache[extractor.name] = extract_features(
                self.images, extractor, batch_size, device, self.storage_options
            )
        return self._cache[extractor.name]


def evaluate_samples(
    samples: ImageSource,
    reference: ReferenceBatch | str,
    extractor: FeatureExtractor,
    *,
    extra_extractors: Sequence[FeatureExtractor] = (),
    batch_size: int = 64,
    device: str | torch.device = "cpu",
    k: int = 3,
    split_size: int = 5000,
    storage_options: dict | None = None,
    fd_method: Literal["sqrtm", "eigh"] = "sqrtm",
) -> dict[str, Any]:
    """Evaluate a batch of samples (uint8 NHWC array/tensor or .npz URL) against a reference.

    With the Inception extractor: {"fid", "sfid", "inception_score", "precision", "recall"}; with another
    extractor: {"fd_<name>", "precision_<name>", "recall_<name>"}; plus "fd_<name>" for each extra extractor and
    "num_samples". Precision/recall need reference images; without them they are omitted (a warning says so).
    ``fd_method``: "sqrtm" (ADM, default) or "eigh" (same value, ~5x faster on CPU; see ``frechet_distance``).
    """
    ref = ReferenceBatch.load(reference, storage_options) if isinstance(reference, str) else reference
    results: dict[str, Any] = {}
    sample_feats = extract_features(samples, extractor, batch_size, device, storage_options)
    results["num_samples"] = int(sample_feats["feats"].shape[0])
    is_inception = "spatial" in sample_feats
    use_ref_stats = is_inception and {"mu", "sigma"} <= ref.stats.keys()
    ref_feats = None if use_ref_stats and ref.images is None else ref.features(extractor, batch_size, device)

    mu, sigma = feature_statistics(sample_feats["feats"])
    if use_ref_stats:
        mu_ref, sigma_ref = ref.stats["mu"], ref.stats["sigma"]
    else:
        mu_ref, sigma_ref = feature_statistics(ref_feats["feats"])
    fd_key = "fid" if is_inception else f"fd_{extractor.name}"
    results[fd_key] = frechet_distance(mu, sigma, mu_ref, sigma_ref, method=fd_method)

    if is_inception:
        mu_s, sigma_s = feature_statistics(sample_feats["spatial"])
        if {"mu_s", "sigma_s"} <= ref.stats.keys():
            mu_s_ref, sigma_s_ref = ref.stats["mu_s"], ref.stats["sigma_s"]
        elif ref_feats is not None:
            mu_s_ref, sigma_s_ref = feature_statistics(ref_feats["spatial"])
        else:
            raise ValueError("reference has pool statistics but neither spatial statistics nor images: no sFID")
        results["sfid"] = frechet_distance(mu_s, sigma_s, mu_s_ref, sigma_s_ref, method=fd_method)
        results["inception_score"] = inception_score(sample_feats["logits"], split_size=split_size)

    if ref_feats is not None:
        precision, recall = precision_recall(ref_feats["feats"], sample_feats["feats"], k=k, device=device)
        suffix = "" if is_inception else f"_{extractor.name}"
        results[f"precision{suffix}"], results[f"recall{suffix}"] = precision, recall
    else:
        log.warning("reference has statistics only (no images): precision/recall skipped")

    for extra in extra_extractors:
        feats = extract_features(samples, extra, batch_size, device, storage_options)["feats"]
        ref_extra = ref.features(extra, batch_size, device)["feats"]
        results[f"fd_{extra.name}"] = frechet_distance(
            *feature_statistics(feats), *feature_statistics(ref_extra), method=fd_method
        )
    return results


def clip_score_samples(
    samples: ImageSource,
    captions: Sequence[str],
    scorer: Any,
    batch_size: int = 64,
    storage_options: dict | None = None,
) -> dict[str, float]:
    """CLIP score of a sample batch (uint8 NHWC array/tensor or .npz URL, streamed) against its captions: image i is
    paired with ``captions[i]``. ``scorer(images uint8 [B,3,H,W], captions) -> per-pair scores [B]`` is a
    ``deepflow.platform.eval.clip_score.ClipScorer``. Returns {"clip_score": mean, "clip_score_std": std over pairs}."""
    total = _count(samples, storage_options)
    captions = list(captions)
    if len(captions) < total:
        raise ValueError(f"clip score: {len(captions)} captions for {total} samples (need one per sample, in order)")
    scores: list[Tensor] = []
    done = 0
    for batch in tqdm(_nhwc_batches(samples, batch_size, storage_options), desc="clip score", leave=False):
        images = nhwc_uint8_to_nchw(batch)
        scores.append(scorer(images, captions[done : done + len(batch)]).float().cpu())
        done += len(batch)
    if not scores:
        raise ValueError("clip score: no samples")
    values = torch.cat(scores)
    return {"clip_score": float(values.mean()), "clip_score_std": float(values.std()) if len(values) > 1 else 0.0}
