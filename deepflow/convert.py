"""``python -m deepflow.convert [args ...]``: the same as ``deepflow convert`` (the launcher in :mod:`deepflow.cli`)."""
import sys

from deepflow.cli import run_job

if __name__ == "__main__":
    sys.exit(run_job("convert", prog="python -m deepflow.convert"))
