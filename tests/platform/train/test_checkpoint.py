"""CheckpointManager with a real (single-process) DDP engine: commit marker, newest-committed resume, retention,
asynchronous saving, object-store staging on the moto S3 server (no staging folder left behind, also when the
upload fails), the model card that makes a checkpoint folder loadable by ``artifacts.load_weights``, RNG round
trip, and the export through ``artifacts.write_export``."""

from __future__ import annotations

import json
import random
import tempfile
from pathlib import Path

import fsspec
import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from deepflow.artifacts import ModelCard, load_weights, write_export
from deepflow.models import create_model
from deepflow.models.flow import FlowObjective
from deepflow.platform.train.checkpoint import CheckpointManager, capture_rng_state, restore_rng_state
from deepflow.platform.train.config import load_config
from deepflow.platform.train.distributed import DistContext, init_distributed, step_generator
from deepflow.platform.train.ema import ShardedEMA
from deepflow.platform.train.engines import build_engine, optimizer_settings
from deepflow.platform.train.engines.ddp import DDPEngine

CTX = DistContext(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"), backend=None)


def _engine_and_ema(seed: int = 0):  # noqa: ANN202
    cfg = load_config(None, ["data.global_batch_size=8", "optim.lr=1e-2"])
    torch.manual_seed(seed)
    model = create_model("DeepFlow-S/2-2T", depth=2, hidden_size=32, num_heads=2, input_size=8, in_channels=1,
                         num_classes=10, acc_widths=(16, 16, 16))
    engine = build_engine(cfg, model, CTX)
    return engine, ShardedEMA(engine.named_local_params(), decay=0.5)


def _train(engine, ema, steps: range) -> list[float]:  # noqa: ANN001
    objective = FlowObjective()
    data = torch.Generator().manual_seed(1)
    x, y = torch.randn(8, 1, 8, 8, generator=data), torch.randint(0, 10, (8,), generator=data)
    losses = []
    for step in steps:
        with engine.micro_step(True):
            terms = objective.loss(engine.forward_train, x, y, step_generator(0, 0, step, 0, CTX.device),
                                   num_branches=2, num_classes=10)
            engine.backward(terms["total"])
        engine.step()
        ema.update(engine.named_local_params(), step)
        losses.append(float(terms["total"].detach()))
    return losses


def test_commit_resume_retention_and_partial_folders(tmp_path: Path) -> None:
    engine, ema = _engine_and_ema()
    manager = CheckpointManager(str(tmp_path / "ckpt"), CTX, keep_last=2)
    assert manager.latest_step() is None
    for step in (1, 2, 3):
        _train(engine, ema, range(step, step + 1))
        manager.save(step, engine, ema, {"loader": {"pos": step}, "rng": capture_rng_state()}, "run: {}\n")
    # an interrupted later save: files but no COMMIT -> ignored
    (tmp_path / "ckpt" / "step-0000004" / "engine").mkdir(parents=True)
    assert manager.committed_steps() == [2, 3]  # keep_last=2 pruned step 1
    assert manager.latest_step() == 3
    reference = _train(engine, ema, range(4, 7))

    fresh, fresh_ema = _engine_and_ema(seed=123)
    state = CheckpointManager(str(tmp_path / "ckpt"), CTX).load(3, fresh, fresh_ema)
    assert state["loader"] == {"pos": 3} and state["saved_world_size"] == 1
    assert _train(fresh, fresh_ema, range(4, 7)) == reference  # optimizer state restored exactly
    for name, tensor in ema.state_dict().items():
        assert torch.equal(fresh_ema.state_dict()[name], tensor)
    meta = json.loads((tmp_path / "ckpt" / "step-0000003" / "COMMIT").read_text())
    assert meta["step"] == 3 and meta["engine"] == "ddp"
    assert (tmp_path / "ckpt" / "step-0000003" / "config.yaml").read_text() == "run: {}\n"


def test_async_save_commits_later_and_matches_sync(tmp_path: Path) -> None:
    engine, ema = _engine_and_ema()
    _train(engine, ema, range(1, 3))
    sync = CheckpointManager(str(tmp_path / "sync"), CTX)
    sync.save(2, engine, ema, {"loader": {}}, "")
    manager = CheckpointManager(str(tmp_path / "async"), CTX, async_save=True)
    manager.save(2, engine, ema, {"loader": {}}, "")
    assert manager.pending is not None
    _train(engine, ema, range(3, 5))  # the weights move on while the snapshot is written
    manager.wait()
    assert manager.pending is None and manager.committed_steps() == [2]
    a = load_file(str(tmp_path / "sync" / "step-0000002" / "engine" / "model.safetensors"))
    b = load_file(str(tmp_path / "async" / "step-0000002" / "engine" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_object_store_checkpoint_and_export(s3_server, tmp_path: Path) -> None:  # noqa: ANN001
    bucket = s3_server.make_bucket("platform-checkpoint-unit")
    options = s3_server.storage_options
    engine, ema = _engine_and_ema()
    _train(engine, ema, range(1, 3))
    manager = CheckpointManager(f"{bucket}/run/checkpoints", CTX, keep_last=1, storage_options=options,
                                async_save=True)
    manager.save(2, engine, ema, {"loader": {"epoch": 0}}, "a: 1\n")
    manager.wait()
    reference = _train(engine, ema, range(3, 5))
    fs = fsspec.filesystem("s3", **options)
    files = set(fs.find(f"{bucket}/run/checkpoints/step-0000002"))
    for name in ("COMMIT", "meta.json", "config.yaml", "ema/full.safetensors", "engine/model.safetensors",
                 "engine/optimizer.pt", "state/rank-00000.json"):
        assert f"platform-checkpoint-unit/run/checkpoints/step-0000002/{name}" in files
    fresh, fresh_ema = _engine_and_ema(seed=9)
    reader = CheckpointManager(f"{bucket}/run/checkpoints", CTX, storage_options=options)
    assert reader.latest_step() == 2
    assert reader.load(2, fresh, fresh_ema)["loader"] == {"epoch": 0}
    assert _train(fresh, fresh_ema, range(3, 5)) == reference

    write_export(f"{bucket}/run/export", fresh_ema.state_dict(), ModelCard(model="DeepFlow-S/2-2T", step=4), options)
    with fs.open(f"{bucket}/run/export/export.safetensors", "rb") as handle:
        (tmp_path / "e.safetensors").write_bytes(handle.read())
    exported = load_file(str(tmp_path / "e.safetensors"))
    assert all(torch.equal(exported[k], v) for k, v in fresh_ema.state_dict().items())
    assert json.loads(fs.cat(f"{bucket}/run/export/export.json"))["model"] == "DeepFlow-S/2-2T"


def test_rng_state_round_trip() -> None:
    state = capture_rng_state()
    expected = (torch.rand(3), random.random(), np.random.rand())
    json.dumps(state)  # JSON-able
    torch.rand(5), random.random(), np.random.rand()
    restore_rng_state(state)
    again = (torch.rand(3), random.random(), np.random.rand())
    assert torch.equal(expected[0], again[0]) and expected[1:] == again[1:]


def test_checkpoint_of_another_world_size_loads_with_rank_0_state(tmp_path: Path) -> None:
    """As if written by 2 ranks (meta world_size 2, two state files): this 1-rank run loads it, gets its own (rank 0's)
    state with ``saved_world_size``; the saved meta records the EMA slicing. (Real 2 <-> 1 rank resumes of every
    engine: test_reshard.py.)"""
    engine, ema = _engine_and_ema()
    _train(engine, ema, range(1, 3))
    manager = CheckpointManager(str(tmp_path), CTX)
    manager.save(2, engine, ema, {"loader": {"rank": 0}}, "")
    step_dir = tmp_path / "step-0000002"
    meta = json.loads((step_dir / "meta.json").read_text())
    assert (meta["world_size"], meta["sharded_ema"], meta["ema_layout"]) == (1, False, "full")
    (step_dir / "meta.json").write_text(json.dumps({**meta, "world_size": 2}))
    (step_dir / "state" / "rank-00001.json").write_text(json.dumps({"loader": {"rank": 1}}))
    fresh, fresh_ema = _engine_and_ema(seed=5)
    assert manager.load(2, fresh, fresh_ema) == {"loader": {"rank": 0}, "saved_world_size": 2}
    assert all(torch.equal(fresh_ema.state_dict()[k], v) for k, v in ema.state_dict().items())
    (step_dir / "meta.json").write_text(json.dumps({**meta, "engine": "fsdp"}))
    with pytest.raises(RuntimeError, match="written by the fsdp engine, this run uses ddp"):
        manager.load(2, fresh, fresh_ema)


def test_checkpoint_folder_holds_a_model_card_for_load_weights(tmp_path: Path) -> None:
    engine, ema = _engine_and_ema()
    _train(engine, ema, range(1, 3))
    manager = CheckpointManager(str(tmp_path / "ckpt"), CTX)
    card = ModelCard(model="DeepFlow-S/2-2T", kwargs={"depth": 2}, step=2, ema=True)
    manager.save(2, engine, ema, {}, "", card=card)
    weights, loaded = load_weights(str(tmp_path / "ckpt"))  # the checkpoints folder -> newest committed step
    assert loaded.model == "DeepFlow-S/2-2T" and loaded.step == 2 and loaded.kwargs == {"depth": 2}
    assert weights.keys() == ema.state_dict().keys()
    assert all(torch.equal(weights[k], v) for k, v in ema.state_dict().items())
    assert load_weights(manager.step_url(2))[1] == loaded  # a step folder directly


@pytest.mark.parametrize("async_save", [False, True])
def test_failed_upload_leaves_no_staging_folder(s3_server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                async_save: bool) -> None:  # noqa: ANN001
    staging_root = tmp_path / "tmp"
    staging_root.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(staging_root))
    engine, ema = _engine_and_ema()
    manager = CheckpointManager("s3://no-such-bucket-here/ckpt", CTX, async_save=async_save,
                                storage_options=s3_server.storage_options)
    with pytest.raises((FileNotFoundError, RuntimeError)) as raised:
        manager.save(1, engine, ema, {}, "")
        manager.wait()  # the asynchronous writer's error surfaces here
    assert "no-such-bucket-here" in str(raised.value) + str(raised.value.__cause__)
    assert manager.pending is None and list(staging_root.iterdir()) == []


def test_object_store_save_and_resume_leave_no_staging_folder(s3_server, tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: ANN001
    staging_root = tmp_path / "tmp"
    staging_root.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(staging_root))
    bucket = s3_server.make_bucket("platform-checkpoint-staging")
    engine, ema = _engine_and_ema()
    manager = CheckpointManager(f"{bucket}/ckpt", CTX, storage_options=s3_server.storage_options)
    manager.save(1, engine, ema, {"loader": {"pos": 1}}, "")
    assert list(staging_root.iterdir()) == []
    assert manager.load(1, engine, ema) == {"loader": {"pos": 1}, "saved_world_size": 1}
    assert list(staging_root.iterdir()) == []


class _SyncOnlyDDP(DDPEngine):
    """A DDP engine that, like DeepSpeed, cannot save asynchronously."""

    def async_save(self, local_dir: str) -> None:
        return None


def test_engine_without_async_save_is_saved_synchronously(tmp_path: Path) -> None:
    cfg = load_config(None, ["data.global_batch_size=8"])
    torch.manual_seed(0)
    model = create_model("DeepFlow-S/2-2T", depth=2, hidden_size=32, num_heads=2, input_size=8, in_channels=1,
                         num_classes=10, acc_widths=(16, 16, 16))
    engine = _SyncOnlyDDP(model, optimizer_settings(cfg, 1), CTX)
    manager = CheckpointManager(str(tmp_path), CTX, async_save=True)
    manager.save(1, engine, None, {}, "")
    assert manager.pending is None and manager.committed_steps() == [1]  # committed at once, no writer thread


def _failing_rank_worker(rank: int, root: str, port: int) -> None:
    """Rank 1's upload fails, in a synchronous save (step 1) and an asynchronous one (step 2): no rank may commit
    and every rank raises (rather than rank 0 committing without rank 1's files, or waiting in a barrier)."""
    import os

    import torch.distributed as dist

    os.environ.update({"RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_RANK": str(rank), "MASTER_ADDR": "127.0.0.1",
                       "MASTER_PORT": str(port)})
    ctx = init_distributed(backend="gloo")
    cfg = load_config(None, ["data.global_batch_size=8"])
    torch.manual_seed(0)
    model = create_model("DeepFlow-S/2-2T", depth=2, hidden_size=32, num_heads=2, input_size=8, in_channels=1,
                         num_classes=10, acc_widths=(16, 16, 16))
    engine = build_engine(cfg, model, ctx)
    manager = CheckpointManager(root, ctx)
    if rank == 1:
        def broken(*args: object) -> None:
            raise ConnectionError("upload failed on rank 1")

        manager._write_and_upload = broken  # type: ignore[method-assign]
    outcomes = []
    for step, blocking in ((1, True), (2, False)):
        manager.async_save = not blocking
        try:
            manager.save(step, engine, None, {}, "", blocking=blocking)
            manager.wait()
            outcomes.append("no error")
        except RuntimeError as error:
            outcomes.append(str(error))
    Path(root, f"outcome-{rank}.json").write_text(json.dumps(outcomes))
    dist.barrier()
    dist.destroy_process_group()


@pytest.mark.slow
def test_a_rank_whose_upload_fails_stops_the_commit_on_every_rank(tmp_path: Path) -> None:
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    mp.spawn(_failing_rank_worker, args=(str(tmp_path), port), nprocs=2, join=True)
    for rank, where in ((0, " on another rank"), (1, "")):
        assert json.loads((tmp_path / f"outcome-{rank}.json").read_text()) == [
            f"checkpoint of step {step} failed{where}; it is not committed" for step in (1, 2)]
    assert not list(tmp_path.glob("step-*/COMMIT"))
