"""Unreadable shards during training, as a user meets them, through real `jobs/train.py` processes.

The digits dataset has 8 shards (225 samples each). One of them truncated, overwritten with garbage or deleted:
under `data.on_error: skip` (the default) the run completes, names the shard on the console once per rank at most
(once on one rank), counts it once in `data/skipped_shards`, and a 2-rank run (torchrun, gloo) has the losses of
the 1-rank run, both for the automatic stream count (global batch 12 -> 4 streams of 2 shards) and for
`data.streams` equal to the shard count (8 streams of 1 shard: the stream whose shard is bad has none of its own).
Every shard bad: one `error: data.url: ...: no readable shard (N corrupt, M missing)` line per rank, exit 2, no
traceback from the ranks (torchrun adds its own report of the failed workers), no rank left hanging.
`data.on_error: raise`: one `error:` line naming the shard, exit 2 (1 rank).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

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
    write_config,
)

STEPS = 8
#: stream layouts: overrides, the data.streams the run resolves to
LAYOUTS: dict[str, tuple[dict[str, object], int]] = {
    # auto: the largest divisor of 12 that splits 8 shards evenly; windows of both shards (hit at step 1)
    "auto": ({"data.global_batch_size": 12, "data.shuffle_buffer": 300}, 4),
    "8": ({"data.streams": 8}, 8),
}
VICTIM = 2  # index in the manifest of the damaged shard


@pytest.fixture(scope="module")
def digits_source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("digits") / "digits"
    make_digits_dataset(str(root))
    return root


def shard_names(root: Path) -> list[str]:
    return [shard["name"] for shard in json.loads((root / "manifest.json").read_text())["shards"]]


def damage(path: Path, how: str) -> None:
    """``truncate`` (first half kept), ``garbage`` (overwritten with as many 0xff bytes) or ``delete``."""
    if how == "delete":
        path.unlink()
    elif how == "truncate":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    else:
        path.write_bytes(b"\xff" * path.stat().st_size)


def damaged_copy(source: Path, destination: Path, how: str, victims: list[int]) -> str:
    shutil.copytree(source, destination)
    names = shard_names(destination)
    for index in victims:
        damage(destination / names[index], how)
    return str(destination)


class Runs:
    """Training runs of one module, each run once and shared by the tests that read it."""

    def __init__(self, source: Path, root: Path) -> None:
        self.source, self.root = source, root
        self.done: dict[tuple[str, str, int], tuple[Path, str]] = {}

    def get(self, how: str, layout: str, ranks: int) -> tuple[Path, str]:
        """(output dir, console output) of a completed run of ``STEPS`` steps with one ``how``-damaged shard."""
        key = (how, layout, ranks)
        if key not in self.done:
            data = self.root / f"data-{how}"
            if not data.exists():
                damaged_copy(self.source, data, how, [VICTIM])
            name = f"{how}-{layout}-{ranks}"
            overrides = base_overrides(str(data), str(self.root / name), steps=STEPS, **LAYOUTS[layout][0])
            config = write_config(self.root / f"{name}.yaml", overrides)
            proc = run_train(config, [], launcher="python" if ranks == 1 else "torchrun", nproc=ranks)
            self.done[key] = (self.root / name, proc.stdout + proc.stderr)
        return self.done[key]


@pytest.fixture(scope="module")
def runs(digits_source: Path, tmp_path_factory: pytest.TempPathFactory) -> Runs:
    return Runs(digits_source, tmp_path_factory.mktemp("runs"))


def skip_lines(output: str) -> list[str]:
    return [line for line in output.splitlines() if "skipping" in line and ".tar" in line]


@pytest.mark.slow
@pytest.mark.parametrize(("how", "layout"), [("truncate", "auto"), ("garbage", "8"), ("delete", "auto")])
def test_one_bad_shard_is_skipped_named_once_and_counted_once(runs: Runs, how: str, layout: str) -> None:
    output_dir, output = runs.get(how, layout, 1)
    victim = shard_names(runs.source)[VICTIM]
    assert "Traceback" not in output and f"training completed at step {STEPS}" in output, output[-3000:]
    lines = skip_lines(output)
    assert len(lines) == 1 and victim in lines[0], output[-3000:]
    assert ("missing" if how == "delete" else "corrupt") in lines[0]
    saved = yaml.safe_load((output_dir / "config.yaml").read_text())
    assert saved["data"]["streams"] == LAYOUTS[layout][1]
    rows = read_scalars(output_dir / "tensorboard")
    assert [row["data/skipped_shards"] for row in rows] == [1.0] * STEPS  # met at step 1, counted once


@pytest.mark.slow
@pytest.mark.parametrize(("how", "layout"), [("garbage", "8"), ("delete", "auto")])
def test_two_ranks_skip_the_bad_shard_with_the_losses_of_one_rank(runs: Runs, how: str, layout: str) -> None:
    one_dir, _ = runs.get(how, layout, 1)
    two_dir, output = runs.get(how, layout, 2)
    victim = shard_names(runs.source)[VICTIM]
    assert "Traceback" not in output, output[-3000:]
    lines = skip_lines(output)
    assert 1 <= len(lines) <= 2 and all(victim in line for line in lines), output[-3000:]
    expected = losses_by_step(read_scalars(one_dir / "tensorboard"))
    losses = losses_by_step(read_scalars(two_dir / "tensorboard"))
    assert sorted(losses) == sorted(expected) == list(range(1, STEPS + 1))
    for step, loss in expected.items():
        assert losses[step] == pytest.approx(loss, rel=1e-4), f"step {step}"
    assert read_scalars(two_dir / "tensorboard")[-1]["data/skipped_shards"] == 1.0  # distinct over ranks


@pytest.mark.slow
@pytest.mark.parametrize("ranks", [1, 2])
def test_every_shard_bad_is_one_line_and_exit_2(digits_source: Path, tmp_path: Path, ranks: int) -> None:
    names = shard_names(digits_source)
    forms = {index: ("delete", "truncate", "garbage")[index % 3] for index in range(len(names))}
    data = tmp_path / "data"
    shutil.copytree(digits_source, data)
    for index, form in forms.items():
        damage(data / names[index], form)
    missing = sum(form == "delete" for form in forms.values())
    overrides = base_overrides(str(data), str(tmp_path / "out"), steps=STEPS)
    command = launch_command(write_config(tmp_path / "run.yaml", overrides), [],
                             launcher="python" if ranks == 1 else "torchrun", nproc=ranks)
    proc = subprocess.run(command, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=240)
    expected = f"error: data.url: {data}: no readable shard ({len(names) - missing} corrupt, {missing} missing)"
    ours = proc.stderr.split("torch/distributed/elastic")[0]  # what the ranks wrote before torchrun's report
    errors = [line for line in ours.splitlines() if line.startswith("error: ")]
    assert "Traceback" not in ours, proc.stderr[-3000:]
    if ranks == 1:
        assert proc.returncode == 2 and errors == [expected], proc.stderr[-3000:]
    else:  # a rank ended with status 2 and the other followed (torchrun stops it), nobody hung in a collective;
        # torchrun, the launcher, then prints its own summary (exit 1)
        assert 1 <= len(errors) <= 2 and set(errors) == {expected}, proc.stderr[-3000:]
        assert proc.returncode != 0 and "exitcode  : 2" in proc.stderr, proc.stderr[-3000:]


@pytest.mark.slow
@pytest.mark.parametrize("ranks", [1, 2])
def test_on_error_raise_stops_with_one_line_naming_the_shard(digits_source: Path, tmp_path: Path, ranks: int) -> None:
    """On 2 ranks the rank that meets the shard names it; the other learns it through the ranks' agreement on every
    micro-step's batch and stops with one line too (no traceback, nobody left waiting in a collective)."""
    url = damaged_copy(digits_source, tmp_path / "data", "garbage", [VICTIM])
    victim = shard_names(digits_source)[VICTIM]
    overrides = base_overrides(url, str(tmp_path / "out"), steps=STEPS, **{"data.streams": 8, "data.on_error": "raise"})
    command = launch_command(write_config(tmp_path / "run.yaml", overrides), [],
                             launcher="python" if ranks == 1 else "torchrun", nproc=ranks)
    proc = subprocess.run(command, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=240)
    ours = proc.stderr.split("torch/distributed/elastic")[0]  # what the ranks wrote before torchrun's report
    errors = [line for line in ours.splitlines() if line.startswith("error: ")]
    naming = [line for line in errors if victim in line]
    assert len(naming) == 1 and "sha256" in naming[0], proc.stderr[-3000:]
    assert "Traceback" not in ours, proc.stderr[-3000:]
    if ranks == 1:
        assert proc.returncode == 2 and errors == naming, proc.stderr[-3000:]
    else:
        others = [line for line in errors if line not in naming]
        assert all("another rank met an unreadable shard" in line for line in others), proc.stderr[-3000:]
        assert proc.returncode != 0 and "exitcode  : 2" in proc.stderr, proc.stderr[-3000:]