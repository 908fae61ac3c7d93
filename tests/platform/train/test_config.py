"""RunConfig: YAML + dotted overrides, errors naming the field path, shipped configs, the CLI's early rejection."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from deepflow.platform.train.config import ConfigError, RunConfig, config_to_yaml, load_config, save_config

REPO = Path(__file__).resolve().parents[3]

# Exact parameter counts of REFERENCE.md (32x32x4 latents, 1000 classes, no SSL projector).
PAPER_PARAMS = {
    ("SiT-B/2", 12, 32): 130_500_112,
    ("DeepFlow-B/2-2T", 12, 32): 166_201_392,
    ("DeepFlow-L/2-3T", 18, 32): 433_438_768,
    ("DeepFlow-XL/2-3T", 24, 32): 681_559_344,
    ("DeepFlow-XL/2-3T", 24, 64): 682_444_080,
    ("SiT-XL/2", 28, 64): 675_995_920,
}


def test_overrides_are_parsed_as_yaml_scalars(tmp_path: Path) -> None:
    path = tmp_path / "run.yaml"
    path.write_text("optim:\n  lr: 1.0e-4\nmodel:\n  name: SiT-B/2\n")
    cfg = load_config(path, ["optim.lr=2e-4", "checkpoint.async=true", "optim.betas=[0.8, 0.95]",
                             "model.depth=null", "debug.inject_nan_steps=[3, 5]", "run.name=a=b"])
    assert cfg.optim.lr == pytest.approx(2e-4)
    assert cfg.checkpoint.async_save is True
    assert cfg.optim.betas == (0.8, 0.95)
    assert cfg.model.depth is None and cfg.model.name == "SiT-B/2"
    assert cfg.debug.inject_nan_steps == [3, 5]
    assert cfg.run.name == "a=b"


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["optim.lr=0"], "optim.lr: Input should be greater than 0"),
        (["optim.lrr=1"], "optim.lrr: unknown field; did you mean optim.lr?"),
        (["eval.sampler.method=ddim"], "eval.sampler.method: Input should be 'sde', "),
        (["distributed.zero_stage=4"], "distributed.zero_stage: Input should be 1, 2 or 3"),
        (["optim.betas=[0.9, 1.5]"], "optim.betas: Value error, each beta must lie in [0, 1)".replace("Value error, ", "")),
        (["precision=fp16", "distributed.engine=fsdp"], "precision: fp16 is not supported with distributed.engine=fsdp"),
        (["schedule=3"], "schedule: Input should be a valid dictionary"),
        (["optim.lr"], "expected dotted.path=value"),
    ],
)
def test_bad_values_name_the_field_path(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(None, overrides)
    assert message in str(info.value)


def test_unknown_top_level_section_in_yaml(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("optimizer:\n  lr: 1\nschedule:\n  total_steps: -5\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    lines = str(info.value).splitlines()
    assert "optimizer: unknown field; did you mean optim?" in lines
    assert "schedule.total_steps: Input should be greater than or equal to 1" in lines


def test_batch_divisibility_names_the_field() -> None:
    cfg = load_config(None, ["data.global_batch_size=10", "schedule.grad_accumulation=2"])
    assert cfg.per_rank_batch_size(1) == 5
    with pytest.raises(ConfigError, match="data.global_batch_size: 10 is not divisible"):
        cfg.per_rank_batch_size(2)


def test_streams_are_resolved_from_the_batch_and_the_shards_and_must_split_over_the_ranks() -> None:
    from deepflow.artifacts import Manifest, ShardEntry
    from deepflow.platform.train.config import resolve_model_for_dataset

    def manifest(shards: int) -> Manifest:
        return Manifest(kind="vae", shape=[4, 32, 32], num_classes=1000,
                        shards=[ShardEntry(name=f"s{i}.tar", num_samples=10) for i in range(shards)])

    base = ["data.global_batch_size=48", "schedule.grad_accumulation=2"]  # 24 samples per micro-step
    assert resolve_model_for_dataset(load_config(None, base), manifest(240)).data.streams == 24  # 10 shards each
    # 100 shards: 24 or 12 streams would get 4 or 5 (8 or 9) shards, drawing some samples 25% (12%) more often
    assert resolve_model_for_dataset(load_config(None, base), manifest(100)).data.streams == 8  # 12 or 13 shards
    assert resolve_model_for_dataset(load_config(None, base), manifest(12)).data.streams == 12
    assert resolve_model_for_dataset(load_config(None, base), manifest(10)).data.streams == 2  # 5 shards each
    cfg = resolve_model_for_dataset(load_config(None, base + ["data.streams=6"]), manifest(10))
    assert cfg.data.streams == 6 and cfg.per_rank_batch_size(3) == 8
    with pytest.raises(ConfigError, match=r"data.streams: the run's 6 sample streams cannot be split evenly over 4 "
                                          r"ranks; run on a number of ranks that divides 6 \(1, 2, 3, 6\)"):
        cfg.per_rank_batch_size(4)
    with pytest.raises(ConfigError, match="data.streams: 5 must divide the micro-step batch of 24 samples"):
        resolve_model_for_dataset(load_config(None, base + ["data.streams=5"]), manifest(10))
    with pytest.raises(ConfigError, match="data.streams: 12 streams need as many non-empty shards"):
        resolve_model_for_dataset(load_config(None, base + ["data.streams=12"]), manifest(10))


def test_resolved_config_round_trips(tmp_path: Path) -> None:
    cfg = load_config(None, ["optim.lr=3e-4", "checkpoint.async=true", "model.extra={acc_widths: [8, 8, 8]}"])
    save_config(cfg, tmp_path / "sub" / "config.yaml")
    again = load_config(tmp_path / "sub" / "config.yaml")
    assert again == cfg
    assert yaml.safe_load(config_to_yaml(cfg))["checkpoint"]["async"] is True


def _shipped_configs() -> list[Path]:
    paths = sorted((REPO / "configs").glob("imagenet*/*.yaml")) + sorted((REPO / "configs").glob("demo/train-*.yaml"))
    return [p for p in paths if "precompute" not in p.name]


def test_shipped_configs_validate_and_build_the_paper_models() -> None:
    from deepflow.models import create_model

    paths = _shipped_configs()
    names = {p.relative_to(REPO / "configs").as_posix() for p in paths}
    for required in ("imagenet256/sit-b2.yaml", "imagenet256/deepflow-b2-2t.yaml", "imagenet256/deepflow-l2-3t.yaml",
                     "imagenet256/deepflow-xl2-3t.yaml", "imagenet256/deepflow-xl2-3t-ssl.yaml",
                     "imagenet512/deepflow-xl2-3t.yaml", "imagenet512/deepflow-xl2-3t-ssl.yaml",
                     "demo/train-digits.yaml"):
        assert required in names
    seen = set()
    for path in paths:
        cfg: RunConfig = load_config(path)
        key = (cfg.model.name, cfg.model.depth, cfg.model.input_size)
        if key in PAPER_PARAMS and not cfg.model.ssl_align:
            with torch.device("meta"):
                model = create_model(cfg.model.name, **cfg.model.create_kwargs())
            assert sum(p.numel() for p in model.parameters()) == PAPER_PARAMS[key], path
            seen.add(key)
        if cfg.model.ssl_align:  # DINOv2-B/14 tokens must match the latent token grid
            assert (cfg.ssl.image_size // 14) == cfg.model.input_size // 2, path
    assert seen == set(PAPER_PARAMS)


def test_train_cli_rejects_a_bad_config_before_any_process_group(tmp_path: Path) -> None:
    config = tmp_path / "run.yaml"
    config.write_text("run:\n  name: x\n")
    env = {**os.environ, "MASTER_PORT": "1", "WORLD_SIZE": "2", "RANK": "0"}  # a group would hang/fail
    proc = subprocess.run(
        [sys.executable, str(REPO / "jobs" / "train.py"), "--config", str(config), "--set", "optim.lr=-1",
         "--set", "ema.decay=2"],
        capture_output=True, text=True, timeout=120, env=env, cwd=REPO,
    )
    assert proc.returncode == 2
    assert "optim.lr: Input should be greater than 0" in proc.stderr
    assert "ema.decay: Input should be less than or equal to 1" in proc.stderr


def test_saved_config_never_holds_credentials(tmp_path: Path) -> None:
    cfg = load_config(None, ['checkpoint.storage_options={"key": "AKIA123", "secret": "s3cr3t", '
                             '"client_kwargs": {"endpoint_url": "http://minio:9000"}}',
                             'data.storage_options={"token": "abc"}'])
    text = config_to_yaml(cfg)
    assert "AKIA123" not in text and "s3cr3t" not in text and "abc" not in text
    assert "http://minio:9000" in text and text.count("'***'") == 3
    assert cfg.checkpoint.storage_options["secret"] == "s3cr3t"  # the live config keeps them


def test_elastic_world_sizes_must_divide_the_batch_and_the_streams() -> None:
    from deepflow.artifacts import Manifest, ShardEntry
    from deepflow.platform.train.config import resolve_model_for_dataset

    manifest = Manifest(kind="vae", shape=[4, 32, 32], num_classes=1000,
                        shards=[ShardEntry(name=f"s{i}.tar", num_samples=10) for i in range(240)])
    base = ["data.global_batch_size=48", "schedule.grad_accumulation=2"]  # 24 samples per micro-step
    assert resolve_model_for_dataset(load_config(None, base), manifest, [2, 3, 4]).data.streams == 24
    assert resolve_model_for_dataset(load_config(None, base), manifest, [8, 12]).data.streams == 24
    with pytest.raises(ConfigError, match=r"^data.streams: 6 streams cannot be split over world size\(s\) 4 of the "
                                          r"elastic range 2, 3, 4; use a multiple of 12 that divides 24"):
        resolve_model_for_dataset(load_config(None, base + ["data.streams=6"]), manifest, [2, 3, 4])
    with pytest.raises(ConfigError, match=r"^data.global_batch_size: 48 \(x schedule.grad_accumulation 2\) cannot "
                                          r"be split over world size\(s\) 5 of the elastic range 4, 5"):
        resolve_model_for_dataset(load_config(None, base), manifest, [4, 5])
    few = Manifest(kind="vae", shape=[4, 32, 32], num_classes=1000,
                   shards=[ShardEntry(name=f"s{i}.tar", num_samples=10) for i in range(5)])
    with pytest.raises(ConfigError, match=r"^data.streams: no automatic stream count suits every world size"):
        resolve_model_for_dataset(load_config(None, base), few, [6, 12])
    assert resolve_model_for_dataset(load_config(None, base), few, []).data.streams == 1  # a plain run: as before


def test_elastic_range_from_the_agent_command_line_and_the_shared_store_guard() -> None:
    from deepflow.errors import UserError
    from deepflow.platform.train.distributed import check_elastic_launch, elastic_range

    agent = ["--nnodes", "2:3", "--nproc-per-node", "2", "--rdzv-backend", "c10d", "--max-restarts", "5", "train.py"]
    env = {"TORCHELASTIC_RUN_ID": "job", "LOCAL_WORLD_SIZE": "2", "TORCHELASTIC_MAX_RESTARTS": "5"}
    nodes = elastic_range(env, agent)
    assert nodes is not None and nodes.world_sizes == [4, 6] and nodes.restartable
    assert elastic_range({}, agent) is None  # not under torchrun
    standalone = elastic_range({"TORCHELASTIC_RUN_ID": "x", "LOCAL_WORLD_SIZE": "2"},
                               ["--standalone", "--nproc_per_node", "2", "train.py"])
    assert standalone is not None and standalone.world_sizes == [2] and not standalone.restartable
    assert elastic_range({"TORCHELASTIC_RUN_ID": "x", "PET_NNODES": "1:4"}, []) is not None
    assert elastic_range({"TORCHELASTIC_RUN_ID": "x", "PET_NNODES": "1:4"}, []).world_sizes == [1, 2, 3, 4]
    with pytest.raises(UserError, match="^TORCH_DISABLE_SHARE_RDZV_TCP_STORE: set TORCH_DISABLE_SHARE_RDZV_TCP_"):
        check_elastic_launch({**env, "PET_NNODES": "2:3", "TORCHELASTIC_USE_AGENT_STORE": "True"})
    fixed = {**env, "PET_NNODES": "2:3", "TORCHELASTIC_USE_AGENT_STORE": "False",
             "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}
    assert check_elastic_launch(fixed) is not None
    plain = {"TORCHELASTIC_RUN_ID": "x", "TORCHELASTIC_MAX_RESTARTS": "0", "TORCHELASTIC_USE_AGENT_STORE": "True"}
    assert check_elastic_launch(plain) is not None  # a plain run keeps the shared store
