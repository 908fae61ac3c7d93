#!/usr/bin/env python
"""Convergence study at small scale: does DeepFlow reach SiT's quality in fewer steps?

    python bench/bench_convergence.py [--steps 1000] [--eval-every 200] [--out docs/convergence]

SiT and DeepFlow-2T of the same depth and width train on the same Fashion-MNIST pixel shards (precomputed by the
data pipeline when missing) with the same batch, optimiser, seeds and number of steps; both are evaluated at
several points with the small-data classifier metric (Frechet distance in its features against held-out real
images, and class accuracy). DeepFlow-3T and the ablations (deep supervision only; + time gap; + acceleration;
+ cross-space attention = DeepFlow-2T) are evaluated at the final budget. Prints a table, writes
``<out>.md`` (table) and ``<out>.png`` (FD and accuracy versus step).

Every run draws its batches, times, noise and label drops from generators seeded identically, so the only
difference between runs is the architecture/objective.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from deepflow.data_pipeline.loader import ShardLoader  # noqa: E402
from deepflow.models import create_model  # noqa: E402
from deepflow.models.flow import FlowObjective  # noqa: E402
from deepflow.models.sampling import sample  # noqa: E402
from deepflow.platform.inference.generate import to_uint8  # noqa: E402
from deepflow.platform.eval.quality import ClassifierQuality  # noqa: E402


@dataclass
class Variant:
    """One training run: model name + create_model overrides + objective overrides."""

    label: str
    name: str
    model: dict = field(default_factory=dict)
    objective: dict = field(default_factory=dict)
    curve: bool = False  # evaluated at every eval point (else only at the end)


def variants() -> list[Variant]:
    return [
        Variant("SiT", "SiT-S/2", curve=True),
        Variant("DeepFlow-2T", "DeepFlow-S/2-2T", curve=True),
        Variant("DeepFlow-3T", "DeepFlow-S/2-3T"),
        Variant("ablation: deep supervision only", "DeepFlow-S/2-2T", {"vera_mode": "identity"},
                {"alpha": 0.0, "acc_weight": 0.0}),
        Variant("ablation: + time gap (VeRA w/o acc. loss, w/o cross attn.)", "DeepFlow-S/2-2T",
                {"vera_mode": "no_cross_attention"}, {"acc_weight": 0.0}),
        Variant("ablation: + acceleration (VeRA w/o cross attn.)", "DeepFlow-S/2-2T",
                {"vera_mode": "no_cross_attention"}),
    ]


def evaluate(model: torch.nn.Module, quality: ClassifierQuality, num_samples: int, steps: int) -> dict[str, float]:
    """Euler ODE samples (no guidance) from fixed noise, scored by the classifier."""
    model.eval()
    gen = torch.Generator().manual_seed(4321)
    labels = torch.arange(num_samples) % model.num_classes
    noise = torch.randn(num_samples, model.in_channels, model.input_size, model.input_size, generator=gen)
    with torch.no_grad():
        x = sample(model, noise, labels, method="euler", steps=steps, cfg_scale=1.0)
    model.train()
    images = to_uint8(x)
    scores = quality.score(images, labels)
    return {"fd": scores["fd"], "accuracy": scores["accuracy"]}


def train_variant(variant: Variant, args: argparse.Namespace, quality: ClassifierQuality, eval_points: list[int]) -> dict:
    torch.manual_seed(args.seed)
    model = create_model(variant.name, depth=args.depth, hidden_size=args.width, num_heads=args.heads,
                         input_size=16, in_channels=1, num_classes=10, acc_widths=(2 * args.width,) * 3,
                         **variant.model)
    objective = FlowObjective(time_sampling="lognormal", **variant.objective)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr, weight_decay=0.0)
    loader = ShardLoader(args.data, batch_size=args.batch, rank=0, world_size=1, num_workers=0,
                         shuffle_buffer=5000, seed=args.seed, flip=False)
    generator = torch.Generator().manual_seed(args.seed)
    points = eval_points if variant.curve else [args.steps]
    history, start, train_time = [], time.perf_counter(), 0.0
    batches = iter(loader)
    for step in range(1, args.steps + 1):
        tick = time.perf_counter()
        batch = next(batches)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16):
            terms = objective.loss(model.forward_train, batch["x"], batch["y"], generator,
                                   num_branches=model.num_branches, num_classes=model.num_classes)
        optimizer.zero_grad(set_to_none=True)
        terms["total"].backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        train_time += time.perf_counter() - tick
        if step in points:
            scores = evaluate(model, quality, args.eval_samples, args.sample_steps)
            history.append({"step": step, **scores, "loss_last_branch": terms[f"deep_{model.num_branches - 1}"].item()})
            print(f"  {variant.label:58s} step {step:5d}  FD {scores['fd']:8.2f}  acc {scores['accuracy']:.3f}"
                  f"  ({time.perf_counter() - start:.0f}s)", flush=True)
    loader.close()
    params = sum(p.numel() for p in model.parameters())
    return {"label": variant.label, "name": variant.name, "history": history, "params": params,
            "gmacs_per_image": model.flops_per_image() / 1e9, "train_s_per_step": train_time / args.steps}


def first_step_reaching(history: list[dict], target_fd: float) -> int | None:
    return next((h["step"] for h in history if h["fd"] <= target_fd), None)


def write_outputs(results: list[dict], args: argparse.Namespace, real: dict) -> str:
    by_label = {r["label"]: r for r in results}
    sit, df = by_label["SiT"], by_label["DeepFlow-2T"]
    results = [sit, df] + [r for r in results if r["label"] not in ("SiT", "DeepFlow-2T")]
    target = sit["history"][-1]["fd"]
    reach = first_step_reaching(df["history"], target)
    lines = [
        f"Fashion-MNIST 16x16 pixels, depth {args.depth}, width {args.width}, patch 2, batch {args.batch}, "
        f"{'bf16 autocast' if args.bf16 else 'fp32'}, "
        f"AdamW lr {args.lr}, {args.steps} steps, seed {args.seed}; {args.eval_samples} Euler-{args.sample_steps} "
        f"samples without guidance; real held-out images score FD {real['fd']:.2f}, accuracy {real['accuracy']:.3f}.",
        "",
        "| step | " + " | ".join(f"{r['label']} FD / acc" for r in results[:2]) + " |",
        "|---|---|---|",
    ]
    for a, b in zip(sit["history"], df["history"]):
        lines.append(f"| {a['step']} | {a['fd']:.2f} / {a['accuracy']:.3f} | {b['fd']:.2f} / {b['accuracy']:.3f} |")
    lines += ["", "| run (final step) | params | GMACs/img | FD | accuracy |", "|---|---|---|---|---|"]
    for r in results:
        last = r["history"][-1]
        lines.append(f"| {r['label']} | {r['params'] / 1e6:.2f}M | {r['gmacs_per_image']:.3f} | "
                     f"{last['fd']:.2f} | {last['accuracy']:.3f} |")
    lines += ["", f"DeepFlow-2T first reaches SiT's final FD ({target:.2f}) at step {reach} of {args.steps}." if reach
              else f"DeepFlow-2T does not reach SiT's final FD ({target:.2f}) within the {args.steps}-step budget."]
    return "\n".join(lines)


def plot(results: list[dict], path: Path) -> None:
    """FD and accuracy versus step: curves for SiT and DeepFlow-2T, crosses for the final-budget runs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    results = sorted(results, key=lambda r: len(r["history"]) == 1)  # curves first
    for r in [r for r in results if len(r["history"]) > 1]:
        steps = [h["step"] for h in r["history"]]
        axes[0].plot(steps, [h["fd"] for h in r["history"]], marker="o", label=r["label"])
        axes[1].plot(steps, [h["accuracy"] for h in r["history"]], marker="o", label=r["label"])
    for color, r in enumerate([r for r in results if len(r["history"]) == 1], start=2):
        h = r["history"][-1]
        axes[0].scatter([h["step"]], [h["fd"]], marker="x", color=f"C{color}", label=r["label"])
        axes[1].scatter([h["step"]], [h["accuracy"]], marker="x", color=f"C{color}", label=r["label"])
    axes[0].set(xlabel="training step", ylabel="classifier FD (lower is better)", yscale="log")
    axes[1].set(xlabel="training step", ylabel="class accuracy (higher is better)")
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(ROOT / "runs" / "demo" / "data-fashion_mnist"),
                        help="Fashion-MNIST 16x16 pixel shards (the main job's; precomputed when missing)")
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--eval-every", type=int, default=200)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--depth", type=int, default=6)
    parser.add_argument("--width", type=int, default=96)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-bf16", dest="bf16", action="store_false", help="fp32 training (default: bf16 autocast)")
    parser.add_argument("--eval-samples", type=int, default=500)
    parser.add_argument("--sample-steps", type=int, default=20)
    parser.add_argument("--variants", default=None,
                        help="comma-separated variant indices to run (default: all); write the table with --merge")
    parser.add_argument("--merge", nargs="+", default=None, metavar="JSON",
                        help="only write the table/plot from the .json files of earlier (partial) runs")
    parser.add_argument("--out", default=str(ROOT / "docs" / "convergence"))
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if args.merge:
        parts = [json.loads(Path(path).read_text()) for path in args.merge]
        results = [r for part in parts for r in part["results"]]
        args = argparse.Namespace(**{**parts[0]["args"], "out": args.out})
        return finish(results, args, parts[0]["real"], out)

    if not (Path(args.data) / "manifest.json").exists():
        from deepflow.data_pipeline.config import load_config
        from deepflow.data_pipeline.precompute import run_precompute

        run_precompute(load_config(str(ROOT / "configs/demo/precompute-fmnist16.yaml"), [f"output.url={args.data}"]),
                       0, 1, progress=True)
    quality = ClassifierQuality.for_dataset("fashion_mnist")
    real_x, real_y = quality.unseen_real
    real = quality.score(real_x[: args.eval_samples, None], real_y[: args.eval_samples])
    eval_points = list(range(args.eval_every, args.steps + 1, args.eval_every))
    if eval_points[-1] != args.steps:
        eval_points.append(args.steps)

    chosen = variants()
    if args.variants is not None:
        chosen = [chosen[int(index)] for index in args.variants.split(",")]
    results = []
    for variant in chosen:
        print(f"{variant.label}: {variant.name} {variant.model} {variant.objective}", flush=True)
        results.append(train_variant(variant, args, quality, eval_points))
        out.with_suffix(".json").write_text(json.dumps({"args": vars(args), "real": real, "results": results}, indent=1))
    if {r["label"] for r in results} >= {"SiT", "DeepFlow-2T"}:
        return finish(results, args, real, out)
    print(f"wrote {out.with_suffix('.json')} (partial: combine with --merge)")
    return 0


def finish(results: list[dict], args: argparse.Namespace, real: dict, out: Path) -> int:
    table = write_outputs(results, args, real)
    print("\n" + table)
    out.with_suffix(".md").write_text(table + "\n")
    plot(results, out.with_suffix(".png"))
    print(f"\nwrote {out.with_suffix('.md')}, {out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
