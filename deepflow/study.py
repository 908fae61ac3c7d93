"""``python -m deepflow.study [args ...]``: the same as ``deepflow study`` (the launcher in :mod:`deepflow.cli`)."""
import sys

from deepflow.cli import run_job

if __name__ == "__main__":
    sys.exit(run_job("study", prog="python -m deepflow.study"))
