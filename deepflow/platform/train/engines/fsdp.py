"""FSDP2 engine: ``fully_shard`` on every transformer/VeRA block and on the root.

bf16 precision uses ``MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32)``: the sharded parameters and
AdamW state stay fp32, compute runs in bf16, gradients are reduced in fp32. Times stay fp32 (the root does not
cast its inputs; the model's embedders cast their own features) so the small VeRA time gaps survive.
Checkpoints use torch.distributed.checkpoint (DCP) with ``get_state_dict``/``set_state_dict`` for model and
optimizer (sharded DTensor state dicts: each rank writes its shards); DCP reshards on load, so a run resumes on any
world size (weights and AdamW state). EMA slices are the DTensor local shards: ``Shard(0)`` = DIM0_CHUNKS.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Iterator, Mapping
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor

from deepflow.models.conditions import Condition
from deepflow.platform.train.distributed import DistContext
from deepflow.platform.train.engines.base import (
    DIM0_CHUNKS,
    AsyncSave,
    Engine,
    OptimizerSettings,
    build_adamw,
    clipped_step,
    shard_units,
)

__all__ = ["FSDPEngine"]

# A VeRA block's acceleration tokens are the output of a Linear over [B,N,H] tokens, which torch returns as a view;
# FSDP2 then warns (on every rank, on every run) that an in-place op on that view would drop its pre-backward hook.
# No model modifies a unit's output in place (the FSDP2 runs' losses and gradients equal DDP's in the engine tests),
# so the warning says nothing about these runs; copying the tokens to silence it would cost memory at every block.
warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module \(\w+\) returned a view tensor", category=UserWarning)


class FSDPEngine(Engine):
    """FSDP2 sharded parameters and optimizer state; DCP checkpoints (asynchronous saves through DCP async_save)."""

    name = "fsdp"
    requires_process_group = True
    precisions = ("fp32", "bf16")  # FSDP2 MixedPrecisionPolicy: no loss scaling for fp16

    def __init__(self, model: nn.Module, settings: OptimizerSettings, ctx: DistContext) -> None:
        super().__init__(model, settings, ctx)
        if not ctx.distributed:
            # fully_shard needs a process group; a single process gets a 1-rank gloo/nccl group.
            raise RuntimeError("fsdp engine needs torch.distributed initialised (it is, under any launcher)")
        self.sharded_params = ctx.world_size > 1
        self.slice_layout = DIM0_CHUNKS  # fully_shard's default placement: Shard(0) on every parameter
        model.to(ctx.device)
        mesh = init_device_mesh(ctx.device.type, (ctx.world_size,))
        if settings.precision == "bf16":
            unit_policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
            root_policy = MixedPrecisionPolicy(
                param_dtype=torch.bfloat16, reduce_dtype=torch.float32, cast_forward_inputs=False
            )
            self._input_dtype: torch.dtype | None = torch.bfloat16
        else:
            unit_policy = root_policy = MixedPrecisionPolicy()
            self._input_dtype = None
        for unit in shard_units(model):
            if settings.compile:
                unit.compile()
            fully_shard(unit, mesh=mesh, mp_policy=unit_policy)
        fully_shard(model, mesh=mesh, mp_policy=root_policy)
        self.module = model
        self.optimizer = build_adamw([p for p in model.parameters() if p.requires_grad], settings)
        # DCP async_save runs collectives from a background thread: give it its own gloo group so they never
        # interleave with the training loop's collectives on the default group.
        self._async_group = dist.new_group(backend="gloo")

    @contextlib.contextmanager
    def micro_step(self, boundary: bool) -> Iterator[None]:
        assert isinstance(self.model, FSDPModule)
        self.model.set_requires_gradient_sync(boundary)
        try:
            yield
        finally:
            self.model.set_requires_gradient_sync(True)

    def forward_train(self, x: torch.Tensor, times: torch.Tensor, y: Condition) -> Any:
        if self._input_dtype is not None:
            x = x.to(self._input_dtype)
        return self.module(x, times, y, return_all=True)

    def backward(self, loss: torch.Tensor) -> None:
        (loss / self.settings.grad_accumulation).backward()

    def step(self) -> float:
        params = [p for p in self.model.parameters() if p.requires_grad]
        max_norm = self.settings.grad_clip if self.settings.grad_clip > 0 else math.inf
        grad_norm = clipped_step(self.optimizer, params, max_norm)
        self.optimizer.zero_grad(set_to_none=True)
        return grad_norm

    def skip_step(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    # ---------------------------------------------------------------------------------------------- EMA
    def named_local_params(self) -> dict[str, torch.Tensor]:
        return {
            name: (p.to_local() if isinstance(p, DTensor) else p) for name, p in self.model.named_parameters()
        }

    def iter_full(self, local: Mapping[str, torch.Tensor]) -> Iterator[tuple[str, torch.Tensor | None]]:
        """One all-gather per parameter (``DTensor.full_tensor``): each rank holds one full parameter at a time;
        rank 0 yields it (already a new CPU fp32 tensor on CPU runs: no further copy)."""
        for name, param in self.model.named_parameters():
            shard = local[name]
            if isinstance(param, DTensor):
                tensor = DTensor.from_local(
                    shard.to(param.device, param.dtype),
                    param.device_mesh,
                    param.placements,
                    run_check=False,
                    shape=param.shape,
                    stride=param.stride(),
                ).full_tensor()
            else:
                tensor = shard
            yield name, (tensor.detach().to("cpu", torch.float32) if self.ctx.is_main else None)
            del tensor

    # -------------------------------------------------------------------------------------------- state
    def save(self, local_dir: str) -> None:
        model_state, optim_state = get_state_dict(self.model, self.optimizer)
        dcp.save({"model": model_state, "optimizer": optim_state}, checkpoint_id=local_dir)

    def async_save(self, local_dir: str) -> AsyncSave:
        """DCP asynchronous save: stages the shards to CPU now, writes them in the background (``finish`` waits)."""
        model_state, optim_state = get_state_dict(self.model, self.optimizer)
        future = dcp.async_save(
            {"model": model_state, "optimizer": optim_state}, checkpoint_id=local_dir, process_group=self._async_group
        )
        return AsyncSave(future.result)

    def load(self, local_dir: str, saved_world_size: int) -> None:
        """DCP reads the saved shards this rank's new shards overlap (any ``saved_world_size``)."""
        model_state, optim_state = get_state_dict(self.model, self.optimizer)
        state = {"model": model_state, "optimizer": optim_state}
        dcp.load(state, checkpoint_id=local_dir)
        set_state_dict(
            self.model, self.optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"]
        )
        dist.barrier()
