"""Distributed, restartable batch sampling: N images (50k for FID) as chunk files, PNGs and/or one ADM .npz.

    python -m deepflow.platform.inference.sample_job --checkpoint runs/x/export --out runs/x/samples \\
        --num-samples 1000 --method euler --steps 50 --cfg-scale 1.5
    torchrun --nproc-per-node 8 jobs/sample.py --config sample.yaml --set sampler.steps=250

Settings: a :class:`SampleConfig`, from an optional ``--config`` YAML, ``--set a.b=v`` overrides and the flags
(sugar for fields; flags win). ``checkpoint``: anything ``artifacts.load_weights`` reads (an export folder or
``.safetensors``, a ``deepflow convert`` output, a checkpoint step folder, a checkpoints folder). The weights, the
condition plan and the decoder are checked before anything is written.

Sample ``i`` gets its condition from the plan (``conditions``: labels cyclic / shuffled / a file; captions of the
dataset or a file for text models) and its noise from (seed, i) (``generate``). Samples are grouped in chunks of
``chunk_size`` and each chunk in batches of ``batch_size``, so the images are a function of the settings only:
neither the world size nor a restart changes them. Rank r of W samples chunks r, r + W, ...; a restart skips the
chunks that exist; rank 0 then waits for all chunks and writes ``samples.npz`` (``sample_set``).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from pydantic import Field, model_validator
from tqdm.auto import tqdm

from deepflow.artifacts import load_weights
from deepflow.configuration import ConfigSection, StorageURL, flag_overrides, load_validated
from deepflow.platform.inference.conditions import ConditionPlan, sampling_plan
from deepflow.errors import USER_ERRORS, JobArgumentParser, UserError, describe, report_user_errors
from deepflow.models.sampling import METHODS, PRESETS
from deepflow.platform.inference.generate import DecodeSpec, Decoder, SamplerConfig, build_model, generate
from deepflow.platform.inference.sample_set import SampleSet
from deepflow.precision import PRECISIONS, PrecisionChoice, choose_precision
from deepflow.ranks import read_dist_env
from deepflow.storage import resolve_storage_options

log = logging.getLogger(__name__)

__all__ = ["DecodeConfig", "SampleConfig", "SampleResult", "build_parser", "load_config", "main", "run_sampling"]


# --------------------------------------------------------------------------------------------------- config
class DecodeConfig(ConfigSection):
    """Samples -> images; by default what the model card / its training data record."""

    mode: Literal["auto", "vae", "pixel"] = Field("auto", description="auto: the kind recorded with the model")
    vae: str | None = Field(None, description="diffusers AutoencoderKL hub id or local path (latent models)")
    latent_scale: float | None = Field(None, gt=0.0, description="default: recorded with the model, else SD's")
    batch_size: int = Field(32, ge=1, description="latents per VAE decode call")


class SampleConfig(ConfigSection):
    """Everything that determines the images (fingerprinted) plus where and how they are written (not)."""

    checkpoint: StorageURL = Field(min_length=1, description="export / converted file / checkpoint (folder) URL")
    out: StorageURL = Field(min_length=1, description="output folder URL")
    num_samples: int = Field(50_000, ge=1)
    chunk_size: int = Field(250, ge=1, description="images per chunk file, a multiple of batch_size")
    batch_size: int = Field(125, ge=1, description="images per sampler batch (x2 rows with CFG)")
    seed: int = 0
    sampler: SamplerConfig = Field(default_factory=SamplerConfig)
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto", description="auto: bf16 where the device computes it natively, else fp32 (deepflow.precision)")
    labels: str = Field("cyclic", description="class models: cyclic | shuffled | label file (.npy/.txt/.json)")
    captions: str | None = Field(None, description="text models: 'dataset' (default) or a caption file URL")
    dataset: StorageURL | None = Field(None, description="text models: caption dataset URL (default: the training data)")
    text_batch_size: int = Field(256, ge=1, description="captions per text-encoder call")
    decode: DecodeConfig = Field(default_factory=DecodeConfig)
    png: bool = Field(False, description="also write png/NNNNNN.png")
    npz: bool = Field(True, description="assemble samples.npz")
    endpoint_url: str | None = Field(None, description="S3-compatible endpoint for s3:// URLs")
    storage_options: dict[str, Any] = Field(default_factory=dict, description="fsspec options (not recorded)")
    device: str | None = Field(None, description="default: cuda:LOCAL_RANK when available, else cpu")
    progress: bool = True

    @model_validator(mode="after")
    def _consistent(self) -> SampleConfig:
        if self.chunk_size % self.batch_size:
            raise ValueError(f"chunk_size: must be a multiple of batch_size ({self.batch_size}), got {self.chunk_size}")
        if not (self.png or self.npz):
            raise ValueError("npz: nothing to write: enable png and/or npz")
        return self

    def fingerprint(self) -> str:
        """Hash of the settings that determine the images (not the output, the files written, credentials)."""
        content: dict[str, Any] = {
            "checkpoint": self.checkpoint, "num_samples": self.num_samples, "chunk_size": self.chunk_size,
            "batch_size": self.batch_size, "method": self.sampler.method, "steps": self.sampler.steps,
            "cfg_scale": self.sampler.cfg_scale, "guidance_interval": list(self.sampler.guidance_interval),
            "labels": self.labels, "seed": self.seed, "decode": self.decode.mode, "vae": self.decode.vae,
            "latent_scale": self.decode.latent_scale, "precision": self.precision,
        }
        for key in ("captions", "dataset"):  # text models only: class-model fingerprints stay as they were
            if getattr(self, key) is not None:
                content[key] = getattr(self, key)
        return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()[:16]

    def storage_options_for(self, url: str) -> dict[str, Any]:
        return resolve_storage_options(url, self.storage_options, self.endpoint_url)

    def record(self) -> dict[str, Any]:
        """The settings as written to ``sampling.json`` (without storage options)."""
        return self.model_dump(mode="json", exclude={"storage_options"})


# ------------------------------------------------------------------------------------------------------ run
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


@dataclass
class _Pipeline:
    """The model, its condition plan and decoder: everything :func:`generate` needs, built from the config."""

    model: torch.nn.Module
    plan: ConditionPlan
    decoder: Decoder

    @classmethod
    def build(cls, config: SampleConfig, device: torch.device) -> _Pipeline:
        """Weights, condition plan and decoder; a user mistake in any is a ``UserError`` naming its field."""
        with _field("checkpoint"):
            options = config.storage_options_for(config.checkpoint)
            state, card = load_weights(config.checkpoint, options)
            model = build_model(state, card, device)
        with _field("labels" if card.condition == "class" else "captions"):
            plan = sampling_plan(
                model, card, num_samples=config.num_samples, seed=config.seed, labels=config.labels,
                captions=config.captions, dataset=config.dataset, text_batch_size=config.text_batch_size,
                storage_options=config.storage_options_for, device=device,
            )
        with _field("decode"):
            spec = DecodeSpec.resolve(config.decode.mode, vae=config.decode.vae, scale=config.decode.latent_scale,
                                      card=card, in_channels=model.in_channels)
            decoder = Decoder(spec, device, config.decode.batch_size)
        return cls(model, plan, decoder)

    def chunk(self, config: SampleConfig, first: int, last: int, on_batch: Callable[[int], None]) -> np.ndarray:
        """uint8 [last - first, H, W, C] images of samples first .. last - 1, batch by batch."""
        parts = []
        for start in range(first, last, config.batch_size):
            indices = np.arange(start, min(start + config.batch_size, last), dtype=np.int64)
            images = generate(self.model, self.plan, indices, seed=config.seed, sampler=config.sampler,
                              decoder=self.decoder, precision=config.precision)
            parts.append(images.permute(0, 2, 3, 1).numpy())
            on_batch(len(indices))
        return np.concatenate(parts)


#: the field paths of a SampleConfig: an error message starting with one already names its field
_FIELD_PATHS = frozenset([*SampleConfig.model_fields, *(f"sampler.{name}" for name in SamplerConfig.model_fields),
                          *(f"decode.{name}" for name in DecodeConfig.model_fields)])


@contextmanager
def _field(name: str) -> Iterator[None]:
    """Re-raise the user errors raised inside as :class:`UserError` ``<name>: <message>`` (unless the message
    starts with a field path already)."""
    try:
        yield
    except USER_ERRORS as error:
        message = describe(error)
        if message.split(":", 1)[0] not in _FIELD_PATHS:
            message = f"{name}: {message}"
        raise UserError(message) from error


def _log_precision(choice: PrecisionChoice, rank: int) -> None:
    """Rank 0 says which precision it samples in and why (after the inputs were checked: a mistake stays one line)."""
    if rank == 0:
        log.info("precision %s", choice.describe())
        if choice.warning:
            log.warning(choice.warning)


def run_sampling(
    config: SampleConfig,
    rank: int = 0,
    world_size: int = 1,
    device: torch.device | str = "cpu",
    wait_timeout_s: float = 24 * 3600.0,
) -> SampleResult:
    """Sample this rank's missing chunks; rank 0 then waits for all chunks and writes samples.npz. Nothing is
    written before the output folder, the weights, the condition plan and the decoder have been checked."""
    device = torch.device(device)
    precision = choose_precision(config.precision, device)  # resolved: what the fingerprint and sampling.json hold
    config = config.model_copy(update={"precision": precision.precision})
    samples = SampleSet(config.out, config.fingerprint(), config.storage_options_for(config.out))
    recorded = samples.check_settings()
    pipeline = _Pipeline.build(config, device)
    _log_precision(precision, rank)
    if rank == 0 and not recorded:
        samples.write_settings(config.record())
    if rank == 0 and (captions := pipeline.plan.captions_of(np.arange(config.num_samples))) is not None:
        samples.write_captions(captions)

    num_chunks = -(-config.num_samples // config.chunk_size)
    mine = list(range(rank, num_chunks, world_size))
    finished = samples.finished_chunks()
    todo = [c for c in mine if c not in finished]
    if len(todo) < len(mine):
        log.info("rank %d: %d of its %d chunks already exist; sampling %d", rank, len(mine) - len(todo), len(mine),
                 len(todo))
    total = sum(min(config.chunk_size, config.num_samples - c * config.chunk_size) for c in todo)
    bar = tqdm(total=total, unit="img", desc=f"sampling r{rank}", disable=not config.progress or rank != 0)
    start = time.perf_counter()
    for chunk in todo:
        first, last = chunk * config.chunk_size, min((chunk + 1) * config.chunk_size, config.num_samples)
        indices = np.arange(first, last, dtype=np.int64)
        images = pipeline.chunk(config, first, last, bar.update)
        samples.write_chunk(chunk, images, pipeline.plan.labels_of(indices), indices,
                            pipeline.plan.captions_of(indices), png=config.png)
    bar.close()
    result = SampleResult(len(todo), len(mine) - len(todo), total, time.perf_counter() - start, None)
    log.info("rank %d: %d images in %.1fs (%.2f img/s)", rank, total, result.seconds, result.images_per_second)
    if rank == 0 and config.npz:
        samples.wait_for_chunks(num_chunks, wait_timeout_s)
        result.npz_url = samples.assemble_npz(config.num_samples, num_chunks)
        log.info("wrote %s", result.npz_url)
    return result


# ------------------------------------------------------------------------------------------------------ CLI
#: flag dest -> SampleConfig field path
_FLAG_FIELDS = {
    "checkpoint": "checkpoint", "out": "out", "num_samples": "num_samples", "chunk_size": "chunk_size",
    "batch_size": "batch_size", "preset": "sampler.preset", "method": "sampler.method", "steps": "sampler.steps", "cfg_scale": "sampler.cfg_scale",
    "guidance_interval": "sampler.guidance_interval", "labels": "labels", "captions": "captions",
    "dataset": "dataset", "text_batch_size": "text_batch_size", "seed": "seed", "decode": "decode.mode",
    "vae": "decode.vae", "latent_scale": "decode.latent_scale", "vae_batch_size": "decode.batch_size",
    "precision": "precision", "png": "png", "npz": "npz", "endpoint_url": "endpoint_url", "device": "device",
    "progress": "progress",
}


def build_parser() -> argparse.ArgumentParser:
    """Flags default to None (= not given), so only the given ones override the config file."""
    p = JobArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="SampleConfig YAML (local path or storage URL)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="FIELD=VALUE",
                   help="dotted override, value parsed as YAML (repeatable): --set sampler.steps=50")
    p.add_argument("--checkpoint", help="checkpoint: export folder / .safetensors / checkpoint (folder) URL")
    p.add_argument("--out", help="out: output folder URL")
    p.add_argument("--num-samples", type=int, help="num_samples (default 50000)")
    p.add_argument("--chunk-size", type=int, help="chunk_size: images per chunk file (default 250)")
    p.add_argument("--batch-size", type=int, help="batch_size: images per sampler batch (default 125)")
    p.add_argument("--preset", choices=tuple(PRESETS), help="sampler.preset: paper (SDE 250, for reported FID) or fast "
                   "(25 forward passes per image); fills the sampler fields that the config and flags leave unset")
    p.add_argument("--method", choices=METHODS, help="sampler.method (default sde)")
    p.add_argument("--steps", type=int, help="sampler.steps (default 250)")
    p.add_argument("--cfg-scale", type=float, help="sampler.cfg_scale (default 1.0)")
    p.add_argument("--guidance-interval", type=float, nargs=2, metavar=("LOW", "HIGH"),
                   help="sampler.guidance_interval (default 0 1)")
    p.add_argument("--labels", help="labels: cyclic | shuffled | label file (.npy/.txt/.json)")
    p.add_argument("--captions", help="captions (text models): caption file (.txt / .json list) or 'dataset'")
    p.add_argument("--dataset", help="dataset (text models): caption dataset URL")
    p.add_argument("--text-batch-size", type=int, help="text_batch_size: captions per text-encoder call")
    p.add_argument("--seed", type=int, help="seed (default 0)")
    p.add_argument("--decode", choices=("auto", "vae", "pixel"), help="decode.mode (default auto)")
    p.add_argument("--vae", help="decode.vae: diffusers AutoencoderKL hub id or local path")
    p.add_argument("--latent-scale", type=float, help="decode.latent_scale (default: recorded, else 0.18215)")
    p.add_argument("--vae-batch-size", type=int, help="decode.batch_size (default 32)")
    p.add_argument("--precision", choices=PRECISIONS,
                   help="precision (default auto: bf16 where the device computes it natively, else fp32)")
    p.add_argument("--png", action="store_const", const=True, help="png: also write <out>/png/NNNNNN.png")
    p.add_argument("--no-npz", dest="npz", action="store_const", const=False, help="npz: false")
    p.add_argument("--endpoint-url", help="endpoint_url: S3-compatible endpoint")
    p.add_argument("--device", help="device (default: cuda:LOCAL_RANK when available, else cpu)")
    p.add_argument("--no-progress", dest="progress", action="store_const", const=False, help="progress: false")
    return p


def load_config(args: argparse.Namespace) -> SampleConfig:
    """The config file, then ``--set`` overrides, then the flags given."""
    flags = flag_overrides({field: getattr(args, dest) for dest, field in _FLAG_FIELDS.items()})
    return load_validated(SampleConfig, args.config, [*args.overrides, *flags])


def main(argv: list[str] | None = None) -> int:
    """Exit status: 0 done, 2 a user mistake (one ``error:`` line). The rank comes from torchrun's or a Kubernetes
    Indexed Job's environment (:func:`deepflow.ranks.read_dist_env`)."""

    def body() -> int:
        args = build_parser().parse_args(argv)
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        config = load_config(args)
        where = read_dist_env()
        device = config.device or (
            f"cuda:{where.local_rank % torch.cuda.device_count()}" if torch.cuda.is_available() else "cpu")
        result = run_sampling(config, where.rank, where.world_size, device)
        print(f"rank {where.rank}/{where.world_size}: sampled {result.chunks_done} chunks ({result.images} images, "
              f"{result.images_per_second:.2f} img/s), skipped {result.chunks_skipped}"
              + (f"; wrote {result.npz_url}" if result.npz_url else ""), flush=True)
        return 0

    return report_user_errors(body)


if __name__ == "__main__":
    sys.exit(main())
