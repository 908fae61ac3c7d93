"""Training engines: one interface (:class:`Engine`), a registry of implementations (ddp, fsdp, deepspeed).

Adding an engine = one :class:`Engine` subclass with a unique ``name``, listed in :data:`ENGINES` (the run config
accepts every name listed here); the trainer and the checkpoint manager read everything else (process-group needs,
sharding, async saving) from the interface.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import nn

from deepflow.platform.train.distributed import DistContext
from deepflow.platform.train.engines.base import AsyncSave, Engine, OptimizerSettings
from deepflow.platform.train.engines.ddp import DDPEngine
from deepflow.platform.train.engines.deepspeed import DeepSpeedEngine
from deepflow.platform.train.engines.fsdp import FSDPEngine

if TYPE_CHECKING:  # the config validates engine names against ENGINES: no runtime import back
    from deepflow.platform.train.config import RunConfig

__all__ = ["ENGINES", "AsyncSave", "Engine", "OptimizerSettings", "build_engine", "engine_class", "optimizer_settings"]

#: ``distributed.engine`` name -> engine class (the DeepSpeed package itself is imported only when one is built)
ENGINES: dict[str, type[Engine]] = {engine.name: engine for engine in (DDPEngine, FSDPEngine, DeepSpeedEngine)}


def engine_class(name: str) -> type[Engine]:
    """The registered engine called ``name``; a ValueError naming ``distributed.engine`` otherwise."""
    try:
        return ENGINES[name]
    except KeyError:
        raise ValueError(f"distributed.engine: unknown engine {name!r} (known: {', '.join(sorted(ENGINES))})") from None


def optimizer_settings(cfg: RunConfig, world_size: int, device_type: str = "cpu") -> OptimizerSettings:
    """Flatten the run config into the knobs the engines need (``distributed.compile: auto`` resolved for
    ``device_type``)."""
    return OptimizerSettings(
        lr=cfg.optim.lr,
        betas=cfg.optim.betas,
        eps=cfg.optim.eps,
        weight_decay=cfg.optim.weight_decay,
        grad_clip=cfg.optim.grad_clip,
        grad_accumulation=cfg.schedule.grad_accumulation,
        precision=cfg.precision,
        compile=cfg.distributed.compile_on(device_type),
        per_rank_batch_size=cfg.per_rank_batch_size(world_size),
        zero_stage=cfg.distributed.zero_stage,
    )


def build_engine(cfg: RunConfig, model: nn.Module, ctx: DistContext) -> Engine:
    """Wrap ``model`` (on CPU, freshly initialised) in the engine named by ``cfg.distributed.engine``.

    Activation checkpointing (``model.gradient_checkpointing``) is switched on here, before any wrapping.
    """
    cls = engine_class(cfg.distributed.engine)
    if cfg.model.gradient_checkpointing:
        if not hasattr(model, "gradient_checkpointing"):
            raise ValueError("model.gradient_checkpointing: this model has no gradient_checkpointing switch")
        model.gradient_checkpointing = True
    return cls(model, optimizer_settings(cfg, ctx.world_size, ctx.device.type), ctx)
