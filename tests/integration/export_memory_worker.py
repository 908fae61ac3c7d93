"""One rank of the export-memory measurement (run by tests/integration/test_memory.py under torchrun; no tests
here): build the real engine of a run config (2 ranks, gloo), an EMA of its slices, then measure this process's peak
resident memory above its resident set for three paths, each after resetting the kernel's high-water mark:

- ``export``: ``checkpoint.write_full_export`` (the trainer's end-of-run EMA export, collective);
- ``convert``: rank 0 turns the checkpoint just saved (sharded or not) into an export (``artifacts.export_checkpoint``);
- ``load``: rank 0 loads that checkpoint's EMA (``artifacts.load_weights``: returns one full copy).

Writes ``<out>/memory-rank<R>.json``: {"model_bytes", "export", "convert", "load"} (bytes; convert/load on rank 0)
and checks on rank 0 that the export equals the loaded checkpoint EMA.
"""

from __future__ import annotations

import gc
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from memory_support import reset_peak, vm_hwm  # noqa: E402

from deepflow.artifacts import ModelCard, export_checkpoint, load_weights  # noqa: E402
from deepflow.platform.train.checkpoint import CheckpointManager, write_full_export  # noqa: E402
from deepflow.platform.train.config import load_config  # noqa: E402
from deepflow.platform.train.distributed import init_distributed, shutdown_distributed  # noqa: E402
from deepflow.platform.train.ema import ShardedEMA  # noqa: E402
from deepflow.platform.train.engines import build_engine, engine_class  # noqa: E402
from deepflow.platform.train.trainer import _build_model  # noqa: E402


def _extra_peak(run: callable) -> int:  # type: ignore[valid-type]
    """Bytes of resident memory ``run()`` needed above the resident set at its start."""
    gc.collect()
    base = reset_peak()
    run()
    return vm_hwm() - base


def main(config: str, out: str, *overrides: str) -> None:
    cfg = load_config(config, list(overrides))
    ctx = init_distributed("gloo", None, require_group=engine_class(cfg.distributed.engine).requires_process_group)
    model = _build_model(cfg)
    model_bytes = sum(p.numel() * 4 for p in model.parameters())
    engine = build_engine(cfg, model, ctx)
    del model
    ema = ShardedEMA(engine.named_local_params())
    with torch.no_grad():  # an EMA that differs from the weights (the export must be the EMA)
        for shadow in ema.state_dict().values():
            shadow.mul_(0.5)
    card = ModelCard(model=cfg.model.name, kwargs=cfg.model.create_kwargs())
    report: dict[str, int] = {"model_bytes": model_bytes}
    report["export"] = _extra_peak(lambda: write_full_export(engine, ema, f"{out}/export", card))
    manager = CheckpointManager(f"{out}/checkpoints", ctx)
    manager.save(1, engine, ema, {"step": 1}, "run: {}\n", card=card if ctx.is_main else None, blocking=True)
    step = f"{out}/checkpoints/step-0000001"
    if ctx.is_main:
        report["convert"] = _extra_peak(lambda: export_checkpoint(step, f"{out}/converted"))
        loaded: dict[str, dict[str, torch.Tensor]] = {}
        report["load"] = _extra_peak(lambda: loaded.setdefault("w", load_weights(step)[0]))
        exported = load_weights(f"{out}/export")[0]
        converted = load_weights(f"{out}/converted")[0]
        assert exported.keys() == loaded["w"].keys() == converted.keys()
        for name, tensor in exported.items():
            assert torch.equal(tensor, loaded["w"][name]) and torch.equal(tensor, converted[name]), name
    ctx.barrier()
    Path(out, f"memory-rank{ctx.rank}.json").write_text(json.dumps(report))
    shutdown_distributed(ctx)


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main(sys.argv[1], sys.argv[2], *sys.argv[3:])
