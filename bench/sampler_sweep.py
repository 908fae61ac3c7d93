"""Quality against forward passes per image for every sampler: classifier FD and class accuracy of each (checkpoint,
sampler setting, sampling seed), through the trainer's periodic evaluator (the generate path of ``deepflow sample``,
the run's ``eval.extractor``: the small-data classifier), with SDE 250 (the paper's protocol) as the baseline.

    python bench/sampler_sweep.py \\
        --model demo=runs/demo/run-fashion_mnist:1000 \\
        --model SiT=runs/study-samplers/runs/sit/seed-0:2000 \\
        --model DeepFlow-2T=runs/study-samplers/runs/deepflow-2t/seed-0:2000 \\
        --num-samples 200 --out docs/sampling

A model is LABEL=RUN_DIR:STEP: a run folder with its ``config.yaml`` and ``checkpoints/step-NNNNNNN`` (EMA weights;
``deepflow study --config configs/study/fmnist-samplers.yaml`` trains the SiT and DeepFlow-2T ones). Sample ``i`` of
sampling seed ``s`` is the generate path's sample (s, i): every setting sees the same initial noise per seed.
Results are cached in ``<out>/results.json`` (rerun to continue; ``--report-only`` rewrites ``report.md`` and
``fd-vs-passes.png`` from it). ``--only LABEL ...`` runs only these settings; ``--seeds-for LABEL ...`` adds the
extra sampling seeds to these settings (the baseline and the preset always get them).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

BASELINE = "SDE 250"
PRESET = "sde-2m 25, eta 3 (fast preset)"


@dataclass(frozen=True)
class Setting:
    """One sampler setting of the sweep: a label, SamplerConfig fields, and whether it gets every sampling seed."""

    label: str
    sampler: dict[str, Any]
    all_seeds: bool = False
    needs_acceleration: bool = False


SETTINGS = [
    Setting(BASELINE, {"method": "sde", "steps": 250}, all_seeds=True),
    Setting(PRESET, {"preset": "fast"}, all_seeds=True),
    Setting("sde-2m 25", {"method": "sde-2m", "steps": 25}),
    Setting("SDE 62", {"method": "sde", "steps": 62}),
    Setting("SDE 25", {"method": "sde", "steps": 25}),
    Setting("SDE 25, edm grid", {"method": "sde", "steps": 25, "grid": "edm"}),
    Setting("sde-exp 25", {"method": "sde-exp", "steps": 25}),
    Setting("sde-2m 12", {"method": "sde-2m", "steps": 12}),
    Setting("sde-2m 50", {"method": "sde-2m", "steps": 50}),
    Setting("sde-2m 25, eta 0.5", {"method": "sde-2m", "steps": 25, "diffusion_norm": 0.5}),
    Setting("sde-2m 25, eta 1.5", {"method": "sde-2m", "steps": 25, "diffusion_norm": 1.5}),
    Setting("sde-2m 25, eta 2", {"method": "sde-2m", "steps": 25, "diffusion_norm": 2.0}),
    Setting("sde-2m 25, eta 5", {"method": "sde-2m", "steps": 25, "diffusion_norm": 5.0}),
    Setting("sde-2m 12, eta 3", {"method": "sde-2m", "steps": 12, "diffusion_norm": 3.0}),
    Setting("sde-exp 25, eta 3", {"method": "sde-exp", "steps": 25, "diffusion_norm": 3.0}),
    Setting("sde-2m 25, shift 2", {"method": "sde-2m", "steps": 25, "shift": 2.0}),
    Setting("sde-2m 25, shift 0.5", {"method": "sde-2m", "steps": 25, "shift": 0.5}),
    Setting("Euler 25", {"method": "euler", "steps": 25}),
    Setting("Heun 12", {"method": "heun", "steps": 12}),
    Setting("Heun 12, edm grid", {"method": "heun", "steps": 12, "grid": "edm"}),
    Setting("midpoint 12", {"method": "midpoint", "steps": 12}),
    Setting("dpm++2m 25", {"method": "dpm++2m", "steps": 25}),
    Setting("dpm++2m 25, edm grid", {"method": "dpm++2m", "steps": 25, "grid": "edm"}),
    Setting("accel 25", {"method": "accel", "steps": 25}, needs_acceleration=True),
]


def parse_model(text: str) -> tuple[str, Path, int]:
    """LABEL=RUN_DIR:STEP -> (label, run dir, step)."""
    label, _, rest = text.partition("=")
    folder, _, step = rest.rpartition(":")
    if not label or not folder or not step.isdigit():
        raise SystemExit(f"--model: expected LABEL=RUN_DIR:STEP, got {text!r}")
    return label, Path(folder), int(step)


def key(model: str, setting: str, seed: int, num_samples: int) -> str:
    return f"{model} | {setting} | seed {seed} | n {num_samples}"


class Sweep:
    """Evaluates (model, setting, seed) triples with the run's Evaluator; results cached in results.json."""

    def __init__(self, out: Path, num_samples: int) -> None:
        self.out, self.num_samples = out, num_samples
        self.path = out / "results.json"
        self.data: dict[str, Any] = json.loads(self.path.read_text()) if self.path.is_file() else {"records": {}}

    def save(self) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=1, sort_keys=True))
        os.replace(tmp, self.path)

    def run_model(self, label: str, run_dir: Path, step: int, settings: list[Setting], seeds: list[int],
                  extra: set[str]) -> None:
        import torch

        from deepflow.artifacts import load_weights, step_dir_name
        from deepflow.platform.inference.generate import SamplerConfig
        from deepflow.platform.train.config import load_config
        from deepflow.platform.train.distributed import DistContext
        from deepflow.platform.train.periodic_eval import Evaluator
        from deepflow.platform.train.tb_logging import TrainLogger

        run_cfg = load_config(run_dir / "config.yaml")
        weights = load_weights(str(run_dir / "checkpoints" / step_dir_name(step)))[0]
        has_vera = run_cfg.model.name.startswith("DeepFlow")
        ctx = DistContext(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"), backend=None)
        scratch = ROOT / "runs" / "sampler-sweep" / label
        evaluator: Any = None
        logger = TrainLogger(str(scratch / "tensorboard"), enabled=False)
        for setting in settings:
            if setting.needs_acceleration and not has_vera:
                continue
            sampler = SamplerConfig(**setting.sampler)
            for seed in (seeds if setting.all_seeds or setting.label in extra else seeds[:1]):
                name = key(label, setting.label, seed, self.num_samples)
                if name in self.data["records"]:
                    continue
                cfg = run_cfg.model_copy(update={
                    "eval": run_cfg.eval.model_copy(update={"sampler": sampler, "num_samples": self.num_samples,
                                                            "batch_size": self.num_samples, "all_ranks": False}),
                    "run": run_cfg.run.model_copy(update={"seed": seed, "output_dir": str(scratch)}),
                })
                if evaluator is None:
                    evaluator = Evaluator(cfg, ctx, logger)
                evaluator.cfg = cfg  # same model, plan, extractor and reference; this sampler and seed
                started = time.perf_counter()
                metrics = evaluator.run(weights, step)
                record = {"model": label, "setting": setting.label, "seed": seed, "num_samples": self.num_samples,
                          "sampler": sampler.model_dump(mode="json"), "forward_passes": sampler.forward_passes(),
                          "seconds": round(time.perf_counter() - started, 1), "checkpoint": f"{run_dir}:{step}",
                          **{k.removeprefix("eval/"): v for k, v in metrics.items()}}
                self.data["records"][name] = record
                self.save()
                print(f"{name}: fd {record['fd_classifier']:.2f}, acc {record['class_accuracy']:.3f}, "
                      f"{record['forward_passes']} passes, {record['seconds']} s", flush=True)
        logger.close()


# ------------------------------------------------------------------------------------------------------ report
def summarise(records: list[dict[str, Any]], metric: str) -> tuple[float, float, int]:
    values = [r[metric] for r in records]
    spread = statistics.stdev(values) if len(values) > 1 else math.nan
    return statistics.fmean(values), spread, len(values)


def fmt(mean: float, spread: float, count: int, digits: int) -> str:
    return f"{mean:.{digits}f}" if count == 1 else f"{mean:.{digits}f} +- {spread:.{digits}f}"


def table(data: dict[str, Any], num_samples: int) -> tuple[str, dict[str, dict[str, Any]]]:
    """The markdown table (one row per setting, one FD and accuracy column pair per model) and its numbers."""
    records = [r for r in data["records"].values() if r["num_samples"] == num_samples]
    models = list(dict.fromkeys(r["model"] for r in records))
    order = [s.label for s in SETTINGS]
    labels = sorted({r["setting"] for r in records}, key=lambda s: order.index(s) if s in order else len(order))
    summary: dict[str, dict[str, Any]] = {}
    head = "| setting | passes/image | " + " | ".join(f"{m}: FD | {m}: acc" for m in models) + " |"
    lines = [head, "|" + "---|" * (2 + 2 * len(models))]
    for label in labels:
        cells, passes = [], None
        for model in models:
            rows = [r for r in records if r["model"] == model and r["setting"] == label]
            if not rows:
                cells += ["-", "-"]
                continue
            passes = rows[0]["forward_passes"]
            fd, acc = summarise(rows, "fd_classifier"), summarise(rows, "class_accuracy")
            summary.setdefault(model, {})[label] = {"passes": passes, "fd": fd, "acc": acc,
                                                    "seeds": sorted(r["seed"] for r in rows)}
            cells += [fmt(*fd, 2), fmt(*acc, 3)]
        lines.append(f"| {label} | {passes} | " + " | ".join(cells) + " |")
    return "\n".join(lines), summary


def plot(summary: dict[str, dict[str, Any]], path: Path) -> None:
    """FD (mean +- std over seeds where there are several) against passes per image, log x; one panel per model.
    Settings of one method and options at several step counts are joined; points at the same count are spread
    slightly along x so that they stay readable."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FixedLocator, ScalarFormatter

    fig, axes = plt.subplots(1, len(summary), figsize=(7.5 * len(summary), 5.0), squeeze=False)
    for ax, (model, rows) in zip(axes[0], summary.items()):
        families: dict[str, list[tuple[int, float, float]]] = {}
        for label, row in rows.items():
            method, _, rest = label.partition(" ")
            steps, _, options = rest.partition(", ")
            family = f"{method}, {options}" if options else method
            families.setdefault(family, []).append((row["passes"], row["fd"][0], row["fd"][1]))
        base = rows.get(BASELINE)
        if base:
            mean, spread = base["fd"][0], base["fd"][1]
            ax.axhspan(mean - spread, mean + spread, color="0.88", label=f"{BASELINE}: mean +- std")
            ax.axvline(base["passes"] / 10, color="0.5", ls=":", label="a tenth of its passes")
        crowd: dict[int, int] = {}
        cmap = plt.get_cmap("tab20")
        for index, (family, points) in enumerate(sorted(families.items())):
            points.sort()
            xs = []
            for passes, _, _ in points:
                crowd[passes] = crowd.get(passes, 0) + 1
                xs.append(passes * (1.0 + 0.012 * (crowd[passes] - 1)) if passes in (24, 25) else passes)
            ys = [p[1] for p in points]
            es = [0.0 if math.isnan(p[2]) else p[2] for p in points]
            marker = "*" if "(fast preset)" in family else "o"
            ax.errorbar(xs, ys, yerr=es, marker=marker, ms=9 if marker == "*" else 4, capsize=2, label=family,
                        lw=1 if len(points) > 1 else 0, elinewidth=1, color=cmap(index % 20))
        ax.set_xscale("log")
        ax.xaxis.set_major_locator(FixedLocator([12, 25, 50, 100, 250]))
        ax.xaxis.set_major_formatter(ScalarFormatter())
        ax.xaxis.set_minor_locator(FixedLocator([]))
        ax.set_xlabel("forward passes per image (log)")
        ax.set_ylabel("classifier FD (lower is better)")
        ax.set_title(f"{model}: FD vs forward passes (error bars: std over 3 sampling seeds)", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6.5, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(out: Path, num_samples: int, command: str) -> None:
    data = json.loads((out / "results.json").read_text())
    text, summary = table(data, num_samples)
    (out / "table.md").write_text(text + "\n")
    data["summary"] = {m: {k: {**v, "fd": list(v["fd"]), "acc": list(v["acc"])} for k, v in rows.items()}
                       for m, rows in summary.items()}
    data["command"] = command
    (out / "results.json").write_text(json.dumps(data, indent=1, sort_keys=True))
    try:
        plot(summary, out / "fd-vs-passes.png")
    except ImportError:
        print("matplotlib missing: no plot", file=sys.stderr)
    print(text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", action="append", default=[], metavar="LABEL=RUN_DIR:STEP")
    parser.add_argument("--num-samples", type=int, default=200)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="sampling seeds")
    parser.add_argument("--only", nargs="+", metavar="SETTING", help="run only these settings")
    parser.add_argument("--seeds-for", nargs="+", default=[], metavar="SETTING", help="all seeds for these too")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=str(ROOT / "docs" / "sampling"))
    parser.add_argument("--report-only", action="store_true")
    args = parser.parse_args(argv)
    out = Path(args.out)
    known = {s.label for s in SETTINGS}
    unknown = [name for name in [*(args.only or []), *args.seeds_for] if name not in known]
    if unknown:
        raise SystemExit(f"--only/--seeds-for: unknown settings {unknown} (known: {sorted(known)})")
    if not args.report_only:
        import torch

        torch.set_num_threads(args.threads)
        sweep = Sweep(out, args.num_samples)
        settings = [s for s in SETTINGS if args.only is None or s.label in args.only]
        for text in args.model:
            sweep.run_model(*parse_model(text), settings, args.seeds, set(args.seeds_for))
    write_report(out, args.num_samples, "python bench/sampler_sweep.py " + " ".join(argv or sys.argv[1:]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
