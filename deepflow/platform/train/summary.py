"""The startup summary of a training run: what is about to train, where, on what, and where its outputs go.

    for line in startup_summary(trainer):   # rank 0, once the Trainer is built
        log.info(line)

Everything comes from the built :class:`~deepflow.platform.train.trainer.Trainer` (its resolved config, process
context, engine, loader manifest, checkpoint and TensorBoard URLs), so the summary is right after
``Trainer.__init__`` and at any later point. It runs no collective and does not touch the random number generators
(the parameter count builds the model on the meta device inside ``torch.random.fork_rng``).
"""
from __future__ import annotations

import os
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from deepflow.artifacts import Manifest
    from deepflow.platform.train.config import RunConfig
    from deepflow.platform.train.trainer import Trainer

__all__ = ["format_count", "parameter_count", "startup_summary"]


def format_count(count: int) -> str:
    """``681559344`` -> ``"681.56M"``; small counts stay whole."""
    for unit, size in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if count >= size:
            return f"{count / size:.2f}{unit}"
    return str(count)


def parameter_count(cfg: RunConfig) -> int:
    """Parameters of the run's model (every rank's shards together), counted on the meta device: no memory, no
    random numbers drawn."""
    from deepflow.models import create_model

    with torch.random.fork_rng(devices=[]), torch.device("meta"):
        model = create_model(cfg.model.name, **cfg.model.create_kwargs())
    return sum(param.numel() for param in model.parameters())


def _model_line(cfg: RunConfig) -> str:
    spec = cfg.model.spec
    depth = cfg.model.depth or spec.depth
    size = cfg.model.input_size
    if cfg.model.is_text:
        condition = "text-conditional"
    else:
        condition = f"class-conditional ({cfg.model.num_classes} classes)"
    ssl = ", SSL alignment" if cfg.model.ssl_align else ""
    return (f"model       {cfg.model.name}: {format_count(parameter_count(cfg))} parameters, "
            f"{spec.num_branches} branch{'es' if spec.num_branches != 1 else ''}, depth {depth}, "
            f"input {cfg.model.in_channels}x{size}x{size}, {condition}{ssl}")


def _devices(trainer: Trainer) -> str:
    ctx = trainer.ctx
    if ctx.device.type == "cuda":
        return f"{torch.cuda.get_device_name(ctx.device)} ({ctx.device}, {torch.cuda.device_count()} visible)"
    return str(ctx.device)


def _engine_line(trainer: Trainer) -> str:
    cfg = trainer.cfg
    engine = cfg.distributed.engine + (f" ZeRO-{cfg.distributed.zero_stage}" if cfg.distributed.engine == "deepspeed"
                                       else "")
    sharded = ", sharded parameters" if trainer.engine.sharded_params else ""
    compiled = ", torch.compile" if cfg.distributed.compile_on(trainer.ctx.device.type) else ""
    return f"engine      {engine}{sharded}{compiled}, precision {trainer.precision.describe()}"


def _world_line(trainer: Trainer) -> str:
    ctx = trainer.ctx
    backend = f", backend {ctx.backend}" if ctx.backend else ""
    local = os.environ.get("LOCAL_WORLD_SIZE") or os.environ.get("LOCAL_SIZE")
    per_node = f" ({local} per node)" if local and ctx.world_size > 1 else ""
    return (f"world       {ctx.world_size} rank{'s' if ctx.world_size != 1 else ''}{per_node}{backend}, "
            f"device {_devices(trainer)}, CPU threads {torch.get_num_threads()} per rank")


def _data_line(cfg: RunConfig, manifest: Manifest | None) -> str:
    if manifest is None:
        return f"data        {cfg.data.url}"
    condition = "captions" if manifest.condition == "text" else f"{manifest.num_classes} classes"
    shape = "x".join(str(n) for n in manifest.shape)
    return (f"data        {cfg.data.url}: {manifest.num_samples} samples in {len(manifest.shards)} shards, "
            f"{manifest.kind} {shape}, {condition}")


def _schedule_lines(trainer: Trainer) -> list[str]:
    cfg, world = trainer.cfg, trainer.ctx.world_size
    accumulation = cfg.schedule.grad_accumulation
    micro = cfg.per_rank_batch_size(world)
    accumulated = f" x {accumulation} accumulation" if accumulation > 1 else ""
    start = f", from step {trainer.step}" if trainer.step else ""
    evaluation = "off"
    if cfg.eval.every:
        what = cfg.eval.extractor or ("CLIP score" if cfg.eval.clip_model else "grid only")
        evaluation = f"every {cfg.eval.every} steps ({what}, {cfg.eval.num_samples} samples)"
    return [
        f"batch       {cfg.data.global_batch_size} global = {micro} per rank x {world} rank"
        f"{'s' if world != 1 else ''}{accumulated}",
        f"schedule    {cfg.schedule.total_steps} steps{start}, lr {cfg.optim.lr:g} (warmup {cfg.optim.warmup_steps}), "
        f"EMA {'decay ' + format(cfg.ema.decay, 'g') if cfg.ema.enabled else 'off'}, eval {evaluation}",
    ]


def _output_lines(cfg: RunConfig) -> list[str]:
    resume = "resumes from the newest committed step" if cfg.checkpoint.resume else "no resume"
    export = f"{cfg.run.output_dir.rstrip('/')}/export" if cfg.checkpoint.export_ema else "off"
    return [
        f"output      {cfg.run.output_dir}  (export: {export})",
        f"checkpoints {cfg.checkpoint_url}  every {cfg.checkpoint.every} steps, keep {cfg.checkpoint.keep_last}, "
        f"{'async, ' if cfg.checkpoint.async_save else ''}{resume}",
        f"tensorboard {cfg.tensorboard_url}  (tensorboard --logdir {cfg.tensorboard_url})",
    ]


def startup_summary(trainer: Trainer) -> list[str]:
    """The lines to print once at the start of a run (see module doc)."""
    cfg = trainer.cfg
    return [
        f"run         {cfg.run.name} (seed {cfg.run.seed})",
        _model_line(cfg),
        _engine_line(trainer),
        _world_line(trainer),
        _data_line(cfg, trainer.loader.manifest),
        *_schedule_lines(trainer),
        *_output_lines(cfg),
    ]
