"""The study config and report, without training: one-line errors for mistakes a user makes in a study file
(typo in a variant's overrides, a field the study owns, unknown labels, raw weights of a sharded engine), the
evaluation plan, and the report's arithmetic (mean +- std, the tie rule, training seconds of a resumed run)."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import yaml

from deepflow.platform.study.config import load_study, run_overrides
from deepflow.platform.study.job import main
from deepflow.platform.study.report import Summary, _seconds_per_step, verdict

BASE = {"run": {"name": "base"}, "model": {"name": "DeepFlow-S/2-2T", "depth": 2, "hidden_size": 32,
                                            "num_heads": 2, "input_size": 8, "in_channels": 1, "num_classes": 10},
        "data": {"url": "data/none"}, "eval": {"extractor": "classifier",
                                              "extractor_options": {"dataset": "digits"}}}


def _study(tmp_path: Path, **changes: object) -> Path:
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(BASE))
    study = {"name": "t", "output_dir": str(tmp_path / "out"), "base_config": "base.yaml", "seeds": [0, 1],
             "steps": 10, "eval_every": 4,
             "variants": [{"label": "SiT", "set": ["model.name=SiT-S/2"]}, {"label": "DeepFlow-2T"},
                          {"label": "ablation", "set": ["objective.acc_weight=0"], "curve": False, "seeds": [0]}],
             "protocols": [{"label": "ema"}, {"label": "raw", "weights": "raw", "variants": ["SiT"]}]}
    study.update(changes)
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(study))
    return path


def test_plan_points_protocols_and_run_overrides(tmp_path: Path) -> None:
    study, configs = load_study(_study(tmp_path))
    sit, deepflow, ablation = study.variants
    assert study.eval_points(sit) == [4, 8, 10] and study.eval_points(ablation) == [10]
    assert [p.label for p in study.protocols_for(sit, 4)] == ["ema"]
    assert [p.label for p in study.protocols_for(sit, 10)] == ["ema", "raw"]
    assert [p.label for p in study.protocols_for(deepflow, 10)] == ["ema"]
    assert configs["SiT"].model.name == "SiT-S/2" and configs["ablation"].objective.acc_weight == 0.0
    assert configs["SiT"].eval.every == 0 and configs["SiT"].schedule.total_steps == 10
    overrides = run_overrides(study, ablation, 0)
    assert "checkpoint.every=10" in overrides and f"run.output_dir={tmp_path / 'out/runs/ablation/seed-0'}" in overrides
    assert study.comparison == ("SiT", "DeepFlow-2T")
    assert study.parallel_runs(cpu_count=8) == 8 and study.parallel_runs(gpus=4, cpu_count=8) == 4
    study.nproc_per_run = 2
    assert study.parallel_runs(gpus=4) == 2 and study.parallel_runs(cpu_count=8) == 4


@pytest.mark.parametrize(("changes", "message"), [
    ({"variants": [{"label": "SiT", "set": ["model.nmae=SiT-S/2"]}, {"label": "B"}],
      "protocols": [{"label": "ema"}]}, "error: variants[SiT]: model.nmae"),
    ({"variants": [{"label": "SiT", "set": ["run.seed=4"]}, {"label": "B"}], "protocols": [{"label": "ema"}]},
     "error: variants[SiT].set: run.seed is set by the study"),
    ({"compare": ["SiT", "DeepFlow"]}, "compare: unknown variants ['DeepFlow']"),
    ({"protocols": [{"label": "ema", "variants": ["SiTT"]}]}, "names unknown variants ['SiTT']"),
    ({"base_config": "missing.yaml"}, "error: base_config: "),
    ({"seeds": [1, 1]}, "seeds: "),
    ({"overrides": ["distributed.engine=fsdp"]}, "protocols[raw].weights: raw weights need distributed.engine=ddp"),
])
def test_a_mistake_in_the_study_file_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                   changes: dict, message: str) -> None:
    assert main(["--config", str(_study(tmp_path, **changes)), "--dry-run"]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1 and "Traceback" not in err


def test_dry_run_lists_every_run_with_its_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--config", str(_study(tmp_path)), "--dry-run", "--set", "seeds=[0,1,2]"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 3 + 3 + 1  # SiT and DeepFlow-2T x 3 seeds, the ablation x 1
    assert lines[0].startswith("SiT seed 0 (to train): ") and "--set run.seed=0" in lines[0]
    assert lines[1].startswith("DeepFlow-2T seed 0") and lines[-1].startswith("ablation seed 0")
    assert main(["--config", str(_study(tmp_path)), "--dry-run", "--variants", "ablation"]) == 0
    assert [line.split(" (")[0] for line in capsys.readouterr().out.splitlines()] == ["ablation seed 0"]
    assert main(["--config", str(_study(tmp_path)), "--dry-run", "--variants", "SIT"]) == 2
    assert "--variants: 'SIT' not in" in capsys.readouterr().err


def test_summary_and_the_tie_rule() -> None:
    a, b = Summary([10.0, 12.0, 14.0]), Summary([5.0, 6.0, 7.0])
    assert a.mean == 12.0 and a.std == 2.0 and a.text(1) == "12.0 +- 2.0"
    assert verdict(a, b, "fd_classifier") == "ahead"  # lower FD, intervals disjoint
    assert verdict(a, b, "class_accuracy") == "behind"
    assert verdict(a, Summary([9.0, 11.0, 13.0]), "fd_classifier") == "tie"  # overlapping intervals
    assert verdict(Summary([1.0]), b, "fd_classifier") == "n/a"  # a one-seed baseline has no interval
    assert verdict(a, Summary([9.0]), "fd_classifier") == "ahead (1 seed)"  # a point below the baseline's interval
    assert verdict(a, Summary([11.0]), "fd_classifier") == "tie (1 seed)"


def test_seconds_per_step_is_the_median_window_and_counts_a_resumed_step_once(tmp_path: Path) -> None:
    board = tmp_path / "tensorboard"
    board.mkdir()
    records = [{"step": 10, "perf/images_per_s": 32.0}, {"step": 20, "perf/images_per_s": 16.0},
               {"step": 30, "perf/images_per_s": 0.5},  # lost: the run was killed before its checkpoint
               {"step": 30, "perf/images_per_s": 32.0}, {"step": 40, "perf/images_per_s": 64.0, "loss/total": 1.0},
               {"step": 40, "loss/total": 1.0}]
    (board / "scalars.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n")
    assert _seconds_per_step(tmp_path, batch=32) == 1.0  # median of 1, 2, 1, 0.5 s
    assert math.isnan(_seconds_per_step(tmp_path / "missing", batch=32))


def test_equal_compute_interpolates_between_evaluation_points() -> None:
    from deepflow.platform.study.report import _interpolated

    points = [(10.0, 100.0), (40.0, 25.0), (80.0, 20.0)]
    assert _interpolated(points, 20.0) == pytest.approx(62.5)  # halfway in log x
    assert _interpolated(points, 20.0, log_y=True) == pytest.approx(50.0)  # a power law through both points
    assert _interpolated(points, 10.0) == 100.0 and _interpolated(points, 80.0) == 20.0
    assert _interpolated(points, 5.0) is None and _interpolated(points, 81.0) is None  # never extrapolated
