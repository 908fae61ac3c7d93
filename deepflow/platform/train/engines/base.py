"""The engine interface: how the training loop talks to DDP, FSDP2 and DeepSpeed without branching on them.

One training step with gradient accumulation ``A`` is::

    for micro in range(A):
        with engine.micro_step(boundary=(micro == A - 1)):
            out = engine.forward_train(x, times, y)        # through the wrapped module's __call__
            engine.backward(loss)                         # loss of this micro-batch (not pre-divided by A)
    grad_norm = engine.step()                             # clip + optimizer update (+ zero grads)
    # or engine.skip_step() when the loss was not finite: no update, gradients dropped

Checkpoints: ``save(local_dir)`` / ``load(local_dir, saved_world_size)`` are collective and write or read
engine-specific files in a LOCAL directory (each rank its own files); the checkpoint manager stages them to and from
object stores. ``load`` restores a checkpoint written by any number of ranks (each engine reshards its own state).
``async_save(local_dir)`` starts a save that the loop does not wait for: it returns an :class:`AsyncSave` whose
``finish()`` (run in a background thread, no collectives) completes the files, or None when the engine cannot save
asynchronously (the caller then calls ``save``); the answer is the same on every rank.
Launch needs: ``requires_process_group`` (a 1-process run still gets a 1-rank group); ``sharded_params`` (each
rank holds a different slice of the weights, so each rank checkpoints its own EMA slice).
EMA: ``named_local_params()`` gives this rank's slice of every parameter (the full tensor when not sharded, the
FSDP2 DTensor local shard, or the ZeRO-3 partition), cut as the engine's ``slice_layout`` says (see
:func:`deepflow.artifacts.slice_full`); ``iter_full(local)`` turns such slices back into full tensors on rank 0 ONE
PARAMETER AT A TIME (a collective generator every rank runs to its end; exports and evaluation consume it tensor by
tensor, so rank 0 never holds a second copy of the model), ``gather_full(local)`` collects it into a dict.
``full_state_dict()`` = ``gather_full(named_local_params())``; ``full_specs()`` are the full shapes and dtypes. Without collectives: ``local_slice(full)`` cuts this
rank's slices out of full tensors, ``assemble_full(slices, layout)`` joins the slices saved by every rank of a run
of any world size (resuming on another world size reads those and cuts its own slices).
"""

from __future__ import annotations

import contextlib
import ctypes
import math
import os
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, ClassVar

import torch
import torch.distributed.tensor
from torch import nn

from deepflow.artifacts import (  # the slice layouts are on-storage layouts (checkpoint meta.json ema_layout)
    DIM0_CHUNKS,
    FLAT_PARTITIONS,
    FULL,
    SLICE_LAYOUTS,
    TensorSpec,
    join_slices,
    slice_full,
)
from deepflow.models.conditions import Condition
from deepflow.platform.train.distributed import DistContext

__all__ = [
    "AsyncSave",
    "DIM0_CHUNKS",
    "Engine",
    "FLAT_PARTITIONS",
    "FULL",
    "OptimizerSettings",
    "PRECISION_DTYPES",
    "SLICE_LAYOUTS",
    "build_adamw",
    "clipped_step",
    "fix_cpu_mmap_threshold",
    "iter_cpu_fp32",
    "join_slices",
    "shard_units",
    "slice_full",
]

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


#: devices whose torch build has the fused (one kernel per parameter group, ahead-of-time compiled) AdamW
FUSED_ADAMW_DEVICES = ("cpu", "cuda")


def build_adamw(params: Any, settings: OptimizerSettings) -> torch.optim.AdamW:
    """torch AdamW, fused (one pass over each tensor's parameter, gradient and moments instead of about ten) where
    every parameter lives on a device in :data:`FUSED_ADAMW_DEVICES`, else foreach. On a CPU the fused step takes
    69 ms where torch's default loop over tensors takes 306 ms (62M parameters, 2 threads; README figures)."""
    params = list(params)
    devices = {p.device.type for group in params for p in (group["params"] if isinstance(group, dict) else [group])}
    fused = bool(devices) and devices <= set(FUSED_ADAMW_DEVICES)
    return torch.optim.AdamW(
        params,
        lr=settings.lr,
        betas=tuple(settings.betas),
        eps=settings.eps,
        weight_decay=settings.weight_decay,
        fused=fused,
        foreach=None if fused else True,
    )


def clipped_step(optimizer: torch.optim.Optimizer, params: Sequence[torch.Tensor], max_norm: float) -> float:
    """One optimizer step on the gradients of ``params`` clipped to a global L2 norm of ``max_norm`` (``math.inf``:
    no clipping); no update when the norm is not finite. Returns the pre-clip global norm.

    With a fused AdamW on plain tensors the clip costs no pass over the gradients: the clip factor goes into the
    fused kernel as its ``grad_scale`` (the kernel divides every gradient by it while it reads them) and a non-finite
    norm as its ``found_inf`` (the kernel then leaves parameters, moments and step counts as they were), so the host
    waits for the norm only after the update. Otherwise (sharded DTensor parameters, a foreach optimizer) torch's
    clip multiplies the gradients in place first. Both agree to fp32 rounding (tests/platform/train/test_engines)."""
    grads = [p.grad for p in params if p.grad is not None]
    norm = torch.nn.utils.get_total_norm(grads, foreach=True)
    if isinstance(norm, torch.distributed.tensor.DTensor) or not optimizer.defaults.get("fused"):
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm, foreach=True)
        full_norm = norm.full_tensor() if isinstance(norm, torch.distributed.tensor.DTensor) else norm
        if math.isfinite(float(full_norm)):
            optimizer.step()
        return float(full_norm)
    norm32 = norm.float()
    optimizer.grad_scale = (norm32 / max_norm + 1e-6 / max_norm).clamp(min=1.0)  # type: ignore[attr-defined]
    optimizer.found_inf = (~torch.isfinite(norm32)).float()  # type: ignore[attr-defined]
    try:
        optimizer.step()
    finally:
        optimizer.grad_scale = optimizer.found_inf = None  # type: ignore[attr-defined]
    return float(norm)


def shard_units(model: nn.Module) -> list[nn.Module]:
    """The model's units for FSDP2 sharding / per-block compilation: its own ``shard_units()`` list, else the
    children of its ``blocks`` ModuleList, else none."""
    if hasattr(model, "shard_units"):
        return list(model.shard_units())
    blocks = getattr(model, "blocks", None)
    return list(blocks) if isinstance(blocks, nn.ModuleList) else []


#: glibc ``mallopt`` parameter number of M_MMAP_THRESHOLD
_M_MMAP_THRESHOLD = -3
#: allocations from this size on get their own pages, returned to the system when freed
CPU_MMAP_THRESHOLD_BYTES = 1 << 20
#: the fixed threshold is set for models of at least this many parameter bytes only: each allocation above it then
#: costs page faults, which halved the demo model's CPU training speed (3.4M parameters: 1.3 vs 2.5 it/s, 100 steps
#: of configs/demo/train-fmnist.yaml with MALLOC_MMAP_THRESHOLD_=1 MiB vs 256 MiB, AMD EPYC 2 cores, 2026-12-07),
#: while for a model of hundreds of MB the resident memory it saves matters and the faults are small against a step
CPU_MMAP_MIN_MODEL_BYTES = 256 << 20


def fix_cpu_mmap_threshold(threshold: int = CPU_MMAP_THRESHOLD_BYTES) -> bool:
    """Keep the resident memory of CPU training at what is alive: glibc's malloc serves allocations above a
    *dynamic* threshold with their own pages (returned on free) and raises that threshold to the size of every such
    block freed (up to 32 MiB), so after the model's first tensors are freed every later tensor of a few MB (a
    gathered parameter, an activation, a gradient bucket) comes from the heap, whose freed holes stay resident. A
    fixed threshold (the same as ``MALLOC_MMAP_THRESHOLD_=1048576``) ends that: measured on 2 CPU ranks training
    DeepFlow-B/2-2T depth 4 (322 MB fp32), peak RSS per rank FSDP2 2.33 -> 2.01 GiB, ZeRO-3 2.75 -> 2.22 GiB. No-op
    (False) where the C library is not glibc or the environment already sets MALLOC_MMAP_THRESHOLD_."""
    if os.environ.get("MALLOC_MMAP_THRESHOLD_") is not None:
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(_M_MMAP_THRESHOLD, int(threshold)))
    except (OSError, AttributeError):
        return False


def _parameter_bytes(model: nn.Module) -> int:
    """Bytes of the model's parameters (as built, before any sharding)."""
    return sum(param.numel() * param.element_size() for param in model.parameters())


def _owns_memory(tensor: torch.Tensor, source: torch.Tensor | None) -> bool:
    """True when ``tensor`` is a new tensor, not sharing memory with ``source`` (a live slice)."""
    if source is None or source.device != tensor.device:
        return True
    return tensor.untyped_storage().data_ptr() != source.untyped_storage().data_ptr()


def iter_cpu_fp32(local: Mapping[str, torch.Tensor], names: Iterator[str], is_main: bool
                  ) -> Iterator[tuple[str, torch.Tensor | None]]:
    """:meth:`Engine.iter_full` of an unsharded engine: every slice is the full tensor; rank 0 yields it as CPU fp32
    (no copy when it already is), the other ranks None; no collectives."""
    for name in names:
        yield name, (local[name].detach().to("cpu", torch.float32) if is_main else None)


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
        if ctx.device.type == "cpu" and _parameter_bytes(model) >= CPU_MMAP_MIN_MODEL_BYTES:
            fix_cpu_mmap_threshold()
        self.model = model  # the unwrapped module (its parameters may be sharded in place)
        self.settings = settings
        self.ctx = ctx
        #: True when named_local_params() differ between ranks (each rank must save its own EMA slice)
        self.sharded_params = False
        #: how named_local_params() cuts the full parameters (FULL, DIM0_CHUNKS or FLAT_PARTITIONS)
        self.slice_layout = FULL
        self.module: nn.Module = model  # what forward goes through; subclasses replace it with the wrapper
        self.optimizer: torch.optim.Optimizer | Any = None

    # ------------------------------------------------------------------------------------------ training
    @contextlib.contextmanager
    def micro_step(self, boundary: bool) -> Iterator[None]:
        """Context for one micro-batch; gradients are synchronised only when ``boundary`` is True."""
        yield

    def forward_train(self, x: torch.Tensor, times: torch.Tensor, y: Condition) -> Any:
        """x [B,C,H,W] float, times [B,k] float32, y labels [B] long or a text dict -> BranchOutputs, via the
        wrapper's __call__."""
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
    def iter_full(self, local: Mapping[str, torch.Tensor]) -> Iterator[tuple[str, torch.Tensor | None]]:
        """Collective generator over the parameters (``named_parameters`` order): (name, full CPU fp32 tensor of
        the full shape) on rank 0, (name, None) elsewhere, from per-rank slices shaped like named_local_params().

        Every rank must run it to its end (each item may be a collective). A tensor yielded may share memory with
        ``local`` (unsharded engines): read it before the next item and do not modify it; at most one gathered
        tensor is alive per item, so a consumer that writes or copies each one away needs no copy of the model."""

    def gather_full(self, local: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor] | None:
        """Collective: :meth:`iter_full` collected into new tensors (one full copy); rank 0 gets the dict, other
        ranks None. Prefer consuming :meth:`iter_full` where the tensors can be used one at a time."""
        full: dict[str, torch.Tensor] = {}
        for name, tensor in self.iter_full(local):
            if tensor is not None:
                full[name] = tensor if _owns_memory(tensor, local.get(name)) else tensor.clone()
        return full if self.ctx.is_main else None

    def live_weights(self) -> dict[str, torch.Tensor]:
        """named_local_params() detached (what :meth:`iter_full` gathers for the live weights)."""
        return {name: t.detach() for name, t in self.named_local_params().items()}

    def full_state_dict(self) -> dict[str, torch.Tensor] | None:
        """Gathered model weights (CPU, fp32) on rank 0 for export; None on other ranks. Collective."""
        return self.gather_full(self.live_weights())

    def full_specs(self) -> dict[str, TensorSpec]:
        """Shape and dtype (fp32) of every tensor :meth:`iter_full` yields, in its order (an export's header)."""
        return {name: TensorSpec(tuple(shape), torch.float32) for name, shape in self.full_shapes().items()}

    def full_shapes(self) -> dict[str, torch.Size]:
        """The full (unsharded) shape of every parameter."""
        return {name: p.shape for name, p in self.model.named_parameters()}

    def local_slice(self, full: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """This rank's slices of ``full`` (full-shape tensors, any device/dtype), shaped like named_local_params().

        No collectives. Names the model does not have are passed through unchanged (the caller reports them)."""
        local = self.named_local_params()
        out: dict[str, torch.Tensor] = {}
        for name, tensor in full.items():
            if name not in local:
                out[name] = tensor
                continue
            piece = slice_full(tensor, self.slice_layout, self.ctx.rank, self.ctx.world_size)
            if piece.shape != local[name].shape:
                raise ValueError(
                    f"{name}: full shape {tuple(tensor.shape)} cut by {self.slice_layout} for rank {self.ctx.rank} of "
                    f"{self.ctx.world_size} gives {tuple(piece.shape)}, this rank holds {tuple(local[name].shape)}"
                )
            out[name] = piece
        return out

    def assemble_full(
        self, slices: Sequence[dict[str, torch.Tensor]], layout: str | None = None
    ) -> dict[str, torch.Tensor]:
        """Full-shape tensors from the slices saved by every rank (rank order) of a run with ``len(slices)`` ranks
        whose engine cut them by ``layout`` (default: this engine's). No collectives."""
        layout = layout or self.slice_layout
        shapes = self.full_shapes()
        names = slices[0].keys()
        return {
            name: join_slices([piece[name] for piece in slices], layout, shapes[name]) if name in shapes
            else slices[0][name]
            for name in names
        }

    # -------------------------------------------------------------------------------------------- state
    @abstractmethod
    def save(self, local_dir: str) -> None:
        """Collective: write model + optimizer state into ``local_dir`` (this rank's files)."""

    @abstractmethod
    def load(self, local_dir: str, saved_world_size: int) -> None:
        """Collective: restore model + optimizer state written by :meth:`save` on ``saved_world_size`` ranks (the
        files of all those ranks present in ``local_dir``); the world size may differ from this run's."""

    def async_save(self, local_dir: str) -> AsyncSave | None:
        """Collective: capture model + optimizer state now and return the save in flight (its ``finish()`` writes
        into ``local_dir``); None when this engine saves only synchronously (then call :meth:`save`). Every rank
        gives the same kind of answer (a rank with nothing to write returns a handle that does nothing)."""
        return None

    def finalize(self) -> None:
        """Release resources (async checkpoint process groups ...)."""
