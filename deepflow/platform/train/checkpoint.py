"""Checkpoints on any fsspec URL (local path, file://, s3://, gs://), committed by a marker written last.

Layout of one checkpoint::

    <url>/step-0001000/
        engine/                 model + optimizer, engine-specific (safetensors+pt, DCP shards, DeepSpeed files)
        ema/full.safetensors    EMA (replicated engines, rank 0) or ema/rank-00003.safetensors (sharded engines)
        state/rank-00003.json   per rank: data-loader position, RNG states (torch CPU/CUDA, python, numpy)
        config.yaml             the resolved run config
        meta.json               step, world size, engine
        COMMIT                  written last by rank 0, after every rank has finished: the commit

Object stores have no atomic rename, so readers trust only folders with COMMIT; the newest such folder is the
resume point. Engines write local files, so for a remote URL each rank writes into a local staging directory
and uploads its own files (and downloads the whole folder to resume). The last ``keep_last`` committed folders
are kept. Asynchronous saving snapshots everything to CPU in the loop, then writes and uploads in a background
thread; the commit happens in :meth:`CheckpointManager.poll` once every rank's thread has finished.
"""

from __future__ import annotations

import base64
import json
import os
import random
import re
import shutil
import signal
import tempfile
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import fsspec
import numpy as np
import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

from deepflow.platform.train.distributed import DistContext

__all__ = [
    "CheckpointManager",
    "PreemptionHandler",
    "capture_rng_state",
    "restore_rng_state",
    "export_weights",
    "COMMIT_NAME",
]

COMMIT_NAME = "COMMIT"
_STEP_DIR = re.compile(r"^step-(\d{7,})$")


# ------------------------------------------------------------------------------------------------- RNG
def _b64(tensor: torch.Tensor) -> str:
    return base64.b64encode(tensor.cpu().numpy().tobytes()).decode("ascii")


def _unb64(text: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(text)), dtype=torch.uint8).clone()


def capture_rng_state() -> dict[str, Any]:
    """Every global RNG of this process as JSON-able data."""
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "torch_cpu": _b64(torch.get_rng_state()),
        "python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]],
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
    }
    if torch.cuda.is_available():
        state["torch_cuda"] = [_b64(s) for s in torch.cuda.get_rng_state_all()]
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(_unb64(state["torch_cpu"]))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    if "torch_cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([_unb64(s) for s in state["torch_cuda"]])


# ---------------------------------------------------------------------------------------------- signals
class PreemptionHandler:
    """SIGTERM (Kubernetes preemption) sets a flag; the loop finishes its step, saves and exits 0."""

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


# ------------------------------------------------------------------------------------------------- I/O
def _tensor_dict_to_cpu(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {name: t.detach().to("cpu", copy=True).contiguous() for name, t in tensors.items()}


def export_weights(
    weights: dict[str, torch.Tensor],
    url: str,
    metadata: dict[str, Any],
    storage_options: dict[str, Any] | None = None,
) -> None:
    """Write ``<url>/export.safetensors`` and ``<url>/export.json`` (model name, create_model kwargs, step)."""
    fs, root = fsspec.core.url_to_fs(url, **(storage_options or {}))
    fs.makedirs(root, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        local = os.path.join(tmp, "export.safetensors")
        save_file(_tensor_dict_to_cpu(weights), local, metadata={"format": "pt"})
        fs.put_file(local, f"{root}/export.safetensors")
    with fs.open(f"{root}/export.json", "w") as handle:
        json.dump(metadata, handle, indent=2)


@dataclass
class _Pending:
    step: int
    remote_dir: str
    staging: str | None
    thread: threading.Thread
    error: list[BaseException] = field(default_factory=list)
    started: float = field(default_factory=time.perf_counter)


class CheckpointManager:
    """Save / find / load / prune ``step-NNNNNNN`` checkpoints under one URL (see module doc)."""

    def __init__(
        self,
        url: str,
        ctx: DistContext,
        keep_last: int = 3,
        async_save: bool = False,
        storage_options: dict[str, Any] | None = None,
    ) -> None:
        self.url = url.rstrip("/")
        self.ctx = ctx
        self.keep_last = keep_last
        self.async_save = async_save
        self.storage_options = dict(storage_options or {})
        self.fs, self.root = fsspec.core.url_to_fs(self.url, **self.storage_options)
        protocols = self.fs.protocol if isinstance(self.fs.protocol, (tuple, list)) else (self.fs.protocol,)
        self.is_local = "file" in protocols or "local" in protocols
        self.pending: _Pending | None = None
        self.last_stall_s = 0.0
        if ctx.is_main:
            self.fs.makedirs(self.root, exist_ok=True)

    # ---------------------------------------------------------------------------------------- discovery
    def step_path(self, step: int) -> str:
        return f"{self.root}/step-{step:07d}"

    def _list_steps(self) -> list[tuple[int, str, bool]]:
        """(step, path, committed) for every step folder, oldest first."""
        try:
            entries = self.fs.ls(self.root, detail=False)
        except FileNotFoundError:
            return []
        found = []
        for entry in entries:
            match = _STEP_DIR.match(entry.rstrip("/").rsplit("/", 1)[-1])
            if match:
                path = entry.rstrip("/")
                found.append((int(match.group(1)), path, self.fs.exists(f"{path}/{COMMIT_NAME}")))
        return sorted(found)

    def committed_steps(self) -> list[int]:
        self.fs.invalidate_cache()
        return [step for step, _, committed in self._list_steps() if committed]

    def latest_step(self) -> int | None:
        """Newest committed step (decided by rank 0 and broadcast so every rank resumes the same one)."""
        steps = self.committed_steps() if self.ctx.is_main else []
        choice = [steps[-1] if steps else None]
        if self.ctx.distributed:
            dist.broadcast_object_list(choice, src=0)
        return choice[0]

    # --------------------------------------------------------------------------------------------- save
    def save(
        self,
        step: int,
        engine: Any,
        ema: Any | None,
        rank_state: dict[str, Any],
        config_yaml: str,
        blocking: bool | None = None,
    ) -> float:
        """Collective. Write checkpoint ``step``; returns the seconds the caller was stalled.

        Asynchronous (``async_save`` and ``blocking`` not True) when the engine can snapshot to CPU.
        """
        start = time.perf_counter()
        self.wait()  # at most one save in flight
        remote_dir = self.step_path(step)
        use_async = self.async_save if blocking is None else not blocking
        staging = None if self.is_local else tempfile.mkdtemp(prefix=f"ckpt-{step}-r{self.ctx.rank}-")
        local_dir = remote_dir if self.is_local else staging
        assert local_dir is not None
        sharded = bool(getattr(engine, "sharded_params", False))
        ema_name = f"rank-{self.ctx.rank:05d}" if sharded else "full"
        should_write_ema = ema is not None and (sharded or self.ctx.is_main)
        meta = {
            "step": step,
            "world_size": self.ctx.world_size,
            "engine": getattr(engine, "name", "?"),
            "sharded_ema": sharded,
            "time": time.time(),
        }
        if self.ctx.is_main and self.fs.exists(remote_dir):  # leftovers of a crashed save of this same step
            self.fs.rm(remote_dir, recursive=True)
        if self.ctx.is_main or not self.is_local:
            os.makedirs(local_dir, exist_ok=True)
        self.ctx.barrier()

        def write_small_files() -> None:
            os.makedirs(os.path.join(local_dir, "state"), exist_ok=True)
            with open(os.path.join(local_dir, "state", f"rank-{self.ctx.rank:05d}.json"), "w") as handle:
                json.dump(rank_state, handle)
            if self.ctx.is_main:
                with open(os.path.join(local_dir, "config.yaml"), "w") as handle:
                    handle.write(config_yaml)
                with open(os.path.join(local_dir, "meta.json"), "w") as handle:
                    json.dump(meta, handle)

        def write_ema(tensors: dict[str, torch.Tensor]) -> None:
            os.makedirs(os.path.join(local_dir, "ema"), exist_ok=True)
            save_file(tensors, os.path.join(local_dir, "ema", f"{ema_name}.safetensors"))

        ema_cpu = _tensor_dict_to_cpu(ema.state_dict()) if should_write_ema else None
        engine_dir = os.path.join(local_dir, "engine")
        dcp_future: Future | None = None
        snapshot = None
        if use_async:
            if hasattr(engine, "async_save"):
                dcp_future = engine.async_save(engine_dir)
            elif getattr(engine, "supports_snapshot", False):
                snapshot = engine.snapshot()  # CPU copy (None on ranks with nothing to write)
            else:
                use_async = False  # e.g. DeepSpeed: its own save is synchronous

        if not use_async:
            engine.save(engine_dir)
            write_small_files()
            if ema_cpu is not None:
                write_ema(ema_cpu)
            self._upload(local_dir, remote_dir)
            self.ctx.barrier()
            self._commit(step, meta)
            self.last_stall_s = time.perf_counter() - start
            return self.last_stall_s

        def background(pending_errors: list[BaseException]) -> None:
            try:
                if dcp_future is not None:
                    dcp_future.result()
                elif snapshot is not None:
                    engine.write_snapshot(snapshot, engine_dir)
                write_small_files()
                if ema_cpu is not None:
                    write_ema(ema_cpu)
                self._upload(local_dir, remote_dir)
            except BaseException as error:  # surfaced by poll()/wait()
                pending_errors.append(error)

        errors: list[BaseException] = []
        thread = threading.Thread(target=background, args=(errors,), name=f"ckpt-{step}", daemon=True)
        self.pending = _Pending(step, remote_dir, staging, thread, errors)
        thread.start()
        self.last_stall_s = time.perf_counter() - start
        return self.last_stall_s

    def _upload(self, local_dir: str, remote_dir: str) -> None:
        if self.is_local:
            return
        for dirpath, _, filenames in os.walk(local_dir):
            for filename in filenames:
                source = os.path.join(dirpath, filename)
                relative = os.path.relpath(source, local_dir).replace(os.sep, "/")
                self.fs.put_file(source, f"{remote_dir}/{relative}")
        shutil.rmtree(local_dir, ignore_errors=True)

    def _commit(self, step: int, meta: dict[str, Any]) -> None:
        if self.ctx.is_main:
            with self.fs.open(f"{self.step_path(step)}/{COMMIT_NAME}", "w") as handle:
                json.dump(meta, handle)
            self._prune()

    def _prune(self) -> None:
        entries = self._list_steps()
        committed = [(step, path) for step, path, ok in entries if ok]
        keep = {step for step, _ in committed[-self.keep_last :]}
        newest = committed[-1][0] if committed else -1
        pending_step = self.pending.step if self.pending else None
        for step, path, ok in entries:
            stale_partial = not ok and step < newest and step != pending_step
            if (ok and step not in keep) or stale_partial:
                self.fs.rm(path, recursive=True)

    def poll(self) -> bool:
        """Collective (only while a save is pending): commit it once every rank's writer is done."""
        if self.pending is None:
            return False
        done_here = 0 if self.pending.thread.is_alive() else 1
        device = self.ctx.device if self.ctx.backend == "nccl" else torch.device("cpu")
        flag = torch.tensor([done_here], dtype=torch.int32, device=device)
        if self.ctx.distributed:
            dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        if int(flag.item()) == 0:
            return False
        self._finish_pending()
        return True

    def wait(self) -> None:
        """Collective: block until a pending save is written everywhere, then commit it."""
        if self.pending is None:
            return
        self.pending.thread.join()
        self.ctx.barrier()
        self._finish_pending()

    def _finish_pending(self) -> None:
        pending = self.pending
        assert pending is not None
        if pending.error:
            self.pending = None
            raise RuntimeError(f"asynchronous checkpoint of step {pending.step} failed") from pending.error[0]
        self.pending = None
        self._commit(pending.step, {"step": pending.step, "async": True})

    # --------------------------------------------------------------------------------------------- load
    def load(self, step: int, engine: Any, ema: Any | None) -> dict[str, Any]:
        """Collective: restore engine + EMA of ``step``; returns this rank's saved state (loader, RNG)."""
        remote_dir = self.step_path(step)
        local_dir = remote_dir
        staging = None
        if not self.is_local:
            staging = tempfile.mkdtemp(prefix=f"resume-{step}-r{self.ctx.rank}-")
            self.fs.get(remote_dir + "/", staging + "/", recursive=True)
            local_dir = staging
        try:
            with open(os.path.join(local_dir, "meta.json")) as handle:
                meta = json.load(handle)
            state_file = os.path.join(local_dir, "state", f"rank-{self.ctx.rank:05d}.json")
            if meta["world_size"] != self.ctx.world_size:
                raise RuntimeError(
                    f"checkpoint {remote_dir} was written by {meta['world_size']} ranks, this run has "
                    f"{self.ctx.world_size}: per-rank loader positions (and sharded EMA) need the same world size"
                )
            engine.load(os.path.join(local_dir, "engine"))
            if ema is not None:
                ema_name = f"rank-{self.ctx.rank:05d}" if meta.get("sharded_ema") else "full"
                tensors = load_file(os.path.join(local_dir, "ema", f"{ema_name}.safetensors"))
                if not meta.get("sharded_ema") and getattr(engine, "sharded_params", False):
                    raise RuntimeError(f"{remote_dir}: replicated EMA cannot be loaded into a sharded engine")
                ema.load_state_dict(tensors)
            with open(state_file) as handle:
                return json.load(handle)
        finally:
            if staging is not None:
                self.ctx.barrier()
                shutil.rmtree(staging, ignore_errors=True)

    def read_config(self, step: int) -> str:
        with self.fs.open(f"{self.step_path(step)}/config.yaml", "r") as handle:
            return handle.read()

