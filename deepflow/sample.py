"""``python -m deepflow.sample [args ...]``: the same as ``deepflow sample`` (the launcher in :mod:`deepflow.cli`)."""
import sys

from deepflow.cli import run_job

if __name__ == "__main__":
    sys.exit(run_job("sample", prog="python -m deepflow.sample"))
