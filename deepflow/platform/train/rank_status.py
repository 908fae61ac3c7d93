"""How each rank of ``jobs/train.py`` tells the pod supervisor how it ended: ``local-rank-<l>.json`` in
``$DEEPFLOW_STATUS_DIR`` holding ``{"status": "running" | "completed" | "preempted" | "failed", "step": N,
"exit_code": c}`` (written atomically; nothing is written outside a supervisor)."""
from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

__all__ = ["COMPLETED", "FAILED", "PREEMPTED", "RUNNING", "STATUS_DIR_ENV", "RankReport", "RankStatusFile",
           "read_rank_reports"]

#: The folder the supervisor passes to the ranks for their reports.
STATUS_DIR_ENV = "DEEPFLOW_STATUS_DIR"
RUNNING, COMPLETED, PREEMPTED, FAILED = "running", "completed", "preempted", "failed"


@dataclass(frozen=True)
class RankReport:
    """What one rank said about itself (``local-rank-<l>.json`` in the status folder)."""

    status: str  # running | completed | preempted | failed
    step: int | None = None
    exit_code: int = 0
    time: float = 0.0
    pid: int | None = None

    @property
    def final(self) -> bool:
        return self.status in (COMPLETED, PREEMPTED, FAILED)


def _report_path(folder: str | os.PathLike[str], local_rank: int) -> Path:
    return Path(folder) / f"local-rank-{local_rank}.json"


@dataclass(frozen=True)
class RankStatusFile:
    """The writer side, used by ``jobs/train.py`` in every rank: a no-op outside a supervisor."""

    path: Path

    @classmethod
    def from_environ(cls, env: Mapping[str, str] | None = None) -> RankStatusFile | None:
        """The report file of this rank (LOCAL_RANK, default 0) when ``$DEEPFLOW_STATUS_DIR`` is set, else None."""
        env = os.environ if env is None else env
        folder = env.get(STATUS_DIR_ENV, "")
        if not folder:
            return None
        raw = env.get("LOCAL_RANK", "") or "0"
        return cls(_report_path(folder, int(raw) if raw.isdigit() else 0))

    def write(self, status: str, step: int | None = None, exit_code: int = 0) -> None:
        """Replace the report atomically; a failure to write is a warning (the supervisor then assumes the worst)."""
        record = {"status": status, "step": step, "exit_code": exit_code, "pid": os.getpid(), "time": time.time()}
        staging = self.path.with_name(f".{self.path.name}.{os.getpid()}")
        try:
            staging.write_text(json.dumps(record))
            os.replace(staging, self.path)
        except OSError as error:
            print(f"warning: cannot write the rank report {self.path}: {error}", file=sys.stderr, flush=True)


def read_rank_reports(folder: str | os.PathLike[str], nproc: int) -> list[RankReport | None]:
    """The reports of local ranks 0..nproc-1 (None: none yet, or unreadable)."""
    reports: list[RankReport | None] = []
    for local_rank in range(nproc):
        try:
            record = json.loads(_report_path(folder, local_rank).read_text())
            reports.append(RankReport(str(record["status"]), record.get("step"), int(record.get("exit_code") or 0),
                                      float(record.get("time") or 0.0), record.get("pid")))
        except (OSError, ValueError, KeyError, TypeError):
            reports.append(None)
    return reports
