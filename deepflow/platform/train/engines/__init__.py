"""Training engines: one small interface (:class:`Engine`), three implementations (ddp, fsdp, deepspeed)."""

from __future__ import annotations

from torch import nn

from deepflow.platform.train.config import RunConfig
from deepflow.platform.train.distributed import DistContext
from deepflow.platform.train.engines.base import Engine, OptimizerSettings

__all__ = ["Engine", "OptimizerSettings", "build_engine", "optimizer_settings"]


def optimizer_settings(cfg: RunConfig, world_size: int) -> OptimizerSettings:
    """Flatten the run config into the knobs the engines need."""
    return OptimizerSettings(
        lr=cfg.optim.lr,
        betas=cfg.optim.betas,
        eps=cfg.optim.eps,
        weight_decay=cfg.optim.weight_decay,
        grad_clip=cfg.optim.grad_clip,
        grad_accumulation=cfg.schedule.grad_accumulation,
        precision=cfg.precision,
        compile=cfg.distributed.compile,
        per_rank_batch_size=cfg.per_rank_batch_size(world_size),
        zero_stage=cfg.distributed.zero_stage,
    )


def build_engine(cfg: RunConfig, model: nn.Module, ctx: DistContext) -> Engine:
    """Wrap ``model`` (on CPU, freshly initialised) in the engine named by ``cfg.distributed.engine``.

    Activation checkpointing (``model.gradient_checkpointing``) is switched on here, before any wrapping.
    """
    if cfg.model.gradient_checkpointing:
        if not hasattr(model, "gradient_checkpointing"):
            raise ValueError("model.gradient_checkpointing: this model has no gradient_checkpointing switch")
        model.gradient_checkpointing = True
    settings = optimizer_settings(cfg, ctx.world_size)
    kind = cfg.distributed.engine
    if kind == "ddp":
        from deepflow.platform.train.engines.ddp import DDPEngine

        return DDPEngine(model, settings, ctx)
    if kind == "fsdp":
        from deepflow.platform.train.engines.fsdp import FSDPEngine

        return FSDPEngine(model, settings, ctx)
    if kind == "deepspeed":
        from deepflow.platform.train.engines.deepspeed import DeepSpeedEngine

        return DeepSpeedEngine(model, settings, ctx)
    raise ValueError(f"distributed.engine: unknown engine {kind!r}")
