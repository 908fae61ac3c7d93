"""``deepflow study``: a convergence study (variants x seeds through the normal trainer, every checkpoint scored
with the dataset's registered metric, one table and plot per metric, mean +- std over seeds).

    deepflow study --config configs/study/fmnist-convergence.yaml            # run (or continue) it, then report
    deepflow study --config ... --report-only                               # rebuild the report from what exists
    deepflow study --config ... --dry-run                                   # print the runs and their commands
    deepflow study --config ... --set steps=200 --set seeds=[0,1]           # any field of the study config

The study config names a base run config, the variants (run-config overrides), seeds, steps, evaluation points
and protocols (weights and sampler); see ``deepflow.platform.study.config``. Runs live under
``<output_dir>/runs/<variant>/seed-<n>/``; the report (``report.md``, ``results.json``, ``<metric>.png``) under
``<output_dir>``. Everything resumes: rerun the command after an interruption (Ctrl-C, SIGTERM, a crash).
Exit status: 0 when every run trained and was evaluated, 1 when some failed (the report covers the others),
2 for a mistake in the config, 130 when interrupted.
"""
from __future__ import annotations

import argparse
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from types import FrameType

from deepflow.errors import JobArgumentParser, report_user_errors

__all__ = ["main"]


def build_parser() -> argparse.ArgumentParser:
    parser = JobArgumentParser(prog="deepflow study", description=__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="study config YAML")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="FIELD=VALUE",
                        help="dotted override of the study config, value parsed as YAML (repeatable)")
    parser.add_argument("--report-only", action="store_true", help="only (re)write the report from existing runs")
    parser.add_argument("--dry-run", action="store_true", help="print the runs and their commands, run nothing")
    parser.add_argument("--variants", nargs="+", metavar="LABEL", default=None,
                        help="run only these variants (e.g. a second process on other machines' cores); the report "
                        "still covers every run that exists")
    parser.add_argument("--evaluate-run", metavar="LABEL", help=argparse.SUPPRESS)  # one run's evaluation
    parser.add_argument("--evaluate-seed", type=int, default=0, help=argparse.SUPPRESS)
    return parser


def _raise_interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def main(argv: Sequence[str] | None = None) -> int:
    def body() -> int:
        import torch

        from deepflow.platform.study.config import ensure_datasets, load_study
        from deepflow.platform.study.evaluate import evaluate_run
        from deepflow.platform.study.report import collect, write_report
        from deepflow.platform.study.runner import StudyRunner

        args = build_parser().parse_args(list(argv) if argv is not None else None)
        study, configs = load_study(args.config, args.overrides)
        if args.evaluate_run is not None:
            if args.evaluate_run not in [v.label for v in study.variants]:
                raise ValueError(f"--evaluate-run: {args.evaluate_run!r} is not a variant of {args.config}")
            device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
            evaluate_run(study, study.variant(args.evaluate_run), args.evaluate_seed, device)
            return 0
        unknown = [label for label in args.variants or [] if label not in configs]
        if unknown:
            raise ValueError(f"--variants: {', '.join(map(repr, unknown))} not in {args.config} "
                             f"(variants: {', '.join(map(repr, configs))})")
        runner = StudyRunner(study, args.config, args.overrides, print_line=lambda line: print(line, flush=True),
                             only=args.variants)
        if args.dry_run:
            for task in runner.tasks:
                state = "trained" if runner.trained(task) else "to train"
                print(f"{task.name} ({state}): {' '.join(runner.train_command(task))}")
            return 0
        failed = []
        if not args.report_only:
            signal.signal(signal.SIGTERM, _raise_interrupt)
            ensure_datasets(study, configs, print_line=lambda line: print(line, flush=True))
            failed = [task for task in runner.run() if task.status == "failed"]
        report = write_report(study, collect(study), Path(study.output_dir))
        print(f"report: {report}", flush=True)
        for task in failed:
            print(f"error: {task.name}: {task.error}", file=sys.stderr, flush=True)
        return 1 if failed else 0

    return report_user_errors(body)
