"""In-training evaluation: a sample grid from the EMA weights (TensorBoard image + PNG under
``<output_dir>/samples``) and a Frechet distance in the features of a configured extractor
(``deepflow.platform.eval.extractors.build_extractor``); for text-to-image models also the CLIP score of the samples
against their captions (``eval.clip_model``, open_clip).

Samples come from the one generate path of ``deepflow.platform.inference.generate``: sample ``i`` is a function of
(run.seed, i), so grids of successive evaluations are comparable and ``eval.all_ranks`` does not change them. The
condition plan (``inference.conditions.dataset_plan``) conditions sample ``i`` like the training data: class
``i % num_classes``, or, for text models, the first caption of training sample ``i`` (manifest order, with its
stored embedding) guided against the dataset's null text; the grid's captions go to TensorBoard as text. Latent
datasets are decoded with ``eval.vae`` (default: the VAE the manifest records) at the manifest's latent scale.
The reference statistics are read from ``eval.reference``: an ``.npz`` with ``mu``/``sigma``, an ``.npz`` of uint8
images (``arr_0``, NHWC or NCHW), or ``data``: the first ``reference_samples`` images of the training shards (pixel
datasets); without a reference, an extractor that carries its own (the small-data classifier) is used.

By default rank 0 does everything; with ``eval.all_ranks`` every rank samples its share of ``num_samples`` and the
features are gathered to rank 0 (the full EMA weights are broadcast first, tensor by tensor into every rank's
evaluation model as they are gathered: no rank holds a gathered copy of the model beside it).
"""

from __future__ import annotations

import io
import math
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from deepflow.artifacts import Manifest
from deepflow.platform.eval.evaluator import ReferenceBatch, reference_stat_keys
from deepflow.platform.eval.extractors import LabelScorer, SelfReferencedExtractor, build_extractor
from deepflow.platform.inference.conditions import dataset_plan
from deepflow.platform.inference.generate import DecodeSpec, Decoder, generate, to_uint8
from deepflow.platform.inference.prompts import DatasetHandle
from deepflow.platform.train.config import RunConfig, storage_options_for
from deepflow.platform.train.distributed import DistContext
from deepflow.platform.train.tb_logging import TrainLogger, console_logger
from deepflow.storage import join_url, read_url_bytes, write_url_bytes

__all__ = ["EvalSamples", "Evaluator", "Weights", "eval_line", "make_grid_uint8"]

#: full weights for an evaluation: a dict, None (ranks other than 0), or (name, tensor | None) pairs as they are
#: gathered (``Trainer.ema_weights``)
Weights = Mapping[str, torch.Tensor] | Iterable[tuple[str, "torch.Tensor | None"]] | None


def eval_line(step: int, metrics: dict[str, float], num_samples: int, seconds: float) -> str:
    """The console line of one evaluation: ``eval step 500: fd_classifier 19.3, class_accuracy 0.6 (250 samples,
    12.5 s)``."""
    values = ", ".join(f"{name.removeprefix('eval/')} {value:.4g}" for name, value in sorted(metrics.items()))
    return f"eval step {step}: {values or 'sample grid written'} ({num_samples} samples, {seconds:.1f} s)"


def make_grid_uint8(images: torch.Tensor, max_images: int) -> torch.Tensor:
    """uint8 [B,C,H,W] -> one uint8 grid [3,H',W'] of the first ``max_images`` (square-ish layout)."""
    from torchvision.utils import make_grid

    images = images[:max_images]
    if images.shape[1] == 1:
        images = images.expand(-1, 3, -1, -1)
    rows = max(1, int(math.ceil(math.sqrt(images.shape[0]))))
    return make_grid(images, nrow=rows, padding=1, pad_value=0)


@dataclass
class EvalSamples:
    """One rank's evaluation samples: ``images`` uint8 [n,C,H,W], ``labels`` int64 [n] (-1 for text models) and
    ``captions`` (text models) or None."""

    images: torch.Tensor
    labels: torch.Tensor
    captions: list[str] | None


class Evaluator:
    """Periodic evaluation of one run (see module doc)."""

    def __init__(
        self, cfg: RunConfig, ctx: DistContext, logger: TrainLogger, manifest: Manifest | None = None
    ) -> None:
        self.cfg = cfg
        self.ctx = ctx
        self.logger = logger
        self.manifest = manifest
        self.active = ctx.is_main or cfg.eval.all_ranks
        self.model: torch.nn.Module | None = None
        self.extractor: Any = None
        self.reference: tuple[np.ndarray, np.ndarray] | None = None
        self.clip: Any = None
        self.reference_storage_options = storage_options_for(
            cfg.eval.reference or "", cfg.checkpoint.storage_options, cfg.data.resolved_storage_options()
        )
        if not self.active:
            return
        from deepflow.models import create_model

        self.model = create_model(cfg.model.name, **cfg.model.create_kwargs()).to(ctx.device).eval()
        self.model.requires_grad_(False)
        offset, count = self._share()
        data_options = cfg.data.resolved_storage_options()
        # the trainer's manifest (the loader read it) is not read again; without one the URL is opened if needed
        dataset = DatasetHandle(cfg.data.url, data_options, manifest) if manifest is not None else cfg.data.url
        self.plan = dataset_plan(self.model, dataset, offset, count, data_options)
        spec = DecodeSpec.resolve(vae=cfg.eval.vae, manifest=manifest, in_channels=self.model.in_channels)
        self.decoder = Decoder(spec, ctx.device, cfg.eval.batch_size, field="eval.vae")
        if cfg.eval.clip_model:  # the config allows it for text models only
            from deepflow.platform.eval.clip_score import ClipScorer

            self.clip = ClipScorer(*_load_clip(cfg, ctx.device), batch_size=cfg.eval.clip_batch_size)
        if cfg.eval.extractor:
            self.extractor = build_extractor(cfg.eval.extractor, device=ctx.device, **cfg.eval.extractor_options)

    # -------------------------------------------------------------------------------------------- reference
    def _features(self, images: torch.Tensor) -> np.ndarray:
        """uint8 [N,C,H,W] -> float64 features [N, dim], in batches of ``eval.batch_size``."""
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
            if not isinstance(self.extractor, SelfReferencedExtractor):
                return None
            mu, sigma = self.extractor.reference_stats
            return np.asarray(mu, np.float64), np.asarray(sigma, np.float64)
        if reference == "data":
            return feature_statistics(self._features(self._data_images(self.cfg.eval.reference_samples)))
        payload = np.load(io.BytesIO(read_url_bytes(reference, self.reference_storage_options)), allow_pickle=False)
        keys = reference_stat_keys(self.extractor.name)  # Inception: the ADM mu / sigma; others: mu_<name> ...
        if all(key in payload for key in keys):  # checked against the extractor's feature size
            stored = ReferenceBatch(stats={key: payload[key] for key in keys}, url=reference)
            return stored.statistics(self.extractor.name, self.extractor.dim)
        if "arr_0" not in payload and any(name.startswith("mu") for name in payload.files):
            raise ValueError(f"eval.reference: {reference} holds statistics {sorted(payload.files)} but no images and "
                             f"no {'/'.join(keys)} for the {self.extractor.name} extractor")
        key = "arr_0" if "arr_0" in payload else payload.files[0]
        images = _as_nchw_uint8(payload[key][: self.cfg.eval.reference_samples])
        return feature_statistics(self._features(images))

    def _data_images(self, count: int) -> torch.Tensor:
        """uint8 [count,C,H,W]: the first ``count`` training images (pixel datasets)."""
        from deepflow.data_pipeline.loader import ShardLoader

        if self.manifest is not None and self.manifest.kind == "vae":
            raise ValueError("eval.reference: 'data' needs a pixel dataset; give an npz of reference images/statistics")
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
    def load_weights(self, weights: Weights) -> None:
        """Copy full weights into the evaluation model, one tensor at a time: ``weights`` is a dict (rank 0), None
        (other ranks), or (name, tensor | None) pairs produced as a gather runs (``Trainer.ema_weights``: rank 0's
        tensors, None elsewhere; every rank consumes it to its end). With ``eval.all_ranks`` each tensor is
        broadcast from rank 0 straight into every rank's parameter. Memory: the model, plus one tensor in flight."""
        broadcast = self.cfg.eval.all_ranks and self.ctx.distributed
        targets = dict(self.model.state_dict()) if self.model is not None else {}
        if weights is None or isinstance(weights, Mapping):
            given = weights
            names = list(targets) if self.model is not None else []
            pairs: Iterable[tuple[str, torch.Tensor | None]] = (
                (name, None if given is None else given.get(name)) for name in names
            )
        else:
            pairs = weights
        seen: set[str] = set()
        for name, tensor in pairs:
            target = targets.get(name)
            if target is None:
                if self.model is not None:
                    raise KeyError(f"evaluation weights: {name} is not a tensor of {self.cfg.model.name}")
                continue
            if self.ctx.is_main:
                if tensor is None:
                    raise KeyError(f"evaluation weights: {name} missing")
                target.copy_(tensor)
            if broadcast:
                dist.broadcast(target, src=0)
            seen.add(name)
        missing = sorted(set(targets) - seen)
        if missing and (self.ctx.is_main or broadcast):
            raise KeyError(f"evaluation weights: missing {missing[:5]}")

    def samples(self, count: int, offset: int) -> EvalSamples:
        """Samples ``offset`` .. ``offset + count - 1`` of the current weights, ``eval.batch_size`` at a time."""
        assert self.model is not None
        model, batch = self.model, self.cfg.eval.batch_size
        parts = [
            generate(model, self.plan, np.arange(start, min(start + batch, offset + count), dtype=np.int64),
                     seed=self.cfg.run.seed, sampler=self.cfg.eval.sampler, decoder=self.decoder)
            for start in range(offset, offset + count, batch)
        ]
        indices = np.arange(offset, offset + count, dtype=np.int64)
        empty = torch.zeros((0, 3, model.input_size, model.input_size), dtype=torch.uint8)
        return EvalSamples(torch.cat(parts) if parts else empty, torch.from_numpy(self.plan.labels_of(indices)),
                           self.plan.captions_of(indices))

    def _share(self) -> tuple[int, int]:
        """(first sample index, sample count) of this rank: all of ``eval.num_samples`` on rank 0, or an equal share
        of them per rank with ``eval.all_ranks``."""
        cfg = self.cfg
        world = self._world()
        rank = self.ctx.rank if world > 1 else 0
        per_rank = int(math.ceil(cfg.eval.num_samples / world))
        offset = rank * per_rank
        return offset, max(0, min(per_rank, cfg.eval.num_samples - offset))

    def _world(self) -> int:
        return self.ctx.world_size if (self.cfg.eval.all_ranks and self.ctx.distributed) else 1

    def run(self, weights: Weights, step: int) -> dict[str, float]:
        """Collective when ``eval.all_ranks`` (or when ``weights`` is a collective gather). ``weights``: the full
        EMA weights on rank 0 (see :meth:`load_weights`)."""
        started = time.perf_counter()
        with torch.no_grad():
            self.load_weights(weights)
        if not self.active:
            return {}
        assert self.model is not None
        offset, count = self._share()
        batch = self.samples(count, offset)
        feats = self._features(batch.images) if self.extractor is not None and len(batch.images) else None
        clip_scores = self.clip(batch.images, batch.captions) if self.clip is not None and len(batch.images) else None
        labels = batch.labels
        if self._world() > 1:
            feats, clip_scores, labels = self._gather(feats, clip_scores, labels)
        if not self.ctx.is_main:
            return {}
        self._log_grid(batch, step)
        metrics: dict[str, float] = {}
        if clip_scores is not None:
            metrics["eval/clip_score"] = float(clip_scores.float().mean())
        if feats is not None:
            metrics.update(self._feature_metrics(feats, labels, batch.captions is None))
        if metrics:
            self.logger.scalars(step, metrics)
        console_logger(self.ctx.rank).info(eval_line(step, metrics, len(labels), time.perf_counter() - started))
        return metrics

    def _gather(self, feats: np.ndarray | None, clip_scores: torch.Tensor | None, labels: torch.Tensor
                ) -> tuple[np.ndarray | None, torch.Tensor | None, torch.Tensor]:
        """Every rank's features, CLIP scores and labels, concatenated in rank order (on every rank)."""
        box: list[Any] = [None] * self._world()
        dist.all_gather_object(box, (feats, clip_scores, labels))
        if feats is not None:
            feats = np.concatenate([part[0] for part in box if part[0] is not None and len(part[0])])
        if clip_scores is not None:
            clip_scores = torch.cat([part[1] for part in box if part[1] is not None])
        labels = torch.cat([part[2] for part in box])
        return feats, clip_scores, labels

    def _feature_metrics(self, feats: np.ndarray, labels: torch.Tensor, class_labels: bool) -> dict[str, float]:
        """Frechet distance to the reference; class accuracy of the labels when the extractor classifies."""
        from deepflow.platform.eval.metrics import feature_statistics, frechet_distance

        metrics: dict[str, float] = {}
        if self.reference is None:
            self.reference = self._reference_stats()
        if self.reference is not None and feats.shape[0] >= 2:
            mu, sigma = feature_statistics(feats)
            metrics[f"eval/fd_{self.cfg.eval.extractor}"] = float(frechet_distance(mu, sigma, *self.reference))
        if class_labels and isinstance(self.extractor, LabelScorer) and len(labels) == feats.shape[0]:
            metrics["eval/class_accuracy"] = float(self.extractor.class_accuracy(feats, labels))
        return metrics

    def _log_grid(self, batch: EvalSamples, step: int) -> None:
        """The grid of rank 0's first ``eval.grid_size`` samples: TensorBoard image, PNG, captions as text."""
        grid = make_grid_uint8(batch.images, self.cfg.eval.grid_size)
        self.logger.image("eval/samples", grid, step)
        self._write_png(grid, step)
        if batch.captions is not None:
            shown = batch.captions[: self.cfg.eval.grid_size]
            self.logger.text("eval/captions", "\n".join(f"{i}. {c}" for i, c in enumerate(shown, 1)), step)

    def _write_png(self, grid: torch.Tensor, step: int) -> None:
        """``<run.output_dir>/samples/step-NNNNNNN.png`` (atomic, any storage)."""
        from PIL import Image

        buffer = io.BytesIO()
        Image.fromarray(grid.permute(1, 2, 0).numpy()).save(buffer, format="PNG")
        url = join_url(self.cfg.run.output_dir, f"samples/step-{step:07d}.png")
        write_url_bytes(url, buffer.getvalue(), self.cfg.output_storage_options())


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
