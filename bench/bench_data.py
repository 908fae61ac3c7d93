#!/usr/bin/env python
"""Data-pipeline benchmark: loader samples/s and precompute overhead.  Prints figures, asserts nothing.

    OMP_NUM_THREADS=1 python bench/bench_data.py [--samples 20480] [--repeats 3] [--skip-precompute]

1. Loader: 4x32x32 float16 posterior mean + std with labels (what the ImageNet-256 training reads),
   batch 256, from a local directory and from a moto S3 server started here, with 0 and 2 workers.
   Baseline measured in the same run: producing the same batches from arrays already in memory (gather +
   noise draw + ``(mean + std * eps) * scale``), i.e. the loader's work minus storage, tar and shuffling.
2. Precompute overhead: a folder of JPEGs through the job with the SD-VAE architecture (random weights,
   64 px to keep CPU time reasonable) versus the bare encoder on the same preprocessed images and batches.
   Also the pixel encoder's throughput, i.e. the pipeline's own per-image cost (read, decode, crop, write).
Each figure is the median of ``--repeats`` runs.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from deepflow.data_pipeline.arrays import write_array_dataset  # noqa: E402
from deepflow.data_pipeline.loader import ShardLoader  # noqa: E402

BATCH = 256
SD_VAE = {"block_out_channels": [128, 256, 512, 512], "down_block_types": ["DownEncoderBlock2D"] * 4,
          "up_block_types": ["UpDecoderBlock2D"] * 4, "layers_per_block": 2, "latent_channels": 4, "sample_size": 256}


def start_moto() -> tuple[subprocess.Popen[bytes], str]:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    os.environ.update({"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                       "AWS_DEFAULT_REGION": "us-east-1"})
    process = subprocess.Popen([str(Path(sys.executable).with_name("moto_server")), "-H", "127.0.0.1", "-p", str(port)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    for _ in range(600):
        try:
            urllib.request.urlopen(f"{endpoint}/moto-api/", timeout=1).close()
            break
        except OSError:
            time.sleep(0.1)
    import boto3

    boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1").create_bucket(Bucket="bench")
    return process, endpoint


def loader_rate(url: str, workers: int, batches: int, options: dict | None, mode: str = "thread") -> tuple[float, float]:
    """(samples per wall second, samples per CPU second of this process and its threads)."""
    loader = ShardLoader(url, batch_size=BATCH, num_workers=workers, shuffle_buffer=1000, storage_options=options,
                         worker_mode=mode)
    iterator = iter(loader)
    for _ in range(3):  # warm-up: worker start, first shards
        next(iterator)
    start, cpu_start = time.perf_counter(), time.process_time()
    for _ in range(batches):
        next(iterator)
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    loader.close()
    return batches * BATCH / wall, batches * BATCH / cpu


def in_memory_rate(mean: np.ndarray, std: np.ndarray, batches: int) -> float:
    generator = torch.Generator().manual_seed(0)
    rng = np.random.default_rng(0)
    start = time.perf_counter()
    for _ in range(batches):
        index = rng.integers(0, len(mean), BATCH)
        m, s = torch.from_numpy(mean[index]), torch.from_numpy(std[index])
        eps = torch.randn(m.shape, generator=generator)
        torch.addcmul(m.float(), s.float(), eps).mul_(0.18215)
    return batches * BATCH / (time.perf_counter() - start)


def bench_loader(samples: int, repeats: int, batches: int, workdir: Path) -> None:
    rng = np.random.default_rng(0)
    mean = rng.standard_normal((samples, 4, 32, 32), dtype=np.float32).astype(np.float16)
    std = (rng.random((samples, 4, 32, 32), dtype=np.float32) * 0.2).astype(np.float16)
    labels = rng.integers(0, 1000, samples)
    local = str(workdir / "latents")
    write_array_dataset(local, {"mean": mean, "std": std}, labels, num_classes=1000, samples_per_shard=1024)
    moto, endpoint = start_moto()
    try:
        options = {"client_kwargs": {"endpoint_url": endpoint}, "skip_instance_cache": True}
        remote = "s3://bench/latents"
        write_array_dataset(remote, {"mean": mean, "std": std}, labels, num_classes=1000, samples_per_shard=1024,
                            storage_options=options)
        baseline = statistics.median(in_memory_rate(mean, std, batches) for _ in range(repeats))
        print(f"loader: {samples} samples of 4x32x32 fp16 mean+std + labels, 1024/shard, batch {BATCH}, "
              f"{batches} batches timed, median of {repeats}; load average before: {os.getloadavg()[0]:.1f} "
              f"on {os.cpu_count()} CPUs")
        print(f"  baseline (in-memory gather + sample, 1 thread): {baseline:10.0f} samples/s")
        cases = [("local", local, None, 0, "thread"), ("local", local, None, 2, "thread"),
                 ("local", local, None, 2, "process"), ("s3/moto", remote, options, 0, "thread"),
                 ("s3/moto", remote, options, 2, "thread"), ("s3/moto", remote, options, 2, "process")]
        for where, url, opts, workers, mode in cases:
            runs = [loader_rate(url, workers, batches, opts, mode) for _ in range(repeats)]
            rate = statistics.median(r[0] for r in runs)
            cpu = statistics.median(r[1] for r in runs)
            goal = 20000 if where == "local" else 10000
            cpu_text = f"{cpu:8.0f} samples/CPU-s" if mode == "thread" else " " * 21  # children's CPU is not counted
            print(f"  {where:8s} workers={workers} ({mode:7s}): {rate:8.0f} samples/s {cpu_text} "
                  f"({rate / baseline:.2f}x baseline; goal {goal}: {'met' if rate >= goal else 'NOT met'})")
    finally:
        moto.terminate()
        moto.wait()


def write_jpegs(directory: Path, count: int) -> None:
    from PIL import Image

    rng = np.random.default_rng(0)
    for index in range(count):
        folder = directory / f"class{index % 4}"
        folder.mkdir(parents=True, exist_ok=True)
        base = rng.integers(0, 256, (3,), dtype=np.uint8)
        array = np.clip(base + rng.normal(0, 40, (240, 320, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(array).save(folder / f"{index:05d}.jpg", quality=90)


def bench_precompute(repeats: int, workdir: Path, images: int) -> None:
    from deepflow.data_pipeline.config import load_config
    from deepflow.data_pipeline.encoders import VaeEncoder
    from deepflow.data_pipeline.precompute import ItemDataset, run_precompute
    from deepflow.data_pipeline.sources import build_source

    torch.set_num_threads(1)  # one core encodes, the other decodes/writes (as a GPU job would split it)
    write_jpegs(workdir / "jpegs", images)

    def config(kind: str, run: int, resolution: int) -> object:
        encoder = {"kind": "vae", "random_init": SD_VAE} if kind == "vae" else {"kind": "pixel"}
        return load_config(tree={
            "source": {"kind": "image_folder", "root": str(workdir / "jpegs")},
            "preprocess": {"resolution": resolution, "resize": "adm_center_crop"},
            "encoder": encoder,
            "output": {"url": str(workdir / f"out-{kind}-{run}"), "samples_per_shard": 16},
            "batch_size": 8, "num_workers": 1,
        })

    pipeline, bare, inside = [], [], []
    for run in range(repeats):  # pipeline and bare encoder alternate, so load drift affects both alike
        cfg = config("vae", run, 64)
        summary = run_precompute(cfg, progress=False)
        pipeline.append(summary.pipeline_seconds)
        inside.append(summary.encoder_seconds)
        encoder = VaeEncoder(cfg.encoder, torch.device("cpu"))
        dataset = ItemDataset(build_source(cfg.source), np.arange(images), cfg, 3)
        batches = [torch.from_numpy(np.stack([dataset[i].pixels for i in range(s, min(s + 8, images))]))
                   for s in range(0, images, 8)]
        start = time.perf_counter()
        for batch in batches:
            encoder.encode(batch)
        bare.append(time.perf_counter() - start)
    ratio = statistics.median(p / b for p, b in zip(pipeline, bare, strict=True))
    own = statistics.median((p - i) / i for p, i in zip(pipeline, inside, strict=True))
    print(f"precompute: {images} JPEGs 320x240 -> ADM crop 64 -> SD-VAE architecture (random weights), batch 8, "
          f"1 decode worker, 1 encoder thread, median of {repeats}")
    print(f"  bare encoder {statistics.median(bare):.2f}s, pipeline {statistics.median(pipeline):.2f}s: "
          f"overhead {100 * (ratio - 1):+.1f}% (goal <= 10%: {'met' if ratio <= 1.1 else 'NOT met'})")
    print(f"  within the pipeline runs: {100 * own:+.1f}% of the time outside encoder calls "
          "(reading, decoding, cropping, writing not hidden behind the encoder)")
    rates = []
    for run in range(repeats):
        summary = run_precompute(config("pixel", run, 256), progress=False)
        rates.append(summary.num_samples / summary.pipeline_seconds)
    rate = statistics.median(rates)
    print(f"  (load average now: {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs)")
    print(f"  pipeline alone (pixel encoder, 256 px): {rate:.0f} images/s = {1000 / rate:.1f} ms/image of "
          "read + decode + crop + shard write")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=20480)
    parser.add_argument("--batches", type=int, default=60)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--images", type=int, default=48)
    parser.add_argument("--skip-precompute", action="store_true")
    args = parser.parse_args()
    import logging

    logging.basicConfig(level=logging.WARNING)
    with tempfile.TemporaryDirectory() as directory:
        bench_loader(args.samples, args.repeats, args.batches, Path(directory))
        if not args.skip_precompute:
            bench_precompute(args.repeats, Path(directory), args.images)


if __name__ == "__main__":
    main()
