"""Stand-ins for the processes below the k8s_env supervisor, for its fast tests (no torch, no training).

    python fake_processes.py rank <behaviour of local rank 0> <behaviour of local rank 1> ...
    python fake_processes.py launcher <nproc> <marker file> <spawn delay s> -- <rank command ...>

A rank reports into ``$DEEPFLOW_STATUS_DIR`` like ``jobs/train.py`` and picks its behaviour by LOCAL_RANK:
``train`` runs until SIGTERM, then reports ``preempted`` and exits 0 (the trainer's preemption path);
``fail=N`` reports ``failed`` and exits N after 0.3 s; ``complete`` reports ``completed`` after 0.3 s; ``silent``
exits 0 after 0.3 s without any report.

The launcher starts ``nproc`` ranks with LOCAL_RANK set (after ``spawn delay`` seconds) and waits for all of them,
like DeepSpeed's launch.py; if it is signalled itself it writes the marker file, SIGKILLs its ranks and exits 1
(what the real launchers do after their grace period); when a rank fails it exits 1 once all have ended.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from deepflow.platform.train.rank_status import RankStatusFile  # noqa: E402


def rank(behaviours: list[str]) -> int:
    local = int(os.environ.get("LOCAL_RANK", "0"))
    behaviour = behaviours[local]
    report = RankStatusFile.from_environ()
    assert report is not None, "no DEEPFLOW_STATUS_DIR"
    stop: list[int] = []
    signal.signal(signal.SIGTERM, lambda signum, frame: stop.append(signum))
    report.write("running")
    if behaviour == "train":
        step = 0
        while not stop:
            step += 1
            time.sleep(0.02)
        report.write("preempted", step=step)
        return 0
    time.sleep(0.3)
    if behaviour.startswith("fail="):
        code = int(behaviour.split("=", 1)[1])
        report.write("failed", exit_code=code)
        return code
    if behaviour == "complete":
        report.write("completed", step=10)
        return 0
    if behaviour == "silent":
        report.path.unlink()
        return 0
    raise SystemExit(f"unknown behaviour {behaviour!r}")


def launcher(nproc: int, marker: Path, delay: float, command: list[str]) -> int:
    children: list[subprocess.Popen[bytes]] = []

    def signalled(signum: int, frame: object) -> None:
        marker.write_text(signal.Signals(signum).name)
        for child in children:
            child.kill()
        raise SystemExit(1)

    signal.signal(signal.SIGTERM, signalled)
    signal.signal(signal.SIGINT, signalled)
    time.sleep(delay)
    for local in range(nproc):
        children.append(subprocess.Popen(command, env={**os.environ, "LOCAL_RANK": str(local)}))
    codes = [child.wait() for child in children]
    return 0 if all(code == 0 for code in codes) else 1


if __name__ == "__main__":
    if sys.argv[1] == "rank":
        sys.exit(rank(sys.argv[2:]))
    nproc, marker, delay, separator, *rank_command = sys.argv[2:]
    assert separator == "--"
    sys.exit(launcher(int(nproc), Path(marker), float(delay), rank_command))
