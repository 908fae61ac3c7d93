#!/usr/bin/env python
"""``python jobs/precompute.py [args ...]`` = ``deepflow precompute``: encode a dataset into shards.

A shim (also under torchrun and the deepspeed launcher, as the Kubernetes manifests run it) for the launcher in
:mod:`deepflow.cli`, which sets threads and logging, then runs the job; ``--help`` lists the job's options.
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # a checkout that is not installed

from deepflow.cli import job_main  # noqa: E402

main = job_main("precompute")

if __name__ == "__main__":
    sys.exit(main())
