"""Launch-environment parsing (torchrun / deepspeed launcher / Kubernetes / single process) and step seeding."""

from __future__ import annotations

import pytest
import torch

from deepflow.platform.train.distributed import init_distributed, read_dist_env, step_generator, step_seed

LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "JOB_COMPLETION_INDEX",
               "NPROC_PER_NODE")


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for name in LAUNCH_VARS:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_single_process_needs_no_group(clean_env: pytest.MonkeyPatch) -> None:
    env = read_dist_env()
    assert (env.rank, env.world_size, env.source) == (0, 1, "single")
    ctx = init_distributed()
    assert ctx.world_size == 1 and ctx.backend is None and not ctx.distributed
    assert ctx.device.type == ("cuda" if torch.cuda.is_available() else "cpu")


def test_torchrun_and_deepspeed_launcher_env(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("RANK", "5")
    clean_env.setenv("WORLD_SIZE", "8")
    clean_env.setenv("LOCAL_RANK", "1")
    clean_env.setenv("MASTER_ADDR", "10.1.2.3")
    clean_env.setenv("MASTER_PORT", "29600")
    env = read_dist_env()
    assert (env.rank, env.world_size, env.local_rank, env.master_addr, env.master_port) == (5, 8, 1, "10.1.2.3", 29600)
    clean_env.delenv("LOCAL_RANK")
    assert read_dist_env(local_rank_arg=3).local_rank == 3  # deepspeed's --local_rank=3


def test_kubernetes_indexed_job_env(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("WORLD_SIZE", "16")
    clean_env.setenv("JOB_COMPLETION_INDEX", "2")
    clean_env.setenv("NPROC_PER_NODE", "4")
    clean_env.setenv("LOCAL_RANK", "3")
    clean_env.setenv("MASTER_ADDR", "train-0.train")
    env = read_dist_env()
    assert (env.rank, env.world_size, env.local_rank, env.source) == (11, 16, 3, "kubernetes")


def test_world_size_without_rank_is_an_error(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("WORLD_SIZE", "4")
    with pytest.raises(ValueError, match="neither RANK nor JOB_COMPLETION_INDEX"):
        read_dist_env()
    clean_env.setenv("RANK", "x")
    with pytest.raises(ValueError, match="RANK='x' is not an integer"):
        read_dist_env()


def test_step_seeds_depend_on_every_coordinate() -> None:
    seeds = {step_seed(s, r, t, m) for s in range(2) for r in range(3) for t in range(50) for m in range(2)}
    assert len(seeds) == 2 * 3 * 50 * 2
    a = torch.randn(4, generator=step_generator(1, 0, 7, 0, torch.device("cpu")))
    b = torch.randn(4, generator=step_generator(1, 0, 7, 0, torch.device("cpu")))
    c = torch.randn(4, generator=step_generator(1, 1, 7, 0, torch.device("cpu")))
    assert torch.equal(a, b) and not torch.equal(a, c)
