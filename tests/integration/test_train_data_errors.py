"""A corrupt shard during training, as a user meets it: `data.on_error: skip` (default) trains on and counts the
skip in TensorBoard (`data/skipped_shards`, read back with TensorBoard's own reader); `data.on_error: raise` stops
with one `error:` line naming the shard (exit 2, no traceback)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_train_support import base_overrides, make_digits_dataset, run_train, write_config  # noqa: E402


@pytest.fixture(scope="module")
def damaged_digits(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    """(dataset URL, name of its garbled shard)."""
    root = tmp_path_factory.mktemp("damaged") / "digits"
    make_digits_dataset(str(root))
    victim = json.loads((root / "manifest.json").read_text())["shards"][2]["name"]
    data = bytearray((root / victim).read_bytes())
    data[len(data) // 2 : len(data) // 2 + 64] = b"\xff" * 64
    (root / victim).write_bytes(bytes(data))
    return str(root), victim


@pytest.mark.slow
def test_a_skipped_shard_is_counted_in_tensorboard(damaged_digits: tuple[str, str], tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    url, victim = damaged_digits
    # 4 streams of 2 shards: every stream reads both of its shards within the first 8 steps (225 samples each)
    config = write_config(tmp_path / "run.yaml", base_overrides(url, str(tmp_path), steps=8, **{"data.streams": 4}))
    proc = run_train(config, [], launcher="python")
    assert victim in proc.stderr and "Traceback" not in proc.stderr
    accumulator = EventAccumulator(str(tmp_path / "tensorboard"), size_guidance={"scalars": 0})
    accumulator.Reload()
    counts = [event.value for event in accumulator.Scalars("data/skipped_shards")]
    assert counts[-1] == 1 and counts == sorted(counts)


@pytest.mark.slow
def test_on_error_raise_stops_with_one_line_naming_the_shard(damaged_digits: tuple[str, str], tmp_path: Path) -> None:
    url, victim = damaged_digits
    overrides = base_overrides(url, str(tmp_path), steps=8, **{"data.streams": 4, "data.on_error": "raise"})
    proc = run_train(write_config(tmp_path / "run.yaml", overrides), [], launcher="python", check=False)
    assert proc.returncode == 2, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and victim in errors[0] and "sha256" in errors[0], proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
