"""Evaluation of whole sample batches: the ADM protocol (FID, sFID, IS, precision, recall) and Frechet distances in
the features of any registered extractor, plus class accuracy for extractors that classify.

Sample and reference batches are ADM ``.npz`` files (``arr_0``: uint8 NHWC images; samples may carry ``arr_1``: int
labels, -1 for text-to-image samples) on any storage URL, or arrays in memory. A reference may instead (or also)
carry precomputed Inception statistics ``mu``/``sigma`` (pool_3) and ``mu_s``/``sigma_s`` (spatial), as
``VIRTUAL_imagenet256_labeled.npz`` does, and ``mu_<name>``/``sigma_<name>`` for any other extractor (as
``deepflow.platform.eval.reference_job`` writes them); statistics are used before images, and precision/recall still
use its images. Arrays are streamed from the
zip member in batches through :meth:`deepflow.storage.Storage.open_read` (a 50k x 256 x 256 x 3 batch is 9.8 GB),
never unpickled.

Entry points: :func:`evaluate_batch` (any list of extractors, reference optional for self-referenced ones),
:func:`clip_score_samples`.
"""
from __future__ import annotations

import logging
import zipfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import IO, Any, Literal

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from deepflow.platform.eval.extractors import (
    FeatureExtractor,
    LabelScorer,
    MultiOutputExtractor,
    SelfReferencedExtractor,
)
from deepflow.platform.eval.metrics import (
    feature_statistics,
    frechet_distance,
    frechet_distance_details,
    inception_score,
    precision_recall,
)
from deepflow.storage import Storage, split_url

log = logging.getLogger(__name__)

__all__ = [
    "INCEPTION_STAT_KEYS",
    "ImageSource",
    "ReferenceBatch",
    "check_image_batch",
    "clip_score_samples",
    "evaluate_batch",
    "extract_features",
    "feature_parts",
    "iter_npz_batches",
    "nhwc_uint8_to_nchw",
    "npz_array_shape",
    "npz_member_names",
    "read_npz_array",
    "read_sample_labels",
    "reference_stat_keys",
]

ImageSource = str | np.ndarray | Tensor
FdMethod = Literal["sqrtm", "eigh"]


# ------------------------------------------------------------------------------------------------- .npz on storage
@contextmanager
def _open_npz(url: str, storage_options: dict | None) -> Iterator[zipfile.ZipFile]:
    """The zip archive of an .npz on any storage URL, read lazily (members are streamed, not downloaded whole)."""
    parent, name = split_url(url)
    with Storage(parent, storage_options).open_read(name) as handle:
        try:
            archive = zipfile.ZipFile(handle)
        except (zipfile.BadZipFile, OSError, EOFError) as error:
            raise ValueError(f"{url}: not a readable .npz file ({error})") from None
        with archive:
            yield archive


def npz_member_names(url: str, storage_options: dict | None = None) -> list[str]:
    """Names of the arrays in an .npz (``["arr_0", "arr_1"]``...)."""
    with _open_npz(url, storage_options) as archive:
        return [name[: -len(".npy")] for name in archive.namelist() if name.endswith(".npy")]


def _read_npy_header(stream: IO[bytes], what: str) -> tuple[tuple[int, ...], bool, np.dtype]:
    """(shape, fortran_order, dtype) of a .npy stream positioned at its start; object arrays are refused."""
    try:
        version = np.lib.format.read_magic(stream)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(stream)
        elif version == (2, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(stream)
        else:
            raise ValueError(f"unsupported .npy format version {version}")
    except ValueError as error:
        raise ValueError(f"{what}: not a readable .npy array ({error})") from None
    if dtype.hasobject:
        raise ValueError(f"{what}: object arrays are not supported (they would need unpickling)")
    return shape, fortran, dtype


@contextmanager
def _open_member(
    url: str, key: str, storage_options: dict | None
) -> Iterator[tuple[IO[bytes], tuple[int, ...], bool, np.dtype]]:
    """(stream positioned after the header, shape, fortran_order, dtype) of array ``key`` of an .npz."""
    with _open_npz(url, storage_options) as archive:
        member = f"{key}.npy"
        if member not in archive.namelist():
            names = [n[: -len(".npy")] for n in archive.namelist() if n.endswith(".npy")]
            raise ValueError(f"{url}: no array {key!r} in the .npz (it has {names})")
        with archive.open(member) as stream:
            shape, fortran, dtype = _read_npy_header(stream, f"{url}:{key}")
            yield stream, shape, fortran, dtype


def npz_array_shape(url: str, key: str = "arr_0", storage_options: dict | None = None) -> tuple[int, ...]:
    """Shape of array ``key`` of an .npz, from its header only."""
    with _open_member(url, key, storage_options) as (_, shape, _, _):
        return tuple(shape)


def check_image_batch(url: str, storage_options: dict | None = None, min_images: int = 2) -> tuple[int, ...]:
    """Shape [N, H, W, 3|1] of the images ``arr_0`` of an .npz, checked from its header: uint8 NHWC (the ADM format,
    [N, H, W] grayscale also accepted) with at least ``min_images`` images (feature statistics need two)."""
    with _open_member(url, "arr_0", storage_options) as (_, shape, _, dtype):
        pass
    if dtype != np.uint8 or len(shape) not in (3, 4) or (len(shape) == 4 and shape[-1] not in (1, 3)):
        raise ValueError(f"{url}: arr_0 must be uint8 NHWC images [N, H, W, 3|1] (the ADM format), got {dtype} "
                         f"{tuple(shape)}")
    if shape[0] < min_images:
        raise ValueError(f"{url}: {shape[0]} images in arr_0; the metrics need at least {min_images}")
    return tuple(shape)


def read_npz_array(url: str, key: str, storage_options: dict | None = None) -> np.ndarray:
    """The whole array ``key`` of an .npz on any storage URL (never unpickled)."""
    with _open_member(url, key, storage_options) as (stream, shape, fortran, dtype):
        expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        buffer = stream.read(expected)
    if len(buffer) != expected:
        raise ValueError(f"{url}:{key}: truncated ({len(buffer)} of {expected} bytes)")
    order = "F" if fortran else "C"
    return np.frombuffer(buffer, dtype=dtype).reshape(shape, order=order).copy()


def iter_npz_batches(
    url: str, key: str = "arr_0", batch_size: int = 64, storage_options: dict | None = None
) -> Iterator[np.ndarray]:
    """Stream array ``key`` [N, ...] of an .npz in read-only batches [b, ...] along axis 0 (never loaded whole)."""
    with _open_member(url, key, storage_options) as (stream, shape, fortran, dtype):
        if fortran and len(shape) > 1:
            raise ValueError(f"{url}:{key}: Fortran-ordered arrays cannot be streamed by rows")
        if not shape:
            raise ValueError(f"{url}:{key}: a scalar, not a batch of images")
        row_bytes = int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize
        for start in range(0, shape[0], batch_size):
            rows = min(batch_size, shape[0] - start)
            buffer = stream.read(rows * row_bytes)
            if len(buffer) != rows * row_bytes:
                raise ValueError(f"{url}:{key}: truncated at row {start}")
            yield np.frombuffer(buffer, dtype=dtype).reshape(rows, *shape[1:])


def read_sample_labels(url: str, storage_options: dict | None = None) -> np.ndarray | None:
    """The labels ``arr_1`` [N] int64 of a sample batch (as jobs/sample.py writes it), or None if it has none."""
    if "arr_1" not in npz_member_names(url, storage_options):
        return None
    labels = read_npz_array(url, "arr_1", storage_options)
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"{url}:arr_1: labels must be integers [N], got {labels.dtype} {labels.shape}")
    return labels.astype(np.int64)


# --------------------------------------------------------------------------------------------------- features
def _nhwc_batches(source: ImageSource, batch_size: int, storage_options: dict | None) -> Iterator[np.ndarray]:
    if isinstance(source, str):
        yield from iter_npz_batches(source, "arr_0", batch_size, storage_options)
        return
    array = source.cpu().numpy() if isinstance(source, Tensor) else np.asarray(source)
    for start in range(0, array.shape[0], batch_size):
        yield array[start : start + batch_size]


def _count(source: ImageSource, storage_options: dict | None) -> int:
    if isinstance(source, str):
        shape = npz_array_shape(source, "arr_0", storage_options)
        return int(shape[0]) if shape else 0
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


def feature_parts(extractor: FeatureExtractor, images: Tensor) -> dict[str, Tensor]:
    """uint8 images [B, 3|1, H, W] -> {"feats": [B, D]} (+ "spatial" [B, 2023], "logits" [B, 1008] for a
    multi-output extractor), float tensors where the extractor runs."""
    if isinstance(extractor, MultiOutputExtractor):
        out = extractor.forward_all(images)
        return {"feats": out.pool, "spatial": out.spatial, "logits": out.logits}
    return {"feats": extractor(images)}


@torch.no_grad()
def extract_features(
    source: ImageSource,
    extractor: FeatureExtractor,
    batch_size: int = 64,
    device: str | torch.device = "cpu",
    storage_options: dict | None = None,
    progress: bool = True,
) -> dict[str, np.ndarray]:
    """Features of every image: {"feats": [N, D]} and, for Inception, also "spatial" [N, 2023], "logits" [N, 1008].

    ``source``: uint8 NHWC images [N, H, W, 3|1] (array/tensor) or an .npz URL (``arr_0``, streamed).
    """
    total = _count(source, storage_options)
    outputs: dict[str, list[np.ndarray]] = {}
    with tqdm(total=total, desc=f"{extractor.name} features", unit="img", leave=False, disable=not progress) as bar:
        for batch in _nhwc_batches(source, batch_size, storage_options):
            images = nhwc_uint8_to_nchw(batch).to(device)
            for name, value in feature_parts(extractor, images).items():
                outputs.setdefault(name, []).append(value.float().cpu().numpy())
            bar.update(len(batch))
    if not outputs:
        raise ValueError(f"{source if isinstance(source, str) else 'samples'}: no images to evaluate")
    return {name: np.concatenate(chunks) for name, chunks in outputs.items()}


# --------------------------------------------------------------------------------------------------- reference
#: the ADM names of the Inception statistics in a reference .npz: pool_3 (FID) and spatial (sFID)
INCEPTION_STAT_KEYS = ("mu", "sigma", "mu_s", "sigma_s")


def reference_stat_keys(name: str) -> tuple[str, str]:
    """Names of the (mu [D], sigma [D, D]) arrays of extractor ``name`` in a reference .npz: ``("mu", "sigma")`` for
    Inception (the ADM reference batches), ``("mu_<name>", "sigma_<name>")`` for any other extractor."""
    return ("mu", "sigma") if name == "inception" else (f"mu_{name}", f"sigma_{name}")


def _statistics_members(names: Sequence[str]) -> list[str]:
    """The complete (mu, sigma) pairs among the arrays of an .npz: the ADM Inception ones and every
    ``mu_<name>``/``sigma_<name>``."""
    present = set(names)
    pairs = [("mu", "sigma"), ("mu_s", "sigma_s")]
    pairs += [(n, f"sigma_{n[3:]}") for n in names if n.startswith("mu_") and n != "mu_s"]
    return [key for mu, sigma in pairs if mu in present and sigma in present for key in (mu, sigma)]


@dataclass
class ReferenceBatch:
    """A reference batch: images (uint8 NHWC or an .npz URL with arr_0) and/or precomputed feature statistics:
    ``mu``/``sigma``/``mu_s``/``sigma_s`` (Inception, the ADM names) and ``mu_<name>``/``sigma_<name>`` (extractor
    ``name``), float64 [D] / [D, D].

    Features are computed once per extractor name and cached, so periodic in-training evaluations pay only once.
    """

    images: ImageSource | None = None
    stats: dict[str, np.ndarray] = field(default_factory=dict)  # mu, sigma, mu_s, sigma_s, mu_<name>, sigma_<name>
    storage_options: dict | None = None
    progress: bool = True
    #: where it was read from (None: built in memory); named in the results
    url: str | None = None
    _cache: dict[str, dict[str, np.ndarray]] = field(default_factory=dict, repr=False)

    @classmethod
    def load(cls, url: str, storage_options: dict | None = None, progress: bool = True) -> ReferenceBatch:
        """Read an ADM reference .npz: arr_0 stays on storage (streamed), statistics are loaded."""
        names = npz_member_names(url, storage_options)
        stats = {k: read_npz_array(url, k, storage_options) for k in _statistics_members(names)}
        if "arr_0" not in names and not stats.keys() - {"mu_s", "sigma_s"}:
            raise ValueError(f"{url}: a reference needs images (arr_0) or statistics (mu, sigma or mu_<extractor>, "
                             f"sigma_<extractor>); it has neither images nor statistics: {names}")
        images = url if "arr_0" in names else None
        return cls(images=images, stats=stats, storage_options=storage_options, progress=progress, url=url)

    def statistics(self, name: str, dim: int | None = None) -> tuple[np.ndarray, np.ndarray] | None:
        """(mu [D], sigma [D, D]) float64 of extractor ``name`` held by the reference (None when it has none).

        ``dim``: the extractor's feature size; statistics of another size are refused (they come from another
        extractor or another configuration of it).
        """
        mu_key, sigma_key = reference_stat_keys(name)
        if mu_key not in self.stats or sigma_key not in self.stats:
            return None
        mu = np.atleast_1d(np.asarray(self.stats[mu_key], np.float64))
        sigma = np.atleast_2d(np.asarray(self.stats[sigma_key], np.float64))  # np.cov of one feature is 0-d
        size = mu.shape[0] if mu.ndim == 1 else -1
        if size < 0 or sigma.shape != (size, size) or (dim is not None and size != dim):
            where = self.url or "reference"
            raise ValueError(f"{where}: {mu_key} {tuple(mu.shape)} / {sigma_key} {tuple(sigma.shape)} do not fit the "
                             f"{name} extractor's {dim if dim is not None else 'D'} features (statistics of another "
                             "extractor?)")
        return mu, sigma

    def describe_statistics(self, name: str) -> str:
        """Where the statistics of ``name`` come from: ``<url> (mu_<name>, sigma_<name>)``."""
        return f"{self.url or 'reference'} ({', '.join(reference_stat_keys(name))})"

    def features(
        self, extractor: FeatureExtractor, batch_size: int, device: str | torch.device
    ) -> dict[str, np.ndarray]:
        """Features of the reference images (cached per extractor name); ValueError when there are no images."""
        if extractor.name not in self._cache:
            if self.images is None:
                raise ValueError(f"reference has no images (arr_0): cannot compute {extractor.name} features")
            self._cache[extractor.name] = extract_features(
                self.images, extractor, batch_size, device, self.storage_options, self.progress
            )
        return self._cache[extractor.name]


def _as_reference(
    reference: ReferenceBatch | str | None, storage_options: dict | None, progress: bool
) -> ReferenceBatch | None:
    if isinstance(reference, str):
        return ReferenceBatch.load(reference, storage_options, progress)
    return reference


# --------------------------------------------------------------------------------------------------- metrics
def _adm_metrics(
    sample_feats: dict[str, np.ndarray],
    reference: ReferenceBatch,
    extractor: FeatureExtractor,
    batch_size: int,
    device: str | torch.device,
    k: int,
    split_size: int,
    fd_method: FdMethod,
) -> dict[str, float]:
    """fid, sfid, inception_score and (with reference images) precision, recall of Inception features."""
    pool_stats = reference.statistics(extractor.name, extractor.dim)  # "inception": the ADM mu / sigma
    stats_only = pool_stats is not None and reference.images is None
    ref_feats = None if stats_only else reference.features(extractor, batch_size, device)
    mu_ref, sigma_ref = pool_stats if pool_stats is not None else feature_statistics(ref_feats["feats"])
    results = {"fid": frechet_distance(*feature_statistics(sample_feats["feats"]), mu_ref, sigma_ref, method=fd_method)}
    if {"mu_s", "sigma_s"} <= reference.stats.keys():
        mu_s_ref, sigma_s_ref = reference.stats["mu_s"], reference.stats["sigma_s"]
    elif ref_feats is not None:
        mu_s_ref, sigma_s_ref = feature_statistics(ref_feats["spatial"])
    else:
        raise ValueError("reference has pool statistics but neither spatial statistics nor images: no sFID")
    results["sfid"] = frechet_distance(*feature_statistics(sample_feats["spatial"]), mu_s_ref, sigma_s_ref,
                                       method=fd_method)
    results["inception_score"] = inception_score(sample_feats["logits"], split_size=split_size)
    if ref_feats is not None:
        results["precision"], results["recall"] = precision_recall(ref_feats["feats"], sample_feats["feats"], k=k,
                                                                   device=device)
    else:
        log.warning("reference has statistics only (no images): precision/recall skipped")
    return results


def _reference_statistics(
    extractor: FeatureExtractor,
    reference: ReferenceBatch | None,
    batch_size: int,
    device: str | torch.device,
) -> tuple[tuple[np.ndarray, np.ndarray], str]:
    """((mu [D], sigma [D, D]), where they come from) for a single-output extractor: the reference's own statistics
    of it (``mu_<name>``/``sigma_<name>``), else the reference batch's images when there are some, else the
    extractor's own reference (:class:`SelfReferencedExtractor`)."""
    stats = reference.statistics(extractor.name, extractor.dim) if reference is not None else None
    if stats is not None:
        return stats, reference.describe_statistics(extractor.name)
    if reference is not None and reference.images is not None:
        where = reference.images if isinstance(reference.images, str) else "reference images"
        return feature_statistics(reference.features(extractor, batch_size, device)["feats"]), where
    if isinstance(extractor, SelfReferencedExtractor):
        return extractor.reference_stats, extractor.reference_id
    mu_key, sigma_key = reference_stat_keys(extractor.name)
    raise ValueError(f"reference: the {extractor.name!r} extractor has no reference of its own: give a reference batch "
                     f"with images (arr_0) or {mu_key}/{sigma_key} statistics")


def _class_accuracy(extractor: LabelScorer, feats: np.ndarray, labels: np.ndarray, what: str) -> float | None:
    """Accuracy on the samples with a label >= 0 (-1: text-to-image samples, no class asked for); None if none."""
    if len(labels) != len(feats):
        raise ValueError(f"{what}: {len(labels)} labels (arr_1) for {len(feats)} images (arr_0)")
    known = labels >= 0
    if not known.any():
        log.info("%s: no class labels (all -1: text-to-image samples): class accuracy skipped", what)
        return None
    if int(labels.max()) >= extractor.num_classes:
        raise ValueError(f"{what}: label {int(labels.max())} is outside the {extractor.name} extractor's "
                         f"{extractor.num_classes} classes")
    return extractor.class_accuracy(feats[known], labels[known])


def _check_names(extractors: Sequence[FeatureExtractor]) -> None:
    names = [extractor.name for extractor in extractors]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise ValueError(f"extractors: more than one extractor named {duplicates} (their result keys would collide)")
    if not extractors:
        raise ValueError("extractors: nothing to evaluate (no feature extractor)")


def evaluate_batch(
    samples: ImageSource,
    extractors: Sequence[FeatureExtractor],
    reference: ReferenceBatch | str | None = None,
    *,
    labels: np.ndarray | None = None,
    batch_size: int = 64,
    device: str | torch.device = "cpu",
    k: int = 3,
    split_size: int = 5000,
    storage_options: dict | None = None,
    fd_method: FdMethod = "sqrtm",
    progress: bool = True,
    precision_recall_for: Sequence[str] = (),
) -> dict[str, Any]:
    """Evaluate a batch of samples (uint8 NHWC [N, H, W, 3|1] array/tensor or .npz URL) with every extractor.

    - a multi-output (Inception) extractor: "fid", "sfid", "inception_score", "precision", "recall" (the ADM
      protocol; needs ``reference``: images and/or mu/sigma/mu_s/sigma_s);
    - any other extractor: "fd_<name>" against the reference images, or, without a reference, against the
      extractor's own reference statistics (the small-data classifier), recorded as "reference_<name>";
    - an extractor that classifies (the classifier), given ``labels`` [N] (-1: none): "class_accuracy" (or
      "class_accuracy_<name>" for another name);
    - "precision_<name>", "recall_<name>" for the single-output extractors named in ``precision_recall_for``, when
      the reference has images;
    - always "num_samples".
    """
    _check_names(extractors)
    ref = _as_reference(reference, storage_options, progress)
    results: dict[str, Any] = {}
    for extractor in extractors:
        feats = extract_features(samples, extractor, batch_size, device, storage_options, progress)
        results["num_samples"] = int(feats["feats"].shape[0])
        if isinstance(extractor, MultiOutputExtractor):
            if ref is None:
                raise ValueError(f"reference: {extractor.name} metrics (fid, sfid, inception_score, precision, "
                                 f"recall) need a reference batch (arr_0 and/or mu, sigma, mu_s, sigma_s)")
            results.update(_adm_metrics(feats, ref, extractor, batch_size, device, k, split_size, fd_method))
            continue
        (mu_ref, sigma_ref), where = _reference_statistics(extractor, ref, batch_size, device)
        fd = frechet_distance_details(*feature_statistics(feats["feats"]), mu_ref, sigma_ref, method=fd_method)
        results[f"fd_{extractor.name}"] = fd.value
        if fd.diagonal_offset:  # a singular covariance product, recomputed as pytorch-fid does
            results[f"fd_{extractor.name}_diagonal_offset"] = fd.diagonal_offset
        results[f"reference_{extractor.name}"] = where
        if extractor.name in precision_recall_for and ref is not None and ref.images is not None:
            ref_feats = ref.features(extractor, batch_size, device)["feats"]
            precision, recall = precision_recall(ref_feats, feats["feats"], k=k, device=device)
            results[f"precision_{extractor.name}"], results[f"recall_{extractor.name}"] = precision, recall
        if labels is not None and isinstance(extractor, LabelScorer):
            what = samples if isinstance(samples, str) else "samples"
            accuracy = _class_accuracy(extractor, feats["feats"], np.asarray(labels), what)
            if accuracy is not None:
                key = "class_accuracy" if extractor.name == "classifier" else f"class_accuracy_{extractor.name}"
                results[key] = accuracy
    return results


def clip_score_samples(
    samples: ImageSource,
    captions: Sequence[str],
    scorer: Any,
    batch_size: int = 64,
    storage_options: dict | None = None,
    progress: bool = True,
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
    with tqdm(total=total, desc="clip score", unit="img", leave=False, disable=not progress) as bar:
        for batch in _nhwc_batches(samples, batch_size, storage_options):
            images = nhwc_uint8_to_nchw(batch)
            scores.append(scorer(images, captions[done : done + len(batch)]).float().cpu())
            done += len(batch)
            bar.update(len(batch))
    if not scores:
        raise ValueError("clip score: no samples")
    values = torch.cat(scores)
    return {"clip_score": float(values.mean()), "clip_score_std": float(values.std()) if len(values) > 1 else 0.0}
