"""``deepflow study`` the way a user runs it: a real CLI process training real runs (SiT and DeepFlow-2T, two
seeds, plus a final-only variant) on the digits dataset, stopped with SIGTERM in the middle and run again with the
same command: it resumes (trained runs are not retrained, evaluations are not repeated) and writes the report
(tables with mean +- std over seeds, the tie reading, one plot per metric), whose figures equal the runs'
evaluation records."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.integration.test_train_support import base_overrides, make_digits_dataset, write_config

pytestmark = pytest.mark.slow


def _study_file(tmp_path: Path) -> Path:
    data = str(tmp_path / "data")
    make_digits_dataset(data)
    write_config(tmp_path / "base.yaml", base_overrides(data, str(tmp_path / "unused"), steps=8) + [
        "eval.extractor=classifier", "eval.extractor_options.dataset=digits", "eval.batch_size=16",
        "debug.step_sleep_s=0.25", "schedule.log_every=2"])
    study = {
        "name": "tiny", "output_dir": str(tmp_path / "study"), "base_config": "base.yaml", "seeds": [0, 1],
        "steps": 8, "eval_every": 4, "num_samples": 16, "parallel": 2,
        "variants": [{"label": "SiT", "set": ["model.name=SiT-S/2"]}, {"label": "DeepFlow-2T"},
                     {"label": "no acceleration", "set": ["objective.acc_weight=0"], "curve": False,
                      "seeds": [0]}],
        "protocols": [{"label": "EMA, Euler 4", "sampler": {"method": "euler", "steps": 4}},
                      {"label": "raw, Euler 4", "weights": "raw", "sampler": {"method": "euler", "steps": 4},
                       "variants": ["SiT", "DeepFlow-2T"]}],
    }
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(study))
    return path


def _command(study: Path) -> list[str]:
    return [sys.executable, "-m", "deepflow", "study", "--config", str(study)]


def test_study_stops_on_sigterm_resumes_and_reports(tmp_path: Path) -> None:
    study = _study_file(tmp_path)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    first = subprocess.Popen(_command(study), cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True)
    checkpoint = tmp_path / "study/runs/sit/seed-0/checkpoints/step-0000004/COMMIT"
    deadline = time.monotonic() + 240
    while not checkpoint.exists() and time.monotonic() < deadline and first.poll() is None:
        time.sleep(0.2)
    assert checkpoint.exists(), first.communicate()
    first.send_signal(signal.SIGTERM)
    out, err = first.communicate(timeout=120)
    assert first.returncode == 130, (out, err)
    assert not (tmp_path / "study/runs/sit/seed-0/checkpoints/step-0000008/COMMIT").exists()

    second = subprocess.run(_command(study), cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, (second.stdout, second.stderr)
    assert "[5/5]" in second.stdout and "report: " in second.stdout
    train_log = (tmp_path / "study/runs/sit/seed-0/train.log").read_text()
    assert "resum" in train_log.lower()  # the interrupted run continued from its step-4 checkpoint

    results = json.loads((tmp_path / "study/results.json").read_text())
    records = {(r["variant"], r["seed"]): r["evaluations"] for r in results["runs"]}
    assert set(records) == {("SiT", 0), ("SiT", 1), ("DeepFlow-2T", 0), ("DeepFlow-2T", 1), ("no acceleration", 0)}
    assert sorted((e["step"], e["protocol"]) for e in records[("SiT", 0)]) == [
        (4, "EMA, Euler 4"), (8, "EMA, Euler 4"), (8, "raw, Euler 4")]
    assert [(e["step"], e["protocol"]) for e in records[("no acceleration", 0)]] == [(8, "EMA, Euler 4")]
    assert all(e["train_flops"] > 0 and e["train_seconds"] > 0 for r in records.values() for e in r)

    report = (tmp_path / "study/report.md").read_text()
    fds = [next(e["metrics"]["fd_classifier"] for e in records[("DeepFlow-2T", s)]
                if (e["step"], e["protocol"]) == (8, "EMA, Euler 4")) for s in (0, 1)]
    mean, std = sum(fds) / 2, abs(fds[0] - fds[1]) / 2 ** 0.5
    assert f"{mean:.2f} +- {std:.2f}" in report
    assert "| 8 |" in report and "reading" in report and "| no acceleration |" in report
    assert (tmp_path / "study/fd-classifier.png").stat().st_size > 0
    assert (tmp_path / "study/class-accuracy.png").stat().st_size > 0

    again = subprocess.run(_command(study), cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and again.stdout.count("already done") == 5, again.stdout
    kept = json.loads((tmp_path / "study/runs/sit/seed-0/evaluations.json").read_text())
    assert [(e["step"], e["protocol"], e["metrics"]) for e in kept] == [
        (e["step"], e["protocol"], e["metrics"]) for e in records[("SiT", 0)]]
