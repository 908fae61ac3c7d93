"""TrainLogger: scalars, images and the custom-scalars layout read back with TensorBoard's own reader, locally
and synced to the S3 server."""

from __future__ import annotations

from pathlib import Path

import fsspec
import pytest
import numpy as np
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.custom_scalar import layout_pb2

from deepflow.platform.train.tb_logging import TrainLogger, branch_layout


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
