#!/usr/bin/env python
"""Batch sampling for evaluation (``deepflow.platform.inference.sample_job``): N images as chunk files, PNGs and/or
one ADM .npz; the rank comes from torchrun or a Kubernetes Indexed Job.

    torchrun --nproc-per-node 8 jobs/sample.py --checkpoint s3://runs/xl3t/export --out s3://runs/xl3t/samples-cfg1 \\
        --num-samples 50000 --method sde --steps 250 --cfg-scale 1.0 --vae stabilityai/sd-vae-ft-ema
    python jobs/sample.py --config sample.yaml --set sampler.cfg_scale=1.5

--checkpoint: an export folder (export.safetensors + export.json), an export or `deepflow convert` .safetensors
(its .json beside it), a training checkpoint step folder (model.json + EMA weights), or a checkpoints folder (its
newest committed step). Rerunning the same command skips finished chunks and reproduces the same images.

Text-to-image models take captions instead of labels (--captions: a file, or "dataset": the first caption of each
of the first N samples of --dataset, default the training data recorded with the weights); <out>/captions.txt lists
them in sample order (for jobs/evaluate.py --captions).
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from deepflow.platform.inference.sample_job import build_parser, main  # noqa: E402,F401 - build_parser: k8s tests


if __name__ == "__main__":
    sys.exit(main())
