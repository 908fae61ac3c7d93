"""Training runs around the loop: injected NaN losses, SIGTERM (preemption), the deepspeed launcher with SSL
alignment (a tiny random DINOv2) and periodic evaluation (sample grid + Frechet distance)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_train_support import (  # noqa: E402
    REPO,
    _env,
    base_overrides,
    launch_command,
    losses_by_step,
    make_digits_dataset,
    read_scalars,
    run_train,
    start_train,
    write_config,
)


@pytest.fixture(scope="module")
def digits_url(tmp_path_factory: pytest.TempPathFactory) -> str:
    root = tmp_path_factory.mktemp("digits-faults")
    make_digits_dataset(str(root / "digits"))
    return str(root / "digits")


@pytest.mark.slow
def test_injected_nan_is_skipped_and_too_many_stop_with_a_checkpoint(digits_url: str, tmp_path: Path) -> None:
    """2 ranks under DeepSpeed ZeRO-3 with gradient accumulation (the forward ran, the backward must not)."""
    overrides = base_overrides(digits_url, str(tmp_path), steps=12, **{
        "debug.inject_nan_steps": "[3, 5, 6]", "schedule.max_nonfinite_steps": 2, "schedule.log_every": 1,
        "distributed.engine": "deepspeed", "distributed.zero_stage": 3, "schedule.grad_accumulation": 2,
    })
    config = write_config(tmp_path / "run.yaml", overrides)
    proc = run_train(config, [], check=False)
    assert proc.returncode != 0, proc.stdout[-3000:]
    assert "loss was NaN/inf for 2 consecutive steps (up to step 6)" in proc.stdout + proc.stderr
    assert "step 3: non-finite loss on some rank; step skipped (1 in a row)" in proc.stdout
    rows = read_scalars(tmp_path / "tensorboard")
    losses = losses_by_step(rows)
    assert sorted(losses) == [1, 2, 4]  # 3, 5, 6 skipped; the run stopped after 6
    assert max(row.get("optim/skipped_steps", 0) for row in rows) == 3
    assert (tmp_path / "checkpoints" / "step-0000006" / "COMMIT").exists()
    # the checkpoint holds the last good weights (no update at 5 and 6) and resumes cleanly
    proc = run_train(config, ["debug.inject_nan_steps=[]", "schedule.total_steps=8"])
    assert "resumed from" in proc.stdout and proc.stdout.count("training completed at step 8") == 2


def _wait_for_step(path: Path, step: int, proc, timeout: float = 120.0) -> None:  # noqa: ANN001
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and any(f'"step": {step},' in line for line in path.read_text().splitlines()):
            return
        if proc.poll() is not None:
            raise AssertionError(f"training ended early:\n{proc.stdout.read()[-3000:]}")
        time.sleep(0.1)
    raise AssertionError(f"step {step} not reached within {timeout}s")


@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["python", "torchrun"])
def test_sigterm_saves_a_committed_checkpoint(launcher: str, digits_url: str, tmp_path: Path) -> None:
    overrides = base_overrides(digits_url, str(tmp_path), steps=10_000, **{
        "debug.step_sleep_s": 0.05, "distributed.engine": "fsdp", "precision": "bf16",
    })
    config = write_config(tmp_path / "run.yaml", overrides)
    proc = start_train(config, [], launcher=launcher)
    _wait_for_step(tmp_path / "tensorboard" / "scalars.jsonl", 3, proc)
    os.kill(proc.pid, signal.SIGTERM)  # torchrun forwards it to both workers, like Kubernetes to a pod
    output, _ = proc.communicate(timeout=180)
    committed = [p for p in (tmp_path / "checkpoints").iterdir() if (p / "COMMIT").exists()]
    assert len(committed) == 1, output[-3000:]
    step = int(committed[0].name.split("-")[1])
    assert 3 <= step < 10_000
    expected_ranks = 1 if launcher == "python" else 2
    assert output.count(f"training preempted at step {step}") == expected_ranks, output[-3000:]
    if launcher == "python":
        assert proc.returncode == 0  # (torchrun's own agent reports a signal death even when workers exit 0)
    else:
        assert "exitcode" not in output  # no worker failed


@pytest.mark.slow
def test_sigterm_during_start_up_is_kept_and_ends_in_a_committed_checkpoint(digits_url: str, tmp_path: Path) -> None:
    """A preemption that arrives while the job is still importing torch and building the model (right after
    jobs/train.py reported "running") is not fatal: the run stops after its first step with a checkpoint."""
    config = write_config(tmp_path / "run.yaml", base_overrides(digits_url, str(tmp_path), steps=10_000))
    status = tmp_path / "status"
    status.mkdir()
    proc = subprocess.Popen(launch_command(config, [], launcher="python"), cwd=REPO,
                            env={**_env(), "DEEPFLOW_STATUS_DIR": str(status)}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    report = status / "local-rank-0.json"
    deadline = time.monotonic() + 60
    while not report.exists() and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGTERM)
    output, _ = proc.communicate(timeout=180)
    assert proc.returncode == 0, output[-3000:]
    committed = [p.name for p in (tmp_path / "checkpoints").iterdir() if (p / "COMMIT").exists()]
    assert committed == ["step-0000001"], output[-3000:]
    assert "training preempted at step 1" in output and "Traceback" not in output
    assert json.loads(report.read_text())["status"] == "preempted"


@pytest.mark.slow
def test_deepspeed_launcher_with_ssl_alignment_and_evaluation(tmp_path: Path) -> None:
    import torch
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from transformers import Dinov2Config, Dinov2Model

    from deepflow.data_pipeline.config import PrecomputeConfig
    from deepflow.data_pipeline.precompute import run_precompute

    data_url = str(tmp_path / "digits-img")
    run_precompute(PrecomputeConfig.model_validate({
        "source": {"kind": "digits"}, "preprocess": {"resolution": 8, "resize": "resize", "channels": 1},
        "encoder": {"kind": "pixel", "dtype": "uint8"}, "batch_size": 64, "limit": 256,
        "output": {"url": data_url, "samples_per_shard": 64, "samples_per_block": 64, "keep_image": "png"},
    }), rank=0, world_size=1, progress=False)
    torch.manual_seed(0)
    dino = tmp_path / "tiny-dinov2"
    Dinov2Model(Dinov2Config(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                             patch_size=14, image_size=56)).save_pretrained(dino)
    overrides = base_overrides(data_url, str(tmp_path / "run"), steps=6, **{
        "model.ssl_align": "true", "model.extra": '{"acc_widths":[32,32,32],"projector_dim":32,"z_dim":32}',
        "ssl.encoder": str(dino), "ssl.image_size": 56,
        "eval.every": 3, "eval.num_samples": 40, "eval.batch_size": 20, "eval.sampler.method": "heun",
        "eval.sampler.steps": 4, "eval.extractor": "classifier", "eval.extractor_options": "{dataset: digits}",
        "eval.all_ranks": "true", "precision": "bf16",
    })
    config = write_config(tmp_path / "run.yaml", overrides)
    proc = run_train(config, ["distributed.engine=deepspeed", "distributed.zero_stage=2"], launcher="deepspeed")
    assert proc.stdout.count("training completed at step 6") == 2
    accumulator = EventAccumulator(str(tmp_path / "run" / "tensorboard"), size_guidance={"scalars": 0, "images": 0})
    accumulator.Reload()
    tags = set(accumulator.Tags()["scalars"])
    assert {"loss/proj", "loss/acc", "eval/fd_classifier"} <= tags
    proj = [e.value for e in accumulator.Scalars("loss/proj")]
    assert all(-1.0 <= value <= 1.0 for value in proj)  # negative cosine similarity
    assert [e.step for e in accumulator.Scalars("eval/fd_classifier")] == [3, 6]
    assert [e.step for e in accumulator.Images("eval/samples")] == [3, 6]
    assert sorted(p.name for p in (tmp_path / "run" / "samples").iterdir()) == ["step-0000003.png", "step-0000006.png"]
