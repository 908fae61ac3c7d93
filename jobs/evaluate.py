#!/usr/bin/env python
"""Evaluate a sample batch in the ADM protocol: FID, sFID, Inception Score, precision, recall (+ optional FDs).

    python jobs/evaluate.py --samples s3://bucket/run/samples.npz --reference VIRTUAL_imagenet256_labeled.npz \\
        --inception-weights /weights/pt_inception-2015-12-05-6726825d.pth \\
        --out s3://bucket/run/eval/step-0400000.json --tensorboard /runs/xl3t/tb --step 400000 \\
        --extractor dinov2:model=/weights/dinov2-large

Text-to-image samples (jobs/sample.py writes <out>/captions.txt beside samples.npz) also get a CLIP score against
their captions (open_clip; sample i is paired with caption i):

    python jobs/evaluate.py --samples s3://runs/mmdit/coco30k/samples.npz --reference coco_val2014_30k.npz \
        --inception-weights /weights/pt_inception-2015-12-05-6726825d.pth \
        --clip-model ViT-L-14 --clip-pretrained /weights/open_clip_vit_l14_openai.bin \
        --captions s3://runs/mmdit/coco30k/captions.txt --out s3://runs/mmdit/eval/step-0150000.json

Samples and reference are ADM .npz files (arr_0: uint8 NHWC; the reference may hold mu/sigma/mu_s/sigma_s) on any
fsspec URL. Inception weights: the pytorch-fid or torch-fidelity weights file, a local path or URL. Results go to a
JSON file (any fsspec URL) and, with --tensorboard, to scalars ``eval/<metric>`` at --step.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import fsspec  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402

from deepflow.platform.eval.evaluator import evaluate_samples  # noqa: E402
from deepflow.platform.eval.extractors import build_extractor  # noqa: E402


def parse_extractor_spec(spec: str) -> tuple[str, dict[str, Any]]:
    """``kind[:key=value,key=value]`` -> (kind, options). E.g. ``clip:model_name=ViT-L-14,pretrained=/w/clip.pt``.

    Values are parsed as YAML scalars (``image_size=224`` -> int, ``x=true`` -> bool); anything else stays a string.
    """
    kind, _, rest = spec.partition(":")
    options: dict[str, Any] = {}
    for item in filter(None, rest.split(",")):
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise argparse.ArgumentTypeError(f"--extractor {spec!r}: option {item!r} is not key=value")
        parsed = yaml.safe_load(value) if value else value
        options[key] = parsed if isinstance(parsed, (int, float, bool)) else value
    if not kind:
        raise argparse.ArgumentTypeError(f"--extractor {spec!r}: missing kind")
    return kind, options


def default_captions_url(samples: str) -> str:
    """``captions.txt`` in the folder of the samples .npz (where jobs/sample.py writes it)."""
    return samples.rsplit("/", 1)[0] + "/captions.txt" if "/" in samples else "captions.txt"


def clip_results(args: argparse.Namespace) -> dict[str, Any]:
    """CLIP score of --samples against --captions with --clip-model / --clip-pretrained."""
    import warnings

    from deepflow.platform.eval.clip_score import ClipScorer, load_clip
    from deepflow.platform.eval.evaluator import clip_score_samples
    from deepflow.platform.inference.prompts import read_caption_file

    captions_url = args.captions or default_captions_url(args.samples)
    try:
        captions = read_caption_file(captions_url)
    except FileNotFoundError:
        raise SystemExit(f"error: --clip-model needs captions: {captions_url} not found; give --captions") from None
    if args.clip_pretrained is None:
        warnings.warn("CLIP score with RANDOM open_clip weights (no --clip-pretrained): meaningless numbers",
                      UserWarning, stacklevel=2)
    model, tokenizer = load_clip(args.clip_model, args.clip_pretrained, args.device, **args.clip_model_kwargs)
    scores = clip_score_samples(args.samples, captions, ClipScorer(model, tokenizer, args.batch_size), args.batch_size)
    return {**scores, "clip_model": args.clip_model, "clip_pretrained": args.clip_pretrained or "RANDOM (tests only)",
            "captions": captions_url}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", required=True, help="sample batch .npz (arr_0 uint8 NHWC), any fsspec URL")
    parser.add_argument("--reference", required=True, help="reference batch .npz (arr_0 and/or mu, sigma, mu_s, sigma_s)")
    weights = parser.add_mutually_exclusive_group(required=True)
    weights.add_argument("--inception-weights", help="path or URL of the FID Inception-v3 weights file")
    weights.add_argument(
        "--random-inception-for-tests", action="store_true", help="random Inception weights: meaningless numbers"
    )
    parser.add_argument("--extractor", action="append", default=[], type=parse_extractor_spec,
                        help="extra FD extractor kind[:k=v,...] (dinov2:model=..., clip:model_name=...,pretrained=...)")
    parser.add_argument("--clip-model",
                        help="open_clip model name (e.g. ViT-L-14): CLIP score of the samples against their captions")
    parser.add_argument("--clip-pretrained", help="open_clip pretrained tag or local weights; omitted: RANDOM (tests)")
    parser.add_argument("--clip-model-kwargs", type=json.loads, default={},
                        help="JSON architecture overrides of open_clip.create_model (tiny models in tests)")
    parser.add_argument("--captions", help="caption file (.txt one per line / .json list), caption i for sample i; "
                        "default with --clip-model: captions.txt beside --samples")
    parser.add_argument("--out", help="where to write the JSON results (any fsspec URL)")
    parser.add_argument("--tensorboard", help="TensorBoard log dir for eval/<metric> scalars")
    parser.add_argument("--step", type=int, default=0, help="global step of the evaluated checkpoint")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--k", type=int, default=3, help="neighbourhood size of precision/recall")
    parser.add_argument("--fd-method", choices=("sqrtm", "eigh"), default="sqrtm",
                        help="sqrtm: the ADM computation; eigh: the same value ~5x faster on CPU")
    return parser


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    inception = build_extractor("inception", weights=args.inception_weights).to(args.device)
    extras = [build_extractor(kind, **options).to(args.device) for kind, options in args.extractor]
    results = evaluate_samples(
        args.samples, args.reference, inception, extra_extractors=extras, batch_size=args.batch_size,
        device=args.device, k=args.k, fd_method=args.fd_method,
    )
    if args.clip_model:
        results.update(clip_results(args))
    results.update(samples=args.samples, reference=args.reference, step=args.step,
                   inception_weights=args.inception_weights or "RANDOM (tests only)")
    text = json.dumps(results, indent=2, sort_keys=True)
    print(text)
    if args.out:
        fs, path = fsspec.core.url_to_fs(args.out)
        fs.makedirs(fs._parent(path), exist_ok=True)  # noqa: SLF001
        with fs.open(path, "w") as handle:
            handle.write(text + "\n")
    if args.tensorboard:
        from torch.utils.tensorboard import SummaryWriter

        with SummaryWriter(args.tensorboard) as writer:
            for key, value in results.items():
                if isinstance(value, float):
                    writer.add_scalar(f"eval/{key}", value, args.step)
    return results


if __name__ == "__main__":
    main()
