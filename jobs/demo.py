#!/usr/bin/env python
"""``python jobs/demo.py [args ...]`` = ``deepflow demo``: the whole platform on a small dataset, on CPU, offline
(:mod:`deepflow.demo`; ``make demo`` runs it).

A shim for the launcher in :mod:`deepflow.cli`, which sets threads and logging, then runs the job.
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # a checkout that is not installed

from deepflow.cli import job_main  # noqa: E402

main = job_main("demo")

if __name__ == "__main__":
    sys.exit(main())
