"""Peak resident memory of the rank processes of a launched training job (no tests here).

:class:`RankPeaks` samples, while a launcher (torchrun, the deepspeed launcher, plain python) runs, every process
of its tree that runs ``jobs/train.py`` itself and records each rank's ``VmHWM`` (the kernel's own high-water mark
of the resident set: a peak between two samples is still seen, only the last sampling interval before a rank exits
is not). :func:`vm_hwm` / :func:`reset_peak` measure inside one process: ``/proc/self/clear_refs`` ``5`` resets the
high-water mark to the current resident set (Linux >= 4.0).
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import psutil

__all__ = ["RankPeaks", "reset_peak", "vm_hwm", "vm_rss"]


def _status_kib(pid: int | str, field: str) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def vm_hwm(pid: int | str = "self") -> int:
    """Peak resident set size of a process (bytes)."""
    return _status_kib(pid, "VmHWM") * 1024


def vm_rss(pid: int | str = "self") -> int:
    """Current resident set size of a process (bytes)."""
    return _status_kib(pid, "VmRSS") * 1024


def reset_peak() -> int:
    """Reset this process's VmHWM to its current resident set; returns that (bytes)."""
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")
    return vm_hwm()


def _rank_of(process: psutil.Process) -> int | None:
    """The RANK of a process running jobs/train.py as its script (not a launcher naming it as an argument)."""
    try:
        cmdline = process.cmdline()
        if len(cmdline) < 2 or "-m" in cmdline[1:2] or not any(a.endswith("train.py") for a in cmdline[1:3]):
            return None
        return int(process.environ().get("RANK", "0"))
    except (psutil.Error, ValueError):
        return None


class RankPeaks:
    """rank -> peak resident set (bytes) of the training ranks under a launcher's process ``pid``."""

    def __init__(self, pid: int, interval_s: float = 0.05) -> None:
        self.root = psutil.Process(pid)
        self.interval_s = interval_s
        self.peaks: dict[int, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.is_set():
            try:
                children = self.root.children(recursive=True)
            except psutil.Error:
                children = []
            for child in [self.root, *children]:
                rank = _rank_of(child)
                if rank is None:
                    continue
                try:
                    peak = vm_hwm(child.pid)
                except (OSError, KeyError):
                    continue
                self.peaks[rank] = max(self.peaks.get(rank, 0), peak)
            time.sleep(self.interval_s)

    @contextmanager
    def running(self) -> Iterator[RankPeaks]:
        self._thread.start()
        try:
            yield self
        finally:
            self._stop.set()
            self._thread.join()


if __name__ == "__main__":  # python memory_support.py <pid>: print the ranks' peaks every 5 s
    import sys

    peaks = RankPeaks(int(sys.argv[1]))
    with peaks.running():
        while psutil.pid_exists(int(sys.argv[1])):
            time.sleep(5)
            print({rank: round(peak / 2**30, 2) for rank, peak in sorted(peaks.peaks.items())}, flush=True)
    print(os.linesep.join(f"rank {rank}: peak RSS {peak / 2**30:.2f} GiB" for rank, peak in sorted(peaks.peaks.items())))
