"""The training startup summary (right after the Trainer is built) and the console line of a periodic evaluation."""
from __future__ import annotations

from pathlib import Path

import torch

from deepflow.platform.train.config import config_from_tree
from deepflow.platform.train.distributed import init_distributed
from deepflow.platform.train.periodic_eval import eval_line
from deepflow.platform.train.summary import format_count, parameter_count, startup_summary
from deepflow.platform.train.trainer import Trainer
from tests.integration.test_train_support import base_overrides, make_digits_dataset


def test_summary_of_a_built_trainer_names_everything_and_draws_no_random_numbers(tmp_path: Path) -> None:
    from deepflow.platform.train.config import apply_overrides

    make_digits_dataset(str(tmp_path / "data"))
    tree = apply_overrides({"run": {"name": "tiny"}}, base_overrides(str(tmp_path / "data"), str(tmp_path / "run"),
                                                                     steps=7, **{"eval.every": 0}))
    cfg = config_from_tree(tree)
    ctx = init_distributed(cfg.distributed.backend, None, require_group=False)
    trainer = Trainer(cfg, ctx)
    try:
        rng = torch.get_rng_state()
        lines = startup_summary(trainer)
        assert torch.equal(rng, torch.get_rng_state())  # a resumed run's draws stay exactly as checkpointed
    finally:
        trainer.loader.close()
        trainer.logger.close()
    text = "\n".join(lines)
    built = sum(p.numel() for p in trainer.engine.model.parameters())
    assert parameter_count(trainer.cfg) == built
    assert f"model       DeepFlow-S/2-2T: {format_count(built)} parameters, 2 branches, depth 2, input 1x8x8, " \
           "class-conditional (10 classes)" in text
    assert "engine      ddp, precision fp32" in text
    assert f"world       1 rank, device cpu, CPU threads {torch.get_num_threads()} per rank" in text
    assert f"data        {tmp_path / 'data'}: 1797 samples in 8 shards, pixel 1x8x8, 10 classes" in text
    assert "batch       32 global = 32 per rank x 1 rank" in text
    assert "schedule    7 steps, lr 0.002 (warmup 0), EMA decay 0.9, eval off" in text
    assert f"checkpoints {tmp_path / 'run'}/checkpoints  every 1000 steps" in text
    assert f"tensorboard {tmp_path / 'run'}/tensorboard" in text


def test_counts_and_the_eval_line() -> None:
    assert [format_count(n) for n in (999, 1_470_000, 681_559_344, 2_000_000_000)] == ["999", "1.47M", "681.56M",
                                                                                        "2.00B"]
    line = eval_line(500, {"eval/fd_classifier": 140.71, "eval/class_accuracy": 0.1812}, 250, 9.84)
    assert line == "eval step 500: class_accuracy 0.1812, fd_classifier 140.7 (250 samples, 9.8 s)"
    assert eval_line(3, {}, 4, 0.5) == "eval step 3: sample grid written (4 samples, 0.5 s)"


def test_precision_auto_is_resolved_for_the_device_and_the_summary_says_why(tmp_path: Path) -> None:
    from deepflow.platform.train.config import apply_overrides
    from deepflow.precision import choose_precision

    make_digits_dataset(str(tmp_path / "data"))
    tree = apply_overrides({}, base_overrides(str(tmp_path / "data"), str(tmp_path / "run"), steps=1,
                                              **{"eval.every": 0, "precision": "auto"}))
    cfg = config_from_tree(tree)
    trainer = Trainer(cfg, init_distributed(cfg.distributed.backend, None, require_group=False))
    try:
        lines = startup_summary(trainer)
    finally:
        trainer.loader.close()
        trainer.logger.close()
    expected = choose_precision("auto", torch.device("cpu"))
    assert trainer.cfg.precision == expected.precision  # what the engine, checkpoints and the export see
    assert f"precision: {expected.precision}\n" in trainer.config_yaml
    assert f"engine      ddp, precision {expected.describe()}" in "\n".join(lines)
