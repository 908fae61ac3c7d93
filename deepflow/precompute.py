"""``python -m deepflow.precompute [args ...]``: the same as ``deepflow precompute`` (the launcher in :mod:`deepflow.cli`)."""
import sys

from deepflow.cli import run_job

if __name__ == "__main__":
    sys.exit(run_job("precompute", prog="python -m deepflow.precompute"))
