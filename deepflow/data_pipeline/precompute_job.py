"""Precompute encoded shards: ``python jobs/precompute.py --config configs/demo/precompute-digits.yaml``.

Runs one rank's slice.  Rank and world size come from ``--rank/--world-size``, torchrun's
``RANK``/``WORLD_SIZE``, or a Kubernetes indexed job's ``JOB_COMPLETION_INDEX`` with the config's
``slices``.  Re-running after a crash finishes the missing shards only; the last rank to finish writes
``manifest.json`` (or run ``--finalize`` once all ranks are done).

A mistake in the config, a URL or the source prints one line ``error: <field or URL>: <what is wrong>`` and exits
with status 2 (``DEEPFLOW_DEBUG=1`` shows the traceback instead).
"""

from __future__ import annotations

import argparse
import logging
import sys

from deepflow.data_pipeline.config import load_config
from deepflow.data_pipeline.precompute import finalize_only, resolve_rank, run_precompute
from deepflow.errors import JobArgumentParser, report_user_errors

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    """The job's flags (usage errors raise :class:`~deepflow.errors.UsageError`)."""
    parser = JobArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="precompute YAML")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="a.b=c",
                        help="override a config field (repeatable)")
    parser.add_argument("--rank", type=int, default=None)
    parser.add_argument("--world-size", type=int, default=None)
    parser.add_argument("--finalize", action="store_true", help="only merge finished ranks into manifest.json")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def _run(argv: list[str] | None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    config = load_config(args.config, args.overrides)
    if args.finalize:
        world = resolve_rank(config, args.rank if args.world_size else None, args.world_size).world_size
        manifest = finalize_only(config, world)
        if manifest is None:
            print("not all ranks have finished; manifest not written", file=sys.stderr)
            return 1
        print(f"manifest written: {manifest['num_samples']} samples in {len(manifest['shards'])} shards")
        return 0
    run_precompute(config, args.rank, args.world_size, progress=not args.no_progress)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Exit status: 0 done, 1 ``--finalize`` before every rank finished, 2 a user mistake (one ``error:`` line)."""
    return report_user_errors(lambda: _run(argv))


if __name__ == "__main__":
    sys.exit(main())
