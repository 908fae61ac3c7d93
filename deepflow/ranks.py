"""Which process am I: the ONE reader of the launch environment (rank, world size, local rank, rendezvous).

* torchrun / ``torch.distributed.run`` and the DeepSpeed launcher: RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR,
  MASTER_PORT (DeepSpeed also passes ``--local_rank=N``: give it as ``local_rank_arg``);
* Kubernetes Indexed Jobs: the pod's index in JOB_COMPLETION_INDEX is its node rank; with WORLD_SIZE and
  NPROC_PER_NODE (processes per pod, default 1) RANK = node_rank * NPROC_PER_NODE + LOCAL_RANK; jobs whose pods are
  independent slices (precompute) give the number of pods as ``slices`` instead;
* nothing set: a single process (world size 1).

No torch.distributed here: training, sampling and precompute all read their place from this module.
"""
from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

__all__ = ["DistEnv", "read_dist_env"]


@dataclass(frozen=True)
class DistEnv:
    """Where this process sits in the job, as read from the environment."""

    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int
    source: str  # "single" | "torchrun" | "kubernetes" | "explicit"


def _int_env(env: Mapping[str, str], name: str, default: int | None = None) -> int | None:
    value = env.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} is not an integer") from None


def read_dist_env(
    local_rank_arg: int | None = None,
    environ: Mapping[str, str] | None = None,
    slices: int | None = None,
) -> DistEnv:
    """Read rank / world size from torchrun, DeepSpeed-launcher or Kubernetes variables (see module doc).

    ``slices``: the number of pods of a Kubernetes Indexed Job whose pods work independently (one process each).
    """
    env = os.environ if environ is None else environ
    world_size = _int_env(env, "WORLD_SIZE", 1) or 1
    addr = env.get("MASTER_ADDR", "127.0.0.1")
    port = _int_env(env, "MASTER_PORT", 29500) or 29500
    rank = _int_env(env, "RANK")
    local_rank = _int_env(env, "LOCAL_RANK", local_rank_arg)
    local = local_rank if local_rank is not None else 0
    if rank is not None:
        env_info = DistEnv(rank, world_size, local, addr, port, "torchrun" if world_size > 1 else "single")
    else:
        node_rank = _int_env(env, "JOB_COMPLETION_INDEX")
        if node_rank is not None and slices is not None and world_size == 1:
            env_info = DistEnv(node_rank, slices, local, addr, port, "kubernetes")
        elif node_rank is not None and world_size > 1:
            per_node = _int_env(env, "NPROC_PER_NODE", 1) or 1
            env_info = DistEnv(node_rank * per_node + local, world_size, local, addr, port, "kubernetes")
        elif node_rank is not None:
            raise ValueError(
                "slices: JOB_COMPLETION_INDEX is set (Kubernetes indexed job) but neither WORLD_SIZE nor the "
                "number of slices (pods) is known; set WORLD_SIZE in the pod or slices in the config"
            )
        elif world_size > 1:
            raise ValueError(
                f"WORLD_SIZE={world_size} but neither RANK nor JOB_COMPLETION_INDEX is set: cannot tell this "
                "process's rank (launch with torchrun, the deepspeed launcher or a Kubernetes indexed Job)"
            )
        else:
            env_info = DistEnv(0, 1, local, addr, port, "single")
    if not 0 <= env_info.rank < env_info.world_size:
        raise ValueError(f"rank {env_info.rank} is outside 0..{env_info.world_size - 1} "
                         f"(world size {env_info.world_size})")
    return env_info
