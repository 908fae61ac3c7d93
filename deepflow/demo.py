"""The main job on the embedded default: the whole platform on real data, on a CPU, offline.

    deepflow demo [--out runs/demo] [--steps N] [--set field=value ...]

1. precompute Fashion-MNIST (Debian's dataset-fashion-mnist; scikit-learn digits when it is not installed) into
   local webdataset shards in pixel space (resized to 16x16) (the precompute job's code path);
2. train a small DeepFlow-2T with ``deepflow train`` in a child process, as a user runs it (one process: on a
   2-core machine two data-parallel processes of one thread each are no faster than one process with two threads,
   and pay for the gloo all-reduce), with periodic evaluation (classifier FD + accuracy), checkpoints and
   TensorBoard logs;
3. sample a class-conditional grid from the exported EMA weights, score the samples with the small-data
   classifier, and print (on stdout; the progress goes to the log on stderr) where everything is.

``--steps N`` trains N steps instead of the config's, with the evaluation and checkpoint intervals scaled to keep
their share of the run; ``--set`` overrides (applied after) win.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from deepflow.errors import JobArgumentParser, UsageError, report_user_errors
from deepflow.runtime import packaged_configs_dir

if TYPE_CHECKING:
    from deepflow.platform.eval.quality import ClassifierQuality

__all__ = ["DATASETS", "main", "scaled_interval", "steps_overrides"]

log = logging.getLogger("deepflow.demo")

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
DATASETS = {
    # dataset -> (precompute config, train config), under the shipped configs folder
    "fashion_mnist": ("demo/precompute-fmnist16.yaml", "demo/train-fmnist.yaml"),
    "digits": ("demo/precompute-digits.yaml", "demo/train-digits.yaml"),
}


def _banner(text: str) -> None:
    log.info(f"=== {text} ===")


def choose_dataset(requested: str) -> str:
    if requested != "auto":
        return requested
    if (FASHION_MNIST_DIR / "train-images-idx3-ubyte.gz").exists():
        return "fashion_mnist"
    log.warning(f"{FASHION_MNIST_DIR} not found (Debian package dataset-fashion-mnist needs apt); "
                "falling back to scikit-learn's 8x8 digits")
    return "digits"


def scaled_interval(every: int, total_steps: int, steps: int) -> int:
    """An interval of ``every`` steps in a ``total_steps`` run, scaled to a run of ``steps`` (0 stays 0: off)."""
    if every <= 0:
        return every
    return max(1, math.ceil(every * steps / total_steps))


def steps_overrides(train_config: Path, steps: int) -> list[str]:
    """``--set`` overrides that make the run ``steps`` long with eval/checkpoint intervals scaled alike."""
    from deepflow.platform.train.config import load_config

    config = load_config(str(train_config))
    total = config.schedule.total_steps
    return [
        f"schedule.total_steps={steps}",
        f"eval.every={scaled_interval(config.eval.every, total, steps)}",
        f"checkpoint.every={scaled_interval(config.checkpoint.every, total, steps)}",
    ]


def precompute(config_path: Path, data_dir: Path) -> dict:
    """Encode the dataset into shards under ``data_dir`` (skipped when its manifest already exists)."""
    from deepflow.data_pipeline.config import load_config
    from deepflow.data_pipeline.precompute import run_precompute

    manifest_path = data_dir / "manifest.json"
    if manifest_path.exists():
        log.info(f"shards already committed at {data_dir} (delete the folder to rebuild)")
    else:
        config = load_config(str(config_path), [f"output.url={data_dir}"])
        run_precompute(config, 0, 1, progress=True)
    return json.loads(manifest_path.read_text())


def train(config_path: Path, run_dir: Path, data_dir: Path, overrides: list[str]) -> int:
    """``deepflow train --config ...`` in a child process, exactly as a user would run it (it chooses its own
    threads, as every job does); returns its exit status."""
    command = [sys.executable, "-m", "deepflow", "train", "--config", str(config_path),
               "--set", f"run.output_dir={run_dir}", "--set", f"data.url={data_dir}"]
    for override in overrides:
        command += ["--set", override]
    log.info("$ deepflow " + " ".join(command[3:]))
    package_root = str(Path(__file__).resolve().parent.parent)  # also when this checkout is not installed
    path = os.pathsep.join(p for p in (package_root, os.environ.get("PYTHONPATH", "")) if p)
    return subprocess.run(command, env={**os.environ, "PYTHONPATH": path}).returncode


def final_samples(run_dir: Path, quality: "ClassifierQuality", num_samples: int, seed: int) -> dict:
    """Class-conditional samples from the exported EMA weights through the platform's one generate path (the one
    ``deepflow sample`` and the periodic evaluation use): a labelled grid PNG and the quality figures."""
    import numpy as np
    import torch
    from torchvision.utils import save_image

    from deepflow.artifacts import load_weights
    from deepflow.platform.inference.conditions import ClassPlan, label_plan
    from deepflow.platform.inference.generate import Decoder, DecodeSpec, SamplerConfig, build_model, generate

    state, card = load_weights(str(run_dir / "export"))
    model = build_model(state, card, torch.device("cpu"))
    classes = model.num_classes
    plan = ClassPlan(label_plan("cyclic", num_samples, classes, seed), classes)
    decoder = Decoder(DecodeSpec.resolve("auto", card=card, in_channels=model.in_channels))
    sampler = SamplerConfig(method="euler", steps=20, cfg_scale=2.0)
    batches = [np.arange(start, min(start + 250, num_samples)) for start in range(0, num_samples, 250)]
    uint8 = torch.cat([generate(model, plan, indices, seed=seed, sampler=sampler, decoder=decoder)
                       for indices in batches])
    labels = torch.from_numpy(plan.labels)
    scores = quality.score(uint8, labels)

    # Grid: one row per class, 10 samples each (rows in class order).
    per_class = 10
    rows = [uint8[labels == c][:per_class] for c in range(classes)]
    grid_path = run_dir / "samples" / "final_grid.png"
    grid_path.parent.mkdir(parents=True, exist_ok=True)
    save_image(torch.cat(rows).float() / 255.0, grid_path, nrow=per_class, padding=1)
    np.savez_compressed(run_dir / "samples" / "final_samples.npz", arr_0=uint8.permute(0, 2, 3, 1).numpy(),
                        labels=labels.numpy())
    return {**scores, "grid": str(grid_path), "num_samples": num_samples}


def build_parser() -> argparse.ArgumentParser:
    """The demo's flags (usage errors are one-line user errors)."""
    parser = JobArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/demo", help="output folder (data, run, samples)")
    parser.add_argument("--dataset", choices=["auto", *DATASETS], default="auto")
    parser.add_argument("--steps", type=int, default=None, metavar="N",
                        help="training steps (default: the config's); eval/checkpoint intervals scale with it")
    parser.add_argument("--samples", type=int, default=500, help="final samples scored by the classifier")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="FIELD=VALUE",
                        help="training config override (repeatable, applied last), e.g. --set optim.lr=5e-4")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Exit status: 0 done, 2 a user mistake (one ``error:`` line), else the training run's status."""
    return report_user_errors(lambda: _run(argv))


def _run(argv: list[str] | None) -> int:
    args = build_parser().parse_args(argv)
    if args.steps is not None and args.steps < 1:
        raise UsageError(f"--steps: must be at least 1, got {args.steps}")
    started = time.perf_counter()
    out = Path(args.out).resolve()
    dataset = choose_dataset(args.dataset)
    configs = packaged_configs_dir()
    precompute_config, train_config = (configs / name for name in DATASETS[dataset])
    data_dir, run_dir = out / f"data-{dataset}", out / f"run-{dataset}"
    overrides = (steps_overrides(train_config, args.steps) if args.steps else []) + args.overrides

    _banner(f"1/3 precompute {dataset} -> {data_dir}")
    manifest = precompute(precompute_config, data_dir)
    log.info(f"{manifest['num_samples']} samples in {len(manifest['shards'])} shards")

    _banner(f"2/3 train ({train_config.relative_to(configs)})")
    status = train(train_config, run_dir, data_dir, overrides)
    if status != 0:
        log.error(f"training failed (exit status {status}); see its output above")
        return status

    _banner("3/3 final samples and quality")
    from deepflow.platform.eval.quality import ClassifierQuality

    quality = ClassifierQuality.for_dataset(dataset)
    result = final_samples(run_dir, quality, args.samples, seed=1234)
    real_x, real_y = quality.unseen_real
    real = quality.score(real_x[: args.samples, None], real_y[: args.samples])
    minutes = (time.perf_counter() - started) / 60
    summary = {
        "dataset": dataset, "minutes": round(minutes, 2),
        "samples_fd": round(result["fd"], 3), "samples_accuracy": round(result["accuracy"], 4),
        "real_images_fd": round(real["fd"], 3), "real_images_accuracy": round(real["accuracy"], 4),
        "classifier_sha256": result["classifier_sha256"],
    }
    (run_dir / "demo_summary.json").write_text(json.dumps(summary, indent=2))
    _banner(f"done in {minutes:.1f} min")
    print(f"samples grid : {result['grid']}  (one row per class, in class order)\n"  # the result: on stdout
          f"samples npz  : {run_dir / 'samples' / 'final_samples.npz'}\n"
          f"TensorBoard  : tensorboard --logdir {run_dir / 'tensorboard'}\n"
          f"checkpoints  : {run_dir / 'checkpoints'}   EMA export: {run_dir / 'export'}\n"
          f"quality ({args.samples} samples, classifier {result['classifier_sha256'][:12]}): "
          f"FD {result['fd']:.2f} (real held-out {real['fd']:.2f}), "
          f"class accuracy {result['accuracy']:.1%} (real {real['accuracy']:.1%})", flush=True)
    return 0


if __name__ == "__main__":
    from deepflow.cli import run_job

    sys.exit(run_job("demo", prog="python -m deepflow.demo"))
