"""DistributedDataParallel engine (a plain module when the world size is 1).

Precision: fp32, bf16 autocast, or fp16 autocast with a GradScaler. Parameters and optimizer state stay fp32
and replicated, so EMA and export need no gathering. Checkpoint: rank 0 writes ``model.safetensors`` and
``optimizer.pt`` (tensors only, loaded with ``weights_only=True``): the full state, which every rank of a run of any
world size loads.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from deepflow.models.conditions import Condition
from deepflow.platform.train.distributed import DistContext
from deepflow.platform.train.engines.base import (
    AsyncSave,
    Engine,
    OptimizerSettings,
    build_adamw,
    clipped_step,
    iter_cpu_fp32,
)
from deepflow.storage import set_default_mode

__all__ = ["DDPEngine", "MODEL_FILE"]

#: the weights file of a DDP checkpoint (in its engine folder)
MODEL_FILE = "model.safetensors"


def _cpu_copy(value: Any, copy: bool = True) -> Any:
    """A (nested) state dict with every tensor on the CPU: cloned (``copy``: a snapshot the loop may not change),
    or shared where it already is a CPU tensor."""
    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu", copy=copy)
    if isinstance(value, dict):
        return {key: _cpu_copy(item, copy) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_cpu_copy(item, copy) for item in value)
    return value


def _write_state(state: dict[str, Any], local_dir: str) -> None:
    """``model.safetensors`` + ``optimizer.pt`` (optimizer and grad-scaler state) from a CPU copy of the state."""
    os.makedirs(local_dir, exist_ok=True)
    save_file(state["model"], os.path.join(local_dir, MODEL_FILE))
    set_default_mode(os.path.join(local_dir, MODEL_FILE))  # safetensors writes 0600
    torch.save({"optimizer": state["optimizer"], "scaler": state["scaler"]}, os.path.join(local_dir, "optimizer.pt"))


class DDPEngine(Engine):
    """Replicated parameters and optimizer state; asynchronous saves copy the state to CPU in the loop."""

    name = "ddp"
    requires_process_group = False

    def __init__(self, model: nn.Module, settings: OptimizerSettings, ctx: DistContext) -> None:
        super().__init__(model, settings, ctx)
        model.to(ctx.device)
        if settings.compile:
            model.compile()
        if ctx.distributed:
            device_ids = [ctx.device.index] if ctx.device.type == "cuda" else None
            self.module = DistributedDataParallel(model, device_ids=device_ids)
        self.optimizer = build_adamw([p for p in model.parameters() if p.requires_grad], settings)
        self._autocast_dtype = None if settings.precision == "fp32" else settings.dtype
        self.scaler = torch.amp.GradScaler(ctx.device.type, enabled=settings.precision == "fp16")

    @contextlib.contextmanager
    def micro_step(self, boundary: bool) -> Iterator[None]:
        if boundary or not isinstance(self.module, DistributedDataParallel):
            yield
        else:
            with self.module.no_sync():
                yield

    def forward_train(self, x: torch.Tensor, times: torch.Tensor, y: Condition) -> Any:
        if self._autocast_dtype is None:
            return self.module(x, times, y, return_all=True)
        with torch.autocast(self.ctx.device.type, dtype=self._autocast_dtype):
            return self.module(x, times, y, return_all=True)

    def backward(self, loss: torch.Tensor) -> None:
        self.scaler.scale(loss / self.settings.grad_accumulation).backward()

    def step(self) -> float:
        params = [p for p in self.model.parameters() if p.requires_grad]
        max_norm = self.settings.grad_clip if self.settings.grad_clip > 0 else math.inf
        if self.scaler.is_enabled():
            self.scaler.unscale_(self.optimizer)
            grad_norm = float(torch.nn.utils.clip_grad_norm_(params, max_norm, foreach=True))
            self.scaler.step(self.optimizer)  # the scaler itself skips non-finite fp16 steps
            self.scaler.update()
        else:
            grad_norm = clipped_step(self.optimizer, params, max_norm)
        self.optimizer.zero_grad(set_to_none=True)
        return grad_norm

    def skip_step(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    # ---------------------------------------------------------------------------------------------- EMA
    def named_local_params(self) -> dict[str, torch.Tensor]:
        return {name: p for name, p in self.model.named_parameters()}

    def iter_full(self, local: Mapping[str, torch.Tensor]) -> Iterator[tuple[str, torch.Tensor | None]]:
        """Replicated: rank 0 yields its own tensors (views when CPU fp32), no collectives."""
        return iter_cpu_fp32(local, iter(dict(self.model.named_parameters())), self.ctx.is_main)

    # -------------------------------------------------------------------------------------------- state
    def _state(self) -> dict[str, Any]:
        return {
            "model": {k: v.detach().contiguous() for k, v in self.model.state_dict().items()},
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
        }

    def save(self, local_dir: str) -> None:
        """Rank 0 writes the live state (CPU tensors as they are, no snapshot: the loop waits for this save)."""
        if self.ctx.is_main:
            _write_state(_cpu_copy(self._state(), copy=False), local_dir)
        self.ctx.barrier()

    def async_save(self, local_dir: str) -> AsyncSave:
        """Rank 0 copies the state to CPU now (the loop may then change the weights) and writes it in ``finish``;
        the other ranks have nothing to write."""
        if not self.ctx.is_main:
            return AsyncSave(lambda: None)
        snapshot = _cpu_copy(self._state())
        return AsyncSave(lambda: _write_state(snapshot, local_dir))

    def load(self, local_dir: str, saved_world_size: int) -> None:
        """Every rank reads rank 0's full files (whatever the world size that wrote them)."""
        weights = load_file(os.path.join(local_dir, MODEL_FILE), device=str(self.ctx.device))
        self.model.load_state_dict(weights)
        state = torch.load(os.path.join(local_dir, "optimizer.pt"), map_location=self.ctx.device, weights_only=True)
        self.optimizer.load_state_dict(state["optimizer"])
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
