"""SIGTERM (a Kubernetes preemption, ``kill``) as a flag the training loop polls: the current step finishes, every
rank agrees through the step's all-reduce, a checkpoint is committed and the run returns: the training process exits
0, and under the Kubernetes pod supervisor the pod exits 75 (:mod:`deepflow.platform.train.pod_supervisor`).

Installed by ``jobs/train.py`` before anything slow (imports of torch, the process group, the dataset), so a
preemption during start-up is not lost: the run then stops after its first step, with a checkpoint.
"""
from __future__ import annotations

import signal
from typing import Any

__all__ = ["PreemptionHandler"]


class PreemptionHandler:
    """SIGTERM sets ``requested``; :meth:`restore` puts the previous handlers back."""

    def __init__(self, signals: tuple[int, ...] = (signal.SIGTERM,)) -> None:
        self.requested = False
        self.signal_name: str | None = None
        self._previous: dict[int, Any] = {}
        for signum in signals:
            try:
                self._previous[signum] = signal.signal(signum, self._handle)
            except ValueError:  # not the main thread
                pass

    def _handle(self, signum: int, frame: Any) -> None:
        self.requested = True
        self.signal_name = signal.Signals(signum).name

    def restore(self) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
