"""Fixtures of the data-pipeline tests: small committed datasets built once per session."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from deepflow.data_pipeline.config import PrecomputeConfig, load_config
from deepflow.data_pipeline.precompute import run_precompute

REPO = Path(__file__).resolve().parents[2]


def digits_config(url: str, **overrides: Any) -> PrecomputeConfig:
    """The demo digits config (8x8 pixels, uint8) writing to ``url`` with small shards."""
    settings = [f"output.url={url}", "output.samples_per_shard=128", "output.samples_per_block=64"]
    settings += [f"{key}={value}" for key, value in overrides.items()]
    return load_config(REPO / "configs/demo/precompute-digits.yaml", settings)


@pytest.fixture(scope="session")
def digits_dataset(tmp_path_factory: pytest.TempPathFactory) -> str:
    """Digits precomputed by two ranks (1797 samples, 16 shards of <= 128) in a local directory."""
    url = str(tmp_path_factory.mktemp("digits") / "ds")
    config = digits_config(url)
    run_precompute(config, rank=0, world_size=2, progress=False)
    summary = run_precompute(config, rank=1, world_size=2, progress=False)
    assert summary.manifest is not None
    return url
