"""How a job process sets itself up before the job runs: intra-op threads, the console log format, and where a
``--config`` name that is not a file is looked up (the configs shipped in the package).

Called by the one launcher (:func:`deepflow.cli.run_job`) that every entry path goes through: the ``deepflow``
console script, ``python -m deepflow[.<job>]`` and the ``jobs/*.py`` shims.

Threads: a process uses ``cores // local processes`` intra-op threads (at least 1), where ``cores`` is the number of
CPUs this process may run on (its affinity mask, capped by a cgroup CPU quota: a Kubernetes CPU limit) and the
local processes are the ranks that torchrun (``LOCAL_WORLD_SIZE``) or the DeepSpeed launcher (``LOCAL_SIZE``)
started on this machine. An ``OMP_NUM_THREADS`` the user set wins. The choice is exported as ``OMP_NUM_THREADS``
before torch is imported (so every OpenMP pool of the process, not only torch's, uses it) and applied with
``torch.set_num_threads`` when torch is already loaded; ``DEEPFLOW_AUTO_THREADS`` marks the value as chosen here,
so a child job (the demo's training run) chooses again instead of taking it for the user's.
"""
from __future__ import annotations

import contextlib
import logging
import math
import os
import sys
from collections.abc import Iterator, Mapping, MutableMapping
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "AUTO_THREADS_ENV",
    "ThreadChoice",
    "available_cores",
    "choose_threads",
    "configure_logging",
    "configure_threads",
    "job_logging",
    "local_world_size",
    "packaged_configs_dir",
    "resolve_config_path",
]

#: set next to OMP_NUM_THREADS when the value was chosen by :func:`configure_threads` (not by the user)
AUTO_THREADS_ENV = "DEEPFLOW_AUTO_THREADS"
#: launcher variables holding the number of processes started on this machine, in order of preference
LOCAL_SIZE_VARIABLES = ("LOCAL_WORLD_SIZE", "LOCAL_SIZE", "OMPI_COMM_WORLD_LOCAL_SIZE")


# ---------------------------------------------------------------------------------------------------- threads
@dataclass(frozen=True)
class ThreadChoice:
    """The intra-op thread count of this process and why."""

    threads: int
    source: str  # "OMP_NUM_THREADS" (the user's) | "auto"
    cores: int
    local_processes: int

    def describe(self) -> str:
        if self.source == "auto":
            return (f"{self.threads} threads ({self.cores} cores / {self.local_processes} local "
                    f"process{'es' if self.local_processes != 1 else ''})")
        return f"{self.threads} threads (OMP_NUM_THREADS)"


def _cgroup_cpu_limit(root: Path = Path("/sys/fs/cgroup")) -> float | None:
    """CPUs allowed by a cgroup CPU quota (v2 ``cpu.max`` or v1 ``cpu.cfs_quota_us``), None without a quota."""
    try:
        quota, period = (root / "cpu.max").read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:
        quota_us = int((root / "cpu" / "cpu.cfs_quota_us").read_text())
        period_us = int((root / "cpu" / "cpu.cfs_period_us").read_text())
        return quota_us / period_us if quota_us > 0 and period_us > 0 else None
    except (OSError, ValueError):
        return None


def available_cores() -> int:
    """CPUs this process may use: its affinity mask, capped by a cgroup CPU quota (rounded up), at least 1."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        cores = os.cpu_count() or 1
    limit = _cgroup_cpu_limit()
    if limit is not None:
        cores = min(cores, math.ceil(limit))
    return max(1, cores)


def local_world_size(environ: Mapping[str, str]) -> int:
    """Processes of this job on this machine, from the launcher's variables (1 without a launcher)."""
    for name in LOCAL_SIZE_VARIABLES:
        value = environ.get(name, "")
        if value.isdigit() and int(value) > 0:
            return int(value)
    return 1


def _user_threads(environ: Mapping[str, str]) -> int | None:
    """The user's OMP_NUM_THREADS (a positive integer not set by :func:`configure_threads`), else None."""
    value = environ.get("OMP_NUM_THREADS", "").strip()
    if not value or value == environ.get(AUTO_THREADS_ENV):
        return None
    first = value.split(",")[0]  # OpenMP allows a list per nesting level
    return int(first) if first.isdigit() and int(first) > 0 else None


def choose_threads(environ: Mapping[str, str], cores: int) -> ThreadChoice:
    """The thread count for a process with ``cores`` CPUs in this launch environment (see module doc)."""
    local = local_world_size(environ)
    user = _user_threads(environ)
    if user is not None:
        return ThreadChoice(user, "OMP_NUM_THREADS", cores, local)
    return ThreadChoice(max(1, cores // local), "auto", cores, local)


def configure_threads(environ: MutableMapping[str, str] | None = None) -> ThreadChoice:
    """Choose this process's threads and apply them (``OMP_NUM_THREADS`` for what is loaded later,
    ``torch.set_num_threads`` when torch is loaded already)."""
    env = os.environ if environ is None else environ
    choice = choose_threads(env, available_cores())
    if choice.source == "auto":
        env["OMP_NUM_THREADS"] = env[AUTO_THREADS_ENV] = str(choice.threads)
    torch = sys.modules.get("torch")
    if torch is not None and hasattr(torch, "set_num_threads"):
        torch.set_num_threads(choice.threads)
    return choice


# ---------------------------------------------------------------------------------------------------- logging
class _ConsoleFormatter(logging.Formatter):
    """``HH:MM:SS [rankN] message``; ``WARNING: `` / ``ERROR: `` before the message at those levels."""

    def __init__(self, rank: int) -> None:
        super().__init__("%(asctime)s " + f"[rank{rank}] " + "%(message)s", "%H:%M:%S")

    def formatMessage(self, record: logging.LogRecord) -> str:  # noqa: N802 - logging's name
        if record.levelno >= logging.WARNING:
            record.message = f"{record.levelname}: {record.message}"
        return super().formatMessage(record)


class _StderrHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes to the current ``sys.stderr`` (looked up at each record, so a replaced stderr is followed)."""

    _deepflow_console = True

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property  # type: ignore[override]
    def stream(self):  # noqa: ANN201 - a text stream
        return sys.stderr

    @stream.setter
    def stream(self, value: object) -> None:  # the base class assigns it; the current stderr is always used
        pass


def _log_rank(environ: Mapping[str, str]) -> int:
    """This process's rank for the log prefix (0 when the launch environment does not tell)."""
    from deepflow.ranks import read_dist_env

    try:
        return read_dist_env(environ=environ).rank
    except ValueError:  # an inconsistent environment is reported by the job itself
        return 0


def configure_logging(debug: bool = False, environ: Mapping[str, str] | None = None) -> None:
    """One console format for every job: records of every logger go to stderr as ``HH:MM:SS [rankN] message``
    (rank 0 from INFO, other ranks from WARNING; deepflow's own loggers from DEBUG with ``debug``), Python warnings
    through it too; stdout stays for what a job produces (results, JSON, where its outputs are). Idempotent."""
    env = os.environ if environ is None else environ
    rank = _log_rank(env)
    root = logging.getLogger()
    handler = next((h for h in root.handlers if getattr(h, "_deepflow_console", False)), None)
    if handler is None:
        handler = _StderrHandler()
        root.addHandler(handler)
    handler.setFormatter(_ConsoleFormatter(rank))
    root.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    logging.getLogger("deepflow").setLevel(logging.DEBUG if debug else logging.NOTSET)
    logging.captureWarnings(True)


@contextlib.contextmanager
def job_logging(debug: bool = False, environ: Mapping[str, str] | None = None) -> Iterator[None]:
    """:func:`configure_logging` for the duration of one job, the previous logging set-up restored afterwards (a
    job run in-process, as tests do, leaves no handler behind)."""
    root, package = logging.getLogger(), logging.getLogger("deepflow")
    saved = (list(root.handlers), root.level, package.level, getattr(logging, "_warnings_showwarning", None))
    configure_logging(debug, environ)
    try:
        yield
    finally:
        handlers, level, package_level, showwarning = saved
        for handler in list(root.handlers):
            if handler not in handlers:
                handler.flush()
                root.removeHandler(handler)
        root.setLevel(level)
        package.setLevel(package_level)
        logging.captureWarnings(showwarning is not None)


# ---------------------------------------------------------------------------------------------------- configs
def packaged_configs_dir() -> Path:
    """The configs shipped inside the package (``deepflow/configs``; the repository's ``configs`` links to it)."""
    return Path(__file__).resolve().parent / "configs"


def resolve_config_path(path: str | os.PathLike[str]) -> str:
    """``path`` itself when it is a URL or an existing file; else the shipped config of that name, so that
    ``demo/train-digits.yaml`` and ``configs/demo/train-digits.yaml`` work from any directory once the package is
    installed; else ``path`` unchanged (the caller reports it missing)."""
    text = os.fspath(path)
    if "://" in text or os.path.exists(text) or os.path.isabs(text):
        return text
    relative = Path(text)
    if relative.parts[:1] == ("configs",):
        relative = Path(*relative.parts[1:]) if len(relative.parts) > 1 else Path()
    candidate = packaged_configs_dir() / relative
    return str(candidate) if relative.parts and candidate.is_file() else text
