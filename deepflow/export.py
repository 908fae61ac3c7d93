"""``python -m deepflow.export [args ...]``: the same as ``deepflow export`` (the launcher in :mod:`deepflow.cli`)."""
import sys

from deepflow.cli import run_job

if __name__ == "__main__":
    sys.exit(run_job("export", prog="python -m deepflow.export"))
