"""``python -m deepflow.evaluate [args ...]``: the same as ``deepflow evaluate`` (the launcher in :mod:`deepflow.cli`)."""
import sys

from deepflow.cli import run_job

if __name__ == "__main__":
    sys.exit(run_job("evaluate", prog="python -m deepflow.evaluate"))
