"""TrainLogger: scalars, images and the custom-scalars layout read back with TensorBoard's own reader, locally
and synced to the S3 server; a failed sync neither raises nor loses steps, close keeps what it could not upload."""

from __future__ import annotations

import shutil
from pathlib import Path

import fsspec
import numpy as np
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.custom_scalar import layout_pb2

from deepflow.platform.train.tb_logging import TrainLogger, branch_layout
from deepflow.storage import StorageUnavailableError


def _read(directory: Path) -> EventAccumulator:
    accumulator = EventAccumulator(str(directory), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    accumulator.Reload()
    return accumulator


def _log_some(logger: TrainLogger) -> None:
    logger.set_layout(branch_layout(3, ssl=True))
    for step in (1, 2, 3):
        logger.scalars(step, {"loss/deep_0": 1.0 / step, "loss/deep_2": 2.0 / step, "loss/total": 3.0 / step})
    logger.image("eval/samples", np.full((3, 4, 6), 200, dtype=np.uint8), step=3)


def test_local_event_files_and_layout(tmp_path: Path) -> None:
    logger = TrainLogger(str(tmp_path / "tb"), enabled=True)
    _log_some(logger)
    logger.close()
    accumulator = _read(tmp_path / "tb")
    assert {"loss/deep_0", "loss/deep_2", "loss/total"} <= set(accumulator.Tags()["scalars"])
    assert [e.value for e in accumulator.Scalars("loss/deep_2")] == pytest.approx([2.0, 1.0, 2.0 / 3.0])
    assert accumulator.Images("eval/samples")[0].width == 6
    proto = accumulator.Tensors("custom_scalars__config__")[0].tensor_proto
    layout = layout_pb2.Layout.FromString(proto.string_val[0])
    categories = {c.title: [chart.title for chart in c.chart] for c in layout.category}
    assert categories["DeepFlow losses by branch"][:3] == ["branch 0", "branch 1", "branch 2"]
    assert "total, acceleration, SSL" in categories["DeepFlow losses by branch"]
    assert (tmp_path / "tb" / "scalars.jsonl").read_text().count("\n") == 3


def test_disabled_logger_writes_nothing(tmp_path: Path) -> None:
    logger = TrainLogger(str(tmp_path / "tb"), enabled=False)
    _log_some(logger)
    logger.close()
    assert not (tmp_path / "tb").exists()


def test_object_store_sync(s3_server, tmp_path: Path) -> None:  # noqa: ANN001
    bucket = s3_server.make_bucket("platform-tensorboard-unit")
    logger = TrainLogger(f"{bucket}/run/tb", enabled=True, storage_options=s3_server.storage_options)
    _log_some(logger)
    logger.close()
    fs = fsspec.filesystem("s3", **s3_server.storage_options)
    local = tmp_path / "download"
    fs.get(f"{bucket}/run/tb/", str(local) + "/", recursive=True)
    accumulator = _read(local)
    assert [e.step for e in accumulator.Scalars("loss/total")] == [1, 2, 3]


def test_failed_sync_keeps_training_and_the_next_sync_uploads_every_step(
    s3_server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:  # noqa: ANN001
    """A sync during an outage (the store unreachable for the whole retry budget) warns and returns; the next
    sync uploads what was missed; only changed files are uploaded again; close removes the local copy."""
    bucket = s3_server.make_bucket("platform-tensorboard-outage")
    logger = TrainLogger(f"{bucket}/run/tb", enabled=True, storage_options=s3_server.storage_options)
    real_put = logger.storage.put_file
    calls: list[str] = []

    def unreachable(path: str, name: str) -> None:
        raise StorageUnavailableError(f"{name}: storage unreachable for 180s")

    monkeypatch.setattr(logger.storage, "put_file", unreachable)
    _log_some(logger)
    assert logger.sync() is False  # no exception: training goes on
    assert "TensorBoard upload" in caplog.text and "retried at the next sync" in caplog.text

    def counting(path: str, name: str) -> None:
        calls.append(name)
        real_put(path, name)

    monkeypatch.setattr(logger.storage, "put_file", counting)
    assert logger.sync() is True
    assert "scalars.jsonl" in calls and any(name.startswith("events.out.tfevents") for name in calls)
    calls.clear()
    assert logger.sync() is True and calls == []  # nothing changed, nothing uploaded
    logger.scalars(4, {"loss/total": 0.5})
    local_dir = Path(logger.local_dir)
    logger.close()
    assert "scalars.jsonl" in calls and not local_dir.exists()
    fs = fsspec.filesystem("s3", **s3_server.storage_options)
    fs.get(f"{bucket}/run/tb/", str(tmp_path / "download") + "/", recursive=True)
    assert [e.step for e in _read(tmp_path / "download").Scalars("loss/total")] == [1, 2, 3, 4]


def test_close_keeps_the_local_copy_when_the_final_upload_fails(
    s3_server, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:  # noqa: ANN001
    bucket = s3_server.make_bucket("platform-tensorboard-close")
    logger = TrainLogger(f"{bucket}/run/tb", enabled=True, storage_options=s3_server.storage_options)
    _log_some(logger)

    def unreachable(path: str, name: str) -> None:
        raise StorageUnavailableError(f"{name}: storage unreachable for 180s")

    monkeypatch.setattr(logger.storage, "put_file", unreachable)
    logger.close()  # does not raise
    assert Path(logger.local_dir).is_dir() and (Path(logger.local_dir) / "scalars.jsonl").exists()
    assert f"kept in {logger.local_dir}" in caplog.text
    shutil.rmtree(logger.local_dir)


def test_resumed_run_continues_the_remote_files(s3_server, tmp_path: Path) -> None:  # noqa: ANN001
    """A second logger on the same URL (a resumed run) brings the files down first and appends to them."""
    bucket = s3_server.make_bucket("platform-tensorboard-resume")
    first = TrainLogger(f"{bucket}/run/tb", enabled=True, storage_options=s3_server.storage_options)
    _log_some(first)
    first.close()
    resumed = TrainLogger(f"{bucket}/run/tb", enabled=True, storage_options=s3_server.storage_options)
    assert (Path(resumed.local_dir) / "scalars.jsonl").read_text().count("\n") == 3
    resumed.scalars(4, {"loss/total": 0.5})
    resumed.close()
    fs = fsspec.filesystem("s3", **s3_server.storage_options)
    fs.get(f"{bucket}/run/tb/", str(tmp_path / "download") + "/", recursive=True)
    assert sorted(e.step for e in _read(tmp_path / "download").Scalars("loss/total")) == [1, 2, 3, 4]
    assert (tmp_path / "download" / "scalars.jsonl").read_text().count("\n") == 4
