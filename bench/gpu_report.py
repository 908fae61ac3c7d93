#!/usr/bin/env python
"""The GPU figures of the README in one run: DeepFlow-XL/2-3T at 256px (4x32x32 latents), bf16, one GPU.

    python bench/gpu_report.py                       # on a GPU machine: prints the table, writes bench/gpu_report.md
    python bench/gpu_report.py --write-readme        # ... and replaces the GPU table in README.md
    python bench/gpu_report.py --tiny                # the same code path on a CPU with a tiny model (a smoke test)

Training (``bench/bench_engines.py``'s worker, one process): images/s per GPU, model TFLOP/s (6 x the paper's
multiply-accumulate count per image, attention included), MFU against the device's dense bf16 peak, peak memory;
fsdp and deepspeed ZeRO-2, each eager and with ``distributed.compile``. Sampling (the generate path of
``deepflow sample``: SDE, 250 steps, the paper's FID setting, cfg 1.0): images/s, fp32 and bf16, eager and
compiled (CUDA graphs). Every figure is a median over timed steps after warm-up; compile build time is reported
separately.
"""
from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from bench_engines import ENGINES  # noqa: E402

XL = ["model.name=DeepFlow-XL/2-3T", "model.input_size=32", "model.in_channels=4", "model.num_classes=1000"]
TINY = ["model.name=DeepFlow-S/2-2T", "model.depth=2", "model.hidden_size=32", "model.num_heads=2",
        "model.input_size=8", "model.in_channels=4", "model.num_classes=10",
        'model.extra={"acc_widths":[32,32,32]}']
README_BEGIN, README_END = "<!-- gpu-report:begin -->", "<!-- gpu-report:end -->"


def train_rows(model: list[str], batch: int, steps: int, precision: str, compile_modes: list[bool]) -> list[dict]:
    """One bench_engines worker per (engine, compile): its RESULT line."""
    rows = []
    for engine in ("fsdp", "zero2"):
        for compiled in compile_modes:
            overrides = model + ENGINES[engine] + [f"precision={precision}", f"distributed.compile={str(compiled).lower()}"]
            command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1",
                       str(REPO / "bench" / "bench_engines.py"), "--worker", "step", "--steps", str(steps),
                       "--batch", str(batch)]
            for override in overrides:
                command += ["--set", override]
            start = time.perf_counter()
            proc = subprocess.run(command, capture_output=True, text=True, cwd=REPO)
            result = next((json.loads(line[7:]) for line in proc.stdout.splitlines() if line.startswith("RESULT ")),
                          None)
            if result is None:
                raise RuntimeError(f"{engine} compile={compiled} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
            result.update({"engine": engine, "compile": compiled, "wall_s": time.perf_counter() - start})
            rows.append(result)
            print(json.dumps(result), flush=True)
    return rows


def sample_rows(model: list[str], batch: int, steps: int, compile_modes: list[bool]) -> list[dict]:
    """Sampling images/s of the generate path (latents only; the VAE decode is not timed)."""
    import torch

    from deepflow.models import create_model
    from deepflow.platform.inference.generate import SamplerConfig, sample_latents
    from deepflow.platform.train.config import load_config

    cfg = load_config(None, model)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    net = create_model(cfg.model.name, **cfg.model.create_kwargs()).to(device).eval().requires_grad_(False)
    shape = (batch, cfg.model.in_channels, cfg.model.input_size, cfg.model.input_size)
    noise = torch.randn(shape, device=device)
    labels = torch.randint(0, cfg.model.num_classes, (batch,), device=device)
    rows = []
    for precision in ("fp32", "bf16"):
        for compiled in compile_modes:
            sampler = SamplerConfig(method="sde", steps=steps, cfg_scale=1.0, compile=compiled)

            def run() -> None:
                sample_latents(net, noise, labels, sampler, precision=precision,  # noqa: B023
                               generator=torch.Generator(device=device).manual_seed(0))
                if device.type == "cuda":
                    torch.cuda.synchronize()

            start = time.perf_counter()
            run()
            first = time.perf_counter() - start
            times = []
            for _ in range(3):
                start = time.perf_counter()
                run()
                times.append(time.perf_counter() - start)
            row = {"precision": precision, "compile": compiled, "images_per_s": batch / statistics.median(times),
                   "first_call_s": first}
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def markdown(device: str, model: str, train: list[dict], sample: list[dict], batch: int, sample_steps: int) -> str:
    lines = [f"Device: {device}. Training: {model}, batch {batch} per GPU, one GPU.", "",
             "| engine | compile | images/s/GPU | TFLOP/s | MFU | peak memory GB |", "|---|---|---|---|---|---|"]
    for r in train:
        mfu = f"{r['mfu']:.1%}" if r.get("mfu") is not None else "n/a"
        lines.append(f"| {r['engine']} | {'yes' if r['compile'] else 'no'} | {r['images_per_s']:.1f} | "
                     f"{r['tflops_per_device']:.1f} | {mfu} | {r.get('peak_mem_gb', float('nan')):.1f} |")
    lines += ["", f"Sampling: SDE {sample_steps} steps, cfg 1.0 (the paper's FID setting), latents only.", "",
              "| precision | compile | images/s | first call s |", "|---|---|---|---|"]
    for r in sample:
        lines.append(f"| {r['precision']} | {'yes' if r['compile'] else 'no'} | {r['images_per_s']:.2f} | "
                     f"{r['first_call_s']:.1f} |")
    return "\n".join(lines) + "\n"


def write_readme(table: str) -> None:
    readme = REPO / "README.md"
    text = readme.read_text()
    block = f"{README_BEGIN}\n{table}{README_END}"
    pattern = re.compile(re.escape(README_BEGIN) + ".*?" + re.escape(README_END), re.DOTALL)
    if not pattern.search(text):
        raise SystemExit(f"error: README.md has no {README_BEGIN} ... {README_END} block to replace")
    readme.write_text(pattern.sub(lambda _: block, text))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="tiny model, few steps: checks the script on a CPU")
    parser.add_argument("--batch", type=int, default=None, help="training batch per GPU (default 64; tiny 4)")
    parser.add_argument("--no-compile", action="store_true", help="eager only")
    parser.add_argument("--write-readme", action="store_true")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "gpu_report.md")
    args = parser.parse_args()
    import torch

    if not torch.cuda.is_available() and not args.tiny:
        raise SystemExit("error: no CUDA device: run on a GPU machine, or pass --tiny to check the script on a CPU")
    model = TINY if args.tiny else XL
    batch = args.batch or (4 if args.tiny else 64)
    precision = "fp32" if args.tiny else "bf16"  # bf16 DeepSpeed/FSDP on CPU is not what the table measures
    compile_modes = [False] if args.no_compile else [False, True]
    steps, sample_steps, sample_batch = (2, 3, 2) if args.tiny else (10, 250, 64)
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU (tiny smoke test)"
    train = train_rows(model, batch, steps, precision, compile_modes)
    sample = sample_rows(model, sample_batch, sample_steps, compile_modes)
    what = "tiny DeepFlow-S/2-2T (d2, H32), fp32" if args.tiny else "DeepFlow-XL/2-3T, 256px, bf16"
    table = markdown(device, what, train, sample, batch, sample_steps)
    print(table)
    args.out.write_text(table)
    if args.write_readme:
        write_readme(table)


if __name__ == "__main__":
    main()
