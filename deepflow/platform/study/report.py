"""Collect a study's results (evaluations, training time, FLOPs) into ``results.json``, a markdown report and one
plot per metric (against steps, training FLOPs and training wall-clock), mean +- std over seeds.

Reading rule of the report: the method is "ahead" / "behind" the baseline at a point only where the intervals
mean +- std of the two do not overlap; overlapping intervals are a "tie". The paired difference (same seed: same
data order and evaluation noise) is shown beside it.
"""
from __future__ import annotations

import json
import math
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from deepflow.platform.study.config import StudyConfig, describe, slug
from deepflow.platform.study.evaluate import read_evaluations
from deepflow.platform.train.tb_logging import read_scalars

__all__ = ["Summary", "collect", "higher_is_better", "verdict", "write_report"]


def higher_is_better(metric: str) -> bool:
    return any(word in metric for word in ("accuracy", "clip_score", "inception_score", "precision", "recall"))


@dataclass
class Summary:
    """mean, std (sample, n-1; 0 for one value) and the values over seeds."""

    values: list[float]

    @property
    def n(self) -> int:
        return len(self.values)

    @property
    def mean(self) -> float:
        return statistics.fmean(self.values) if self.values else math.nan

    @property
    def std(self) -> float:
        return statistics.stdev(self.values) if len(self.values) > 1 else 0.0

    def text(self, digits: int) -> str:
        if not self.values:
            return "-"
        spread = f" +- {self.std:.{digits}f}" if self.n > 1 else ""
        return f"{self.mean:.{digits}f}{spread}"


def verdict(baseline: Summary, method: Summary, metric: str) -> str:
    """"ahead" / "behind" when mean +- std intervals are disjoint, else "tie" (see the module doc). A method with
    one seed is a point against the baseline's interval ("(1 seed)" is added); a baseline with one seed: "n/a"."""
    if baseline.n < 2 or method.n < 1:
        return "n/a"
    low_b, high_b = baseline.mean - baseline.std, baseline.mean + baseline.std
    low_m, high_m = method.mean - method.std, method.mean + method.std
    suffix = " (1 seed)" if method.n == 1 else ""
    if high_m < low_b:
        return ("behind" if higher_is_better(metric) else "ahead") + suffix
    if low_m > high_b:
        return ("ahead" if higher_is_better(metric) else "behind") + suffix
    return "tie" + suffix


# -------------------------------------------------------------------------------------------------- collect
def _seconds_per_step(run_dir: Path, batch: int) -> float:
    """The run's median training seconds per step over the trainer's logging windows (``perf/images_per_s`` in
    its TensorBoard scalars; the last record of a step wins when a resumed run logged it twice). The median keeps a
    window slowed by another process on the machine, or by a checkpoint save, from bending the wall-clock axis."""
    rates = {int(row["step"]): float(row["perf/images_per_s"])
             for row in read_scalars(StudyConfig.tensorboard_dir(run_dir)) if "perf/images_per_s" in row}
    per_step = [batch / rate for rate in rates.values() if rate > 0]
    return statistics.median(per_step) if per_step else math.nan


def _run_facts(run_dir: Path) -> dict[str, Any]:
    """Parameters, training FLOPs per step and batch of a run, from its saved config (model built on 'meta')."""
    import torch

    from deepflow.models import create_model
    from deepflow.platform.train.config import load_config
    from deepflow.platform.train.trainer import train_flops_per_image

    cfg = load_config(run_dir / "config.yaml")
    with torch.device("meta"):
        model = create_model(cfg.model.name, **cfg.model.create_kwargs())
    batch = cfg.data.global_batch_size
    return {"params": sum(p.numel() for p in model.parameters()), "batch": batch,
            "train_flops_per_step": train_flops_per_image(model) * batch,
            "model": cfg.model.name, "depth": model.depth, "hidden_size": model.hidden_size,
            "lr": cfg.optim.lr, "warmup_steps": cfg.optim.warmup_steps, "precision": cfg.precision,
            "engine": cfg.distributed.engine, "ema_decay": cfg.ema.decay}


def collect(study: StudyConfig) -> dict[str, Any]:
    """Every run's records, FLOPs and training time, as written to ``results.json``."""
    runs = []
    for variant in study.variants:
        for seed in study.seeds_of(variant):
            run_dir = study.run_dir(variant, seed)
            if not (run_dir / "config.yaml").is_file():
                continue
            facts = _run_facts(run_dir)
            seconds_per_step = _seconds_per_step(run_dir, facts["batch"])
            records = read_evaluations(run_dir)
            for record in records:
                record["train_flops"] = facts["train_flops_per_step"] * record["step"]
                record["train_seconds"] = seconds_per_step * record["step"]
            runs.append({"variant": variant.label, "seed": seed, **facts, "seconds_per_step": seconds_per_step,
                         "evaluations": records})
    return {"study": describe(study), "runs": runs}


def _summaries(results: dict[str, Any], variant: str, protocol: str, metric: str
               ) -> dict[int, tuple[Summary, float, float]]:
    """step -> (summary over seeds, mean training FLOPs, mean training seconds)."""
    by_step: dict[int, list[tuple[float, float, float]]] = {}
    for run in results["runs"]:
        if run["variant"] != variant:
            continue
        for record in run["evaluations"]:
            if record["protocol"] == protocol and metric in record["metrics"]:
                by_step.setdefault(record["step"], []).append(
                    (record["metrics"][metric], record["train_flops"], record["train_seconds"]))
    return {step: (Summary([v for v, _, _ in rows]), statistics.fmean(f for _, f, _ in rows),
                   statistics.fmean(s for _, _, s in rows)) for step, rows in sorted(by_step.items())}


def _paired(results: dict[str, Any], baseline: str, method: str, protocol: str, metric: str, step: int) -> Summary:
    """method - baseline per seed (seeds both have) at ``step``."""
    def values(label: str) -> dict[int, float]:
        out = {}
        for run in results["runs"]:
            if run["variant"] == label:
                for record in run["evaluations"]:
                    if record["protocol"] == protocol and record["step"] == step and metric in record["metrics"]:
                        out[run["seed"]] = record["metrics"][metric]
        return out

    a, b = values(baseline), values(method)
    return Summary([b[seed] - a[seed] for seed in sorted(set(a) & set(b))])


def metrics_of(results: dict[str, Any]) -> list[str]:
    names = {name for run in results["runs"] for r in run["evaluations"] for name in r["metrics"]}
    return sorted(names, key=lambda name: (higher_is_better(name), name))


# --------------------------------------------------------------------------------------------------- report
def _digits(metric: str) -> int:
    return 3 if higher_is_better(metric) else 2


def _setup_line(study: StudyConfig, results: dict[str, Any]) -> str:
    runs = results["runs"]
    if not runs:
        return "No run has started yet."
    first = runs[0]
    headline = study.protocols[0]
    return (f"Every run: depth {first['depth']}, width {first['hidden_size']} "
            f"({first['engine']} engine, {first['precision']}), batch {first['batch']}, AdamW lr {first['lr']:g} "
            f"with {first['warmup_steps']} warm-up steps, EMA {first['ema_decay']}; seeds {study.seeds}; "
            f"{study.num_samples} samples per evaluation. Headline protocol '{headline.label}': "
            f"{headline.weights} weights, {headline.sampler.method} {headline.sampler.steps} steps, "
            f"cfg {headline.sampler.cfg_scale:g}.")


def _curve_table(study: StudyConfig, results: dict[str, Any], metric: str) -> list[str]:
    baseline, method = study.comparison
    protocol = study.protocols[0].label
    curves = [v for v in study.variants if v.curve]
    summaries = {v.label: _summaries(results, v.label, protocol, metric) for v in curves}
    steps = sorted({step for s in summaries.values() for step in s})
    lines = [f"**{metric}** ({'higher' if higher_is_better(metric) else 'lower'} is better), protocol '{protocol}', "
             "mean +- std over seeds:", "",
             f"| step | train TFLOPs {baseline} / {method} | " + " | ".join(v.label for v in curves)
             + f" | {method} - {baseline} (paired) | reading |",
             "|---" * (len(curves) + 4) + "|"]
    for step in steps:
        cells = [summaries[v.label][step][0].text(_digits(metric)) if step in summaries[v.label] else "-"
                 for v in curves]
        flops = " / ".join(f"{summaries[label][step][1] / 1e12:.1f}" if step in summaries.get(label, {}) else "-"
                           for label in (baseline, method))
        paired = _paired(results, baseline, method, protocol, metric, step)
        reading = (verdict(summaries[baseline][step][0], summaries[method][step][0], metric)
                   if step in summaries.get(baseline, {}) and step in summaries.get(method, {}) else "-")
        lines.append(f"| {step} | {flops} | " + " | ".join(cells) + f" | {paired.text(_digits(metric))} | {reading} |")
    return lines


def _interpolated(points: list[tuple[float, float]], x: float, log_y: bool = False) -> float | None:
    """Interpolation of sorted (x, y) points (x > 0) at ``x``, linear in log x (and in log y with ``log_y``: FD-like
    metrics fall roughly as a power of the compute); None outside their range (never extrapolated)."""
    for (x0, y0), (x1, y1) in zip(points, points[1:]):
        if x0 <= x <= x1:
            if x1 == x0:
                return y0
            w = (math.log(x) - math.log(x0)) / (math.log(x1) - math.log(x0))
            if log_y and y0 > 0 and y1 > 0:
                return math.exp(math.log(y0) + (math.log(y1) - math.log(y0)) * w)
            return y0 + (y1 - y0) * w
    return points[0][1] if points and points[0][0] == x else None


def _per_seed_curves(results: dict[str, Any], variant: str, protocol: str, metric: str
                     ) -> dict[int, list[tuple[float, float]]]:
    """seed -> sorted (training FLOPs, value) of one variant."""
    curves: dict[int, list[tuple[float, float]]] = {}
    for run in results["runs"]:
        if run["variant"] == variant:
            curves[run["seed"]] = sorted((r["train_flops"], r["metrics"][metric]) for r in run["evaluations"]
                                         if r["protocol"] == protocol and metric in r["metrics"])
    return curves


def _flop_table(study: StudyConfig, results: dict[str, Any], metric: str) -> list[str]:
    """Both curve variants at equal training FLOPs: the baseline's evaluation points, the method's value at the same
    FLOPs interpolated between its own points (per seed, then mean +- std; see :func:`_interpolated`)."""
    baseline, method = study.comparison
    protocol = study.protocols[0].label
    base_curves = _per_seed_curves(results, baseline, protocol, metric)
    method_curves = _per_seed_curves(results, method, protocol, metric)
    budgets = sorted({flops for curve in base_curves.values() for flops, _ in curve})
    if not budgets or not method_curves:
        return []
    lines = [f"**{metric}** at equal training compute (protocol '{protocol}'; {method} interpolated between its "
             "evaluation points, per seed, linearly in log FLOPs" + ("" if higher_is_better(metric) else
                                                                     " and log " + metric) + "):", "",
             f"| train TFLOPs | {baseline} | {method} | reading |", "|---|---|---|---|"]
    for budget in budgets:
        base = Summary([v for curve in base_curves.values() for f, v in curve if f == budget])
        values = [_interpolated(curve, budget, log_y=not higher_is_better(metric)) for curve in method_curves.values()]
        mine = Summary([v for v in values if v is not None])
        reading = verdict(base, mine, metric) if mine.n else "-"
        lines.append(f"| {budget / 1e12:.1f} | {base.text(_digits(metric))} | {mine.text(_digits(metric))} | "
                     f"{reading} |")
    return lines


def _final_table(study: StudyConfig, results: dict[str, Any], metrics: list[str]) -> list[str]:
    protocol = study.protocols[0].label
    baseline = study.comparison[0]
    lines = [f"Every variant at its last step (protocol '{protocol}'; reading against {baseline} at the same step):",
             "", "| variant | seeds | steps | params | train GFLOPs/step | train s/step | "
             + " | ".join(f"{m} | reading" for m in metrics) + " |",
             "|---" * (6 + 2 * len(metrics)) + "|"]
    for variant in study.variants:
        runs = [r for r in results["runs"] if r["variant"] == variant.label]
        if not runs:
            continue
        last = study.steps_of(variant)
        cells = []
        for metric in metrics:
            mine = _summaries(results, variant.label, protocol, metric).get(last)
            base = _summaries(results, baseline, protocol, metric).get(last)
            cells.append(mine[0].text(_digits(metric)) if mine else "-")
            cells.append("-" if not mine or not base or variant.label == baseline else verdict(base[0], mine[0], metric))
        seconds = [r["seconds_per_step"] for r in runs if not math.isnan(r["seconds_per_step"])]
        per_step = f"{statistics.fmean(seconds):.3f}" if seconds else "-"
        lines.append(f"| {variant.label} | {len(runs)} | {last} | {runs[0]['params'] / 1e6:.2f}M "
                     f"| {runs[0]['train_flops_per_step'] / 1e9:.0f} "
                     f"| {per_step} | " + " | ".join(cells) + " |")
    return lines


def _protocol_table(study: StudyConfig, results: dict[str, Any], metrics: list[str]) -> list[str]:
    if len(study.protocols) < 2:
        return []
    lines = ["Evaluation protocols at the last step (same checkpoints, mean +- std over seeds):", "",
             "| protocol | variant | " + " | ".join(metrics) + " |", "|---" * (2 + len(metrics)) + "|"]
    for protocol in study.protocols:
        for variant in study.variants:
            if protocol.variants is not None and variant.label not in protocol.variants:
                continue
            cells = []
            for metric in metrics:
                found = _summaries(results, variant.label, protocol.label, metric).get(study.steps_of(variant))
                cells.append(found[0].text(_digits(metric)) if found else "-")
            if any(cell != "-" for cell in cells):
                lines.append(f"| {protocol.label} | {variant.label} | " + " | ".join(cells) + " |")
    return lines


def plot(study: StudyConfig, results: dict[str, Any], metric: str, path: Path) -> None:
    """``metric`` against step, training TFLOPs and training seconds: mean line and +- std band per curve
    variant; final-only variants as error bars at their last point."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    protocol = study.protocols[0].label
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    for color, variant in enumerate(study.variants):
        points = _summaries(results, variant.label, protocol, metric)
        if not points:
            continue
        steps = sorted(points)
        means = [points[s][0].mean for s in steps]
        stds = [points[s][0].std for s in steps]
        for axis, xs in zip(axes, (steps, [points[s][1] / 1e12 for s in steps], [points[s][2] for s in steps])):
            label = f"{variant.label} (n={points[steps[-1]][0].n})"
            if variant.curve and len(steps) > 1:
                axis.plot(xs, means, marker="o", color=f"C{color}", label=label)
                axis.fill_between(xs, [m - s for m, s in zip(means, stds)], [m + s for m, s in zip(means, stds)],
                                  color=f"C{color}", alpha=0.2)
            else:
                axis.errorbar(xs, means, yerr=stds, fmt="x", capsize=3, color=f"C{color}", label=label)
    direction = "higher" if higher_is_better(metric) else "lower"
    for axis, xlabel in zip(axes, ("training step", "training TFLOPs", "training seconds (one run)")):
        axis.set(xlabel=xlabel, ylabel=f"{metric} ({direction} is better)")
        if metric.startswith("fd"):
            axis.set_yscale("log")
        axis.grid(alpha=0.3)
    axes[2].legend(fontsize=7)
    fig.suptitle(f"{study.name}: {metric}, mean +- std over seeds ({protocol})")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_report(study: StudyConfig, results: dict[str, Any], out: Path) -> Path:
    """Write ``results.json``, ``report.md`` and ``<metric>.png`` into ``out``; returns the report's path."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    metrics = metrics_of(results)
    lines = [f"# Study {study.name}", "", _setup_line(study, results), ""]
    for metric in metrics:
        lines += _curve_table(study, results, metric) + [""]
        lines += _flop_table(study, results, metric) + [""]
        plot(study, results, metric, out / f"{slug(metric)}.png")
        lines += [f"![{metric}]({slug(metric)}.png)", ""]
    lines += _final_table(study, results, metrics) + [""]
    lines += _protocol_table(study, results, metrics)
    report = out / "report.md"
    report.write_text("\n".join(lines).rstrip() + "\n")
    return report

