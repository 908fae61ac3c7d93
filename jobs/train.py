#!/usr/bin/env python
"""`python jobs/train.py` (also under torchrun / the deepspeed launcher): a shim for :mod:`deepflow.platform.train.job`."""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from deepflow.platform.train.job import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
