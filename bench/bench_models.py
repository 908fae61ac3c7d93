"""Training-step cost of SiT vs DeepFlow at the same depth: time per image beside linear-layer GFLOPs.

CPU (default, small):  python bench/bench_models.py
GPU:                   python bench/bench_models.py --device cuda --dtype bf16 --pair XL --batch 32 \
                           --input-size 32 --peak-tflops 989 [--compile]

One training step = FlowObjective loss (all heads) + backward. Both models are measured in the same run,
interleaved, median of ``--repeats`` timed steps after ``--warmup`` steps. The goal: the time ratio
(DeepFlow / SiT) should not exceed the FLOP ratio by more than 10%.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from deepflow.models import create_model
from deepflow.models.flow import FlowObjective

PAIRS = {
    "B": [("SiT-B/2", 12), ("DeepFlow-B/2-2T", 12)],
    "XL": [("SiT-XL/2", 28), ("DeepFlow-XL/2-3T", 24)],
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pair", choices=sorted(PAIRS), default="B", help="B: SiT-B/2 vs DeepFlow-B/2-2T (d12); "
                   "XL: SiT-XL/2 (d28) vs DeepFlow-XL/2-3T (d24)")
    p.add_argument("--depth", type=int, default=None, help="force one depth for both models")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="autocast dtype (params stay fp32)")
    p.add_argument("--compile", action="store_true", help="torch.compile the models")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--input-size", type=int, default=16, help="latent side (32 = ImageNet 256px)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = default)")
    p.add_argument("--peak-tflops", type=float, default=None, help="accelerator peak (dense, this dtype) for MFU")
    return p.parse_args()


class Runner:
    """One model, its optimizer-free training step and its FLOP counts."""

    def __init__(self, name: str, depth: int, args: argparse.Namespace) -> None:
        self.name, self.depth = name, depth
        self.model = create_model(name, depth=depth, input_size=args.input_size).to(args.device)
        self.model.train()
        self.fn = torch.compile(self.model) if args.compile else self.model
        self.objective = FlowObjective(label_dropout=0.1)
        self.args = args
        self.gen = torch.Generator().manual_seed(0)
        g = torch.Generator().manual_seed(1)
        shape = (args.batch, 4, args.input_size, args.input_size)
        self.x0 = torch.randn(shape, generator=g).to(args.device)
        self.y = torch.randint(0, 1000, (args.batch,), generator=g).to(args.device)
        self.times: list[float] = []

    def _call(self, x, times, y):
        return self.fn(x, times, y, return_all=True)

    def step(self) -> float:
        device = torch.device(self.args.device)
        sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        sync()
        start = time.perf_counter()
        with torch.autocast(device.type, dtype=DTYPES[self.args.dtype], enabled=self.args.dtype != "fp32"):
            terms = self.objective.loss(self._call, self.x0, self.y, self.gen,
                                        num_branches=self.model.num_branches, num_classes=1000)
        terms["total"].backward()
        self.model.zero_grad(set_to_none=True)
        sync()
        return time.perf_counter() - start

    def gflops(self, train: bool, attention: bool = False) -> float:
        return self.model.flops_per_image(train=train, attention=attention) / 1e9


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    pair = PAIRS[args.pair]
    runners = [Runner(name, args.depth or depth, args) for name, depth in pair]
    print(f"device={args.device} dtype={args.dtype} compile={args.compile} batch={args.batch} "
          f"latents=4x{args.input_size}x{args.input_size} ({(args.input_size // 2) ** 2} tokens)"
          f" threads={torch.get_num_threads()}")
    if args.input_size != 32:
        print(f"note: latents reduced from 32x32 to {args.input_size}x{args.input_size} to fit this machine; "
              "the GFLOPs columns below are for these latents, the 'paper GFLOPs' column for 32x32")
    for _ in range(args.warmup):
        for r in runners:
            r.step()
    for _ in range(args.repeats):  # interleaved so that load on shared cores hits both models alike
        for r in runners:
            r.times.append(r.step())

    print(f"{'model':<18}{'depth':>6}{'paper GFLOPs':>14}{'GFLOPs/img':>12}{'train GFLOPs':>14}"
          f"{'ms/img fwd+bwd':>16}{'img/s':>9}" + ("" if args.peak_tflops is None else f"{'MFU':>8}"))
    rows = []
    for r in runners:
        with torch.device("meta"):
            paper = create_model(r.name, depth=r.depth).flops_per_image() / 1e9
        per_img = statistics.median(r.times) / args.batch
        line = (f"{r.name:<18}{r.depth:>6}{paper:>14.1f}{r.gflops(False):>12.2f}{r.gflops(True):>14.2f}"
                f"{per_img * 1e3:>16.2f}{1 / per_img:>9.1f}")
        if args.peak_tflops is not None:
            # FLOPs of a step ~ 3 x training forward (forward + 2x backward), 2 FLOPs per multiply-accumulate,
            # attention matmuls included.
            step_flops = 3 * 2 * r.model.flops_per_image(train=True, attention=True)
            line += f"{step_flops / per_img / (args.peak_tflops * 1e12):>8.1%}"
        print(line)
        rows.append((per_img, r.gflops(True), r.gflops(True, attention=True), r.gflops(False)))
    (t0, f0, fa0, fi0), (t1, f1, fa1, fi1) = rows
    time_ratio = t1 / t0
    print(f"time ratio {pair[1][0]} / {pair[0][0]}: {time_ratio:.3f}")
    print(f"FLOP ratio (training forward, linear layers): {f1 / f0:.3f}   with attention matmuls: {fa1 / fa0:.3f}"
          f"   inference forward: {fi1 / fi0:.3f}")
    excess = time_ratio / (f1 / f0) - 1
    print(f"time ratio exceeds the linear-layer FLOP ratio by {excess:+.1%} (goal: <= +10%)")


if __name__ == "__main__":
    main()
