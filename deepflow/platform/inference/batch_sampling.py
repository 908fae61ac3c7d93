"""Distributed, restartable batch sampling (the library behind ``jobs/sample.py``).

Sample ``i`` (0 <= i < N) gets its label from the label plan (``cyclic``: i % num_classes; ``shuffled``: a seeded
permutation of the cyclic labels; or a label file) and its initial noise from a generator seeded by (seed, i).
Samples are grouped in fixed chunks of ``chunk_size`` indices and each chunk in fixed batches of ``batch_size``;
the SDE's per-step noise of a batch comes from a generator seeded by (seed, first index of the batch). So the
images are a function of the settings only: neither the world size nor a restart changes them.

Rank r of W (torchrun's RANK/WORLD_SIZE or a Kubernetes Indexed Job's JOB_COMPLETION_INDEX) samples chunks
r, r + W, ... A chunk is written as ``<out>/chunks/chunk-000123.npz`` (images uint8 NHWC, labels, indices) in one
atomic write (a temporary file renamed on local disks; a single PUT on object stores), after its PNGs; a
restarted job skips every chunk file that exists. Rank 0 then waits for all chunks and assembles
``<out>/samples.npz`` (ADM format: arr_0 uint8 NHWC, arr_1 labels), streamed chunk by chunk.

Text-to-image models (MMDiT): sample ``i`` gets caption ``i % n`` of ``captions`` (a caption file: one per line or a
JSON list; or ``dataset``: the first caption of each of the first N samples of the caption dataset), encoded with the
text encoder the dataset manifest records (the manifest travels in export.json; ``dataset`` defaults to the
training data URL recorded there or in the checkpoint's config), guided against the dataset's null text
(``text_null.safetensors``) with CFG in one batched forward. Rank 0 writes ``<out>/captions.txt`` (caption of
sample i on line i+1) for the CLIP score of ``jobs/evaluate.py``; chunk files carry the captions too and arr_1 holds
-1 labels.

Weights: an exported model (``export.safetensors`` + ``export.json``, written by the trainer's checkpoint module)
or a training checkpoint's EMA (``step-NNNNNNN/ema/full.safetensors`` + ``config.yaml``; a checkpoints root
resolves to its newest committed step). Latent models are decoded by a diffusers ``AutoencoderKL`` in batches
(``vae.decode(z / scale)``); pixel models are mapped from [-1, 1]. uint8 = clamp(127.5 x + 128, 0, 255) (DiT/ADM).
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import tempfile
import time
import zipfile
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import fsspec
import numpy as np
import torch
import yaml
from fsspec.implementations.local import LocalFileSystem
from safetensors.torch import load as load_safetensors_bytes
from tqdm.auto import tqdm

from deepflow.models import create_model
from deepflow.models.conditions import condition_to
from deepflow.models.sampling import sample

log = logging.getLogger(__name__)

CHUNK_PATTERN = "chunk-{:06d}.npz"
SETTINGS_NAME = "sampling.json"


# ------------------------------------------------------------------------------------------------ settings
@dataclass
class SampleSettings:
    """Everything that determines the images (fingerprinted) plus where they go (not fingerprinted)."""

    checkpoint: str
    out: str
    num_samples: int = 50_000
    chunk_size: int = 250
    batch_size: int = 125
    method: Literal["sde", "euler", "heun"] = "sde"
    steps: int = 250
    cfg_scale: float = 1.0
    guidance_interval: tuple[float, float] = (0.0, 1.0)
    labels: str = "cyclic"  # "cyclic" | "shuffled" | path/URL of a label file (.npy, .txt, .json)
    seed: int = 0
    decode: Literal["auto", "vae", "pixel"] = "auto"
    vae: str | None = None
    latent_scale: float | None = None
    vae_batch_size: int = 32
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    write_png: bool = False
    write_npz: bool = True
    captions: str | None = None  # text models: "dataset" (default) or a caption file (.txt / .json), any fsspec URL
    dataset: str | None = None  # text models: caption dataset URL (default: the training data URL of the weights)
    text_batch_size: int = 256
    storage_options: dict[str, Any] = field(default_factory=dict)

    def validate(self) -> None:
        if self.num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {self.num_samples}")
        if self.batch_size < 1 or self.chunk_size < 1 or self.chunk_size % self.batch_size:
            raise ValueError(
                f"chunk_size ({self.chunk_size}) must be a positive multiple of batch_size ({self.batch_size})"
            )
        if not self.write_png and not self.write_npz:
            raise ValueError("nothing to write: enable PNGs and/or the .npz")
        lo, hi = self.guidance_interval
        if not 0.0 <= lo <= hi <= 1.0:
            raise ValueError(f"guidance_interval must satisfy 0 <= low <= high <= 1, got {self.guidance_interval}")

    def fingerprint(self) -> str:
        """Hash of the settings that determine the images (not output location, PNG/npz choice, credentials)."""
        keys = ("checkpoint", "num_samples", "chunk_size", "batch_size", "method", "steps", "cfg_scale",
                "guidance_interval", "labels", "seed", "decode", "vae", "latent_scale", "precision")
        values = asdict(self)
        content_dict = {k: values[k] for k in keys}
        for key in ("captions", "dataset"):  # text models only: class-model fingerprints stay as they were
            if values[key] is not None:
                content_dict[key] = values[key]
        content = json.dumps(content_dict, sort_keys=True, default=list)
        return hashlib.sha256(content.encode()).hexdigest()[:16]


# ----------------------------------------------------------------------------------------------- weights
def _read_bytes(fs: fsspec.AbstractFileSystem, path: str) -> bytes:
    with fs.open(path, "rb") as handle:
        return handle.read()


def _read_json(fs: fsspec.AbstractFileSystem, path: str) -> dict[str, Any]:
    return json.loads(_read_bytes(fs, path))


def _newest_committed_step(fs: fsspec.AbstractFileSystem, root: str) -> str | None:
    steps = []
    for entry in fs.ls(root, detail=False):
        name = entry.rstrip("/").rsplit("/", 1)[-1]
        if name.startswith("step-") and name[5:].isdigit() and fs.exists(f"{entry.rstrip('/')}/COMMIT"):
            steps.append((int(name[5:]), entry.rstrip("/")))
    return max(steps)[1] if steps else None


def resolve_weights(url: str, storage_options: dict[str, Any] | None = None) -> tuple[dict[str, torch.Tensor], dict]:
    """Read weights + model description from an export or a training checkpoint (see module doc).

    Returns (state_dict, meta) where meta has "model" (name), "kwargs" (create_model overrides) and optionally
    "manifest" (the training data manifest: kind, latent_scale, encoder).
    """
    fs, path = fsspec.core.url_to_fs(url, **(storage_options or {}))
    path = path.rstrip("/")
    if path.endswith(".safetensors"):
        meta_path = path[: -len(".safetensors")] + ".json"
        if not fs.exists(meta_path):
            raise FileNotFoundError(f"{url}: no {meta_path.rsplit('/', 1)[-1]} beside it naming the model")
        return load_safetensors_bytes(_read_bytes(fs, path)), _read_json(fs, meta_path)
    if fs.exists(f"{path}/export.safetensors"):
        return load_safetensors_bytes(_read_bytes(fs, f"{path}/export.safetensors")), _read_json(fs, f"{path}/export.json")
    if not fs.exists(f"{path}/config.yaml"):
        newest = _newest_committed_step(fs, path) if fs.isdir(path) else None
        if newest is None:
            raise FileNotFoundError(
                f"{url}: neither an export (export.safetensors + export.json), a checkpoint step folder "
                "(config.yaml + ema/), nor a checkpoints folder with a committed step-NNNNNNN"
            )
        log.info("using the newest committed checkpoint %s", newest)
        path = newest
    if not fs.exists(f"{path}/ema/full.safetensors"):
        shards = fs.glob(f"{path}/ema/rank-*.safetensors")
        if shards:
            raise ValueError(
                f"{url}: the EMA is sharded over {len(shards)} ranks (FSDP / ZeRO-3); export it first "
                "(the trainer writes <output_dir>/export/export.safetensors with checkpoint.export_ema)"
            )
        raise FileNotFoundError(f"{url}: no EMA weights (ema/full.safetensors) in this checkpoint")
    config = yaml.safe_load(_read_bytes(fs, f"{path}/config.yaml"))
    from deepflow.platform.train.config import config_from_tree

    run_config = config_from_tree(config)
    meta = {"model": run_config.model.name, "kwargs": run_config.model.create_kwargs(), "checkpoint": path,
            "data_url": run_config.data.url or None}
    return load_safetensors_bytes(_read_bytes(fs, f"{path}/ema/full.safetensors")), meta


def build_sampling_model(
    state: dict[str, torch.Tensor], meta: dict[str, Any], device: torch.device
) -> torch.nn.Module:
    """create_model(meta["model"], **meta["kwargs"]) with the weights loaded; eval mode on ``device``."""
    if "model" not in meta:
        raise ValueError(f"model description lacks 'model' (the registry name): keys {sorted(meta)}")
    kwargs = dict(meta.get("kwargs") or {})
    kwargs.pop("gradient_checkpointing", None)
    model = create_model(meta["model"], **kwargs)
    for prefix in ("module.", "_orig_mod."):
        if state and all(key.startswith(prefix) for key in state):
            state = {key[len(prefix):]: value for key, value in state.items()}
    expected = model.state_dict()
    params = {name for name, _ in model.named_parameters()}
    missing = sorted(params - state.keys())
    unexpected = sorted(state.keys() - expected.keys())
    if missing or unexpected:
        raise ValueError(
            f"weights do not fit {meta['model']} {kwargs}: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    model.load_state_dict(state, strict=False)
    return model.to(device).eval().requires_grad_(False)


# ------------------------------------------------------------------------------------------ labels, noise
def _seed_for(*parts: int) -> int:
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1, dtype=np.uint64)[0] >> 1)


def label_plan(spec: str, num_samples: int, num_classes: int, seed: int, storage_options: dict | None = None) -> np.ndarray:
    """int64 [num_samples] labels: "cyclic" (i % C), "shuffled" (seeded permutation of cyclic), or a file."""
    if spec == "cyclic":
        return np.arange(num_samples, dtype=np.int64) % num_classes
    if spec == "shuffled":
        cyclic = np.arange(num_samples, dtype=np.int64) % num_classes
        return cyclic[np.random.default_rng(_seed_for(seed, 7)).permutation(num_samples)]
    with fsspec.open(spec, "rb", **(storage_options or {})) as handle:
        raw = handle.read()
    if spec.endswith(".npy"):
        labels = np.load(io.BytesIO(raw), allow_pickle=False)
    elif spec.endswith(".json"):
        labels = np.asarray(json.loads(raw))
    else:
        labels = np.asarray([int(tok) for tok in raw.decode().split()])
    labels = labels.astype(np.int64).reshape(-1)
    if labels.shape[0] < num_samples:
        raise ValueError(f"label file {spec} has {labels.shape[0]} labels, fewer than num_samples={num_samples}")
    if labels.min() < 0 or labels.max() >= num_classes:
        raise ValueError(f"label file {spec}: labels must lie in [0, {num_classes}), got [{labels.min()}, {labels.max()}]")
    return labels[:num_samples]


def initial_noise(indices: np.ndarray, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """[len(indices), *shape] float32 on CPU; row k comes from a generator seeded by (seed, indices[k])."""
    rows = [torch.randn(shape, generator=torch.Generator().manual_seed(_seed_for(seed, 0, int(i)))) for i in indices]
    return torch.stack(rows)


# ---------------------------------------------------------------------------------------------- decoding
def to_uint8_nhwc(images: torch.Tensor) -> np.ndarray:
    """float [B, C, H, W] in [-1, 1] -> uint8 [B, H, W, C] via clamp(127.5 x + 128, 0, 255)."""
    return torch.clamp(127.5 * images.float() + 128.0, 0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


class Decoder:
    """Model outputs [B, C, h, w] -> uint8 NHWC images; VAE decoding in batches of ``batch_size``."""

    def __init__(self, vae: torch.nn.Module | None, scale: float, batch_size: int) -> None:
        self.vae, self.scale, self.batch_size = vae, scale, batch_size

    @torch.no_grad()
    def __call__(self, x: torch.Tensor) -> np.ndarray:
        if self.vae is None:
            return to_uint8_nhwc(x)
        parts = []
        for start in range(0, x.shape[0], self.batch_size):
            z = x[start : start + self.batch_size] / self.scale
            parts.append(to_uint8_nhwc(self.vae.decode(z.to(self.vae.dtype)).sample))
        return np.concatenate(parts)


def build_decoder(settings: SampleSettings, meta: dict[str, Any], in_channels: int, device: torch.device) -> Decoder:
    manifest = meta.get("manifest") or {}
    mode = settings.decode
    if mode == "auto":
        mode = manifest.get("kind") or ("vae" if settings.vae else "pixel" if in_channels in (1, 3) else "vae")
    if mode == "pixel":
        return Decoder(None, 1.0, settings.vae_batch_size)
    vae_id = settings.vae or ((manifest.get("encoder") or {}).get("model"))
    if not vae_id or vae_id == "random_init":
        raise ValueError("latent model: give --vae (a diffusers AutoencoderKL hub id or local path)")
    scale = settings.latent_scale or manifest.get("latent_scale") or 0.18215
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(vae_id).to(device).eval().requires_grad_(False)
    return Decoder(vae, float(scale), settings.vae_batch_size)


# -------------------------------------------------------------------------------------------------- text
class TextPlan:
    """Captions of all N samples and their text conditions, encoded batch by batch (see module doc).

    ``condition(indices)`` -> {"text_emb" [b,L,D] float32, "text_mask" [b,L] bool, "text_pooled" [b,P] float32};
    ``null`` is the dataset's empty-caption encoding ([L,D], [L], [P]).
    """

    def __init__(self, settings: SampleSettings, meta: dict[str, Any], device: torch.device) -> None:
        from deepflow.platform.inference.prompts import (
            dataset_captions,
            dataset_prompts,
            read_caption_file,
            read_manifest,
            read_null_text,
            text_encoder_config,
        )

        options = settings.storage_options or None
        dataset = settings.dataset or meta.get("data_url")
        manifest = meta.get("manifest") or None
        if dataset and (settings.dataset or manifest is None):
            manifest = read_manifest(dataset, options)  # an explicit --dataset describes the text features
        if not manifest or not manifest.get("text"):
            raise ValueError(
                f"{meta.get('model')} is a text-to-image model but no caption-dataset manifest is known (export.json "
                "'manifest' / the checkpoint's data.url): give --dataset <caption dataset URL>"
            )
        self.manifest = manifest
        spec = settings.captions or "dataset"
        self.encoder: Any = None
        self.stored: Any = None  # text_eval.Prompts when the dataset's own embeddings are used
        if spec == "dataset":
            if not dataset:
                raise ValueError("--captions dataset: the caption dataset URL is unknown; give --dataset")
            captions = dataset_captions(dataset, settings.num_samples, options)
        else:
            captions = read_caption_file(spec, options)
        try:
            config = text_encoder_config(manifest)
        except ValueError:
            if spec != "dataset":
                raise
            config = None  # e.g. a randomly initialised encoder: use the stored embeddings instead
            self.stored = dataset_prompts(dataset, settings.num_samples, options)
        if config is not None:
            from deepflow.data_pipeline.text_encoders import build_text_encoder

            config = config.model_copy(update={"batch_size": settings.text_batch_size})
            self.encoder = build_text_encoder(config, device)
        self.captions = [captions[i % len(captions)] for i in range(settings.num_samples)]
        if dataset:
            self.null = read_null_text(dataset, options, manifest)
        else:
            self.null = {k: torch.from_numpy(v.astype(np.float32) if v.dtype.kind == "f" else v)
                         for k, v in self.encoder.null().items()}

    def condition(self, indices: np.ndarray) -> dict[str, torch.Tensor]:
        from deepflow.platform.inference.prompts import encode_prompts

        if self.stored is not None:
            return self.stored.select(indices).cond
        return encode_prompts([self.captions[int(i)] for i in indices], self.manifest, encoder=self.encoder).cond


# -------------------------------------------------------------------------------------------------- I/O
def _atomic_write(fs: fsspec.AbstractFileSystem, path: str, data: bytes) -> None:
    """Readers see the whole file or nothing: temp + rename locally, one PUT on object stores."""
    if isinstance(fs, LocalFileSystem):
        directory = os.path.dirname(path)
        os.makedirs(directory, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-")
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.replace(tmp, path)
    else:
        fs.pipe_file(path, data)


def _npz_bytes(**arrays: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


def _write_pngs(fs: fsspec.AbstractFileSystem, root: str, images: np.ndarray, indices: np.ndarray) -> None:
    from PIL import Image

    for image, index in zip(images, indices):
        buffer = io.BytesIO()
        Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(buffer, format="PNG")
        _atomic_write(fs, f"{root}/png/{int(index):06d}.png", buffer.getvalue())


def _write_npy_member(archive: zipfile.ZipFile, name: str, shape: tuple[int, ...], dtype: np.dtype, parts) -> None:
    with archive.open(f"{name}.npy", "w", force_zip64=True) as member:
        header = {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False, "shape": shape}
        np.lib.format.write_array_header_2_0(member, header)
        for part in parts:
            member.write(np.ascontiguousarray(part, dtype=dtype).tobytes())


def assemble_npz(settings: SampleSettings, num_chunks: int) -> str:
    """Stream every chunk into ``<out>/samples.npz`` (arr_0 uint8 NHWC, arr_1 int64 labels). Returns its URL."""
    fs, root = fsspec.core.url_to_fs(settings.out, **settings.storage_options)
    root = root.rstrip("/")
    chunk_paths = [f"{root}/chunks/{CHUNK_PATTERN.format(c)}" for c in range(num_chunks)]

    def load(path: str, key: str) -> np.ndarray:
        with fs.open(path, "rb") as handle, np.load(handle, allow_pickle=False) as data:
            if str(data["fingerprint"]) != settings.fingerprint():
                raise ValueError(f"{path} was sampled with other settings (fingerprint mismatch)")
            return data[key]

    first = load(chunk_paths[0], "images")
    shape = (settings.num_samples, *first.shape[1:])
    local_dir = os.path.dirname(root) if isinstance(fs, LocalFileSystem) else None
    fd, tmp = tempfile.mkstemp(suffix=".npz", dir=local_dir)
    os.close(fd)
    try:
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as archive:
            _write_npy_member(archive, "arr_0", shape, np.uint8, (load(p, "images") for p in chunk_paths))
            _write_npy_member(archive, "arr_1", (settings.num_samples,), np.int64, (load(p, "labels") for p in chunk_paths))
        target = f"{root}/samples.npz"
        if isinstance(fs, LocalFileSystem):
            os.replace(tmp, target)
        else:
            fs.put_file(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return settings.out.rstrip("/") + "/samples.npz"


# ---------------------------------------------------------------------------------------------------- run
@dataclass
class SampleResult:
    chunks_done: int
    chunks_skipped: int
    images: int
    seconds: float
    npz_url: str | None

    @property
    def images_per_second(self) -> float:
        return self.images / self.seconds if self.seconds > 0 else float("nan")


def _check_settings_file(fs: fsspec.AbstractFileSystem, root: str, settings: SampleSettings, rank: int) -> None:
    path = f"{root}/{SETTINGS_NAME}"
    record = {"fingerprint": settings.fingerprint(), "settings": {**asdict(settings), "storage_options": None}}
    if fs.exists(path):
        previous = _read_json(fs, path)
        if previous.get("fingerprint") != record["fingerprint"]:
            raise ValueError(
                f"{settings.out} holds samples made with other settings ({path}: {previous.get('settings')}); "
                "use another output folder"
            )
    elif rank == 0:
        _atomic_write(fs, path, json.dumps(record, indent=2, default=list).encode())


def run_sampling(
    settings: SampleSettings,
    rank: int = 0,
    world_size: int = 1,
    device: torch.device | str = "cpu",
    wait_timeout_s: float = 24 * 3600.0,
    progress: bool = True,
) -> SampleResult:
    """Sample this rank's missing chunks; rank 0 then waits for all chunks and writes samples.npz."""
    settings.validate()
    device = torch.device(device)
    fs, root = fsspec.core.url_to_fs(settings.out, **settings.storage_options)
    root = root.rstrip("/")
    fs.makedirs(f"{root}/chunks", exist_ok=True)
    _check_settings_file(fs, root, settings, rank)

    state, meta = resolve_weights(settings.checkpoint, settings.storage_options)
    model = build_sampling_model(state, meta, device)
    text: TextPlan | None = None
    if getattr(model, "conditioning", "class") == "text":
        if settings.labels != "cyclic":
            raise ValueError("--labels applies to class-conditional models; text-to-image models take --captions")
        text = TextPlan(settings, meta, device)
        labels = np.full(settings.num_samples, -1, dtype=np.int64)
        if rank == 0:
            from deepflow.platform.inference.prompts import normalize_caption

            lines = "".join(normalize_caption(c) + "\n" for c in text.captions)
            _atomic_write(fs, f"{root}/captions.txt", lines.encode("utf-8"))
    else:
        if settings.captions is not None or settings.dataset is not None:
            raise ValueError(f"--captions/--dataset apply to text-to-image models; {meta.get('model')} takes --labels")
        labels = label_plan(
            settings.labels, settings.num_samples, model.num_classes, settings.seed, settings.storage_options
        )
    decoder = build_decoder(settings, meta, model.in_channels, device)
    latent_shape = (model.in_channels, model.input_size, model.input_size)
    autocast_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(settings.precision)

    num_chunks = -(-settings.num_samples // settings.chunk_size)
    mine = list(range(rank, num_chunks, world_size))
    fs.invalidate_cache()
    existing = {p.rstrip("/").rsplit("/", 1)[-1] for p in fs.glob(f"{root}/chunks/chunk-*.npz")}
    todo = [c for c in mine if CHUNK_PATTERN.format(c) not in existing]
    skipped = len(mine) - len(todo)
    if skipped:
        log.info("rank %d: %d of its %d chunks already exist; sampling %d", rank, skipped, len(mine), len(todo))

    total_images = sum(min(settings.chunk_size, settings.num_samples - c * settings.chunk_size) for c in todo)
    bar = tqdm(total=total_images, unit="img", desc=f"sampling r{rank}", disable=not progress or rank != 0)
    start = time.perf_counter()
    for chunk in todo:
        first, last = chunk * settings.chunk_size, min((chunk + 1) * settings.chunk_size, settings.num_samples)
        images, chunk_indices = [], np.arange(first, last, dtype=np.int64)
        for batch_start in range(first, last, settings.batch_size):
            indices = np.arange(batch_start, min(batch_start + settings.batch_size, last), dtype=np.int64)
            noise = initial_noise(indices, latent_shape, settings.seed).to(device)
            if text is not None:
                y: Any = condition_to(text.condition(indices), device, dtype=torch.float32)
                null: Any = text.null
            else:
                y, null = torch.from_numpy(labels[indices]).to(device), None
            generator = torch.Generator(device=device).manual_seed(_seed_for(settings.seed, 1, int(batch_start)))
            with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                x0 = sample(
                    model, noise, y, method=settings.method, steps=settings.steps, cfg_scale=settings.cfg_scale,
                    guidance_interval=tuple(settings.guidance_interval), null_label=model.num_classes,
                    generator=generator, null_condition=null,
                )
            images.append(decoder(x0.float()))
            bar.update(len(indices))
            bar.set_postfix(img_s=f"{bar.n / max(time.perf_counter() - start, 1e-9):.2f}")
        chunk_images = np.concatenate(images)
        if settings.write_png:
            _write_pngs(fs, root, chunk_images, chunk_indices)
        extra = {} if text is None else {"captions": np.array([text.captions[int(i)] for i in chunk_indices])}
        payload = _npz_bytes(images=chunk_images, labels=labels[chunk_indices], indices=chunk_indices,
                             fingerprint=np.array(settings.fingerprint()), **extra)
        _atomic_write(fs, f"{root}/chunks/{CHUNK_PATTERN.format(chunk)}", payload)
    bar.close()
    seconds = time.perf_counter() - start
    result = SampleResult(len(todo), skipped, total_images, seconds, None)
    log.info("rank %d: %d images in %.1fs (%.2f img/s)", rank, total_images, seconds, result.images_per_second)

    if rank == 0 and settings.write_npz:
        wanted = {CHUNK_PATTERN.format(c) for c in range(num_chunks)}
        deadline = time.monotonic() + wait_timeout_s
        while True:
            fs.invalidate_cache()
            present = {p.rstrip("/").rsplit("/", 1)[-1] for p in fs.glob(f"{root}/chunks/chunk-*.npz")}
            if wanted <= present:
                break
            if time.monotonic() > deadline:
                raise TimeoutError(f"chunks still missing after {wait_timeout_s:.0f}s: {sorted(wanted - present)[:5]}")
            time.sleep(5.0)
        result.npz_url = assemble_npz(settings, num_chunks)
        log.info("wrote %s", result.npz_url)
    return result
