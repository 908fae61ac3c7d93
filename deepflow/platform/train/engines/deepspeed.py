"""DeepSpeed engine: ZeRO stage 1, 2 or 3 with a torch AdamW client optimizer (nothing JIT-compiles).

bf16/fp16 use DeepSpeed's own mixed precision (16-bit module weights, fp32 master partitions in the ZeRO
optimizer); the image input is cast to the module dtype here while times stay fp32 (the model's embedders cast
their features), so the small VeRA time gaps are not rounded to bf16. Checkpoints use DeepSpeed's
``save_checkpoint``/``load_checkpoint`` (each rank writes its optimizer partition, whose layout depends on the world
size). Resuming on the same world size loads those files as they are; on another world size they are first converted
to DeepSpeed's universal checkpoint (``deepspeed.checkpoint.ds_to_universal``: one file per parameter with its fp32
master weights and AdamW ``exp_avg``/``exp_avg_sq``, plus the step and loss scaler), once per machine into a
temporary folder, and loaded with DeepSpeed's ``load_universal`` switch: fp32 master weights (also under bf16/fp16)
and optimizer state are restored exactly, the 16-bit module weights are refreshed from them.

EMA slices: ZeRO-1/2 keep full module weights on every rank (EMA of those); ZeRO-3 keeps each parameter's local
partition ``param.ds_tensor`` (flat, padded to ``ceil(numel / world_size)``: FLAT_PARTITIONS), so the EMA is sharded
like the weights and is gathered (all_gather per parameter) only for evaluation and export.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import logging
import math
import os
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from deepflow.models.conditions import Condition
from deepflow.platform.train.distributed import DistContext
from deepflow.platform.train.engines.base import (
    FLAT_PARTITIONS,
    FULL,
    Engine,
    OptimizerSettings,
    build_adamw,
    iter_cpu_fp32,
    shard_units,
)

__all__ = ["DeepSpeedEngine", "deepspeed_config", "flatten_adjacent", "share_fp32_master", "zero3_working_set"]

log = logging.getLogger(__name__)

_TAG = "engine"  # the DeepSpeed tag: files go to <engine dir>/engine/
_UNIVERSAL_DONE = "converted"  # written last into a universal copy's folder


def _import_deepspeed() -> Any:
    """Import DeepSpeed; on CPU select its CPU accelerator and skip its JIT-built shared-memory all-reduce
    (a C++ extension compiled on first use), so collectives go through torch's gloo group unchanged."""
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import importlib

    import deepspeed

    if not torch.cuda.is_available():
        # (``import deepspeed.comm.torch as x`` would bind the torch package: deepspeed.comm imports torch)
        importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
    return deepspeed


def zero3_working_set(model: nn.Module) -> dict[str, int]:
    """ZeRO-3 buffer and gathering limits (elements) sized to the model's largest parameter P instead of DeepSpeed's
    defaults, which are sized for GPU clusters and make ZeRO-3 hold more than the model it shards on a small node
    (measured on CPU, 2 ranks: DeepFlow-B/2-2T depth 4, 322 MB fp32: peak RSS per rank 3.25 GiB with the defaults,
    2.82 GiB with limits of one transformer block, 2.22 GiB with P; FSDP2 2.01-2.2 GiB):

    - ``reduce_bucket_size`` (default 5e8 elements = 2 GB fp32 per rank, and as much again while its reduce-scatter
      interleaves the bucket) -> P;
    - ``stage3_max_live_parameters`` 1e9 and ``stage3_max_reuse_distance`` 1e9 (a model below 1e9 elements stays
      gathered from its forward to its backward: a full copy of the weights on every rank) -> 2P and P, so full
      weights are released after use and gathered again for the backward, like FSDP2's ``reshard_after_forward``;
    - ``stage3_prefetch_bucket_size`` 5e7 -> P.
    """
    largest = max((p.numel() for p in model.parameters()), default=1)
    return {
        "reduce_bucket_size": largest,
        "stage3_prefetch_bucket_size": largest,
        "stage3_max_live_parameters": 2 * largest,
        "stage3_max_reuse_distance": largest,
    }


def flatten_adjacent(tensors: list[torch.Tensor]) -> torch.Tensor:
    """``torch._utils._flatten_dense_tensors`` without the copy when the tensors already lie end to end in one
    storage (contiguous, same dtype, each starting where the previous one ends): then the 1-D view over them.

    ZeRO-3's optimizer flattens each step's gradient partitions (views of its contiguous gradient buffer, in order)
    into a new tensor before the update: a copy of this rank's gradients per step (0.16 GB per rank for a 322 MB
    model on 2 ranks) that the view makes unnecessary; anything else (padding, scattered tensors) is copied as
    before."""
    from torch._utils import _flatten_dense_tensors

    first = tensors[0] if tensors else None
    if first is None or not all(t.is_contiguous() and t.dtype == first.dtype and t.device == first.device
                                for t in tensors):
        return _flatten_dense_tensors(tensors)
    storage = first.untyped_storage().data_ptr()
    offset = first.storage_offset()
    for tensor in tensors:
        if tensor.untyped_storage().data_ptr() != storage or tensor.storage_offset() != offset:
            return _flatten_dense_tensors(tensors)
        offset += tensor.numel()
    total = offset - first.storage_offset()
    return first.new_empty(0).set_(first.untyped_storage(), first.storage_offset(), (total,))


def share_fp32_master(optimizer: Any) -> int:
    """Make ZeRO-3's fp32 master partition the working partition itself when both are fp32 on the same device;
    returns the bytes freed per rank.

    With fp32 weights (``precision: fp32``, or bf16 by autocast over fp32 weights) the master copy equals the working
    partition, and DeepSpeed means to share it (stage3 ``_create_fp32_partitions``), but on a CPU it compares the
    tensor's ``torch.device("cpu")`` with the accelerator's device *name* ``"cpu"``, which are never equal, and clones:
    a second copy of this rank's weights for the whole run (0.31 GiB per rank for a 616 MiB model on 2 ranks, 1.27 GiB
    at XL/2-3T). The optimizer keeps its parameter objects (and its state keyed by them); only their storage
    changes, and DeepSpeed's copy of the master into the working partition after each step becomes a self-copy."""
    if getattr(optimizer, "offload_optimizer", False):
        return 0
    freed = 0
    working_groups = getattr(optimizer, "fp16_partitioned_groups_flat", [])
    master_groups = getattr(optimizer, "fp32_partitioned_groups_flat", [])
    for working, master in zip(working_groups, master_groups):
        if (working is None or master is working or working.dtype != master.dtype
                or working.device != master.device or working.shape != master.shape
                or master.untyped_storage().data_ptr() == working.untyped_storage().data_ptr()):
            continue
        freed += master.numel() * master.element_size()
        master.data = working.data
    return freed


def deepspeed_config(
    settings: OptimizerSettings, world_size: int, working_set: dict[str, int] | None = None
) -> dict[str, Any]:
    """The DeepSpeed JSON config equivalent of the run's settings (``working_set``: :func:`zero3_working_set` of
    the model, for ZeRO-3)."""
    zero: dict[str, Any] = {"stage": settings.zero_stage, "contiguous_gradients": True, "overlap_comm": False}
    if settings.zero_stage == 3:
        zero["stage3_gather_16bit_weights_on_model_save"] = False
        zero.update(working_set or {})
    return {
        "train_micro_batch_size_per_gpu": settings.per_rank_batch_size,
        "gradient_accumulation_steps": settings.grad_accumulation,
        "train_batch_size": settings.per_rank_batch_size * settings.grad_accumulation * world_size,
        "gradient_clipping": settings.grad_clip,
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,
        "bf16": {"enabled": settings.precision == "bf16"},
        "fp16": {"enabled": settings.precision == "fp16", "initial_scale_power": 16},
        "steps_per_print": 2**62,
        "wall_clock_breakdown": False,
    }


def _convert_to_universal(native_dir: str, out_dir: str) -> None:
    """``ds_to_universal``: the native checkpoint under ``native_dir/<tag>`` -> ``out_dir/<tag>`` (+ the marker).

    Serial (worker processes would be forked from a process holding CUDA/NCCL state). The converter's prints and
    progress bars are kept out of the job's stdout/stderr. ``inject_missing_state``: DeepSpeed writes the
    ``universal_checkpoint_info`` the converter asks for only for AutoTP/AutoEP models.
    """
    from deepspeed.checkpoint import ds_to_universal

    args = argparse.Namespace(
        input_folder=os.path.join(native_dir, _TAG),
        output_folder=os.path.join(out_dir, _TAG),
        num_extract_workers=1,
        num_merge_workers=1,
        keep_temp_folder=False,
        strict=True,
        inject_missing_state=True,
    )
    start = time.perf_counter()
    chatter = io.StringIO()
    with contextlib.redirect_stdout(chatter), contextlib.redirect_stderr(chatter):
        ds_to_universal.main(args)
    with open(os.path.join(out_dir, _UNIVERSAL_DONE), "w"):
        pass
    seconds = time.perf_counter() - start
    log.info("converted the DeepSpeed checkpoint %s to a universal one in %.1f s", native_dir, seconds)


def _convert_everywhere(convert: Callable[[], None] | None, native_dir: str, ctx: DistContext) -> None:
    """Collective: run ``convert`` where given; if it failed on any rank, every rank raises (no rank is left waiting
    in the load's collectives)."""
    error = None
    if convert is not None:
        try:
            convert()
        except Exception as failure:  # noqa: BLE001 - raised below on every rank
            error = failure
    device = ctx.device if ctx.backend == "nccl" else torch.device("cpu")
    failed = torch.tensor([int(error is not None)], dtype=torch.int32, device=device)
    dist.all_reduce(failed, op=dist.ReduceOp.MAX)
    if failed.item():
        where = "" if error is not None else " on another rank"
        raise RuntimeError(
            f"converting the DeepSpeed checkpoint {native_dir} to a universal one failed{where}"
        ) from error


@contextlib.contextmanager
def _universal_checkpoint(native_dir: str, ctx: DistContext) -> Iterator[str]:
    """Collective: a folder holding the universal conversion of the native checkpoint in ``native_dir``.

    The local rank 0 of each machine converts it once into a temporary folder (named by rank 0, and by the machine's
    first rank, so that several nodes sharing one host never convert into the same folder) that its machine's ranks
    share; a rank that does not see that folder (another TMPDIR) converts its own copy. Removed on exit, after every
    rank has loaded.
    """
    name = [f"deepflow-universal-{uuid.uuid4().hex}" if ctx.is_main else None]
    dist.broadcast_object_list(name, src=0)
    shared = os.path.join(tempfile.gettempdir(), f"{name[0]}-node{ctx.rank - ctx.local_rank}")
    owned: list[str] = [shared] if ctx.local_rank == 0 else []
    try:
        first = (lambda: _convert_to_universal(native_dir, shared)) if ctx.local_rank == 0 else None
        _convert_everywhere(first, native_dir, ctx)
        folder = shared
        if not os.path.isfile(os.path.join(shared, _UNIVERSAL_DONE)):
            folder = tempfile.mkdtemp(prefix="deepflow-universal-")
            owned.append(folder)
        own = (lambda: _convert_to_universal(native_dir, folder)) if folder != shared else None
        _convert_everywhere(own, native_dir, ctx)
        yield folder
        dist.barrier()  # every rank has read the shared copy before its owner removes it
    finally:
        for path in owned:
            shutil.rmtree(path, ignore_errors=True)


class DeepSpeedEngine(Engine):
    """ZeRO-1/2/3 through ``deepspeed.initialize``; checkpoints are DeepSpeed's own (synchronous only)."""

    name = "deepspeed"
    requires_process_group = True

    def __init__(self, model: nn.Module, settings: OptimizerSettings, ctx: DistContext) -> None:
        super().__init__(model, settings, ctx)
        deepspeed = _import_deepspeed()
        if ctx.backend is None:
            raise RuntimeError("deepspeed engine needs torch.distributed initialised")
        # DeepSpeed asks for the launcher's LOCAL_RANK even when the process group exists (a plain `python` run)
        os.environ.setdefault("LOCAL_RANK", str(ctx.local_rank))
        deepspeed.init_distributed(dist_backend=ctx.backend)
        model.to(ctx.device)
        if settings.compile:
            for unit in shard_units(model):
                unit.compile()
        optimizer = build_adamw([p for p in model.parameters() if p.requires_grad], settings)
        self.ds, self.optimizer, _, _ = deepspeed.initialize(
            model=model, optimizer=optimizer,
            config=deepspeed_config(settings, ctx.world_size, zero3_working_set(model)),
        )
        self.module = self.ds
        self.zero_stage = settings.zero_stage
        if settings.zero_stage == 3 and hasattr(self.optimizer, "flatten"):
            self.optimizer.flatten = flatten_adjacent  # no per-step copy of the gradient partition
        if settings.zero_stage == 3:
            share_fp32_master(self.optimizer)
        self.sharded_params = settings.zero_stage == 3 and ctx.world_size > 1
        self.slice_layout = FLAT_PARTITIONS if settings.zero_stage == 3 else FULL
        self._input_dtype = None if settings.precision == "fp32" else settings.dtype

    @contextlib.contextmanager
    def micro_step(self, boundary: bool) -> Iterator[None]:
        self.ds.set_gradient_accumulation_boundary(boundary)
        yield

    def forward_train(self, x: torch.Tensor, times: torch.Tensor, y: Condition) -> Any:
        if self._input_dtype is not None:
            x = x.to(self._input_dtype)
        return self.ds(x, times, y, return_all=True)

    def backward(self, loss: torch.Tensor) -> None:
        self.ds.backward(loss)  # DeepSpeed divides by gradient_accumulation_steps itself

    def step(self) -> float:
        self.ds.step()
        norm = self.ds.get_global_grad_norm()
        return float(norm) if norm is not None else math.nan

    def skip_step(self) -> None:
        self.optimizer.zero_grad()
        self.ds.zero_grad()

    # ---------------------------------------------------------------------------------------------- EMA
    def named_local_params(self) -> dict[str, torch.Tensor]:
        if self.zero_stage == 3:
            return {name: p.ds_tensor for name, p in self.model.named_parameters()}
        return {name: p for name, p in self.model.named_parameters()}

    def full_shapes(self) -> dict[str, torch.Size]:
        if self.zero_stage == 3:
            return {name: p.ds_shape for name, p in self.model.named_parameters()}
        return super().full_shapes()

    def iter_full(self, local: Mapping[str, torch.Tensor]) -> Iterator[tuple[str, torch.Tensor | None]]:
        """ZeRO-1/2: rank 0's own full tensors, no collectives. ZeRO-3: one all-gather of the flat partitions per
        parameter (each rank holds one full parameter at a time); rank 0 yields it trimmed and reshaped."""
        if self.zero_stage != 3:
            yield from iter_cpu_fp32(local, iter(dict(self.model.named_parameters())), self.ctx.is_main)
            return
        for name, param in self.model.named_parameters():
            shard = local[name].detach().to(param.ds_tensor.device).contiguous()
            if self.ctx.world_size > 1:
                flat = shard.new_empty(shard.numel() * self.ctx.world_size)
                dist.all_gather(list(flat.chunk(self.ctx.world_size)), shard)
            else:
                flat = shard
            full = flat[: param.ds_numel].view(param.ds_shape)
            yield name, (full.to("cpu", torch.float32) if self.ctx.is_main else None)
            del flat, full

    # -------------------------------------------------------------------------------------------- state
    def save(self, local_dir: str) -> None:
        self.ds.save_checkpoint(local_dir, tag=_TAG, client_state={}, save_latest=False)

    def load(self, local_dir: str, saved_world_size: int) -> None:
        """The native files on the same world size; a universal conversion of them on another one."""
        if saved_world_size == self.ctx.world_size:
            self._load_checkpoint(local_dir)
            return
        with _universal_checkpoint(local_dir, self.ctx) as universal_dir:
            self.ds._config.load_universal_checkpoint = True  # read by DeepSpeed at load time only
            try:
                self._load_checkpoint(universal_dir)
            finally:
                self.ds._config.load_universal_checkpoint = False

    def _load_checkpoint(self, local_dir: str) -> None:
        path, _ = self.ds.load_checkpoint(
            local_dir, tag=_TAG, load_optimizer_states=True, load_lr_scheduler_states=False
        )
        if path is None:
            raise FileNotFoundError(f"DeepSpeed checkpoint not found under {local_dir}/{_TAG}")
