#!/usr/bin/env python
"""Convert a reference DeepFlow checkpoint into an export (``deepflow.platform.inference.convert``).

    python jobs/convert.py --reference ckpt.pt --name "DeepFlow-XL/2-3T" --out converted/
    python jobs/sample.py --checkpoint converted/ --out samples/ --num-samples 50000
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from deepflow.platform.inference.convert import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
