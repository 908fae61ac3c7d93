"""The README's main job (`deepflow demo`), end to end on the digits fallback with a tiny step budget."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image


@pytest.mark.slow
def test_demo_runs_end_to_end_and_reports_quality(tmp_path: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DEEPFLOW_CACHE": str(tmp_path / "cache")}
    # `make demo` runs the console script; --steps scales the intervals (2000 -> 30 steps: every 8), --set wins
    result = subprocess.run(
        [str(Path(sys.executable).parent / "deepflow"), "demo", "--out", str(tmp_path / "demo"), "--dataset",
         "digits", "--samples", "100", "--steps", "30", "--set", "checkpoint.every=15", "--set", "eval.every=30",
         "--set", "eval.num_samples=50", "--set", "eval.sampler.steps=4"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    run = tmp_path / "demo" / "run-digits"
    summary = json.loads((run / "demo_summary.json").read_text())
    assert summary["dataset"] == "digits"
    assert summary["samples_fd"] > summary["real_images_fd"]  # 30 steps cannot match real data
    assert 0.0 <= summary["samples_accuracy"] <= 1.0 and summary["real_images_accuracy"] > 0.85
    grid = np.asarray(Image.open(run / "samples" / "final_grid.png"))
    assert grid.shape[0] == grid.shape[1] > 10 * 8  # 10 rows x 10 samples of 8x8
    assert sorted(p.name for p in (run / "checkpoints").iterdir() if p.name.startswith("step-")) == [
        "step-0000015", "step-0000030"]
    assert (run / "export" / "export.safetensors").exists()
    assert any((run / "tensorboard").rglob("events.out.tfevents.*"))
    evals = [json.loads(line) for line in (run / "tensorboard" / "scalars.jsonl").read_text().splitlines()
             if "eval/class_accuracy" in line]
    assert [e["step"] for e in evals] == [30] and 0.0 <= evals[0]["eval/class_accuracy"] <= 1.0
    assert evals[0]["eval/fd_classifier"] > 0
    assert "samples grid" in result.stdout and "class accuracy" in result.stdout
    assert "eval step 30: class_accuracy" in result.stdout + result.stderr  # the periodic evaluation, on the console
    assert "Traceback" not in result.stderr
