"""The ``deepflow`` command: one launcher for every job.

    deepflow --help                      the jobs, one line each
    deepflow <job> --help                the job's own help
    deepflow [--debug] <job> [args ...]  run it (--debug: tracebacks instead of one-line errors)

The same launcher (:func:`run_job`) runs behind every entry path: the ``deepflow`` console script,
``python -m deepflow <job>``, ``python -m deepflow.<job>`` and the ``jobs/<job>.py`` shims (which keep
``deepspeed jobs/train.py --config ...`` and the Kubernetes manifests working). Before the job's ``main(argv)`` it
sets the process's threads and the console log format (:mod:`deepflow.runtime`: log lines on stderr, stdout for
what the job produces) and, with ``--debug``, ``DEEPFLOW_DEBUG=1`` (read by
:func:`deepflow.errors.report_user_errors`; inherited by child processes).

Jobs are named by ``module:function`` strings and imported only when run, so ``deepflow --help`` is instant and a
job whose optional dependencies are not installed says which extra to install.
"""
from __future__ import annotations

import contextlib
import difflib
import importlib
import logging
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

from deepflow import __version__
from deepflow.runtime import AUTO_THREADS_ENV, configure_threads, job_logging

__all__ = ["JOBS", "Job", "job_main", "main", "run_job"]

log = logging.getLogger("deepflow.cli")


@dataclass(frozen=True)
class Job:
    """A subcommand: where its ``main(argv) -> int`` lives and what it does (one line)."""

    target: str  # "package.module:function"
    summary: str


JOBS: dict[str, Job] = {
    "train": Job("deepflow.platform.train.job:main",
                 "train a model from a YAML config (plain python, torchrun or the deepspeed launcher)"),
    "precompute": Job("deepflow.data_pipeline.precompute_job:main",
                      "encode a dataset (images -> VAE latents or pixels, captions -> text features) into shards"),
    "sample": Job("deepflow.platform.inference.sample_job:main",
                  "generate N samples from an export or checkpoint (chunks, PNGs, one ADM .npz)"),
    "evaluate": Job("deepflow.platform.eval.job:main",
                    "score a sample .npz: FID/sFID/IS/precision/recall, or any registered feature extractor"),
    "reference": Job("deepflow.platform.eval.reference_job:main",
                     "build a reference .npz (images and feature statistics) from a dataset for evaluate"),
    "convert": Job("deepflow.platform.inference.convert:main",
                   "import a released reference checkpoint as an export that sample reads"),
    "export": Job("deepflow.platform.export.job:main",
                  "write a model as a self-contained diffusers pipeline folder (DiffusionPipeline.from_pretrained)"),
    "study": Job("deepflow.platform.study.job:main",
                 "a convergence study: variants x seeds through the trainer, mean +- std tables and plots"),
    "demo": Job("deepflow.demo:main",
                "the whole platform on a small dataset, on CPU, offline: precompute, train, sample, score"),
}

#: missing top-level module -> the extra that installs it
EXTRAS: dict[str, str] = {
    "deepspeed": "deepspeed",
    "transformers": "text",
    "open_clip": "text",
    "pytorch_fid": "eval",
    "s3fs": "s3",
    "gcsfs": "gcs",
}

DEBUG_FLAG = "--debug"


def _split_debug(argv: Sequence[str]) -> tuple[bool, list[str]]:
    """(``--debug`` given, argv without it); only options before a ``--`` separator count."""
    args = list(argv)
    end = args.index("--") if "--" in args else len(args)
    debug = DEBUG_FLAG in args[:end]
    return debug, [a for i, a in enumerate(args) if not (i < end and a == DEBUG_FLAG)]


@contextlib.contextmanager
def _job_environment(debug: bool, prog: str | None) -> Iterator[None]:
    """The job's environment variables and program name, restored afterwards (jobs may run in-process)."""
    keys = ("DEEPFLOW_DEBUG", "OMP_NUM_THREADS", AUTO_THREADS_ENV)
    saved_env = {key: os.environ.get(key) for key in keys}
    saved_argv0 = sys.argv[0] if sys.argv else ""
    if debug:
        os.environ["DEEPFLOW_DEBUG"] = "1"
    if prog and sys.argv:
        sys.argv[0] = prog  # argparse's default program name in the job's usage and help
    try:
        yield
    finally:
        for key, value in saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        if sys.argv:
            sys.argv[0] = saved_argv0


def _load(target: str) -> Callable[[list[str]], int | None]:
    module_name, _, function = target.partition(":")
    return getattr(importlib.import_module(module_name), function)


def _missing_dependency(name: str, error: ImportError) -> str:
    """One line for a job that cannot import: the pip extra to install, or that the job is not in this version."""
    missing = error.name or ""
    for module, extra in EXTRAS.items():
        if missing.split(".")[0] == module or (not missing and module in str(error)):
            return (f"error: deepflow {name}: needs the optional package {module!r}: "
                    f"pip install 'deepflow-platform[{extra}]'")
    if missing.startswith("deepflow"):
        return f"error: deepflow {name}: not available in this installation ({missing} is missing)"
    return f"error: deepflow {name}: {error}"


def run_job(name: str, argv: Sequence[str] | None = None, prog: str | None = None) -> int:
    """Run job ``name`` with ``argv`` (default: this process's arguments) after setting up the process (threads,
    logging, ``--debug``); returns its exit status. ``prog``: the program name its help shows."""
    if name not in JOBS:
        raise KeyError(f"unknown job {name!r} (known: {', '.join(JOBS)})")
    debug, args = _split_debug(sys.argv[1:] if argv is None else argv)
    with _job_environment(debug, prog), job_logging(debug=debug):
        threads = configure_threads()
        log.debug("deepflow %s %s: %s", name, __version__, threads.describe())
        try:
            job_main = _load(JOBS[name].target)
            return int(job_main(args) or 0)
        except ImportError as error:
            if debug:
                raise
            print(_missing_dependency(name, error), file=sys.stderr, flush=True)
            return 2
        except KeyboardInterrupt:
            if debug:
                raise
            print(f"deepflow {name}: interrupted", file=sys.stderr, flush=True)
            return 130


def job_main(name: str, prog: str | None = None) -> Callable[[Sequence[str] | None], int]:
    """``main(argv=None) -> int`` running job ``name`` through :func:`run_job` (for shims and ``python -m``)."""

    def main(argv: Sequence[str] | None = None) -> int:
        return run_job(name, argv, prog)

    main.__doc__ = f"``deepflow {name}``: {JOBS[name].summary}."
    return main


def usage(prog: str = "deepflow") -> str:
    """The top-level help: the jobs with one line each."""
    width = max(len(job) for job in JOBS)
    lines = [
        f"usage: {prog} [--version] [--debug] <job> [args ...]",
        "",
        "DeepFlow platform: deeply supervised flow-based image generators, trained at scale.",
        "",
        "jobs:",
        *(f"  {job:<{width}}  {spec.summary}" for job, spec in JOBS.items()),
        "",
        "options:",
        "  -h, --help  show this help; `deepflow <job> --help` shows the job's own options",
        "  --version   print the version",
        "  --debug     show tracebacks instead of one-line errors (also: DEEPFLOW_DEBUG=1; any job accepts it)",
        "",
        "Every job also runs as `python -m deepflow <job>` and `python -m deepflow.<job>`. Each process uses",
        "(cores available) / (ranks on this machine) threads unless OMP_NUM_THREADS is set.",
    ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None, prog: str = "deepflow") -> int:
    """The ``deepflow`` console script: ``deepflow [--debug] <job> [args ...]``."""
    args = list(sys.argv[1:] if argv is None else argv)
    debug = False
    while args and args[0] in (DEBUG_FLAG, "--version", "-h", "--help"):
        if args[0] == DEBUG_FLAG:
            debug = True
            args.pop(0)
            continue
        print(__version__ if args[0] == "--version" else usage(prog))
        return 0
    if not args:
        print(usage(prog), file=sys.stderr)
        return 2
    name, rest = args[0], args[1:]
    if name not in JOBS:
        close = difflib.get_close_matches(name, JOBS, n=2)
        hint = f" (did you mean {' or '.join(close)}?)" if close else f" (jobs: {', '.join(JOBS)})"
        print(f"error: {prog}: unknown job {name!r}{hint}", file=sys.stderr)
        return 2
    return run_job(name, [DEBUG_FLAG, *rest] if debug else rest, prog=f"{prog} {name}")


if __name__ == "__main__":
    sys.exit(main())
