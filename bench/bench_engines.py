#!/usr/bin/env python
"""Engine benchmark (CPU by default; any device the launcher gives).

1. Step time of the same model (DeepFlow-S/2-2T shrunk: depth 4, hidden 128, 16x16x4 inputs) under ddp, fsdp and
   deepspeed ZeRO-1/2/3, 2 ranks (gloo on CPU), median over timed steps, ratio against ddp measured in the same run.
2. How long the training loop stalls for a checkpoint, synchronous versus asynchronous (snapshot to CPU, write in
   a background thread / DCP async_save), for ddp and fsdp with a full-width DeepFlow-S/2-2T (~50M parameters),
   median over repeats; goal: async <= 1/4 of sync.

    python bench/bench_engines.py [--nproc 2] [--steps 12] [--repeats 3]
    python bench/bench_engines.py --gpu-xl     # on one GPU: DeepFlow-XL/2-3T bf16 images/s and MFU, fsdp and ZeRO-2
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

ENGINES = {
    "ddp": ["distributed.engine=ddp"],
    "fsdp": ["distributed.engine=fsdp"],
    "zero1": ["distributed.engine=deepspeed", "distributed.zero_stage=1"],
    "zero2": ["distributed.engine=deepspeed", "distributed.zero_stage=2"],
    "zero3": ["distributed.engine=deepspeed", "distributed.zero_stage=3"],
}
STEP_MODEL = ["model.name=DeepFlow-S/2-2T", "model.depth=4", "model.hidden_size=128", "model.num_heads=4",
              "model.input_size=16", "model.in_channels=4", "model.num_classes=10",
              'model.extra={"acc_widths":[256,256,256]}']
CKPT_MODEL = ["model.name=DeepFlow-S/2-2T", "model.input_size=16", "model.in_channels=4", "model.num_classes=10"]
XL_MODEL = ["model.name=DeepFlow-XL/2-3T", "model.input_size=32", "model.in_channels=4", "model.num_classes=1000",
            "precision=bf16", "distributed.compile=true"]


# ------------------------------------------------------------------------------------------------- worker
def _worker(mode: str, overrides: list[str], steps: int, repeats: int, batch: int) -> None:
    import torch
    import torch.distributed as dist

    from deepflow.models import create_model
    from deepflow.models.flow import FlowObjective
    from deepflow.platform.train.checkpoint import CheckpointManager
    from deepflow.platform.train.config import load_config
    from deepflow.platform.train.distributed import init_distributed, shutdown_distributed, step_generator
    from deepflow.platform.train.ema import ShardedEMA
    from deepflow.platform.train.engines import build_engine
    from deepflow.platform.train.tb_logging import peak_memory_gb, peak_tflops_for

    cfg = load_config(None, overrides + [f"data.global_batch_size={batch}"])
    ctx = init_distributed(require_group=True)
    torch.manual_seed(0)
    model = create_model(cfg.model.name, **cfg.model.create_kwargs())
    flops = 6.0 * model.flops_per_image(train=True, attention=True)
    n_params = sum(p.numel() for p in model.parameters())
    engine = build_engine(cfg, model, ctx)
    ema = ShardedEMA(engine.named_local_params(), 0.9999)
    objective = FlowObjective()
    per_rank = cfg.per_rank_batch_size(ctx.world_size)
    data = torch.Generator().manual_seed(ctx.rank)
    shape = (per_rank, cfg.model.in_channels, cfg.model.input_size, cfg.model.input_size)
    x = torch.randn(shape, generator=data).to(ctx.device)
    y = torch.randint(0, cfg.model.num_classes, (per_rank,), generator=data).to(ctx.device)
    k = model.num_branches

    def sync() -> None:
        if ctx.device.type == "cuda":
            torch.cuda.synchronize()
        if ctx.distributed:
            dist.barrier()

    def train_step(step: int) -> None:
        with engine.micro_step(True):
            terms = objective.loss(engine.forward_train, x, y, step_generator(0, ctx.rank, step, 0, ctx.device),
                                   num_branches=k, num_classes=cfg.model.num_classes)
            engine.backward(terms["total"])
        engine.step()
        ema.update(engine.named_local_params(), step)

    result: dict[str, object] = {"params": n_params}
    if mode == "step":
        for step in range(3):
            train_step(step)
        times = []
        for step in range(3, 3 + steps):
            sync()
            start = time.perf_counter()
            train_step(step)
            sync()
            times.append(time.perf_counter() - start)
        median = statistics.median(times)
        images_per_s = batch / median
        tflops = images_per_s * flops / ctx.world_size / 1e12
        peak = peak_tflops_for(ctx.device, cfg.precision)
        result.update({"step_s": median, "images_per_s": images_per_s, "tflops_per_device": tflops,
                       "mfu": (tflops / peak) if peak else None, "peak_mem_gb": peak_memory_gb(ctx.device)})
    else:
        train_step(0)
        root = tempfile.mkdtemp(prefix="bench-ckpt-") if ctx.is_main else None
        box = [root]
        if ctx.distributed:
            dist.broadcast_object_list(box)
        sync_stalls, async_stalls, async_total = [], [], []
        for repeat in range(repeats):
            manager = CheckpointManager(f"{box[0]}/sync-{repeat}", ctx, keep_last=1)
            sync()
            start = time.perf_counter()
            manager.save(1, engine, ema, {"loader": {}}, "")
            sync()
            sync_stalls.append(time.perf_counter() - start)
            manager = CheckpointManager(f"{box[0]}/async-{repeat}", ctx, keep_last=1, async_save=True)
            sync()
            start = time.perf_counter()
            manager.save(1, engine, ema, {"loader": {}}, "")
            sync()
            async_stalls.append(time.perf_counter() - start)
            step = 1
            while not manager.poll():  # the loop keeps training while the checkpoint is written
                step += 1
                train_step(step)
            async_total.append(time.perf_counter() - start)
        result.update({"sync_stall_s": statistics.median(sync_stalls), "async_stall_s": statistics.median(async_stalls),
                       "async_until_commit_s": statistics.median(async_total)})
        sync()
        if ctx.is_main:
            import shutil

            shutil.rmtree(box[0], ignore_errors=True)
    if ctx.is_main:
        print("RESULT " + json.dumps(result), flush=True)
    engine.finalize()
    shutdown_distributed(ctx)


# ------------------------------------------------------------------------------------------------- parent
def _launch(mode: str, overrides: list[str], nproc: int, steps: int, repeats: int, batch: int) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), "PYTHONPATH": str(REPO)}
    if not _has_cuda():
        env.setdefault("DS_ACCELERATOR", "cpu")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               __file__, "--worker", mode, "--steps", str(steps), "--repeats", str(repeats), "--batch", str(batch)]
    for override in overrides:
        command += ["--set", override]
    proc = subprocess.run(command, capture_output=True, text=True, env=env, cwd=REPO)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    raise RuntimeError(f"{mode} {overrides} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--worker", choices=["step", "ckpt"])
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--gpu-xl", action="store_true", help="DeepFlow-XL/2-3T bf16 on one GPU (fsdp, ZeRO-2)")
    args = parser.parse_args()
    if args.worker:
        _worker(args.worker, args.overrides, args.steps, args.repeats, args.batch)
        return
    if args.gpu_xl:
        print("DeepFlow-XL/2-3T, 256px (4x32x32 latents), bf16, torch.compile, 1 GPU, batch", args.batch)
        for name in ("fsdp", "zero2"):
            r = _launch("step", XL_MODEL + ENGINES[name], 1, args.steps, 1, args.batch)
            print(f"  {name:6s} step {r['step_s'] * 1e3:8.1f} ms  {r['images_per_s']:8.1f} img/s  "
                  f"{r['tflops_per_device']:7.1f} TFLOP/s  MFU {r['mfu'] if r['mfu'] is None else round(r['mfu'], 3)}")
        return
    print(f"1) step time, {args.nproc} ranks, global batch {args.batch}, median of {args.steps} steps "
          "(tiny DeepFlow-S/2-2T: depth 4, hidden 128, 16x16x4)")
    results = {name: _launch("step", STEP_MODEL + ENGINES[name], args.nproc, args.steps, 1, args.batch)
               for name in ENGINES}
    base = results["ddp"]["step_s"]
    print(f"   params {results['ddp']['params']:,}")
    for name, r in results.items():
        print(f"   {name:6s} {r['step_s'] * 1e3:8.1f} ms/step  {r['images_per_s']:8.1f} img/s  x{r['step_s'] / base:5.2f} vs ddp")
    print(f"2) checkpoint loop stall, {args.nproc} ranks, full-width DeepFlow-S/2-2T, median of {args.repeats}")
    for name in ("ddp", "fsdp"):
        r = _launch("ckpt", CKPT_MODEL + ENGINES[name], args.nproc, args.steps, args.repeats, args.batch)
        ratio = r["async_stall_s"] / r["sync_stall_s"]
        print(f"   {name:6s} params {r['params']:,}: sync stall {r['sync_stall_s']:.3f} s, async stall "
              f"{r['async_stall_s']:.3f} s (ratio {ratio:.2f}, goal <= 0.25; committed after "
              f"{r['async_until_commit_s']:.3f} s while training)")


if __name__ == "__main__":
    main()
