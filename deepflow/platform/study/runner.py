"""Run a study: every (variant, seed) trains with ``deepflow train`` and is then scored by
``deepflow study --evaluate-run`` (one process each), ``parallel`` runs at a time.

Each run lives in ``<output_dir>/runs/<variant>/seed-<n>/`` (checkpoints, TensorBoard, ``train.log``,
``evaluate.log``, ``evaluations.json``). Everything resumes: a run whose last checkpoint is committed is not trained
again, a stopped one continues from its newest checkpoint (the trainer's resume), evaluations already recorded are
kept. Ctrl-C / SIGTERM stops the children (the trainers checkpoint first) and exits 130; rerun the same command to
continue. A failed run is reported with its log and the others go on.
"""
from __future__ import annotations

import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path

from deepflow.platform.study.config import StudyConfig, VariantSpec, run_overrides
from deepflow.platform.study.evaluate import committed, pending
from deepflow.platform.train.tb_logging import read_scalars

__all__ = ["RunTask", "StudyRunner", "plan_tasks"]

HEARTBEAT_S = 60.0


@dataclass
class RunTask:
    """One (variant, seed) run and what became of it."""

    variant: VariantSpec
    seed: int
    run_dir: Path
    status: str = "waiting"  # waiting | training | evaluating | done | failed
    error: str = ""
    seconds: dict[str, float] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return f"{self.variant.label} seed {self.seed}"


def plan_tasks(study: StudyConfig) -> list[RunTask]:
    """Curve variants first, seed by seed (the headline comparison fills in early), then the others."""
    ordered = sorted(study.variants, key=lambda v: not v.curve)
    seeds = sorted({s for v in ordered for s in study.seeds_of(v)})
    tasks = [RunTask(v, s, study.run_dir(v, s)) for curve in (True, False) for s in seeds for v in ordered
             if v.curve == curve and s in study.seeds_of(v)]
    return tasks


def _last_logged_step(run_dir: Path) -> int | None:
    """The newest step in the run's TensorBoard scalars, for progress lines."""
    rows = read_scalars(StudyConfig.tensorboard_dir(run_dir))
    return int(rows[-1]["step"]) if rows else None


class StudyRunner:
    """Schedules the runs of a study (see the module doc)."""

    def __init__(self, study: StudyConfig, study_path: str, overrides: list[str],
                 print_line: Callable[[str], None] = print, only: list[str] | None = None) -> None:
        self.study = study
        self.study_path = study_path
        self.overrides = overrides
        self.print = print_line
        self.tasks = [t for t in plan_tasks(study) if only is None or t.variant.label in only]
        self.stopping = threading.Event()
        self._children: set[subprocess.Popen[bytes]] = set()
        self._lock = threading.Lock()
        self._slots: queue.Queue[int] = queue.Queue()
        self._gpus: list[str] = []  # CUDA devices to split between runs (read in run())

    # ---------------------------------------------------------------------------------------------- commands
    def train_command(self, task: RunTask) -> list[str]:
        sets = [arg for item in run_overrides(self.study, task.variant, task.seed) for arg in ("--set", item)]
        launcher = [sys.executable, "-m", "deepflow"]
        if self.study.nproc_per_run > 1:
            launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                        f"--nproc_per_node={self.study.nproc_per_run}", "-m", "deepflow"]
        return [*launcher, "train", "--config", self.study.base_config, *sets]

    def evaluate_command(self, task: RunTask) -> list[str]:
        sets = [arg for item in self.overrides for arg in ("--set", item)]
        return [sys.executable, "-m", "deepflow", "study", "--config", self.study_path, *sets,
                "--evaluate-run", task.variant.label, "--evaluate-seed", str(task.seed)]

    def _environment(self, slot: int) -> dict[str, str]:
        env = dict(os.environ, OMP_NUM_THREADS=str(self.study.threads_per_run), PYTHONUNBUFFERED="1")
        env.pop("DEEPFLOW_AUTO_THREADS", None)
        if self._gpus:
            per_run = self.study.nproc_per_run
            chosen = self._gpus[slot * per_run:(slot + 1) * per_run] or self._gpus[:per_run]
            env["CUDA_VISIBLE_DEVICES"] = ",".join(chosen)
        return env

    # ------------------------------------------------------------------------------------------------- runs
    def trained(self, task: RunTask) -> bool:
        return committed(task.run_dir, self.study.steps_of(task.variant))

    def _child(self, command: list[str], log_path: Path, slot: int) -> int:
        """Run ``command`` with its output appended to ``log_path``; its exit status (130 when stopping)."""
        if self.stopping.is_set():
            return 130
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(log_path, "ab") as log:
            log.write(f"\n$ {' '.join(command)}\n".encode())
            log.flush()
            process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=self._environment(slot),
                                       start_new_session=True)
            with self._lock:
                self._children.add(process)
            try:
                return process.wait()
            finally:
                with self._lock:
                    self._children.discard(process)

    def _phase(self, task: RunTask, phase: str, command: list[str], log_name: str, slot: int) -> bool:
        """Run one phase of ``task`` in a child process; False (and the task marked failed) when it did not exit 0."""
        task.status = phase
        started = time.perf_counter()
        status = self._child(command, task.run_dir / log_name, slot)
        task.seconds[phase] = time.perf_counter() - started
        if status != 0:
            task.status = "failed"
            reason = "stopped" if self.stopping.is_set() else f"exited with status {status}"
            task.error = f"{phase} {reason}; see {task.run_dir / log_name}"
        return status == 0

    def _run(self, task: RunTask) -> RunTask:
        """Train the run unless its last checkpoint is committed, then score what is not scored yet."""
        slot = self._slots.get()
        try:
            if not self.trained(task) and not self._phase(task, "training", self.train_command(task), "train.log",
                                                          slot):
                return task
            if pending(self.study, task.variant, task.run_dir) and not self._phase(
                    task, "evaluating", self.evaluate_command(task), "evaluate.log", slot):
                return task
            task.status = "done"
            return task
        finally:
            self._slots.put(slot)

    def stop(self) -> None:
        """Ask every child to stop (SIGTERM: trainers checkpoint first)."""
        self.stopping.set()
        with self._lock:
            for process in self._children:
                if process.poll() is None:
                    os.killpg(process.pid, signal.SIGTERM)

    def _heartbeat(self) -> None:
        running = [t for t in self.tasks if t.status in ("training", "evaluating")]
        parts = []
        for task in running:
            step = _last_logged_step(task.run_dir) if task.status == "training" else None
            where = f"step {step}/{self.study.steps_of(task.variant)}" if step is not None else task.status
            parts.append(f"{task.name}: {where}")
        done = sum(t.status in ("done", "failed") for t in self.tasks)
        self.print(f"[{done}/{len(self.tasks)} runs done] " + ("; ".join(parts) or "starting"))

    def run(self) -> list[RunTask]:
        """Run every task; returns them with their status. Raises KeyboardInterrupt after stopping the children."""
        self._gpus = _visible_gpus()
        parallel = min(self.study.parallel_runs(gpus=len(self._gpus)), len(self.tasks))
        for slot in range(parallel):
            self._slots.put(slot)
        self.print(f"study {self.study.name}: {len(self.tasks)} runs, {parallel} at a time, "
                   f"{self.study.threads_per_run} thread(s) each -> {self.study.output_dir}")
        with ThreadPoolExecutor(max_workers=parallel) as pool:
            futures = [pool.submit(self._run, task) for task in self.tasks]
            try:
                finished, waiting, last_beat = 0, set(futures), time.monotonic()
                while waiting:
                    done, waiting = wait(waiting, timeout=5.0, return_when=FIRST_COMPLETED)
                    for future in done:
                        task = future.result()
                        finished += 1
                        taken = ", ".join(f"{k} {v:.0f} s" for k, v in task.seconds.items()) or "already done"
                        line = f"[{finished}/{len(self.tasks)}] {task.name}: {task.status} ({taken})"
                        self.print(line + (f": {task.error}" if task.error else ""))
                    if time.monotonic() - last_beat > HEARTBEAT_S:
                        self._heartbeat()
                        last_beat = time.monotonic()
            except KeyboardInterrupt:
                self.stop()
                raise
        return self.tasks


def _visible_gpus() -> list[str]:
    """CUDA device indices this process may hand out (none on a CPU machine)."""
    try:
        import torch

        count = torch.cuda.device_count()
    except Exception:  # noqa: BLE001 - no usable CUDA: a CPU study
        return []
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    ids = [item for item in visible.split(",") if item] if visible else [str(i) for i in range(count)]
    return ids[:count]
