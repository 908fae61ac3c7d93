"""Process groups, devices and seeds.

The launch environment is read once into a :class:`deepflow.ranks.DistEnv` (torchrun, the DeepSpeed launcher,
Kubernetes Indexed Jobs, or a single process that needs no process group at all).
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist

from deepflow.ranks import DistEnv, read_dist_env

__all__ = [
    "DistEnv",
    "DistContext",
    "read_dist_env",
    "init_distributed",
    "shutdown_distributed",
    "seed_everything",
    "step_seed",
    "step_generator",
]


@dataclass
class DistContext:
    """The initialised distributed state used by the rest of the platform."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str | None  # None when no process group was created (single process)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.backend is not None and dist.is_available() and dist.is_initialized()

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()


def _pick_device(local_rank: int) -> torch.device:
    if torch.cuda.is_available():
        index = local_rank % torch.cuda.device_count()
        torch.cuda.set_device(index)
        return torch.device("cuda", index)
    return torch.device("cpu")


def init_distributed(
    backend: str = "auto",
    local_rank_arg: int | None = None,
    require_group: bool = False,
    collective_timeout_s: float = 300.0,
    rendezvous_timeout_s: float = 300.0,
) -> DistContext:
    """Create the default process group when the job has more than one process; pick the device.

    backend "auto" -> nccl on CUDA, gloo on CPU. A single process (world size 1) gets no process group unless
    ``require_group`` (FSDP2 and DeepSpeed need one): then a local 1-rank group over an in-memory store.

    Timeouts, so that a lost peer fails this rank (and its pod, which the Job then restarts) instead of hanging:
    ``rendezvous_timeout_s`` bounds the start-up wait for the other ranks (the TCPStore rendezvous);
    ``collective_timeout_s`` bounds every collective (and store wait) afterwards. gloo raises on a collective
    that times out or on a peer whose connection closed; for NCCL, ``TORCH_NCCL_ASYNC_ERROR_HANDLING`` defaults
    to 1 (as under torchrun) so that the watchdog aborts a timed-out collective and ends the process.
    """
    env = read_dist_env(local_rank_arg)
    device = _pick_device(env.local_rank)
    chosen = backend if backend != "auto" else ("nccl" if device.type == "cuda" else "gloo")
    if chosen == "nccl" and device.type != "cuda":
        raise ValueError("distributed.backend: nccl needs CUDA devices; use gloo (or auto) on CPU")
    if env.world_size == 1:
        if not require_group:
            return DistContext(0, 1, env.local_rank, device, None)
        if not dist.is_initialized():
            dist.init_process_group(
                backend=chosen, store=dist.HashStore(), rank=0, world_size=1,
                timeout=timedelta(seconds=collective_timeout_s),
            )
        return DistContext(0, 1, env.local_rank, device, chosen)
    os.environ.setdefault("MASTER_ADDR", env.master_addr)
    os.environ.setdefault("MASTER_PORT", str(env.master_port))
    if chosen == "nccl":
        os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")
    if not dist.is_initialized():
        dist.init_process_group(
            backend=chosen,
            store=_rendezvous(env.rank, env.world_size, rendezvous_timeout_s, collective_timeout_s),
            rank=env.rank,
            world_size=env.world_size,
            timeout=timedelta(seconds=collective_timeout_s),
            device_id=device if device.type == "cuda" else None,
        )
    return DistContext(env.rank, env.world_size, env.local_rank, device, chosen)


def _rendezvous(rank: int, world_size: int, rendezvous_timeout_s: float, collective_timeout_s: float) -> dist.Store:
    """The ``env://`` store (MASTER_ADDR/MASTER_PORT; torchrun's agent store when it serves one), waiting at most
    ``rendezvous_timeout_s`` for the others; afterwards its waits are bounded by ``collective_timeout_s``."""
    store, _, _ = next(dist.rendezvous("env://", rank, world_size, timeout=timedelta(seconds=rendezvous_timeout_s)))
    store.set_timeout(timedelta(seconds=collective_timeout_s))
    return store


def shutdown_distributed(ctx: DistContext) -> None:
    """Barrier (so no rank leaves while another still communicates), then destroy the process group."""
    if ctx.distributed:
        try:
            dist.barrier()
        finally:
            dist.destroy_process_group()


def seed_everything(seed: int, rank: int = 0) -> None:
    """Seed Python, NumPy and torch (CPU and CUDA) with a rank-dependent seed (model init uses its own)."""
    value = step_seed(seed, rank, 0, 0) % (2**32)
    random.seed(value)
    np.random.seed(value)
    torch.manual_seed(value)


def step_seed(seed: int, rank: int, step: int, micro_step: int = 0) -> int:
    """A 63-bit seed that depends on every argument (NumPy SeedSequence mixing, not a weak sum)."""
    state = np.random.SeedSequence([seed, rank, step, micro_step]).generate_state(2, dtype=np.uint32)
    return int((int(state[0]) << 31) ^ int(state[1])) & ((1 << 63) - 1)


def step_generator(seed: int, rank: int, step: int, micro_step: int, device: torch.device) -> torch.Generator:
    """The generator for all objective randomness of one micro-step: seeded from (seed, rank, step, micro)."""
    generator = torch.Generator(device=device)
    generator.manual_seed(step_seed(seed, rank, step, micro_step))
    return generator
