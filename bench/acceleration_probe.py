"""What DeepFlow's acceleration output predicts, measured on a trained checkpoint (docs/sampling/report.md).

    python bench/acceleration_probe.py --run runs/demo/run-fashion_mnist:1000

Along probability-flow ODE trajectories (Euler, 200 steps, from the generate path's noise) it compares, at several
times t, the model's acceleration a_1 (``model(x, t, y, return_acceleration=True)``) with
  - the trajectory's acceleration dv/dt (finite difference of the final velocity along the ODE, step 0.005): what a
    second-order Taylor step would need, and
  - 2 (v_1 - v) / t (v_1: the first branch's velocity, v: the final one): what the training loss
    |x_t - t sg(v_1) + t^2 a_1 / 2 - x0|^2 makes a_1 predict when the final velocity is the posterior mean,
by cosine similarity and norm ratio |a_1| / |target| (means over 64 samples).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a.flatten(1), b.flatten(1)).mean())


def ratio(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.flatten(1).norm(dim=1) / b.flatten(1).norm(dim=1).clamp_min(1e-12)).mean())


@torch.no_grad()
def probe(run: str, num: int = 64, steps: int = 200, times: tuple[float, ...] = (0.9, 0.7, 0.5, 0.3, 0.1)) -> list:
    from deepflow.artifacts import load_weights, step_dir_name
    from deepflow.models import create_model
    from deepflow.platform.inference.generate import initial_noise
    from deepflow.platform.train.config import load_config

    folder, _, step = run.rpartition(":")
    cfg = load_config(Path(folder) / "config.yaml")
    model = create_model(cfg.model.name, **cfg.model.create_kwargs()).eval()
    model.load_state_dict(load_weights(str(Path(folder) / "checkpoints" / step_dir_name(int(step))))[0], strict=False)
    import numpy as np

    x = initial_noise(np.arange(num), (model.in_channels, model.input_size, model.input_size), seed=0)
    y = torch.arange(num) % model.num_classes
    rows, dt, h = [], 1.0 / steps, 0.005
    targets = sorted(times, reverse=True)
    t = 1.0
    for _ in range(steps):
        if targets and t <= targets[0] + 1e-9:
            tt = torch.full((num,), t)
            v, a = model(x, tt, y, return_acceleration=True)
            v_1 = model(x, torch.stack([tt, tt], 1), y, return_all=True).velocities[0]
            v_next = model(x - h * v, tt - h, y)
            dvdt = (v_next - v) / (-h)  # d v / d t along the trajectory (t decreasing)
            residual = 2.0 * (v_1 - v) / t
            rows.append({"t": round(t, 3), "cos(a, dv/dt)": cosine(a, dvdt), "|a|/|dv/dt|": ratio(a, dvdt),
                         "cos(a, 2(v1-v)/t)": cosine(a, residual), "|a|/|2(v1-v)/t|": ratio(a, residual)})
            targets.pop(0)
        x = x - dt * model(x, torch.full((num,), t), y)
        t -= dt
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", action="append", required=True, metavar="RUN_DIR:STEP")
    parser.add_argument("--out", default=str(ROOT / "docs" / "sampling" / "acceleration.json"))
    args = parser.parse_args()
    torch.set_num_threads(2)
    results = {run: probe(run) for run in args.run}
    Path(args.out).write_text(json.dumps(results, indent=1))
    for run, rows in results.items():
        print(run)
        print("| t | " + " | ".join(k for k in rows[0] if k != "t") + " |")
        for row in rows:
            print(f"| {row['t']} | " + " | ".join(f"{v:.3f}" for k, v in row.items() if k != "t") + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
