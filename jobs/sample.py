#!/usr/bin/env python
"""``python jobs/sample.py [args ...]`` = ``deepflow sample``: N samples from an export or checkpoint.

A shim (also under torchrun and the deepspeed launcher, as the Kubernetes manifests run it) for the launcher in
:mod:`deepflow.cli`, which sets threads and logging, then runs the job; ``--help`` lists the job's options.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # a checkout that is not installed

from deepflow.cli import job_main  # noqa: E402

main = job_main("sample")


def build_parser() -> argparse.ArgumentParser:
    """The job's argument parser (the Kubernetes manifest tests parse the manifests' commands with it); imported on
    use, so that torch loads after the launcher set the threads."""
    from deepflow.platform.inference.sample_job import build_parser as job_parser

    return job_parser()


if __name__ == "__main__":
    sys.exit(main())
