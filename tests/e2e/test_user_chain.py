"""The user's chain, through the command lines a user types, as real processes:

precompute -> train -> export -> sample (export and checkpoint folder) -> evaluate with the small-data classifier
-> convert a reference-format checkpoint into a NEW folder -> sample the converted model.

Every step must exit 0 without a traceback, and each step's output must be accepted by the next one.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.integration.test_train_support import TINY_MODEL
from tests.models.test_convert import H, HEADS, make_reference_state_dict

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


def run_cli(*args: str, env: dict[str, str] | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    """``python jobs/<args>`` from the repository root, as a user runs it; asserts success and no traceback."""
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "HF_HUB_OFFLINE": "1", **(env or {})}
    result = subprocess.run([sys.executable, *args], cwd=REPO, env=full_env, capture_output=True, text=True,
                            timeout=timeout)
    assert result.returncode == 0, f"{args} exited {result.returncode}:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    return result


def _npz_images(path: Path) -> tuple[np.ndarray, np.ndarray]:
    with np.load(path, allow_pickle=False) as data:
        return data["arr_0"], data["arr_1"]


def test_precompute_train_sample_evaluate_convert_sample(tmp_path: Path) -> None:
    data = tmp_path / "data"
    run_cli("jobs/precompute.py", "--config", "configs/demo/precompute-digits.yaml", "--set", f"output.url={data}")
    assert (data / "manifest.json").exists()

    run = tmp_path / "run"
    overrides = [*TINY_MODEL, f"data.url={data}", f"run.output_dir={run}", "data.global_batch_size=32",
                 "schedule.total_steps=12", "checkpoint.every=6", "eval.every=0", "logging.console_every=6",
                 "schedule.log_every=6", "optim.lr=2e-3", "ema.decay=0.9"]
    run_cli("jobs/train.py", "--config", "configs/demo/train-digits.yaml",
            *[arg for override in overrides for arg in ("--set", override)])
    assert (run / "export" / "export.safetensors").exists()
    assert (run / "checkpoints" / "step-0000012" / "COMMIT").exists()

    # the export and the checkpoints folder (newest committed step) are both accepted by the sampler
    sample_args = ["--num-samples", "40", "--chunk-size", "20", "--batch-size", "20", "--method", "euler",
                   "--steps", "4", "--seed", "1"]
    run_cli("jobs/sample.py", "--checkpoint", str(run / "export"), "--out", str(tmp_path / "samples"), *sample_args)
    run_cli("jobs/sample.py", "--checkpoint", str(run / "checkpoints"), "--out", str(tmp_path / "samples-ckpt"),
            *sample_args)
    images, labels = _npz_images(tmp_path / "samples" / "samples.npz")
    assert images.shape == (40, 8, 8, 1) and images.dtype == np.uint8
    assert labels.tolist() == [i % 10 for i in range(40)]
    from_checkpoint, _ = _npz_images(tmp_path / "samples-ckpt" / "samples.npz")
    assert np.array_equal(images, from_checkpoint)  # the export is the newest checkpoint's EMA

    results_path = tmp_path / "eval.json"
    run_cli("jobs/evaluate.py", "--samples", str(tmp_path / "samples" / "samples.npz"),
            "--extractor", "classifier:dataset=digits", "--out", str(results_path))
    results = json.loads(results_path.read_text())
    assert np.isfinite(results["fd_classifier"]) and results["fd_classifier"] >= 0
    assert 0.0 <= results["class_accuracy"] <= 1.0

    # a reference-format checkpoint (latent model, 4 channels) converted into a folder that does not exist yet
    state = make_reference_state_dict(2, 1, False)
    reference = tmp_path / "reference.pt"
    torch.save({"ema": state, "model": state, "args": argparse.Namespace(depth=2, df_idxs=[1], qk_norm=False)},
               reference)
    converted = tmp_path / "new" / "converted"
    run_cli("jobs/convert.py", "--reference", str(reference), "--name", "DeepFlow-S/2-2T", "--out", str(converted),
            "--num-heads", str(HEADS), "--hidden-size", str(H))
    assert (converted / "export.safetensors").exists() and (converted / "export.json").exists()

    from diffusers import AutoencoderKL

    vae = tmp_path / "tiny-vae"
    AutoencoderKL(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                  up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=8,
                  layers_per_block=1, sample_size=16).save_pretrained(vae)
    run_cli("jobs/sample.py", "--checkpoint", str(converted), "--out", str(tmp_path / "samples-converted"),
            "--num-samples", "8", "--chunk-size", "4", "--batch-size", "4", "--method", "euler", "--steps", "2",
            "--vae", str(vae))
    converted_images, _ = _npz_images(tmp_path / "samples-converted" / "samples.npz")
    assert converted_images.shape == (8, 16, 16, 3)
