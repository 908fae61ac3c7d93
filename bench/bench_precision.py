#!/usr/bin/env python
"""bf16 autocast against fp32 on this machine's CPU: the demo model's training step and sampling forward pass.

Side by side in one process, interleaved (fp32, bf16, fp32, bf16, ...), median over repeats, with the launcher's
thread choice. On a CPU without native bf16 (no AVX512-BF16/AMX) autocast is emulated and slower than fp32; this
is the figure behind ``deepflow.precision.EMULATED_BF16_SLOWDOWN`` and the reason ``precision: auto`` picks fp32
there.

    python bench/bench_precision.py [--config configs/demo/train-fmnist.yaml] [--steps 5] [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def _timed(fn: Callable[[], None], steps: int) -> float:
    """Seconds per call of ``fn`` over ``steps`` calls (after one warm-up call)."""
    fn()
    start = time.perf_counter()
    for _ in range(steps):
        fn()
    return (time.perf_counter() - start) / steps


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(REPO / "configs/demo/train-fmnist.yaml"))
    parser.add_argument("--steps", type=int, default=5, help="timed calls per measurement")
    parser.add_argument("--repeats", type=int, default=5, help="measurements per precision (median)")
    args = parser.parse_args(argv)

    from deepflow.runtime import configure_threads

    threads = configure_threads()
    import torch

    from deepflow.models import create_model
    from deepflow.models.flow import FlowObjective
    from deepflow.platform.train.config import load_config
    from deepflow.precision import native_bf16

    cfg = load_config(args.config, [])
    torch.manual_seed(0)
    model = create_model(cfg.model.name, **cfg.model.create_kwargs())
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    objective = FlowObjective(time_sampling=cfg.objective.time_sampling)
    batch = cfg.data.global_batch_size
    size, channels = cfg.model.input_size, cfg.model.in_channels
    x = torch.randn(batch, channels, size, size)
    y = torch.randint(0, cfg.model.num_classes, (batch,))
    t = torch.rand(batch)

    def train_step(dtype: torch.dtype | None) -> Callable[[], None]:
        def step() -> None:
            with torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
                terms = objective.loss(model.forward_train, x, y, torch.Generator().manual_seed(0),
                                       num_branches=model.num_branches, num_classes=cfg.model.num_classes)
            terms["total"].backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        return step

    def sample_forward(dtype: torch.dtype | None) -> Callable[[], None]:
        @torch.no_grad()
        def forward() -> None:
            with torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
                model(x, t, y)
        return forward

    results: dict[str, object] = {"cpu": _cpu_name(), "native_bf16": native_bf16(torch.device("cpu"))[1],
                                  "threads": threads.describe(), "model": cfg.model.name, "batch": batch}
    for name, make in (("train_step", train_step), ("sample_forward", sample_forward)):
        times: dict[str, list[float]] = {"fp32": [], "bf16": []}
        for _ in range(args.repeats):
            times["fp32"].append(_timed(make(None), args.steps))
            times["bf16"].append(_timed(make(torch.bfloat16), args.steps))
        fp32, bf16 = statistics.median(times["fp32"]), statistics.median(times["bf16"])
        results[name] = {"fp32_s": round(fp32, 4), "bf16_s": round(bf16, 4), "bf16_over_fp32": round(bf16 / fp32, 2)}
    print(json.dumps(results, indent=2))


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or "unknown"


if __name__ == "__main__":
    main()
