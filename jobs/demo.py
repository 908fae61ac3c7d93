#!/usr/bin/env python
"""The main job on the embedded default: the whole platform on real data, on a CPU, offline.

    python jobs/demo.py [--out runs/demo] [--steps N] [--set field=value ...]

1. precompute Fashion-MNIST (Debian's dataset-fashion-mnist; scikit-learn digits when it is not installed) into
   local webdataset shards in pixel space (resized to 16x16) (jobs/precompute.py's code path);
2. train a small DeepFlow-2T with jobs/train.py (one process: on a 2-core machine two data-parallel processes of
   one thread each are no faster than one process with two threads, and pay for the gloo all-reduce), with periodic
   evaluation (classifier FD + accuracy), checkpoints and TensorBoard logs;
3. sample a class-conditional grid from the exported EMA weights, score 500 samples with the small-data
   classifier, and print where everything is.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

if TYPE_CHECKING:
    from deepflow.platform.eval.quality import ClassifierQuality

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
DATASETS = {
    # dataset -> (precompute config, train config)
    "fashion_mnist": ("configs/demo/precompute-fmnist16.yaml", "configs/demo/train-fmnist.yaml"),
    "digits": ("configs/demo/precompute-digits.yaml", "configs/demo/train-digits.yaml"),
}


def _banner(text: str) -> None:
    print(f"\n=== {text} ===", flush=True)


def choose_dataset(requested: str) -> str:
    if requested != "auto":
        return requested
    if (FASHION_MNIST_DIR / "train-images-idx3-ubyte.gz").exists():
        return "fashion_mnist"
    print(f"NOTE: {FASHION_MNIST_DIR} not found (Debian package dataset-fashion-mnist needs apt); "
          "falling back to scikit-learn's 8x8 digits", flush=True)
    return "digits"


def precompute(config_path: str, data_dir: Path) -> dict:
    """Encode the dataset into shards under ``data_dir`` (skipped when its manifest already exists)."""
    from deepflow.data_pipeline.config import load_config
    from deepflow.data_pipeline.precompute import run_precompute

    manifest_path = data_dir / "manifest.json"
    if manifest_path.exists():
        print(f"shards already committed at {data_dir} (delete the folder to rebuild)")
    else:
        config = load_config(str(ROOT / config_path), [f"output.url={data_dir}"])
        run_precompute(config, 0, 1, progress=True)
    return json.loads(manifest_path.read_text())


def train(config_path: str, run_dir: Path, data_dir: Path, overrides: list[str]) -> None:
    """``python jobs/train.py --config ...`` in a child process, exactly as a user would run it."""
    command = [sys.executable, str(ROOT / "jobs" / "train.py"), "--config", str(ROOT / config_path),
               "--set", f"run.output_dir={run_dir}", "--set", f"data.url={data_dir}"]
    for override in overrides:
        command += ["--set", override]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("DEMO_THREADS", str(os.cpu_count() or 1))}
    print("$ " + " ".join(command[1:]), flush=True)
    subprocess.run(command, check=True, env=env, cwd=ROOT)


def final_samples(run_dir: Path, quality: "ClassifierQuality", num_samples: int, seed: int) -> dict:
    """Class-conditional samples from the exported EMA weights through the platform's one generate path (the one
    ``jobs/sample.py`` and the periodic evaluation use): a labelled grid PNG and the quality figures."""
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/demo", help="output folder (data, run, samples)")
    parser.add_argument("--dataset", choices=["auto", *DATASETS], default="auto")
    parser.add_argument("--samples", type=int, default=500, help="final samples scored by the classifier")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="FIELD=VALUE",
                        help="training config override (repeatable), e.g. --set schedule.total_steps=500")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    out = (ROOT / args.out).resolve() if not Path(args.out).is_absolute() else Path(args.out)
    dataset = choose_dataset(args.dataset)
    precompute_config, train_config = DATASETS[dataset]
    data_dir, run_dir = out / f"data-{dataset}", out / f"run-{dataset}"

    _banner(f"1/3 precompute {dataset} -> {data_dir}")
    manifest = precompute(precompute_config, data_dir)
    print(f"{manifest['num_samples']} samples in {len(manifest['shards'])} shards")

    _banner(f"2/3 train ({train_config})")
    train(train_config, run_dir, data_dir, args.overrides)

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
    print(f"samples grid : {result['grid']}  (one row per class, in class order)")
    print(f"samples npz  : {run_dir / 'samples' / 'final_samples.npz'}")
    print(f"TensorBoard  : tensorboard --logdir {run_dir / 'tensorboard'}")
    print(f"checkpoints  : {run_dir / 'checkpoints'}   EMA export: {run_dir / 'export'}")
    print(f"quality ({args.samples} samples, classifier {result['classifier_sha256'][:12]}): "
          f"FD {result['fd']:.2f} (real held-out {real['fd']:.2f}), "
          f"class accuracy {result['accuracy']:.1%} (real {real['accuracy']:.1%})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
