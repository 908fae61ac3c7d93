#!/usr/bin/env python
"""`python jobs/precompute.py` (also under torchrun / the deepspeed launcher): a shim for :mod:`deepflow.data_pipeline.precompute_job`."""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from deepflow.data_pipeline.precompute_job import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
