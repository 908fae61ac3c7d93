#!/usr/bin/env python
"""Sampling throughput on CPU with classifier-free guidance: our sampler versus a naive loop.

- ours:  ``deepflow.models.sampling.sample``: cond and uncond in ONE batched forward of the inference path
         (``model(x, t, y)``: only the last velocity head runs);
- naive: an independent Euler-Maruyama loop that runs cond and uncond as TWO forward passes through
         ``forward_train`` (every head: intermediate velocities, accelerations).

Both integrate the same SDE with the same noise, so the images must agree (asserted). Prints the median of several
runs of each and the speed ratio for a small model at several batch sizes (the target: >= 1.8x) and, for context,
a larger one. On a CPU the saving is per-forward overhead (one dispatch instead of two, fewer heads): it is large
for small models and batches and shrinks towards ~1x when the forward becomes compute-bound.

    python bench/bench_sampling.py [--repeats 5] [--threads 1]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from deepflow.models import create_model  # noqa: E402
from deepflow.models.sampling import sample, sde_times  # noqa: E402


def naive_sde_cfg(model, noise, y, steps: int, cfg_scale: float, generator: torch.Generator) -> torch.Tensor:
    """Reference loop: two forward_train passes (cond, uncond) per step, all heads computed."""
    k = model.num_branches
    null = torch.full_like(y, model.num_classes)
    grid = sde_times(steps)
    x = noise
    for i, (t_cur, t_next) in enumerate(zip(grid[:-1], grid[1:])):
        times = torch.full((x.shape[0], k), t_cur)
        v_cond = model.forward_train(x, times, y).velocities[-1]
        v_uncond = model.forward_train(x, times, null).velocities[-1]
        v = v_uncond + cfg_scale * (v_cond - v_uncond)
        score = -(x + (1.0 - t_cur) * v) / t_cur
        drift = v - 0.5 * (2.0 * t_cur) * score
        dt = t_next - t_cur
        x = x + drift * dt
        if i < len(grid) - 2:
            x = x + (2.0 * t_cur) ** 0.5 * abs(dt) ** 0.5 * torch.randn(x.shape, generator=generator)
    return x


def randomized(model: torch.nn.Module) -> torch.nn.Module:
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:  # the zero-initialised heads too, so outputs are non-trivial
                param.copy_(torch.randn(param.shape, generator=generator) * 0.05)
    return model.eval()


def timed_pair(first, second, repeats: int) -> tuple[float, float, float, torch.Tensor, torch.Tensor]:
    """Alternate the two (so both see the same machine load); medians of each and of the per-round ratios."""
    out_first, out_second = first(), second()  # warm-up
    t_first, t_second, ratios = [], [], []
    for _ in range(repeats):
        start = time.perf_counter()
        out_first = first()
        middle = time.perf_counter()
        out_second = second()
        end = time.perf_counter()
        t_first.append(middle - start)
        t_second.append(end - middle)
        ratios.append((end - middle) / (middle - start))
    return (statistics.median(t_first), statistics.median(t_second), statistics.median(ratios),
            out_first, out_second)


@torch.no_grad()
def run_case(label: str, model_kwargs: dict, batch: int, steps: int, cfg_scale: float, repeats: int) -> float:
    model = randomized(create_model("DeepFlow-S/2-2T", **model_kwargs))
    g = torch.Generator().manual_seed(1)
    noise = torch.randn(batch, model.in_channels, model.input_size, model.input_size, generator=g)
    y = torch.randint(0, model.num_classes, (batch,), generator=g)

    def ours() -> torch.Tensor:
        return sample(model, noise, y, method="sde", steps=steps, cfg_scale=cfg_scale,
                      null_label=model.num_classes, generator=torch.Generator().manual_seed(7))

    def naive() -> torch.Tensor:
        return naive_sde_cfg(model, noise, y, steps, cfg_scale, torch.Generator().manual_seed(7))

    t_ours, t_naive, ratio, x_ours, x_naive = timed_pair(ours, naive, repeats)
    torch.testing.assert_close(x_ours, x_naive, rtol=1e-4, atol=1e-4)
    print(f"{label:<44} batch {batch:>3} steps {steps:>3} cfg {cfg_scale}:  ours {batch / t_ours:8.2f} img/s  "
          f"naive {batch / t_naive:8.2f} img/s  speed-up {ratio:.2f}x  (outputs equal, max |diff| "
          f"{(x_ours - x_naive).abs().max().item():.1e})")
    return ratio


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, CPU, {args.threads} thread(s), median of {args.repeats} alternating runs")
    small = dict(depth=4, hidden_size=64, num_heads=4, input_size=8, in_channels=4, num_classes=10,
                 acc_widths=(64, 128, 64))
    larger = dict(depth=8, hidden_size=256, num_heads=4, input_size=16, in_channels=4, num_classes=10,
                  acc_widths=(256, 512, 256))
    ratios = {}
    for batch in (1, 4, 16):
        label = f"small  DeepFlow-S/2-2T d4 H64 8x8x4 (b{batch})"
        ratios[label] = run_case(label, small, batch=batch, steps=50, cfg_scale=4.0, repeats=args.repeats)
    label = "larger DeepFlow-S/2-2T d8 H256 16x16x4 (b8)"
    ratios[label] = run_case(label, larger, batch=8, steps=10, cfg_scale=4.0, repeats=args.repeats)
    for label, ratio in ratios.items():
        print(f"{label}: {ratio:.2f}x (goal >= 1.8x: {'met' if ratio >= 1.8 else 'not met'})")

if __name__ == "__main__":
    main()
