#!/usr/bin/env python
"""Batch sampling for evaluation: N images (50k for FID) as chunk files, PNGs and/or one ADM .npz.

    torchrun --nproc-per-node 8 jobs/sample.py --checkpoint s3://runs/xl3t/export --out s3://runs/xl3t/samples-cfg1 \\
        --num-samples 50000 --method sde --steps 250 --cfg-scale 1.0 --vae stabilityai/sd-vae-ft-ema

--checkpoint: an export folder (export.safetensors + export.json), an export.safetensors URL, a training checkpoint
step folder (EMA weights), or a checkpoints folder (its newest committed step). Ranks (torchrun, or a Kubernetes
Indexed Job's JOB_COMPLETION_INDEX with WORLD_SIZE) split the chunks; rerunning the same command skips finished
chunks and reproduces the same images. Rank 0 writes <out>/samples.npz (arr_0 uint8 NHWC, arr_1 labels).

Text-to-image models (MMDiT) take captions instead of labels, encoded with the text encoder the training dataset's
manifest records, and are guided against the dataset's null (empty-caption) text in one batched forward:

    python jobs/sample.py --checkpoint runs/demo-emoji/export --out runs/demo-emoji/samples --captions prompts.txt \
        --num-samples 64 --method euler --steps 50 --cfg-scale 3.0 --png
    torchrun --nproc-per-node 8 jobs/sample.py --checkpoint s3://runs/mmdit/export --out s3://runs/mmdit/coco30k \
        --captions dataset --dataset s3://deepflow-data/coco2014-val-sdvae-clipL14 --num-samples 30000 \
        --vae stabilityai/sd-vae-ft-ema

--captions: a file (one caption per line, or a JSON list), or "dataset" (default): the first caption of each of the
first N samples of --dataset (default: the training data URL recorded with the weights). Sample i gets caption
i mod n; <out>/captions.txt lists them in sample order (for jobs/evaluate.py --captions).
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from deepflow.platform.train.distributed import read_dist_env  # noqa: E402
from deepflow.platform.inference.batch_sampling import SampleSettings, run_sampling  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="export folder / export.safetensors / checkpoint folder URL")
    p.add_argument("--out", required=True, help="output folder (any fsspec URL)")
    p.add_argument("--num-samples", type=int, default=50_000)
    p.add_argument("--chunk-size", type=int, default=250, help="images per chunk file (a multiple of --batch-size)")
    p.add_argument("--batch-size", type=int, default=125, help="images per sampler batch (x2 forward with CFG)")
    p.add_argument("--method", choices=("sde", "euler", "heun"), default="sde")
    p.add_argument("--steps", type=int, default=250)
    p.add_argument("--cfg-scale", type=float, default=1.0)
    p.add_argument("--guidance-interval", type=float, nargs=2, default=(0.0, 1.0), metavar=("LOW", "HIGH"))
    p.add_argument("--labels", default="cyclic", help="cyclic | shuffled | label file (.npy/.txt/.json)")
    p.add_argument("--captions", default=None,
                   help="text models: caption file (.txt one per line / .json list) or 'dataset' (the default)")
    p.add_argument("--dataset", default=None,
                   help="text models: caption dataset URL (manifest: text encoder, null text; --captions dataset)")
    p.add_argument("--text-batch-size", type=int, default=256, help="captions per text-encoder call")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--decode", choices=("auto", "vae", "pixel"), default="auto",
                   help="auto: from the training data manifest in export.json")
    p.add_argument("--vae", help="diffusers AutoencoderKL hub id or local path (latent models)")
    p.add_argument("--latent-scale", type=float, help="latent scale factor (default: manifest, else 0.18215)")
    p.add_argument("--vae-batch-size", type=int, default=32)
    p.add_argument("--precision", choices=("fp32", "bf16", "fp16"), default="fp32")
    p.add_argument("--png", action="store_true", help="also write <out>/png/NNNNNN.png")
    p.add_argument("--no-npz", action="store_true", help="do not assemble samples.npz")
    p.add_argument("--endpoint-url", help="S3-compatible endpoint (else AWS_ENDPOINT_URL / the default)")
    p.add_argument("--device", default=None, help="default: cuda:LOCAL_RANK when available, else cpu")
    p.add_argument("--no-progress", action="store_true")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    env = read_dist_env()
    device = args.device or (f"cuda:{env.local_rank % torch.cuda.device_count()}" if torch.cuda.is_available() else "cpu")
    settings = SampleSettings(
        checkpoint=args.checkpoint, out=args.out, num_samples=args.num_samples, chunk_size=args.chunk_size,
        batch_size=args.batch_size, method=args.method, steps=args.steps, cfg_scale=args.cfg_scale,
        guidance_interval=tuple(args.guidance_interval), labels=args.labels, seed=args.seed, decode=args.decode,
        vae=args.vae, latent_scale=args.latent_scale, vae_batch_size=args.vae_batch_size, precision=args.precision,
        write_png=args.png, write_npz=not args.no_npz, captions=args.captions, dataset=args.dataset,
        text_batch_size=args.text_batch_size,
        storage_options={"client_kwargs": {"endpoint_url": args.endpoint_url}} if args.endpoint_url else {},
    )
    try:
        settings.validate()
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    result = run_sampling(settings, env.rank, env.world_size, device, progress=not args.no_progress)
    print(
        f"rank {env.rank}/{env.world_size}: sampled {result.chunks_done} chunks ({result.images} images, "
        f"{result.images_per_second:.2f} img/s), skipped {result.chunks_skipped}"
        + (f"; wrote {result.npz_url}" if result.npz_url else ""),
        flush=True,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
