"""The engine interface: how the training loop talks to DDP, FSDP2 and DeepSpeed without branching on them.

One training step with gradient accumulation ``A`` is::

    for micro in range(A):
        with engine.micro_step(boundary=(micro == A - 1)):
            out = engine.forward_train(x, times, y)        # through the wrapped module's __call__
            engine.backward(loss)                         # loss of this micro-batch (not pre-divided by A)
    grad_norm = engine.step()                             # clip + optimizer update (+ zero grads)
    # or engine.skip_step() when the loss was not finite: no update, gradients dropped

Checkpoints: ``save(local_dir)`` / ``load(local_dir)`` are collective and write or read engine-specific files in a
LOCAL directory (each rank its own files); the checkpoint manager stages them to and from object stores.
``async_save(local_dir)`` starts a save that the loop does not wait for: it returns an :class:`AsyncSave` whose
``finish()`` (run in a background thread, no collectives) completes the files, or None when the engine cannot save
asynchronously (the caller then calls ``save``); the answer is the same on every rank.
Launch needs: ``requires_process_group`` (a 1-process run still gets a 1-rank group); ``sharded_params`` (each
rank holds a different slice of the weights, so each rank checkpoints its own EMA slice).
EMA: ``named_local_params()`` gives this rank's slice of every parameter (the full tensor when not sharded, the
FSDP2 DTensor local shard, or the ZeRO-3 partition); ``gather_full(local)`` turns such slices back into full
tensors on rank 0 (a collective). ``full_state_dict()`` = ``gather_full(named_local_params())``.
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from typing import Any, ClassVar

import torch
from torch import nn

from deepflow.models.conditions import Condition
from deepflow.platform.train.distributed import DistContext

__all__ = ["AsyncSave", "Engine", "OptimizerSettings", "PRECISION_DTYPES", "build_adamw", "shard_units"]

PRECISION_DTYPES: dict[str, torch.dtype] = {
    "fp32": torch.float32,
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
}


class OptimizerSettings:
    """The optimizer/precision knobs every engine needs (a flat view of RunConfig's sections)."""

    def __init__(
        self,
        lr: float,
        betas: tuple[float, float],
        eps: float,
        weight_decay: float,
        grad_clip: float,
        grad_accumulation: int,
        precision: str,
        compile: bool,
        per_rank_batch_size: int,
        zero_stage: int = 2,
    ) -> None:
        self.lr = lr
        self.betas = betas
        self.eps = eps
        self.weight_decay = weight_decay
        self.grad_clip = grad_clip
        self.grad_accumulation = grad_accumulation
        self.precision = precision
        self.compile = compile
        self.per_rank_batch_size = per_rank_batch_size
        self.zero_stage = zero_stage

    @property
    def dtype(self) -> torch.dtype:
        return PRECISION_DTYPES[self.precision]


def build_adamw(params: Any, settings: OptimizerSettings) -> torch.optim.AdamW:
    """Plain torch AdamW (foreach; never a JIT-compiled fused kernel, so it runs anywhere)."""
    return torch.optim.AdamW(
        params,
        lr=settings.lr,
        betas=tuple(settings.betas),
        eps=settings.eps,
        weight_decay=settings.weight_decay,
    )


def shard_units(model: nn.Module) -> list[nn.Module]:
    """The model's units for FSDP2 sharding / per-block compilation: its own ``shard_units()`` list, else the
    children of its ``blocks`` ModuleList, else none."""
    if hasattr(model, "shard_units"):
        return list(model.shard_units())
    blocks = getattr(model, "blocks", None)
    return list(blocks) if isinstance(blocks, nn.ModuleList) else []


class AsyncSave:
    """An engine save in flight: the state is already captured (copied to CPU, or staged by DCP); ``finish()``
    writes the rest of the files. ``finish`` blocks, runs no collectives and may run in a background thread."""

    def __init__(self, finish: Callable[[], Any]) -> None:
        self._finish = finish

    def finish(self) -> None:
        self._finish()


class Engine(ABC):
    """A wrapped model + optimizer. Subclasses (registered in ``engines.ENGINES`` by ``name``): DDPEngine,
    FSDPEngine, DeepSpeedEngine."""

    #: the registry key (``distributed.engine``); also recorded in checkpoint metadata
    name: ClassVar[str] = "base"
    #: True when the engine needs torch.distributed initialised even for a single process
    requires_process_group: ClassVar[bool] = False
    #: the ``precision`` values this engine trains in (checked by the run config before anything starts)
    precisions: ClassVar[tuple[str, ...]] = ("fp32", "bf16", "fp16")

    def __init__(self, model: nn.Module, settings: OptimizerSettings, ctx: DistContext) -> None:
        self.model = model  # the unwrapped module (its parameters may be sharded in place)
        self.settings = settings
        self.ctx = ctx
        #: True when named_local_params() differ between ranks (each rank must save its own EMA slice)
        self.sharded_params = False
        self.module: nn.Module = model  # what forward goes through; subclasses replace it with the wrapper
        self.optimizer: torch.optim.Optimizer | Any = None

    # ------------------------------------------------------------------------------------------ training
    @contextlib.contextmanager
    def micro_step(self, boundary: bool) -> Iterator[None]:
        """Context for one micro-batch; gradients are synchronised only when ``boundary`` is True."""
        yield

    def forward_train(self, x: torch.Tensor, times: torch.Tensor, y: Condition) -> Any:
        """x [B,C,H,W] float, times [B,k] float32, y labels [B] long or a text dict -> BranchOutputs, via the wrapper's __call__."""
        return self.module(x, times, y, return_all=True)

    @abstractmethod
    def backward(self, loss: torch.Tensor) -> None:
        """Backpropagate one micro-batch loss (scaled by 1 / grad_accumulation here, not by the caller)."""

    @abstractmethod
    def step(self) -> float:
        """Clip, update and zero gradients at an accumulation boundary; return the pre-clip global grad norm.

        A non-finite grad norm skips the update (the gradients are dropped) and is returned as is.
        """

    @abstractmethod
    def skip_step(self) -> None:
        """Drop this step's gradients without updating (used when the loss was NaN/inf on any rank)."""

    def set_lr(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def train(self, mode: bool = True) -> None:
        self.module.train(mode)

    # ---------------------------------------------------------------------------------------------- EMA
    @abstractmethod
    def named_local_params(self) -> dict[str, torch.Tensor]:
        """This rank's slice of every parameter (live tensors, updated in place by step())."""

    @abstractmethod
    def gather_full(self, local: dict[str, torch.Tensor]) -> dict[str, torch.Tensor] | None:
        """Collective: full CPU fp32 tensors from per-rank slices shaped like named_local_params(); rank 0 gets
        the dict, other ranks None."""

    def full_state_dict(self) -> dict[str, torch.Tensor] | None:
        """Gathered model weights (CPU, fp32) on rank 0 for export; None on other ranks. Collective."""
        return self.gather_full({name: t.detach() for name, t in self.named_local_params().items()})

    # -------------------------------------------------------------------------------------------- state
    @abstractmethod
    def save(self, local_dir: str) -> None:
        """Collective: write model + optimizer state into ``local_dir`` (this rank's files)."""

    @abstractmethod
    def load(self, local_dir: str) -> None:
        """Collective: restore model + optimizer state written by :meth:`save` (files of all ranks present)."""

    def async_save(self, local_dir: str) -> AsyncSave | None:
        """Collective: capture model + optimizer state now and return the save in flight (its ``finish()`` writes
        into ``local_dir``); None when this engine saves only synchronously (then call :meth:`save`). Every rank
        gives the same kind of answer (a rank with nothing to write returns a handle that does nothing)."""
        return None

    def finalize(self) -> None:
        """Release resources (async checkpoint process groups ...)."""
