#!/usr/bin/env python
"""How much does each branch use the class label? A diagnostic for the runs of a ``deepflow study``.

    python bench/conditioning_probe.py --study-dir runs/study-fmnist [--variants SiT DeepFlow-2T] [--step 2000]

For every run of the named variants, the EMA weights of its checkpoint at ``--step`` predict the velocity of held-out
Fashion-MNIST test images (never trained on) noised to fixed times t, once with the true class label and once with
the null label. The conditioning gain of branch i is the drop of its velocity error that the label brings,
``mse_i(null) - mse_i(label)``, here also as a share of ``mse_i(null)``; it is measured per time band (high t = more
noise, where the label must carry the class). Same images, noise and times for every run, so the gains are
comparable across variants and seeds. Prints mean +- std over seeds; ``--json`` writes the numbers.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from deepflow.artifacts import COMMIT_NAME, load_weights, step_dir_name  # noqa: E402
from deepflow.models import create_model  # noqa: E402
from deepflow.models.flow import branch_times, interpolate  # noqa: E402
from deepflow.platform.eval.quality_data import load_labelled_split  # noqa: E402
from deepflow.platform.study.config import slug  # noqa: E402
from deepflow.platform.train.config import load_config  # noqa: E402

BANDS = {"t 0.05-0.35": (0.05, 0.35), "t 0.35-0.65": (0.35, 0.65), "t 0.65-0.95": (0.65, 0.95)}


def held_out(samples: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Test-split images in [-1, 1] [N,1,S,S] and labels [N]."""
    images, labels, _ = load_labelled_split("fashion_mnist", "test", resize_to=size)
    x = torch.from_numpy(images[:samples]).float().div(127.5).sub(1.0)[:, None]
    return x, torch.from_numpy(labels[:samples]).long()


@torch.no_grad()
def branch_gains(step_dir: Path, x: torch.Tensor, y: torch.Tensor) -> dict[str, list[float]]:
    """{band: [relative gain of branch 0, branch 1, ...]} of the EMA weights of one committed checkpoint."""
    cfg = load_config(step_dir / "config.yaml")
    model = create_model(cfg.model.name, **cfg.model.create_kwargs()).eval()
    weights, _ = load_weights(str(step_dir))
    model.load_state_dict(weights)
    null = torch.full_like(y, model.num_classes)
    out: dict[str, list[float]] = {}
    for band, (low, high) in BANDS.items():
        generator = torch.Generator().manual_seed(7)
        errors = {"label": torch.zeros(model.num_branches), "null": torch.zeros(model.num_branches)}
        for t in torch.linspace(low, high, 4):
            eps = torch.randn(x.shape, generator=generator)
            times = branch_times(torch.full((x.shape[0],), float(t)), model.num_branches, cfg.objective.alpha,
                                 generator)
            x_t, target = interpolate(x, eps, times[:, 0]), eps - x
            for name, labels in (("label", y), ("null", null)):
                velocities = model.forward_train(x_t, times, labels).velocities
                errors[name] += torch.stack([(v - target).pow(2).mean() for v in velocities])
        out[band] = ((errors["null"] - errors["label"]) / errors["null"]).tolist()
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--study-dir", type=Path, default=ROOT / "runs" / "study-fmnist")
    parser.add_argument("--variants", nargs="+", default=["SiT", "DeepFlow-2T"])
    parser.add_argument("--step", type=int, default=2000, help="the checkpoint step of every run")
    parser.add_argument("--samples", type=int, default=500)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    results: dict[str, dict[str, list[list[float]]]] = {}
    x = y = None
    for variant in args.variants:
        runs = sorted((args.study_dir / "runs" / slug(variant)).glob("seed-*"))
        if not runs:
            raise SystemExit(f"error: --variants: no runs of {variant!r} under {args.study_dir / 'runs'}")
        for run_dir in runs:
            step_dir = run_dir / "checkpoints" / step_dir_name(args.step)
            if not (step_dir / COMMIT_NAME).is_file():
                print(f"{variant} {run_dir.name}: no committed step {args.step} yet, left out", flush=True)
                continue
            if x is None:
                x, y = held_out(args.samples, load_config(step_dir / "config.yaml").model.input_size)
            gains = branch_gains(step_dir, x, y)
            for band, values in gains.items():
                results.setdefault(variant, {}).setdefault(band, []).append(values)
            print(f"{variant} {run_dir.name}: " + "; ".join(
                f"{band} " + " / ".join(f"{100 * v:.2f}%" for v in values) for band, values in gains.items()), flush=True)
    print("\nrelative conditioning gain (mse(null) - mse(label)) / mse(null), mean +- std over seeds, per branch:")
    print("| variant | branch | " + " | ".join(BANDS) + " |\n|---|---|" + "---|" * len(BANDS))
    for variant, bands in results.items():
        branches = len(next(iter(bands.values()))[0])
        for branch in range(branches):
            cells = []
            for band in BANDS:
                values = [run[branch] for run in bands[band]]
                spread = f" +- {100 * statistics.stdev(values):.2f}" if len(values) > 1 else ""
                cells.append(f"{100 * statistics.fmean(values):.2f}%{spread}")
            name = "last" if branch == branches - 1 else f"{branch} (intermediate)"
            print(f"| {variant} | {name} | " + " | ".join(cells) + " |")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
