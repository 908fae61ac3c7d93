#!/usr/bin/env python
"""``python jobs/export.py [args ...]`` = ``deepflow export``: a model as a self-contained diffusers pipeline folder.

A shim for the launcher in :mod:`deepflow.cli`, which sets threads and logging, then runs the job; ``--help`` lists
the job's options.
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # a checkout that is not installed

from deepflow.cli import job_main  # noqa: E402

main = job_main("export")

if __name__ == "__main__":
    sys.exit(main())
