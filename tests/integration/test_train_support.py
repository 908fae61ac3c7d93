"""Shared helpers of the training integration tests (no tests here): a real digits dataset written through the
data pipeline, a tiny real DeepFlow config, and launchers for ``jobs/train.py`` (python / torchrun / deepspeed).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[2]
TRAIN = REPO / "jobs" / "train.py"

# DeepFlow-S/2-2T shrunk to a few thousand parameters: 8x8 one-channel digits, 2 blocks, hidden 32.
TINY_MODEL = [
    "model.name=DeepFlow-S/2-2T",
    "model.depth=2",
    "model.hidden_size=32",
    "model.num_heads=2",
    "model.input_size=8",
    "model.in_channels=1",
    "model.num_classes=10",
    'model.extra={"acc_widths":[32,32,32],"projector_dim":32}',
]


def make_digits_dataset(url: str, storage_options: dict[str, Any] | None = None) -> dict[str, Any]:
    """sklearn's 8x8 digits (1797 images, 10 classes) as a committed pixel dataset of 8 shards."""
    from sklearn.datasets import load_digits

    from deepflow.data_pipeline.arrays import write_array_dataset

    digits = load_digits()
    pixels = np.clip(np.round(digits.images * (255.0 / 16.0)), 0, 255).astype(np.uint8)[:, None]
    return write_array_dataset(
        url, {"pixels": pixels}, digits.target.astype(np.int64), kind="pixel", num_classes=10,
        samples_per_shard=225, samples_per_block=75, storage_options=storage_options,
    )


#: one engine of each state layout (replicated, dim-0 shards, flat partitions): the resize and elastic tests
RESHARD_ENGINES: dict[str, list[str]] = {
    "ddp": ["distributed.engine=ddp"],
    "fsdp": ["distributed.engine=fsdp"],
    "zero2": ["distributed.engine=deepspeed", "distributed.zero_stage=2"],
}


def base_overrides(data_url: str, output_dir: str, steps: int = 30, **extra: Any) -> list[str]:
    """Overrides of a tiny, fast run (on top of no config file at all: every other field keeps its default)."""
    overrides = TINY_MODEL + [
        f"data.url={data_url}",
        f"run.output_dir={output_dir}",
        "run.seed=3",
        "data.global_batch_size=32",
        "data.shuffle_buffer=100",
        "data.num_workers=0",
        "optim.lr=2e-3",
        f"schedule.total_steps={steps}",
        "schedule.log_every=1",
        "logging.console_every=5",
        "logging.peak_tflops=1.0",
        "checkpoint.every=1000",
        "ema.decay=0.9",
    ]
    overrides += [f"{key}={value}" for key, value in extra.items()]
    return overrides


def write_config(path: Path, overrides: list[str]) -> Path:
    """A YAML run config holding ``overrides`` (validated here first, as jobs/train.py will)."""
    import yaml

    from deepflow.platform.train.config import apply_overrides, config_from_tree

    tree = apply_overrides({"run": {"name": "test"}}, overrides)
    config_from_tree(tree)
    path.write_text(yaml.safe_dump(tree, sort_keys=False))
    return path


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.update({"OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"})
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def launch_command(config: Path, overrides: list[str], launcher: str = "torchrun", nproc: int = 2) -> list[str]:
    """The command line; ``overrides`` travel as ``--set`` (no spaces: the deepspeed launcher splits on them)."""
    sets = [arg for override in overrides for arg in ("--set", override)]
    if launcher == "python":
        return [sys.executable, str(TRAIN), "--config", str(config), *sets]
    if launcher == "torchrun":
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
                str(TRAIN), "--config", str(config), *sets]
    if launcher == "deepspeed":
        return [sys.executable, "-m", "deepspeed.launcher.runner", f"--num_gpus={nproc}", "--no_local_rank",
                str(TRAIN), "--config", str(config), *sets]
    raise ValueError(launcher)


def run_train(config: Path, overrides: list[str], launcher: str = "torchrun", nproc: int = 2,
              timeout: float = 300.0, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(launch_command(config, overrides, launcher, nproc), cwd=REPO, env=_env(),
                          capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"train exited {proc.returncode}\nSTDOUT:\n{proc.stdout[-6000:]}\nSTDERR:\n{proc.stderr[-6000:]}")
    return proc


def start_train(config: Path, overrides: list[str], launcher: str = "torchrun", nproc: int = 2) -> subprocess.Popen[str]:
    return subprocess.Popen(launch_command(config, overrides, launcher, nproc), cwd=REPO, env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)


def read_scalars(tensorboard_dir: Path) -> list[dict[str, float]]:
    """Rows of scalars.jsonl (one per log step; a resumed run appends)."""
    path = tensorboard_dir / "scalars.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def losses_by_step(rows: list[dict[str, float]]) -> dict[int, float]:
    """step -> loss/total; later rows (a resumed run) override earlier ones."""
    return {int(row["step"]): row["loss/total"] for row in rows if "loss/total" in row}
