"""``python -m deepflow.reference [args ...]``: the same as ``deepflow reference`` (the launcher in :mod:`deepflow.cli`)."""
import sys

from deepflow.cli import run_job

if __name__ == "__main__":
    sys.exit(run_job("reference", prog="python -m deepflow.reference"))
