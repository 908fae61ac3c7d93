"""``python -m deepflow.train [args ...]``: the same as ``deepflow train`` (the launcher in :mod:`deepflow.cli`)."""
import sys

from deepflow.cli import run_job

if __name__ == "__main__":
    sys.exit(run_job("train", prog="python -m deepflow.train"))
