#!/usr/bin/env python
"""Evaluate a sample batch: see deepflow/platform/eval/job.py (``python jobs/evaluate.py --help``).

    python jobs/evaluate.py --samples runs/digits/samples/samples.npz --extractor classifier:dataset=digits \\
        --out runs/digits/eval/final.json
    python jobs/evaluate.py --samples s3://bucket/run/samples.npz --reference VIRTUAL_imagenet256_labeled.npz \\
        --inception-weights /weights/pt_inception-2015-12-05-6726825d.pth --out s3://bucket/run/eval/final.json
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from deepflow.platform.eval.job import build_parser, main  # noqa: E402,F401 - build_parser: k8s tests

if __name__ == "__main__":
    sys.exit(main())
