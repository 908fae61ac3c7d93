"""World-size-invariant training: a run's losses do not depend on how many ranks computed them, and a checkpoint
written by 2 ranks resumes on 1 (and 1 on 2) exactly as an uninterrupted run continues: ddp, fsdp and ZeRO-2, each
as real `jobs/train.py` processes (python for 1 rank, torchrun for 2).

Per engine: U = 2 ranks, steps 1..8 uninterrupted; A = 2 ranks to step 4 (committed checkpoint), then 1 rank to 8;
B = 1 rank to 4, then 2 ranks to 8. Every loss of A and B equals U's (relative 1e-4) and both EMA exports equal
U's (1e-4).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_train_support import (  # noqa: E402
    RESHARD_ENGINES as ENGINES,
    base_overrides,
    losses_by_step,
    make_digits_dataset,
    read_scalars,
    run_train,
    write_config,
)

SPLIT, STEPS = 4, 8


@pytest.fixture(scope="module")
def digits_url(tmp_path_factory: pytest.TempPathFactory) -> str:
    root = tmp_path_factory.mktemp("digits")
    make_digits_dataset(str(root / "digits"))
    return str(root / "digits")


def _run(config: Path, engine: str, ranks: int, steps: int) -> str:
    launcher = "python" if ranks == 1 else "torchrun"
    proc = run_train(config, ENGINES[engine] + [f"schedule.total_steps={steps}"], launcher=launcher, nproc=ranks)
    return proc.stdout + proc.stderr


def _export(output_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(output_dir / "export" / "export.safetensors"))


@pytest.mark.slow
@pytest.mark.parametrize("engine", list(ENGINES))
def test_resume_on_another_world_size_matches_the_uninterrupted_run(engine: str, digits_url: str,
                                                                     tmp_path: Path) -> None:
    runs: dict[str, Path] = {}
    for name, (first, second) in {"U": (2, None), "A": (2, 1), "B": (1, 2)}.items():
        out = tmp_path / name
        config = write_config(tmp_path / f"{name}.yaml", base_overrides(digits_url, str(out), steps=STEPS))
        _run(config, engine, first, SPLIT if second else STEPS)
        if second:
            log = _run(config, engine, second, STEPS)
            assert f"step-{SPLIT:07d}" in log and "resumed from" in log, log[-3000:]
        runs[name] = out
    reference = losses_by_step(read_scalars(runs["U"] / "tensorboard"))
    assert sorted(reference) == list(range(1, STEPS + 1))
    expected_export = _export(runs["U"])
    for name in ("A", "B"):
        losses = losses_by_step(read_scalars(runs[name] / "tensorboard"))
        assert sorted(losses) == list(range(1, STEPS + 1))
        for step, loss in reference.items():
            assert losses[step] == pytest.approx(loss, rel=1e-4), f"{engine} {name} step {step}"
        export = _export(runs[name])
        assert export.keys() == expected_export.keys()
        for key, tensor in expected_export.items():
            torch.testing.assert_close(export[key], tensor, rtol=1e-4, atol=1e-4, msg=f"{engine} {name} {key}")
