"""Process groups, devices and seeds.

The launch environment is read once into a :class:`deepflow.ranks.DistEnv` (torchrun, the DeepSpeed launcher,
Kubernetes Indexed Jobs, or a single process that needs no process group at all).

Elastic runs (``torchrun --nnodes MIN:MAX ... --max-restarts R``): :func:`elastic_range` reads the agent's node range,
from which the config check derives every world size the run can take; :func:`check_elastic_launch` refuses a
restartable torchrun run whose agents share one store across rendezvous rounds (see its doc).
"""

from __future__ import annotations

import os
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist

from deepflow.errors import UserError
from deepflow.ranks import DistEnv, read_dist_env

__all__ = [
    "DistEnv",
    "DistContext",
    "read_dist_env",
    "init_distributed",
    "ElasticRange",
    "NO_SHARED_STORE_ENV",
    "elastic_range",
    "check_elastic_launch",
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


#: torchrun (torch 2.4+) serves the workers' ``env://`` store from the rank-0 agent's rendezvous store unless this is 1
NO_SHARED_STORE_ENV = "TORCH_DISABLE_SHARE_RDZV_TCP_STORE"


@dataclass(frozen=True)
class ElasticRange:
    """The torchrun agent's node range and restart budget (``--nnodes MIN:MAX --nproc-per-node G --max-restarts R``)."""

    min_nodes: int
    max_nodes: int
    nproc_per_node: int
    max_restarts: int = 0

    @property
    def world_sizes(self) -> list[int]:
        """Every world size the run can take: n * G for n in [MIN, MAX]."""
        return [nodes * self.nproc_per_node for nodes in range(self.min_nodes, self.max_nodes + 1)]

    @property
    def restartable(self) -> bool:
        """The agents can start another rendezvous round (membership change or worker restart)."""
        return self.min_nodes < self.max_nodes or self.max_restarts > 0


def _agent_argv(environ: Mapping[str, str]) -> list[str] | None:
    """The torchrun agent's own arguments: our parent's command line after ``torch.distributed.run``/``torchrun``
    (None when the parent is something else or unreadable)."""
    try:
        with open(f"/proc/{os.getppid()}/cmdline", "rb") as handle:
            command = [part.decode(errors="replace") for part in handle.read().split(b"\0") if part]
    except OSError:
        return None
    for index, part in enumerate(command):  # python -m torch.distributed.run ARGS | .../torchrun ARGS
        if part in ("torch.distributed.run", "torchrun") or part.endswith(("/torchrun", "torch/distributed/run.py")):
            return command[index + 1:]
    return None


def _parse_nnodes(nnodes: str) -> tuple[int, int]:
    low, _, high = nnodes.partition(":")
    return (int(low), int(high or low))


def elastic_range(
    environ: Mapping[str, str] | None = None, agent_argv: Sequence[str] | None = None
) -> ElasticRange | None:
    """The elastic range of the torchrun agent that started this process; None outside torchrun.

    torchrun passes neither ``--nnodes`` nor its range to the workers (they get LOCAL_WORLD_SIZE, WORLD_SIZE,
    TORCHELASTIC_RUN_ID / _MAX_RESTARTS / _USE_AGENT_STORE). Its options come from its command line or from
    ``PET_<OPTION>`` variables (Kubeflow's elasticPolicy sets PET_NNODES=MIN:MAX), which the workers inherit: the
    agent's command line (``agent_argv``, default our parent's) is parsed with torchrun's own parser, which applies
    the same fallbacks; without it PET_NNODES (default 1) is used. ``--standalone`` is one node.
    """
    env = os.environ if environ is None else environ
    if not env.get("TORCHELASTIC_RUN_ID"):
        return None
    argv = list(agent_argv) if agent_argv is not None else _agent_argv(env)
    nnodes, standalone = env.get("PET_NNODES", "1"), False
    if argv:
        from torch.distributed.run import get_args_parser

        known, _ = get_args_parser().parse_known_args(argv)
        nnodes, standalone = str(known.nnodes), bool(known.standalone)
    try:
        low, high = (1, 1) if standalone else _parse_nnodes(nnodes)
        local = int(env.get("LOCAL_WORLD_SIZE", "1"))
        restarts = int(env.get("TORCHELASTIC_MAX_RESTARTS", "0"))
    except ValueError:
        raise UserError(f"torchrun: --nnodes {nnodes!r} is not N or MIN:MAX") from None
    return ElasticRange(low, high, local, restarts)


def check_elastic_launch(environ: Mapping[str, str] | None = None) -> ElasticRange | None:
    """The elastic range (see :func:`elastic_range`), after refusing a restartable run with torchrun's shared store.

    torch 2.4+ serves the workers' store from the rank-0 agent and keeps that one store for every rendezvous round:
    a process group's keys (each rank's gloo address) outlive the round, so the workers of a restarted round read
    the previous round's addresses and hang, and a node joining a running job waits for a MASTER_ADDR key that is
    never written again. A run that can have a second round (``--nnodes MIN:MAX`` with MIN < MAX, or
    ``--max-restarts`` > 0) needs ``TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1`` in every agent's environment: then each
    round gets a fresh MASTER_PORT whose store worker rank 0 hosts. Raises a :class:`UserError` naming it."""
    env = os.environ if environ is None else environ
    nodes = elastic_range(env)
    if nodes is None or not nodes.restartable:
        return nodes
    if env.get(NO_SHARED_STORE_ENV) != "1" or env.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
        raise UserError(
            f"{NO_SHARED_STORE_ENV}: set {NO_SHARED_STORE_ENV}=1 in every torchrun agent's environment for an "
            f"elastic or restartable run (--nnodes {nodes.min_nodes}:{nodes.max_nodes}, --max-restarts "
            f"{nodes.max_restarts}): torchrun's shared store keeps each round's keys, so restarted ranks would hang"
        )
    return nodes


def _rendezvous(rank: int, world_size: int, rendezvous_timeout_s: float, collective_timeout_s: float) -> dist.Store:
    """The ``env://`` store (MASTER_ADDR/MASTER_PORT; under torchrun the agent's store, or with
    ``TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1`` a fresh store per rendezvous round hosted by rank 0), waiting at most
    ``rendezvous_timeout_s`` for the others; afterwards its waits are bounded by ``collective_timeout_s``."""
    check_elastic_launch()
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
