"""In-training evaluation: a sample grid from the EMA weights (TensorBoard image + PNG) and a Frechet distance in
the features of a configured extractor (``deepflow.platform.eval.extractors.build_extractor``); for text-to-image models
also the CLIP score of the samples against their captions (``eval.clip_model``, open_clip).

Samples use a fixed noise/label draw (seeded by run.seed) so grids of successive evaluations are comparable;
labels cycle through the classes. Text models are conditioned on the captions of the first ``eval.num_samples``
samples of the training shards (manifest order, first caption of each, with its stored embedding; see
``deepflow.platform.inference.prompts.dataset_prompts``), guided against the dataset's null text; the grid's captions go
to TensorBoard as text. Pixel datasets map [-1, 1] -> uint8; latent datasets are decoded with the
diffusers ``AutoencoderKL`` named by ``eval.vae`` (latents / manifest latent_scale). The reference statistics are
read from ``eval.reference``: an ``.npz`` with ``mu``/``sigma``, an ``.npz`` of uint8 images (``arr_0``, NHWC or
NCHW), or ``data``: the first ``reference_samples`` images of the training shards (pixel datasets).

By default rank 0 does everything; with ``eval.all_ranks`` every rank samples its share of ``num_samples`` and the
features are gathered to rank 0 (the full EMA weights are broadcast first).
"""

from __future__ import annotations

import io
import math
from typing import Any

import fsspec
import numpy as np
import torch
import torch.distributed as dist

from deepflow.artifacts import Manifest
from deepflow.platform.train.config import RunConfig, storage_options_for
from deepflow.platform.train.distributed import DistContext
from deepflow.platform.train.tb_logging import TrainLogger

__all__ = ["Evaluator", "to_uint8", "make_grid_uint8"]


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] float [B,C,H,W] -> uint8 [B,C,H,W]."""
    return ((images.float().clamp(-1.0, 1.0) + 1.0) * 127.5).round().to(torch.uint8)


def make_grid_uint8(images: torch.Tensor, max_images: int) -> torch.Tensor:
    """uint8 [B,C,H,W] -> one uint8 grid [3,H',W'] of the first ``max_images`` (square-ish layout)."""
    from torchvision.utils import make_grid

    images = images[:max_images]
    if images.shape[1] == 1:
        images = images.expand(-1, 3, -1, -1)
    rows = max(1, int(math.ceil(math.sqrt(images.shape[0]))))
    return make_grid(images, nrow=rows, padding=1, pad_value=0)


class Evaluator:
    """Periodic evaluation of one run (see module doc)."""

    def __init__(
        self, cfg: RunConfig, ctx: DistContext, logger: TrainLogger, manifest: Manifest | None = None
    ) -> None:
        self.cfg = cfg
        self.ctx = ctx
        self.logger = logger
        self.manifest = manifest
        self.is_latent = manifest is not None and manifest.kind == "vae"
        self.active = ctx.is_main or cfg.eval.all_ranks
        self.model: torch.nn.Module | None = None
        self.extractor: Any = None
        self.reference: tuple[np.ndarray, np.ndarray] | None = None
        self.vae: Any = None
        self.prompts: Any = None  # text_eval.Prompts of the text models
        self.null_text: dict[str, torch.Tensor] | None = None
        self.clip: Any = None
        self.is_text = cfg.model.is_text
        self.prompt_offset = 0
        self.reference_storage_options = storage_options_for(
            cfg.eval.reference or "", cfg.checkpoint.storage_options, cfg.data.resolved_storage_options()
        )
        if not self.active:
            return
        from deepflow.models import create_model

        self.model = create_model(cfg.model.name, **cfg.model.create_kwargs()).to(ctx.device).eval()
        self.model.requires_grad_(False)
        self.is_text = getattr(self.model, "conditioning", "class") == "text"
        if self.is_text:
            from deepflow.platform.inference.prompts import dataset_prompts, read_null_text

            storage = cfg.data.resolved_storage_options()
            offset, count = self._share()
            self.prompt_offset = offset  # this rank's prompts only (float16 embeddings as stored)
            self.prompts = dataset_prompts(cfg.data.url, max(count, 1), storage, start=offset)
            self.null_text = read_null_text(cfg.data.url, storage, manifest.to_json() if manifest else None)
            if cfg.eval.clip_model:
                from deepflow.platform.eval.clip_score import ClipScorer

                self.clip = ClipScorer(*_load_clip(cfg, ctx.device), batch_size=cfg.eval.clip_batch_size)
        if cfg.eval.extractor:
            from deepflow.platform.eval.extractors import build_extractor

            self.extractor = build_extractor(cfg.eval.extractor, **cfg.eval.extractor_options)
            if hasattr(self.extractor, "to"):
                self.extractor = self.extractor.to(ctx.device)

    # ------------------------------------------------------------------------------------------- decode
    def _decode(self, x: torch.Tensor) -> torch.Tensor:
        """Model-space samples [B,C,H,W] -> uint8 images."""
        if not self.is_latent:
            return to_uint8(x)
        if self.vae is None:
            if not self.cfg.eval.vae:
                raise ValueError("eval.vae: latent datasets need a VAE (diffusers AutoencoderKL id or path) to decode")
            from diffusers import AutoencoderKL

            self.vae = AutoencoderKL.from_pretrained(self.cfg.eval.vae).to(self.ctx.device).eval()
        scale = float(self.manifest.latent_scale or 0.18215) if self.manifest else 0.18215
        with torch.no_grad():
            images = self.vae.decode(x.to(self.ctx.device) / scale).sample
        return to_uint8(images)

    # -------------------------------------------------------------------------------------------- reference
    def _features(self, images: torch.Tensor) -> np.ndarray:
        feats = []
        batch = self.cfg.eval.batch_size
        with torch.no_grad():
            for start in range(0, images.shape[0], batch):
                chunk = images[start : start + batch].to(self.ctx.device)
                feats.append(torch.as_tensor(self.extractor(chunk)).float().cpu())
        return torch.cat(feats).numpy().astype(np.float64)

    def _reference_stats(self) -> tuple[np.ndarray, np.ndarray] | None:
        from deepflow.platform.eval.metrics import feature_statistics

        reference = self.cfg.eval.reference
        if reference is None:  # an extractor with its own reference set (the small-data classifier)
            stats = getattr(self.extractor, "reference_stats", None)
            return None if stats is None else (np.asarray(stats[0], np.float64), np.asarray(stats[1], np.float64))
        if reference == "data":
            return feature_statistics(self._features(self._data_images(self.cfg.eval.reference_samples)))
        with fsspec.open(reference, "rb", **self.reference_storage_options) as handle:
            payload = np.load(io.BytesIO(handle.read()), allow_pickle=False)
        if "mu" in payload and "sigma" in payload:
            return np.asarray(payload["mu"], np.float64), np.asarray(payload["sigma"], np.float64)
        key = "arr_0" if "arr_0" in payload else payload.files[0]
        images = _as_nchw_uint8(payload[key][: self.cfg.eval.reference_samples])
        return feature_statistics(self._features(images))

    def _data_images(self, count: int) -> torch.Tensor:
        from deepflow.data_pipeline.loader import ShardLoader

        if self.is_latent:
            raise ValueError("eval.reference=data needs a pixel dataset; give an npz of reference images/statistics")
        loader = ShardLoader(
            self.cfg.data.url, batch_size=min(count, 256), rank=0, world_size=1, num_workers=0,
            shuffle_buffer=0, seed=self.cfg.run.seed + 1, flip=False,
            storage_options=self.cfg.data.resolved_storage_options(),
        )
        images, total = [], 0
        for batch in loader:
            images.append(to_uint8(batch["x"]))
            total += batch["x"].shape[0]
            if total >= count:
                break
        loader.close()
        return torch.cat(images)[:count]

    # ------------------------------------------------------------------------------------------------ run
    def _broadcast_weights(self, weights: dict[str, torch.Tensor] | None) -> dict[str, torch.Tensor]:
        box = [weights]
        dist.broadcast_object_list(box, src=0)
        assert box[0] is not None
        return box[0]

    def _samples(self, count: int, offset: int) -> tuple[torch.Tensor, torch.Tensor | list[str]]:
        """uint8 samples [count,C,H,W] for sample indices offset..offset+count-1, with their labels [count] (class
        models) or captions (text models)."""
        assert self.model is not None
        from deepflow.models.conditions import condition_to
        from deepflow.models.sampling import sample

        cfg = self.cfg
        model = self.model
        shape = (model.in_channels, model.input_size, model.input_size)
        out: list[torch.Tensor] = []
        labels: list[torch.Tensor] = []
        captions: list[str] = []
        for start in range(offset, offset + count, cfg.eval.batch_size):
            stop = min(start + cfg.eval.batch_size, offset + count)
            generator = torch.Generator(device="cpu").manual_seed(cfg.run.seed * 1_000_003 + start)
            noise = torch.randn((stop - start, *shape), generator=generator).to(self.ctx.device)
            if self.is_text:
                prompts = self.prompts.select(range(start - self.prompt_offset, stop - self.prompt_offset))
                y: Any = condition_to(prompts.cond, self.ctx.device, dtype=torch.float32)
                null: Any = self.null_text
                captions.extend(prompts.captions)
            else:
                y = (torch.arange(start, stop) % model.num_classes).to(self.ctx.device)
                null = None
                labels.append(y.cpu())
            with torch.no_grad():
                x0 = sample(
                    model, noise, y, method=cfg.eval.sampler.method, steps=cfg.eval.sampler.steps,
                    cfg_scale=cfg.eval.sampler.cfg_scale, guidance_interval=tuple(cfg.eval.sampler.guidance_interval),
                    null_label=model.num_classes, generator=generator, null_condition=null,
                )
            out.append(self._decode(x0).cpu())
        images = torch.cat(out) if out else torch.zeros((0, 3, *shape[1:]), dtype=torch.uint8)
        if self.is_text:
            return images, captions
        return images, torch.cat(labels) if labels else torch.zeros(0, dtype=torch.long)

    def _share(self) -> tuple[int, int]:
        """(first sample index, sample count) of this rank: all of ``eval.num_samples`` on rank 0, or an equal share
        of them per rank with ``eval.all_ranks``."""
        cfg = self.cfg
        world = self.ctx.world_size if (cfg.eval.all_ranks and self.ctx.distributed) else 1
        rank = self.ctx.rank if world > 1 else 0
        per_rank = int(math.ceil(cfg.eval.num_samples / world))
        offset = rank * per_rank
        return offset, max(0, min(per_rank, cfg.eval.num_samples - offset))

    def run(self, weights: dict[str, torch.Tensor] | None, step: int) -> dict[str, float]:
        """Collective when ``eval.all_ranks``. ``weights``: full EMA weights on rank 0 (None elsewhere)."""
        cfg = self.cfg
        if cfg.eval.all_ranks and self.ctx.distributed:
            weights = self._broadcast_weights(weights)
        if not self.active:
            return {}
        assert self.model is not None and weights is not None
        self.model.load_state_dict({k: v.to(self.ctx.device) for k, v in weights.items()})
        world = self.ctx.world_size if (cfg.eval.all_ranks and self.ctx.distributed) else 1
        rank = self.ctx.rank if world > 1 else 0
        offset, count = self._share()
        images, labels = self._samples(count, offset)
        metrics: dict[str, float] = {}
        feats = self._features(images) if self.extractor is not None and len(images) else None
        clip_scores = self.clip(images, labels) if self.clip is not None and len(images) else None
        if world > 1:
            box: list[Any] = [None] * world
            dist.all_gather_object(box, (images[: cfg.eval.grid_size] if rank == 0 else None, feats, clip_scores))
            if self.extractor is not None:
                feats = np.concatenate([part[1] for part in box if part[1] is not None and len(part[1])])
            if self.clip is not None:
                clip_scores = torch.cat([part[2] for part in box if part[2] is not None])
        if not self.ctx.is_main:
            return {}
        grid = make_grid_uint8(images, cfg.eval.grid_size)
        self.logger.image("eval/samples", grid, step)
        self._write_png(grid, step)
        if self.is_text:
            shown = labels[: min(cfg.eval.grid_size, len(labels))]
            self.logger.text("eval/captions", "\n".join(f"{i}. {c}" for i, c in enumerate(shown, 1)), step)
        if clip_scores is not None:
            metrics["eval/clip_score"] = float(clip_scores.float().mean())
        if feats is not None:
            from deepflow.platform.eval.metrics import feature_statistics, frechet_distance

            if self.reference is None:
                self.reference = self._reference_stats()
            if self.reference is not None and feats.shape[0] >= 2:
                mu, sigma = feature_statistics(feats)
                fd = float(frechet_distance(mu, sigma, *self.reference))
                metrics[f"eval/fd_{cfg.eval.extractor}"] = fd
            if hasattr(self.extractor, "class_accuracy") and world == 1 and not self.is_text:  # of the labels
                metrics["eval/class_accuracy"] = self.extractor.class_accuracy(feats, labels)
        if metrics:
            self.logger.scalars(step, metrics)
        return metrics

    def _write_png(self, grid: torch.Tensor, step: int) -> None:
        from PIL import Image

        url = f"{self.cfg.run.output_dir.rstrip('/')}/samples/step-{step:07d}.png"
        fs, path = fsspec.core.url_to_fs(url, **self.cfg.output_storage_options())
        fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
        buffer = io.BytesIO()
        Image.fromarray(grid.permute(1, 2, 0).numpy()).save(buffer, format="PNG")
        with fs.open(path, "wb") as handle:
            handle.write(buffer.getvalue())


def _load_clip(cfg: RunConfig, device: torch.device) -> tuple[Any, Any]:
    """(open_clip model, tokenizer) of ``eval.clip_model`` / ``eval.clip_pretrained`` / ``eval.clip_model_kwargs``."""
    from deepflow.platform.eval.clip_score import load_clip

    try:
        return load_clip(cfg.eval.clip_model, cfg.eval.clip_pretrained, device, **cfg.eval.clip_model_kwargs)
    except Exception as error:  # noqa: BLE001 - re-raised with the config fields that chose the model
        raise ValueError(
            f"eval.clip_model: cannot build open_clip {cfg.eval.clip_model!r} (eval.clip_pretrained="
            f"{cfg.eval.clip_pretrained!r}): {error}"
        ) from error


def _as_nchw_uint8(images: np.ndarray) -> torch.Tensor:
    """uint8 images NHWC / NCHW / NHW -> uint8 tensor [N,C,H,W]."""
    array = np.asarray(images)
    if array.dtype != np.uint8:
        raise ValueError(f"eval.reference: images must be uint8, got {array.dtype}")
    if array.ndim == 3:
        array = array[:, None]
    elif array.ndim == 4 and array.shape[-1] in (1, 3) and array.shape[1] not in (1, 3):
        array = array.transpose(0, 3, 1, 2)
    return torch.from_numpy(np.ascontiguousarray(array))
