"""The pod supervisor (run by ``k8s_env``): starts the pod's ranks, forwards preemption to them, stops them when
one fails and decides the pod's exit status.

Supervisor. ``python -m deepflow.platform.train.k8s_env --launcher deepspeed|torchrun|python -- jobs/train.py
--config run.yaml`` runs under tini (PID 1) and starts the pod's ranks: through ``deepspeed --no_ssh`` (with a
hostfile naming every pod), through ``torchrun``, or itself (``python``: GPUS_PER_NODE processes with RANK,
LOCAL_RANK, WORLD_SIZE, LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT set). It does not exec the launcher because
neither launcher forwards a preemption usefully:

* ``deepspeed`` (runner.py) installs no SIGTERM handler on the ``--no_ssh`` path: the runner dies at once and its
  per-node ``deepspeed.launcher.launch`` is never signalled (under tini the container then ends and every rank is
  SIGKILLed, with no checkpoint). launch.py itself, when signalled, SIGTERMs the ranks, SIGKILLs them 30 s later
  and exits 1; when a rank fails it does the same to the others (polling once a second).
* ``torchrun`` turns SIGTERM into a ``SignalException``: it SIGTERMs the workers, SIGKILLs them after
  ``--shutdown-timeout`` (30 s), then exits 1 with the exception's traceback, even when every worker checkpointed
  and exited 0. A failed worker makes it stop the others the same way and exit 1 (the worker's 2 or 3 is lost).

So on SIGTERM or SIGINT the supervisor sends SIGTERM straight to the rank processes (found as the processes below
it whose environment has LOCAL_RANK while their parent's has not) and never signals the launcher, which then sees
its ranks exit 0 and exits 0 itself. Before any rank exists there is nothing to save: the launcher is killed.

Every rank of ``jobs/train.py`` reports into ``$DEEPFLOW_STATUS_DIR`` (a fresh folder the supervisor makes):
``local-rank-<l>.json`` holding ``{"status": "running" | "completed" | "preempted" | "failed", "step": N,
"exit_code": c}``. A rank that fails, or ends without a final report (killed), makes the supervisor SIGKILL the
pod's other ranks at once (they could only wait for the dead one) and exit non-zero. The pod's exit status:

* every rank completed: 0;
* every rank preempted with its committed checkpoint (after this pod's SIGTERM, or a peer's, which every rank
  learns through the step's all-reduce): ``--preempted-exit-code`` (75, EX_TEMPFAIL). Not 0: a Job counts a pod
  that exits 0 as succeeded even while it is being preempted (kubernetes/kubernetes#90636), and in an Indexed Job
  that index would be complete and never run again; the manifests' podFailurePolicy ignores 75 instead;
* a rank failed: the first failed rank's status (2 and 3, which the manifests' podFailurePolicy turns into a
  failed Job, pass through unchanged; a rank killed by signal S gives 128 + S under the python launcher, the
  launcher's status otherwise);
* SIGTERM before the ranks could report: 143 (128 + SIGTERM);
* a script that writes no reports: the launcher's (or the ranks') own status.

Elastic mode (``torchrun --nnodes MIN:MAX``, see :mod:`deepflow.platform.train.pod_topology`): the agent owns the
ranks. A failed or vanished rank is the agent's to handle (it restarts the group, at the size that is left), so the
supervisor stops nobody and never kills a launcher whose ranks all ended (the next rendezvous round may take a
while); on SIGTERM/SIGINT it signals the agent itself, which SIGTERMs its ranks (they checkpoint and exit 75, which
makes the other nodes' agents continue without this one) and gives them 30 s before SIGKILL. The agents get
TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 (a fresh store per rendezvous round). When fewer than MIN nodes join within
the join timeout, torchrun's RendezvousTimeoutError traceback is replaced by one line ``error: elastic: fewer than
MIN nodes joined within T s`` and the pod exits :data:`BELOW_MIN_EXIT_CODE`.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from deepflow.platform.train.pod_topology import ElasticLaunch, PodTopology, rank_env
from deepflow.platform.train.rank_status import (
    COMPLETED,
    FAILED,
    PREEMPTED,
    RUNNING,
    STATUS_DIR_ENV,
    RankReport,
    read_rank_reports,
)

__all__ = ["BELOW_MIN_EXIT_CODE", "PREEMPTED_EXIT_CODE", "SIGTERM_EXIT_CODE", "Supervisor", "TracebackFilter", "log",
           "pod_exit_code"]

#: The pod's exit status when every local rank stopped for a preemption with a committed checkpoint (sysexits.h
#: EX_TEMPFAIL): the manifests' podFailurePolicy ``Ignore``s it, so the pod is recreated and nothing is counted.
PREEMPTED_EXIT_CODE = 75
SIGTERM_EXIT_CODE = 128 + int(signal.SIGTERM)
#: elastic mode: fewer than MIN nodes joined the rendezvous within its join timeout
BELOW_MIN_EXIT_CODE = 1
#: torchrun (elastic agent) environment: a fresh workers' store per rendezvous round (see distributed.py)
NO_SHARED_STORE_ENV = "TORCH_DISABLE_SHARE_RDZV_TCP_STORE"


def _failure_status(code: int, preempted_exit_code: int) -> int:
    """A failed rank's exit status as the pod's: signals as 128 + S, never 0 nor the preemption code."""
    if code < 0:
        code = 128 - code
    if code == 0 or code == preempted_exit_code or code > 255:
        return 1
    return code


def pod_exit_code(
    reports: Sequence[RankReport | None],
    *,
    failure: int | None = None,
    launcher_code: int | None = None,
    terminated: bool = False,
    preempted_exit_code: int = PREEMPTED_EXIT_CODE,
) -> int:
    """The pod's exit status from the ranks' reports (see the module doc). ``failure``: the exit status of the
    first rank process the supervisor saw fail (``python`` launcher); ``launcher_code``: the launcher's status
    (None if it was killed); ``terminated``: the pod got SIGTERM/SIGINT."""
    failed = sorted((r for r in reports if r is not None and r.status == FAILED), key=lambda r: r.time)
    if failure is not None:
        return _failure_status(failure, preempted_exit_code)
    if failed:
        return _failure_status(failed[0].exit_code, preempted_exit_code)
    statuses = [r.status for r in reports if r is not None]
    if len(statuses) == len(reports) and set(statuses) <= {COMPLETED, PREEMPTED}:
        return preempted_exit_code if PREEMPTED in statuses else 0
    if terminated:
        return SIGTERM_EXIT_CODE
    if launcher_code:
        return _failure_status(launcher_code, preempted_exit_code)
    return 1 if statuses else 0  # some ranks reported, others ended without a word / a script without reports


def _describe(code: int, reports: Sequence[RankReport | None], preempted_exit_code: int) -> str:
    steps = sorted({r.step for r in reports if r is not None and r.step is not None})
    at = f" at step {steps[0]}" if len(steps) == 1 else (f" at steps {steps}" if steps else "")
    if code == preempted_exit_code:
        return f"every rank preempted{at} with a committed checkpoint: exit {code} (recreate the pod, resume)"
    if code == 0:
        return f"training completed{at}: exit 0"
    return f"exit {code}"


# ------------------------------------------------------------------------------------------------ processes
@dataclass(frozen=True)
class _Proc:
    pid: int
    ppid: int
    start: int  # start time in clock ticks: tells a reused pid apart
    zombie: bool


def _read_proc(pid: int) -> _Proc | None:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2:].split()  # after "pid (comm) "
    return _Proc(pid, int(fields[1]), int(fields[19]), fields[0] in ("Z", "X"))


def _process_table() -> dict[int, _Proc]:
    table = {}
    for name in os.listdir("/proc"):
        if name.isdigit() and (proc := _read_proc(int(name))) is not None:
            table[proc.pid] = proc
    return table


def _descendants(root: int, table: Mapping[int, _Proc]) -> list[_Proc]:
    children: dict[int, list[_Proc]] = {}
    for proc in table.values():
        children.setdefault(proc.ppid, []).append(proc)
    found, stack = [], [root]
    while stack:
        for child in children.get(stack.pop(), []):
            found.append(child)
            stack.append(child.pid)
    return found


def _local_rank_of(pid: int) -> int | None:
    """LOCAL_RANK from the environment the process started with (None: not set, or unreadable)."""
    try:
        raw = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return None
    for item in raw.split(b"\0"):
        if item.startswith(b"LOCAL_RANK="):
            value = item[len(b"LOCAL_RANK="):]
            return int(value) if value.isdigit() else None
    return None


def _become_subreaper() -> None:
    """Orphans below us (a rank whose launcher died) are re-parented to us, so we can still find and stop them."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER
    except (OSError, AttributeError):  # not Linux
        pass


def _signal(pid: int, signum: int) -> None:
    try:
        os.kill(pid, signum)
    except (ProcessLookupError, PermissionError):
        pass


def log(message: str) -> None:
    print(f"[k8s_env] {message}", flush=True)


# ------------------------------------------------------------------------------------------ elastic output
class TracebackFilter:
    """Copies the agent's stderr lines to ``out``, except a traceback that ends in a RendezvousTimeoutError
    (``timed_out`` is then set: the supervisor prints one line instead). Other tracebacks pass unchanged."""

    def __init__(self, out: Any = None) -> None:
        self.out = out if out is not None else sys.stderr
        self.held: list[str] = []
        self.timed_out = False

    def feed(self, line: str) -> None:
        if not self.held and not line.startswith("Traceback (most recent call last)"):
            self._write([line])
            return
        self.held.append(line)
        if line[:1].isspace() or line.startswith(("Traceback", "During handling", "The above exception")) \
                or not line.strip():
            return
        if "RendezvousTimeoutError" in line:  # the exception line: drop the whole traceback
            self.timed_out = True
            self.held = []
        else:
            self.flush()

    def flush(self) -> None:
        self._write(self.held)
        self.held = []

    def _write(self, lines: list[str]) -> None:
        for line in lines:
            self.out.write(line)
        self.out.flush()

    def pump(self, stream: Any) -> None:
        """Read ``stream`` (the launcher's stderr) to its end."""
        for raw in iter(stream.readline, b""):
            self.feed(raw.decode(errors="replace"))
        self.flush()


# ----------------------------------------------------------------------------------------------- supervisor
@dataclass
class _Rank:
    """A rank process the supervisor watches."""

    local_rank: int
    pid: int
    start: int | None = None  # /proc start time (launcher ranks)
    popen: subprocess.Popen[bytes] | None = None  # python launcher: our own child
    signalled: bool = False
    ended: bool = False


@dataclass
class Supervisor:
    """Starts the ranks (itself or through a launcher), forwards SIGTERM/SIGINT to them, stops the pod's other
    ranks when one fails, and returns the pod's exit status (:func:`pod_exit_code`)."""

    launcher: str
    command: list[str]
    topology: PodTopology
    status_dir: str
    preempted_exit_code: int = PREEMPTED_EXIT_CODE
    launcher_grace_s: float = 30.0
    poll_s: float = 0.2
    env: Mapping[str, str] = field(default_factory=lambda: dict(os.environ))
    ranks: dict[int, _Rank] = field(default_factory=dict)  # pid -> rank
    launcher_proc: subprocess.Popen[bytes] | None = None
    signum: int | None = None
    failure: int | None = None
    stopping: bool = False  # the other ranks were killed after a failure
    _launcher_dead_at: float | None = None
    _not_ranks: set[tuple[int, int]] = field(default_factory=set)  # (pid, start) of launcher processes
    elastic: ElasticLaunch | None = None  # torchrun's elastic agent owns the ranks (see the module doc)
    _stderr: TracebackFilter | None = None
    _pump: threading.Thread | None = None

    # ---------------------------------------------------------------- start
    def start(self) -> None:
        env = {**self.env, STATUS_DIR_ENV: self.status_dir}
        if self.launcher == "python":
            for local in range(self.topology.nproc_per_node):
                popen = subprocess.Popen(self.command, env=rank_env(self.topology, local, env), start_new_session=True)
                self.ranks[popen.pid] = _Rank(local, popen.pid, popen=popen)
            return
        env.pop("LOCAL_RANK", None)  # what tells the launcher's ranks apart from the launcher
        if self.elastic is None:
            self.launcher_proc = subprocess.Popen(self.command, env=env, start_new_session=True)
            return
        env[NO_SHARED_STORE_ENV] = "1"
        self.launcher_proc = subprocess.Popen(self.command, env=env, start_new_session=True, stderr=subprocess.PIPE)
        self._stderr = TracebackFilter()
        self._pump = threading.Thread(target=self._stderr.pump, args=(self.launcher_proc.stderr,), daemon=True)
        self._pump.start()

    # ---------------------------------------------------------------- signals
    def _on_signal(self, signum: int, frame: Any) -> None:
        self.signum = signum

    def _install(self) -> dict[int, Any]:
        return {signum: signal.signal(signum, self._on_signal) for signum in (signal.SIGTERM, signal.SIGINT)}

    def _forward(self) -> None:
        """SIGTERM every rank not signalled yet; before any rank exists, kill the launcher (nothing to save).
        Elastic: SIGTERM the agent once (it stops its ranks, which checkpoint, and leaves the group)."""
        if self.elastic is not None and self.launcher_proc is not None:
            if not self.stopping and self.launcher_proc.poll() is None:
                log(f"{signal.Signals(self.signum or signal.SIGTERM).name}: asking the elastic agent to stop its "
                    "ranks (they checkpoint) and leave the group")
                _signal(self.launcher_proc.pid, signal.SIGTERM)
            self.stopping = True
            return
        pending = [rank for rank in self.ranks.values() if not rank.ended and not rank.signalled]
        if not self.ranks and self.launcher_proc is not None and self.launcher_proc.poll() is None:
            log(f"{signal.Signals(self.signum or signal.SIGTERM).name} before any rank started: stopping the launcher")
            self._kill_tree()
            return
        if pending:
            log(f"{signal.Signals(self.signum or signal.SIGTERM).name}: asking {len(pending)} rank(s) to checkpoint "
                 f"and stop (SIGTERM to pid {', '.join(str(r.pid) for r in pending)})")
        for rank in pending:
            _signal(rank.pid, signal.SIGTERM)
            rank.signalled = True

    def _kill_tree(self) -> None:
        for proc in _descendants(os.getpid(), _process_table()):
            _signal(proc.pid, signal.SIGKILL)

    def _stop_others(self, culprit: _Rank, why: str) -> None:
        """A rank failed: SIGKILL the others (they would wait for it until the collective timeout)."""
        if self.stopping:
            return
        self.stopping = True
        others = [rank for rank in self.ranks.values() if rank is not culprit and not rank.ended]
        tail = f": stopping the pod's other {len(others)} rank(s)" if others else ""
        log(f"local rank {culprit.local_rank} (pid {culprit.pid}) {why}{tail}")
        for rank in others:
            _signal(rank.pid, signal.SIGKILL)

    # ---------------------------------------------------------------- watching
    def _watch_children(self) -> None:
        """``python`` launcher: our own rank processes."""
        for rank in self.ranks.values():
            if rank.ended or rank.popen is None or (code := rank.popen.poll()) is None:
                continue
            rank.ended = True
            stopped_by_us = self.signum is not None and code == -signal.SIGTERM
            if code != 0 and not stopped_by_us and not self.stopping:
                self.failure = code
                how = f"was killed by {signal.Signals(-code).name}" if code < 0 else f"exited with status {code}"
                self._stop_others(rank, how)

    def _watch_launcher_ranks(self) -> None:
        """Launchers: find the rank processes below the launcher, notice the ones that fail or end."""
        table = _process_table()
        self._reap_orphans(table)
        reports = read_rank_reports(self.status_dir, self.topology.nproc_per_node)
        self._discover_ranks(table, reports)
        for rank in self.ranks.values():
            if rank.ended:
                continue
            current = table.get(rank.pid)
            rank.ended = current is None or current.start != rank.start or current.zombie
            if self.elastic is not None:
                continue  # the elastic agent restarts (or ends) the group itself
            report = reports[rank.local_rank] if rank.local_rank < len(reports) else None
            if report is not None and report.status == FAILED:
                self._stop_others(rank, f"failed with status {report.exit_code}")
            elif rank.ended and report is not None and report.status == RUNNING:
                self._stop_others(rank, "ended without a final report (killed?)")

    def _discover_ranks(self, table: Mapping[int, _Proc], reports: Sequence[RankReport | None]) -> None:
        """Track the processes below us whose environment has LOCAL_RANK and whose parent's has not (a launcher's
        children; a rank's own children inherit it), and any descendant a running rank reported as its pid."""
        below = {proc.pid: proc for proc in _descendants(os.getpid(), table) if not proc.zombie}
        for proc in below.values():
            if proc.pid in self.ranks or (proc.pid, proc.start) in self._not_ranks:
                continue
            local = _local_rank_of(proc.pid)
            if local is None or _local_rank_of(proc.ppid) is not None:
                self._not_ranks.add((proc.pid, proc.start))
                continue
            self.ranks[proc.pid] = _Rank(local, proc.pid, start=proc.start)
        for local, report in enumerate(reports):  # e.g. when /proc/<pid>/environ cannot be read
            if report is not None and report.status == RUNNING and report.pid in below and report.pid not in self.ranks:
                self.ranks[report.pid] = _Rank(local, report.pid, start=below[report.pid].start)

    def _done(self) -> bool:
        if self.launcher_proc is None:
            return all(rank.ended for rank in self.ranks.values())
        if self.launcher_proc.poll() is not None:
            return True
        if self.elastic is not None:
            return False  # between rendezvous rounds no rank exists: only the agent's end ends the pod
        reports = read_rank_reports(self.status_dir, self.topology.nproc_per_node)
        ranks_gone = bool(self.ranks) and all(rank.ended for rank in self.ranks.values())
        if ranks_gone and (all(r is not None and r.final for r in reports) or self.stopping):
            # every rank has finished but the launcher lingers (torchrun's exit barrier waits for the other pods)
            self._launcher_dead_at = self._launcher_dead_at or time.monotonic() + self.launcher_grace_s
            if time.monotonic() >= self._launcher_dead_at:
                log(f"the ranks ended {self.launcher_grace_s:.0f} s ago but the launcher did not: killing it")
                self._kill_tree()
                self.launcher_proc.wait()
                self.launcher_proc.returncode = None  # killed by us: its status means nothing
                return True
        return False

    def _launcher_code(self) -> int | None:
        if self.launcher_proc is None:
            return None
        return self.launcher_proc.returncode

    # ---------------------------------------------------------------- run
    def run(self) -> int:
        """Start, supervise until the ranks (and the launcher) ended, return the pod's exit status."""
        previous = self._install()
        _become_subreaper()
        try:
            self.start()
            while True:
                if self.launcher_proc is None:
                    self._watch_children()
                else:
                    self._watch_launcher_ranks()
                if self.signum is not None:
                    self._forward()
                if self._done():
                    break
                time.sleep(self.poll_s)
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)
            self._kill_tree()  # nothing outlives the supervisor
            self._reap()
        reports = read_rank_reports(self.status_dir, self.topology.nproc_per_node)
        if self._below_min():
            return BELOW_MIN_EXIT_CODE
        code = pod_exit_code(reports, failure=self.failure, launcher_code=self._launcher_code(),
                             terminated=self.signum is not None, preempted_exit_code=self.preempted_exit_code)
        log(_describe(code, reports, self.preempted_exit_code))
        return code

    def _below_min(self) -> bool:
        """Elastic: the agent gave up waiting for MIN nodes; one ``error:`` line instead of its traceback."""
        if self._pump is not None:
            self._pump.join(timeout=10)
        if self.elastic is None or self._stderr is None or not self._stderr.timed_out:
            return False
        elastic = self.elastic
        print(f"error: elastic: fewer than {elastic.min_nodes} nodes joined within {elastic.join_timeout_s} s "
              f"(--nnodes {elastic.min_nodes}:{elastic.max_nodes}): not enough nodes to continue",
              file=sys.stderr, flush=True)
        return True

    def _popens(self) -> list[subprocess.Popen[bytes]]:
        popens = [rank.popen for rank in self.ranks.values()] + [self.launcher_proc]
        return [popen for popen in popens if popen is not None]

    def _reap_orphans(self, table: Mapping[int, _Proc]) -> None:
        """Reap the orphans re-parented to us (we are a child subreaper) that are not our own Popen children."""
        own = {popen.pid for popen in self._popens()}
        for proc in table.values():
            if proc.ppid == os.getpid() and proc.zombie and proc.pid not in own:
                try:
                    os.waitpid(proc.pid, os.WNOHANG)
                except ChildProcessError:
                    pass

    def _reap(self) -> None:
        for popen in self._popens():
            try:
                popen.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
        self._reap_orphans(_process_table())
