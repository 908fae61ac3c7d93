"""Reference batches from a dataset: an ADM-format ``.npz`` of images and/or feature statistics.

Images come from any source the data pipeline knows (``fashion_mnist``, ``digits``, ``image_folder`` (ImageNet
layout), ``coco``, ``webdataset``, ``emoji``; preprocessed as the precompute job does, e.g. ADM's centre crop to a
resolution) or from a committed shard set (pixel shards, or latent shards that kept their images). The ``.npz`` is
written atomically at any storage URL and holds:

- ``arr_0``: uint8 NHWC images [N, H, W, C] (unless ``--no-images``): precision/recall need them, and so does an
  extractor added later;
- ``mu`` [2048], ``sigma`` [2048, 2048], ``mu_s`` [2023], ``sigma_s`` [2023, 2023] (float64): the FID Inception-v3 pool
  and spatial statistics under the names of ADM's reference batches (``--inception-weights``);
- ``mu_<name>`` [D], ``sigma_<name>`` [D, D] (float64) for every other extractor (``--extractor
  classifier:dataset=digits``, ``dinov2:model=...``, ``clip:model_name=...``);
- ``meta``: a JSON string saying how it was built (input, preprocessing, extractors and their options).

    python -m deepflow.platform.eval.reference_job --source image_folder:root=/data/imagenet/train \\
        --resolution 256 --num-images 50000 --inception-weights --out s3://data/imagenet256-reference.npz
    python -m deepflow.platform.eval.reference_job --shards runs/digits/data --extractor classifier:dataset=digits \\
        --random-inception-for-tests --out runs/digits/reference.npz
    python -m deepflow.platform.eval.reference_job --config reference.yaml --set num_images=10000

``jobs/evaluate.py --reference <that .npz>`` then uses the statistics of each of its extractors (and the images for
precision/recall). Every flag is sugar for a field of :class:`~deepflow.platform.eval.config.ReferenceConfig`
(--config YAML, then flags, then --set overrides); a mistake in the inputs prints one line ``error: <field or URL>:
<what is wrong>`` and exits with status 2.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import zipfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from deepflow.artifacts import Manifest, ShardEntry, read_manifest
from deepflow.configuration import ConfigError, flag_overrides, load_tree, load_validated
from deepflow.data_pipeline.config import PreprocessConfig
from deepflow.data_pipeline.encoders import unit_range_to_uint8
from deepflow.data_pipeline.loader import expand_pattern, split_dataset_url
from deepflow.data_pipeline.preprocess import decode_image_bytes, preprocess_image
from deepflow.data_pipeline.shards import Block, decode_shard, sha256_hex
from deepflow.data_pipeline.sources import CorruptImageError, Source, build_source
from deepflow.errors import JobArgumentParser, report_user_errors
from deepflow.platform.eval.config import ReferenceConfig
from deepflow.platform.eval.evaluator import INCEPTION_STAT_KEYS, feature_parts, reference_stat_keys
from deepflow.platform.eval.extractors import FeatureExtractor, MultiOutputExtractor, build_extractor
from deepflow.platform.eval.job import (
    BUILD_ERRORS,
    USER_ERRORS,
    EvaluateError,
    add_inception_flags,
    check_device,
    field_errors,
    inception_flag,
    parse_extractor_spec,
    parse_kind_spec,
)
from deepflow.storage import Storage, split_url

log = logging.getLogger(__name__)

__all__ = ["ImageStream", "StreamingMoments", "build_parser", "load_config", "main", "run", "shard_stream",
           "source_stream", "write_npz"]

REFERENCE_FORMAT = "deepflow-reference"
#: the config's field paths: a message that starts with one of them already names its field
FIELD_NAMES = tuple(ReferenceConfig.model_fields)


def _field(name: str, errors: tuple[type[BaseException], ...] = USER_ERRORS) -> Any:
    """User errors raised inside become one ``<name>: <message>`` EvaluateError."""
    return field_errors(name, errors, FIELD_NAMES)


# ------------------------------------------------------------------------------------------------ command line
def build_parser() -> argparse.ArgumentParser:
    """Flags; every one defaults to None (unset) so that it overrides a --config file only when given."""
    parser = JobArgumentParser(prog="reference", description=__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML file of ReferenceConfig fields (any storage URL)")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                        help="override a field, e.g. --set num_images=10000 --set source.split=test")
    parser.add_argument("--source", metavar="KIND[:K=V,...]",
                        help="source: a dataset source: digits, fashion_mnist[:split=test], image_folder:root=DIR, "
                        "coco:annotations=F,images=DIR, webdataset:urls=PATTERN, emoji")
    parser.add_argument("--shards", help="shards: a shard set (dataset folder, manifest.json or shard pattern URL)")
    parser.add_argument("--out", help="out: where to write the reference .npz (any storage URL)")
    parser.add_argument("--resolution", type=int, help="preprocess.resolution of source images (default 256)")
    parser.add_argument("--resize", help="preprocess.resize: adm_center_crop (default), center_crop, resize, pad")
    parser.add_argument("--channels", type=int, help="preprocess.channels: 1 or 3 (default: the source's)")
    parser.add_argument("--no-images", action="store_true", help="images=false: statistics only, no arr_0")
    add_inception_flags(parser)
    parser.add_argument("--extractor", action="append", default=[], metavar="KIND[:K=V,...]",
                        help="append to extractors (mu_<name>/sigma_<name>): classifier:dataset=digits, "
                        "dinov2:model=..., clip:model_name=...,pretrained=...")
    parser.add_argument("--num-images", type=int, help="num_images: use at most this many images (default: all)")
    parser.add_argument("--shuffle-seed", type=int, help="shuffle_seed: source order permuted with it (default 0)")
    parser.add_argument("--batch-size", type=int, help="batch_size: images per extractor call (default 64)")
    parser.add_argument("--num-workers", type=int, help="num_workers: image decoding threads (default 4)")
    parser.add_argument("--device", help="device (default: cuda when available, else cpu)")
    parser.add_argument("--no-progress", action="store_true", help="progress=false: no progress bar")
    return parser


def load_config(argv: Sequence[str] | None = None) -> ReferenceConfig:
    """The run's config: --config file, then the flags, then --set overrides (ConfigError naming the fields)."""
    args = build_parser().parse_args(argv)  # usage mistakes: errors.UsageError, one line naming the flag
    tree = load_tree(args.config)
    if args.extractor:
        listed = tree.setdefault("extractors", [])
        if not isinstance(listed, list):
            raise ConfigError("extractors: must be a list of {kind, options} to append --extractor to")
        listed.extend({"kind": kind, "options": options} for kind, options in map(parse_extractor_spec, args.extractor))
    source = None
    if args.source:
        kind, options = parse_kind_spec(args.source, "--source")
        source = {"kind": kind, **options}
    flags = {
        "source": source, "shards": args.shards, "out": args.out, "preprocess.resolution": args.resolution,
        "preprocess.resize": args.resize, "preprocess.channels": args.channels,
        "images": False if args.no_images else None, "inception": inception_flag(args),
        "num_images": args.num_images, "shuffle_seed": args.shuffle_seed, "batch_size": args.batch_size,
        "num_workers": args.num_workers, "device": args.device, "progress": False if args.no_progress else None,
    }
    return load_validated(ReferenceConfig, tree=tree, overrides=flag_overrides(flags) + list(args.set))


# ------------------------------------------------------------------------------------------------ inputs
@dataclass
class ImageStream:
    """The images of a dataset in a fixed order, as uint8 batches [B, C, H, W] (C = 1 or 3, one size throughout).

    ``total`` is the number of images expected (fewer come when source images are unreadable: their keys are
    appended to ``skipped`` while iterating); ``description`` says where they come from (recorded in ``meta``).
    """

    batches: Iterator[np.ndarray]
    total: int
    description: dict[str, Any]
    skipped: list[str] = field(default_factory=list)


def _source_channels(source: Source, preprocess: PreprocessConfig) -> int:
    """Channels of the reference images: configured, else 1 for grayscale datasets, else 3 (RGB: folders mixing
    grayscale and colour JPEGs, as ImageNet does, give RGB images, as the ADM reference batches hold)."""
    if preprocess.channels is not None:
        return preprocess.channels
    return 1 if source.grayscale else 3


def _source_order(count: int, seed: int | None) -> np.ndarray:
    """Item indices [count]: permuted with ``seed`` (an even subset of a class-sorted folder), or in order."""
    return np.arange(count) if seed is None else np.random.default_rng(seed).permutation(count)


def source_stream(cfg: ReferenceConfig) -> ImageStream:
    """The images of ``cfg.source``, preprocessed with ``cfg.preprocess``, in ``shuffle_seed`` order; at most
    ``num_images`` (unreadable images are skipped and listed)."""
    assert cfg.source is not None
    with _field("source", BUILD_ERRORS):
        source = build_source(cfg.source)
    order = _source_order(len(source), cfg.shuffle_seed)
    if not len(order):
        raise _input_error("source", "the dataset has no images")
    total = len(order) if cfg.num_images is None else min(cfg.num_images, len(order))
    channels = _source_channels(source, cfg.preprocess)
    description = {"source": cfg.source.model_dump(mode="json"), "preprocess": cfg.preprocess.model_dump(mode="json"),
                   "shuffle_seed": cfg.shuffle_seed}
    stream = ImageStream(iter(()), total, description)
    stream.batches = _source_batches(source, order, total, channels, cfg, stream.skipped)
    return stream


def _source_batches(
    source: Source, order: np.ndarray, wanted: int, channels: int, cfg: ReferenceConfig, skipped: list[str]
) -> Iterator[np.ndarray]:
    """uint8 [B, C, R, R] batches of up to ``batch_size`` readable images, ``wanted`` in all (fewer if the source runs
    out); decoding and preprocessing run on ``num_workers`` threads, the order stays ``order``."""
    preprocess = cfg.preprocess

    def load(index: int) -> np.ndarray | None:
        try:
            image = source.load(int(index)).image
        except CorruptImageError as error:
            log.warning("skipping %s: %s", error.key, error.reason)
            skipped.append(error.key)
            return None
        return preprocess_image(image, preprocess.resolution, preprocess.resize, channels)

    done, start = 0, 0
    pool = ThreadPoolExecutor(cfg.num_workers, thread_name_prefix="reference-decode") if cfg.num_workers else None
    mapper: Callable[..., Iterable[np.ndarray | None]] = pool.map if pool is not None else map
    with pool or nullcontext():
        while done < wanted and start < len(order):
            window = order[start : start + min(cfg.batch_size, wanted - done)]
            start += len(window)
            images = [image for image in mapper(load, window) if image is not None]
            if images:
                done += len(images)
                yield np.stack(images)


def _select_shards(manifest: Manifest, pattern: str | None, url: str) -> list[ShardEntry]:
    """The manifest's shards, or those whose names match ``pattern`` (brace and glob patterns), in manifest order."""
    if pattern is None:
        return list(manifest.shards)
    import fnmatch

    names = set(expand_pattern(pattern))
    chosen = [s for s in manifest.shards if s.name in names or any(fnmatch.fnmatchcase(s.name, p) for p in names)]
    if not chosen:
        raise ValueError(f"{url}: the pattern matches no shard of the manifest")
    return chosen


def shard_stream(cfg: ReferenceConfig) -> ImageStream:
    """The images of the shard set ``cfg.shards`` in manifest order (at most ``num_images``): the stored uint8 pixels
    of a pixel dataset, or the kept PNG/JPEG images of a latent one (latents alone cannot give images)."""
    assert cfg.shards is not None
    with _field("shards"):
        directory, pattern = split_dataset_url(cfg.shards)
        storage = Storage(directory, cfg.storage_options or None)
        manifest = read_manifest(storage.url, storage.storage_options)
        shards = _select_shards(manifest, pattern, cfg.shards)
    if manifest.kind != "pixel" and not manifest.image_format:
        raise _input_error("shards", f"{cfg.shards}: a {manifest.kind} (latent) shard set without kept images cannot "
                           "give reference images: build the reference from its source (--source ...), or precompute "
                           "with output.keep_image: png")
    available = sum(int(s.num_samples) for s in shards)
    total = available if cfg.num_images is None else min(cfg.num_images, available)
    description = {"shards": cfg.shards, "kind": manifest.kind, "shape": manifest.shape,
                   "num_shards": len(shards), "num_samples": available}
    return ImageStream(_shard_batches(storage, manifest, shards, total, cfg.batch_size), total, description)


def _block_images(block: Block, manifest: Manifest, where: str) -> np.ndarray:
    """uint8 [n, C, H, W] images of a decoded shard: the pixels field (uint8, or float16 in [-1, 1]), else the kept
    images (decoded to RGB)."""
    pixels = block.arrays.get("pixels") if manifest.kind == "pixel" else None
    if pixels is not None:
        return pixels if pixels.dtype == np.uint8 else unit_range_to_uint8(pixels)
    if block.images is not None:
        return np.stack([decode_image_bytes(data, f"{where} image {i}") for i, data in enumerate(block.images)])
    raise ValueError(f"{where}: neither pixels nor kept images in the shard")


def _shard_batches(
    storage: Storage, manifest: Manifest, shards: list[ShardEntry], wanted: int, batch_size: int
) -> Iterator[np.ndarray]:
    """uint8 [B, C, H, W] batches of the shards' images (checksums verified), ``wanted`` in all."""
    done = 0
    for shard in shards:
        if done >= wanted:
            return
        where = storage.url_of(shard.name)
        data = storage.read_bytes(shard.name)
        if shard.sha256 and sha256_hex(data) != shard.sha256:
            raise ValueError(f"{where}: sha256 does not match the manifest (corrupt or truncated shard)")
        images = _block_images(decode_shard(data, where), manifest, where)
        for start in range(0, len(images), batch_size):
            batch = images[start : start + min(batch_size, wanted - done)]
            if not len(batch):
                return
            done += len(batch)
            yield batch


def _input_error(name: str, message: str) -> EvaluateError:
    """The one-line error ``<name>: <message>`` of a mistake in the inputs."""
    return EvaluateError(f"{name}: {message}")


def _guarded(batches: Iterator[np.ndarray], name: str) -> Iterator[np.ndarray]:
    """``batches`` with the user errors of reading them (corrupt shards, unreachable files) named by field ``name``."""
    while True:
        with _field(name):
            batch = next(batches, None)
        if batch is None:
            return
        yield batch


# ------------------------------------------------------------------------------------------------ statistics
class StreamingMoments:
    """Mean and unbiased covariance (as ``np.cov``) of feature rows arriving in batches, in float64.

    Rows are shifted by the first batch's mean before summing (sums of x and x x^T of centred rows keep the
    covariance accurate when the mean is large against the spread). Memory: D + D^2 floats whatever N.
    """

    def __init__(self) -> None:
        self.count = 0
        self._shift: Tensor | None = None
        self._sum: Tensor | None = None
        self._outer: Tensor | None = None

    def update(self, feats: Tensor) -> None:
        """Add rows feats [B, D] (any float dtype, any device: CUDA sums stay there, others go to the CPU)."""
        if feats.ndim != 2:
            raise ValueError(f"features must be [B, D], got shape {tuple(feats.shape)}")
        device = feats.device if feats.device.type == "cuda" else torch.device("cpu")
        x = feats.detach().to(device=device, dtype=torch.float64)
        if self._shift is None:
            self._shift = x.mean(0)
            self._sum = torch.zeros_like(self._shift)
            self._outer = torch.zeros(x.shape[1], x.shape[1], dtype=torch.float64, device=device)
        centred = x - self._shift
        self._sum += centred.sum(0)
        self._outer += centred.T @ centred
        self.count += x.shape[0]

    def result(self) -> tuple[np.ndarray, np.ndarray]:
        """(mu [D], sigma [D, D]) float64; sigma divides by N - 1 (needs N >= 2)."""
        if self.count < 2 or self._shift is None or self._sum is None or self._outer is None:
            raise ValueError(f"feature statistics need at least 2 images, got {self.count}")
        mean_centred = self._sum / self.count
        sigma = (self._outer - self.count * torch.outer(mean_centred, mean_centred)) / (self.count - 1)
        return (self._shift + mean_centred).cpu().numpy(), sigma.cpu().numpy()


def _stat_targets(extractor: FeatureExtractor) -> list[tuple[str, tuple[str, str]]]:
    """(feature part, (mu key, sigma key)) pairs written for an extractor: its features under
    ``reference_stat_keys(name)``; for Inception also the spatial features as ADM's mu_s / sigma_s."""
    targets = [("feats", reference_stat_keys(extractor.name))]
    if isinstance(extractor, MultiOutputExtractor):
        targets.append(("spatial", (INCEPTION_STAT_KEYS[2], INCEPTION_STAT_KEYS[3])))
    return targets


def build_reference_extractors(
    cfg: ReferenceConfig, device: str, inception_weights: str | None
) -> list[FeatureExtractor]:
    """The Inception extractor (when ``inception`` is set) and every one of ``extractors``, on ``device``; their
    statistics keys must not collide."""
    built: list[FeatureExtractor] = []
    if cfg.inception is not None:
        with _field("inception", BUILD_ERRORS):
            built.append(build_extractor("inception", device=device, weights=inception_weights))
    for index, spec in enumerate(cfg.extractors):
        with _field(f"extractors.{index}", BUILD_ERRORS):
            built.append(build_extractor(spec.kind, device=device, **spec.options))
    names = [extractor.name for extractor in built]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise _input_error("extractors", f"more than one extractor named {duplicates} (their mu_<name>/sigma_<name> "
                           "statistics would collide)")
    return built


# ------------------------------------------------------------------------------------------------ output
def _npy_header(shape: tuple[int, ...], dtype: np.dtype) -> dict[str, Any]:
    return {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False, "shape": tuple(shape)}


def write_npz(
    path: str,
    arrays: dict[str, np.ndarray],
    streamed: dict[str, tuple[str, tuple[int, ...], np.dtype]] | None = None,
) -> None:
    """An uncompressed .npz (the ``np.savez`` layout, ZIP64 for large members) at local ``path``.

    ``streamed``: name -> (raw file of C-order rows, shape, dtype), copied in chunks into the member after its .npy
    header (a 50k x 256 x 256 x 3 image batch never sits in memory); written first, then ``arrays``.
    """
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as archive:
        for name, (raw_path, shape, dtype) in (streamed or {}).items():
            expected = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
            if os.path.getsize(raw_path) != expected:
                raise ValueError(f"{name}: {os.path.getsize(raw_path)} staged bytes, expected {expected} for {shape}")
            with archive.open(f"{name}.npy", "w", force_zip64=True) as member, open(raw_path, "rb") as raw:
                np.lib.format.write_array_header_1_0(member, _npy_header(shape, dtype))
                while chunk := raw.read(1 << 22):
                    member.write(chunk)
        for name, array in arrays.items():
            with archive.open(f"{name}.npy", "w", force_zip64=True) as member:
                np.lib.format.write_array(member, np.asarray(array), allow_pickle=False)


@dataclass
class _Collected:
    """What one pass over the images gave: the image count, their shape [H, W, C], and per (mu key, sigma key) the
    moments of those features."""

    count: int = 0
    image_shape: tuple[int, ...] | None = None
    moments: dict[tuple[str, str], StreamingMoments] = field(default_factory=dict)


def _collect(
    stream: ImageStream, input_field: str, extractors: list[FeatureExtractor], images_path: str | None,
    cfg: ReferenceConfig, device: str,
) -> _Collected:
    """Run every extractor over the stream (accumulating their statistics) and stage the NHWC image rows at
    ``images_path`` (None: images not kept)."""
    collected = _Collected()
    targets = [(extractor, _stat_targets(extractor)) for extractor in extractors]
    with (open(images_path, "wb") if images_path else nullcontext()) as staged, \
            tqdm(total=stream.total, desc="reference images", unit="img", disable=not cfg.progress) as bar:
        for batch in _guarded(stream.batches, input_field):
            shape = (batch.shape[2], batch.shape[3], batch.shape[1])
            if collected.image_shape is not None and shape != collected.image_shape:
                raise _input_error(input_field, f"images of different sizes: {collected.image_shape} then {shape} "
                                   "(HWC); set preprocess.resolution / preprocess.channels")
            collected.image_shape = shape
            if staged is not None:
                staged.write(np.ascontiguousarray(batch.transpose(0, 2, 3, 1)).tobytes())
            images = torch.from_numpy(np.ascontiguousarray(batch)).to(device)
            for extractor, wanted in targets:
                with torch.no_grad():
                    parts = feature_parts(extractor, images)
                for part, keys in wanted:
                    collected.moments.setdefault(keys, StreamingMoments()).update(parts[part])
            collected.count += len(batch)
            bar.update(len(batch))
    return collected


def _meta(cfg: ReferenceConfig, stream: ImageStream, collected: _Collected, extractors: list[FeatureExtractor],
          inception_weights: str | None) -> dict[str, Any]:
    """What the reference holds and how it was built (the ``meta`` member, also printed)."""
    specs = ([{"kind": "inception", "options": {"weights": inception_weights or "RANDOM (tests only)"}}]
             if cfg.inception is not None else []) + [spec.model_dump(mode="json") for spec in cfg.extractors]
    statistics = {extractor.name: {**spec, "keys": [k for _, keys in _stat_targets(extractor) for k in keys]}
                  for extractor, spec in zip(extractors, specs)}
    return {"format": REFERENCE_FORMAT, "format_version": 1, "num_images": collected.count,
            "image_shape": list(collected.image_shape or ()), "images": cfg.images, "input": stream.description,
            "skipped": len(stream.skipped), "statistics": statistics}


def run(cfg: ReferenceConfig) -> dict[str, Any]:
    """Build the reference .npz at ``cfg.out``; print and return a summary (``out``, ``num_images``, ``arrays``
    name -> shape, ``skipped`` unreadable source images, and the ``meta`` written).

    The images are staged in a local temporary folder ($TMPDIR: room for N x H x W x C bytes, twice for a local
    ``out``) and the .npz is put into place atomically.
    """
    device = cfg.resolved_device()
    check_device(device)
    with _field("inception"):
        weights = cfg.inception_weights()
    input_field = "source" if cfg.source is not None else "shards"
    stream = source_stream(cfg) if cfg.source is not None else shard_stream(cfg)
    extractors = build_reference_extractors(cfg, device, weights)
    with tempfile.TemporaryDirectory(prefix="deepflow-reference-") as staging:
        images_path = os.path.join(staging, "arr_0.raw") if cfg.images else None
        collected = _collect(stream, input_field, extractors, images_path, cfg, device)
        if collected.count < 2:  # statistics need two, and so does the evaluator of a reference's images
            raise _input_error(input_field, f"{collected.count} readable images; a reference needs at least 2"
                               + (f" ({len(stream.skipped)} unreadable)" if stream.skipped else ""))
        arrays: dict[str, np.ndarray] = {}
        for (mu_key, sigma_key), moments in collected.moments.items():
            arrays[mu_key], arrays[sigma_key] = moments.result()
        meta = _meta(cfg, stream, collected, extractors, weights)
        arrays["meta"] = np.array(json.dumps(meta, sort_keys=True))
        streamed = ({"arr_0": (images_path, (collected.count, *collected.image_shape), np.dtype(np.uint8))}
                    if images_path and collected.image_shape else {})
        local = os.path.join(staging, "reference.npz")
        write_npz(local, arrays, streamed)
        with _field("out"):
            parent, name = split_url(cfg.out)
            Storage(parent, cfg.storage_options or None).put_file(local, name)
    shapes = {name: [int(n) for n in shape] for name, (_, shape, _) in streamed.items()}
    shapes.update({name: list(array.shape) for name, array in arrays.items() if name != "meta"})
    summary = {"out": cfg.out, "num_images": collected.count, "arrays": shapes, "skipped": stream.skipped[:20],
               "meta": meta}
    print(json.dumps(summary, indent=2, sort_keys=True))
    return summary


# ------------------------------------------------------------------------------------------------ entry point
def main(argv: Sequence[str] | None = None) -> int:
    """Run the job; 0 on success, 2 (one ``error: ...`` line on stderr) for a mistake in the inputs."""

    def body() -> int:
        cfg = load_config(argv)
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        run(cfg)
        return 0

    return report_user_errors(body)


if __name__ == "__main__":
    sys.exit(main())
