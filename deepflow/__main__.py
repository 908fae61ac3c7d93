"""``python -m deepflow <job> [args ...]``: the ``deepflow`` command (:mod:`deepflow.cli`)."""
import sys

from deepflow.cli import main

if __name__ == "__main__":
    sys.exit(main(prog="python -m deepflow"))
