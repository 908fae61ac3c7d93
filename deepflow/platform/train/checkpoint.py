"""Checkpoints on any storage URL (local path, file://, s3://, gs://), in the layout of :mod:`deepflow.artifacts`.

One checkpoint is a ``step-NNNNNNN`` folder (see :class:`deepflow.artifacts.CheckpointLayout`)::

    engine/                 model + optimizer, engine-specific (safetensors+pt, DCP shards, DeepSpeed files)
    ema/full.safetensors    EMA, full-shape tensors (unsharded engines, rank 0) or ema/rank-00003.safetensors
                            (sharded engines: each rank's slices, cut as meta.json's ``ema_layout`` says)
    state/rank-00003.json   per rank: data-loader position, RNG states (torch CPU/CUDA, python, numpy)
    config.yaml             the resolved run config
    model.json              the ModelCard, so ``artifacts.load_weights(<checkpoints>)`` rebuilds the EMA model
    meta.json               step, world size, engine, sharded_ema, ema_layout, ema_shapes (sharded: the full
                            shapes, so that ``artifacts.load_weights`` / ``export_checkpoint`` join the slices)
    COMMIT                  written last by rank 0, after every rank has finished: the commit

Readers trust only folders with COMMIT; the newest such folder is the resume point; the last ``keep_last``
committed folders are kept. Every read and write goes through :class:`deepflow.storage.Storage` (one retry
policy). Engines write LOCAL files: on a local disk they write straight into the step folder; for an object store
each rank writes into its own staging folder under TMPDIR, uploads it (``put_tree``) and removes it whatever
happens; a resume downloads only the ``engine/`` folder (the rest is read directly).

Any world size resumes any checkpoint: each engine reshards its own state (:meth:`Engine.load` gets the saved world
size); the EMA is read as saved when the slicing is unchanged, otherwise the saved slices are joined into full
tensors (:meth:`Engine.assemble_full`) and this rank's slices cut out (:meth:`Engine.local_slice`); a rank that did
not exist in the saved run gets rank 0's state file, and the state says ``saved_world_size``.

Memory: a blocking save writes the EMA file from the live EMA tensors (no copy; an asynchronous one copies this
rank's slices first, as the loop goes on changing them); a resume reads the EMA one tensor at a time (resharding
joins and cuts one tensor at a time). The export (:func:`write_full_export`) is written by rank 0 tensor by tensor
while the engine gathers the parameters (:meth:`Engine.iter_full`): one gathered parameter in memory, never a copy
of the model.

Asynchronous saving (``async_save``, when the engine supports it: :meth:`Engine.async_save`): the state is
captured in the loop, then written and uploaded by a background thread; the commit happens in
:meth:`CheckpointManager.poll` (or :meth:`~CheckpointManager.wait`) once every rank's thread has finished.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import random
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from safetensors.torch import save_file

from deepflow.artifacts import (
    CHECKPOINT_CONFIG_NAME,
    CHECKPOINT_META_NAME,
    ENGINE_DIR,
    MODEL_CARD_NAME,
    CheckpointLayout,
    ModelCard,
    ema_file_name,
    iter_safetensors,
    iter_sharded_ema,
    rank_state_name,
    safetensors_specs,
    step_dir_name,
    write_export,
)
from deepflow.platform.train.distributed import DistContext
from deepflow.platform.train.ema import ShardedEMA
from deepflow.platform.train.engines.base import AsyncSave, Engine
from deepflow.storage import Storage, set_default_mode

__all__ = [
    "CheckpointManager",
    "capture_rng_state",
    "full_weights",
    "restore_rng_state",
    "write_full_export",
]

log = logging.getLogger(__name__)


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


# ------------------------------------------------------------------------------------------------- files
@dataclass
class _StepFiles:
    """What one rank writes into a step folder besides the engine's files (captured when the save starts)."""

    rank: int
    rank_state: dict[str, Any]
    ema: dict[str, torch.Tensor] | None  # CPU copy of this rank's EMA file, None when it writes none
    ema_name: str
    main_files: dict[str, bytes]  # rank 0 only: config.yaml, meta.json, model.json

    def write(self, local_dir: str) -> None:
        """Write the files into the local folder ``local_dir``."""
        self._put(local_dir, rank_state_name(self.rank), json.dumps(self.rank_state).encode("utf-8"))
        for name, data in self.main_files.items():
            self._put(local_dir, name, data)
        if self.ema is not None:
            save_file(self.ema, self._local(local_dir, self.ema_name))
            set_default_mode(self._local(local_dir, self.ema_name))  # safetensors writes 0600

    @staticmethod
    def _local(local_dir: str, name: str) -> str:
        path = os.path.join(local_dir, *name.split("/"))
        os.makedirs(os.path.dirname(path), exist_ok=True)
        return path

    def _put(self, local_dir: str, name: str, data: bytes) -> None:
        with open(self._local(local_dir, name), "wb") as handle:
            handle.write(data)


def _cpu_tensors(tensors: dict[str, torch.Tensor], copy: bool = True) -> dict[str, torch.Tensor]:
    """The tensors as contiguous CPU tensors: new copies (``copy``: a save the loop goes on changing the tensors
    under), else sharing memory where they already are (a blocking save's EMA)."""
    return {name: t.detach().to("cpu", copy=copy).contiguous() for name, t in tensors.items()}


@dataclass
class _Pending:
    """An asynchronous save whose background writer may still run."""

    step: int
    meta: dict[str, Any]
    thread: threading.Thread
    errors: list[BaseException] = field(default_factory=list)


def _attempt(operation: Callable[[], None]) -> BaseException | None:
    """Run ``operation``; its exception (returned, not raised) so that every rank can agree before raising."""
    try:
        operation()
    except Exception as error:  # noqa: BLE001 - re-raised by _commit_or_raise on every rank
        return error
    return None


# ------------------------------------------------------------------------------------------------ manager
class CheckpointManager:
    """Save / find / load / prune the step folders under one URL (see the module doc).

    Args:
        url: the checkpoints folder (any storage URL).
        ctx: this process's distributed context; ``save``, ``load``, ``poll``, ``wait`` and ``latest_step`` are
            collective.
        keep_last: committed checkpoints kept (older ones are removed after each commit).
        async_save: write in a background thread when the engine supports it.
        storage_options: fsspec options of ``url`` (S3 endpoint, ...).
    """

    def __init__(
        self,
        url: str,
        ctx: DistContext,
        keep_last: int = 3,
        async_save: bool = False,
        storage_options: dict[str, Any] | None = None,
    ) -> None:
        self.storage = Storage(url, storage_options)
        self.layout = CheckpointLayout(self.storage)
        self.ctx = ctx
        self.keep_last = keep_last
        self.async_save = async_save
        self.pending: _Pending | None = None
        self.last_stall_s = 0.0
        if ctx.is_main:
            self.storage.makedirs()

    @property
    def url(self) -> str:
        return self.storage.url

    # ---------------------------------------------------------------------------------------- discovery
    def step_url(self, step: int) -> str:
        return self.layout.step_url(step)

    def committed_steps(self) -> list[int]:
        return self.layout.committed_steps()

    def latest_step(self) -> int | None:
        """Collective: newest committed step (decided by rank 0 and broadcast so every rank resumes the same)."""
        choice = [self.layout.newest_committed() if self.ctx.is_main else None]
        if self.ctx.distributed:
            dist.broadcast_object_list(choice, src=0)
        return choice[0]

    # --------------------------------------------------------------------------------------------- save
    def save(
        self,
        step: int,
        engine: Engine,
        ema: ShardedEMA | None,
        rank_state: dict[str, Any],
        config_yaml: str,
        card: ModelCard | None = None,
        blocking: bool | None = None,
    ) -> float:
        """Collective. Write checkpoint ``step``; returns the seconds the caller was stalled.

        Asynchronous when ``async_save`` (or ``blocking=False``) and the engine supports it; ``blocking=True``
        always saves synchronously. ``card`` (rank 0) becomes ``model.json``.
        """
        start = time.perf_counter()
        self.wait()  # at most one save in flight
        use_async = self.async_save if blocking is None else not blocking
        files, meta = self._capture(step, engine, ema, rank_state, config_yaml, card, copy=use_async)
        if self.ctx.is_main:
            self.layout.remove(step)  # leftovers of a crashed save of this same step
        staging = None if self.storage.is_local else tempfile.mkdtemp(prefix=f"ckpt-{step}-r{self.ctx.rank}-")
        local_dir = staging or self.storage.path(step_dir_name(step))
        handed_off = False
        try:
            if staging is None and self.ctx.is_main:
                os.makedirs(local_dir, exist_ok=True)
            self.ctx.barrier()
            engine_dir = os.path.join(local_dir, ENGINE_DIR)
            in_flight = engine.async_save(engine_dir) if use_async else None
            if in_flight is None:
                engine.save(engine_dir)
                error = _attempt(lambda: self._write_and_upload(step, files, local_dir))
                _, failed = self._agree(done=True, failed=error is not None)
                self._commit_or_raise(step, meta, failed, error)
            else:
                self._start_writer(step, meta, in_flight, files, local_dir, staging)
                handed_off = True  # the writer thread removes the staging folder
        finally:
            if staging is not None and not handed_off:
                shutil.rmtree(staging, ignore_errors=True)
        self.last_stall_s = time.perf_counter() - start
        return self.last_stall_s

    def _capture(
        self,
        step: int,
        engine: Engine,
        ema: ShardedEMA | None,
        rank_state: dict[str, Any],
        config_yaml: str,
        card: ModelCard | None,
        copy: bool = True,
    ) -> tuple[_StepFiles, dict[str, Any]]:
        """This rank's non-engine files of ``step`` and the commit metadata. ``copy``: the EMA is copied to CPU now
        (a save the loop does not wait for); otherwise the file is written from the live EMA tensors (no copy)."""
        sharded = engine.sharded_params
        meta: dict[str, Any] = {
            "step": step,
            "world_size": self.ctx.world_size,
            "engine": engine.name,
            "sharded_ema": sharded,
            "ema_layout": engine.slice_layout,
            "time": time.time(),
        }
        if sharded:  # what joins the slices back (artifacts.load_weights / export_checkpoint) without the model
            meta["ema_shapes"] = {name: list(shape) for name, shape in engine.full_shapes().items()}
        main_files: dict[str, bytes] = {}
        if self.ctx.is_main:
            main_files[CHECKPOINT_CONFIG_NAME] = config_yaml.encode("utf-8")
            main_files[CHECKPOINT_META_NAME] = json.dumps(meta).encode("utf-8")
            if card is not None:
                main_files[MODEL_CARD_NAME] = json.dumps(card.model_dump(mode="json", exclude_none=True)).encode()
        ema_tensors = None
        if ema is not None and (sharded or self.ctx.is_main):
            # unsharded: this rank's slices are the whole tensors (a ZeRO-3 world of 1 holds them flat: reshaped)
            own = ema.state_dict() if sharded else engine.assemble_full([ema.state_dict()])
            ema_tensors = _cpu_tensors(own, copy)
        files = _StepFiles(
            rank=self.ctx.rank,
            rank_state=rank_state,
            ema=ema_tensors,
            ema_name=ema_file_name(self.ctx.rank if sharded else None),
            main_files=main_files,
        )
        return files, meta

    def _write_and_upload(self, step: int, files: _StepFiles, local_dir: str) -> None:
        """Write this rank's files next to the engine's; on an object store upload the staging folder."""
        files.write(local_dir)
        if not self.storage.is_local:
            self.storage.put_tree(local_dir, step_dir_name(step))

    def _start_writer(
        self,
        step: int,
        meta: dict[str, Any],
        in_flight: AsyncSave,
        files: _StepFiles,
        local_dir: str,
        staging: str | None,
    ) -> None:
        """Finish the engine's save, write and upload in a background thread (errors surface in poll/wait)."""
        errors: list[BaseException] = []

        def write() -> None:
            try:
                in_flight.finish()
                self._write_and_upload(step, files, local_dir)
            except BaseException as error:  # noqa: BLE001 - surfaced by poll()/wait()
                errors.append(error)
            finally:
                if staging is not None:
                    shutil.rmtree(staging, ignore_errors=True)

        thread = threading.Thread(target=write, name=f"ckpt-{step}", daemon=True)
        self.pending = _Pending(step, {**meta, "async": True}, thread, errors)
        thread.start()

    def _agree(self, done: bool, failed: bool) -> tuple[bool, bool]:
        """Collective: (every rank's writer is done, some rank's writer failed)."""
        device = self.ctx.device if self.ctx.backend == "nccl" else torch.device("cpu")
        flags = torch.tensor([int(not done), int(failed)], dtype=torch.int32, device=device)
        if self.ctx.distributed:
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        not_done, failed_any = flags.tolist()
        return not not_done, bool(failed_any)

    def _commit_or_raise(self, step: int, meta: dict[str, Any], failed: bool, error: BaseException | None) -> None:
        """Every rank's files are written: rank 0 writes COMMIT and prunes. Some rank failed: no commit, and every
        rank raises (this rank's error as the cause, if it had one)."""
        if failed:
            where = "" if error is not None else " on another rank"
            raise RuntimeError(f"checkpoint of step {step} failed{where}; it is not committed") from error
        if self.ctx.is_main:
            self.layout.commit(step, meta)
            self._prune()

    def _prune(self) -> None:
        """Remove committed folders beyond ``keep_last`` and uncommitted ones older than the newest commit
        (best effort: a failure is logged and the next commit prunes again)."""
        try:
            steps = self.layout.steps()
            committed = [step for step, ok in steps if ok]
            keep = set(committed[-self.keep_last :])
            newest = committed[-1] if committed else -1
            in_flight = self.pending.step if self.pending else None
            for step, ok in steps:
                if (ok and step not in keep) or (not ok and step < newest and step != in_flight):
                    self.layout.remove(step)
        except OSError as error:
            log.warning("pruning old checkpoints under %s failed (retried at the next commit): %s", self.url, error)

    def poll(self) -> bool:
        """Collective (only while a save is pending): commit it once every rank's writer is done."""
        if self.pending is None:
            return False
        done, failed = self._agree(done=not self.pending.thread.is_alive(), failed=bool(self.pending.errors))
        if not done:
            return False
        self._finish_pending(failed)
        return True

    def wait(self) -> None:
        """Collective: block until a pending save is written everywhere, then commit it."""
        if self.pending is None:
            return
        self.pending.thread.join()
        _, failed = self._agree(done=True, failed=bool(self.pending.errors))
        self._finish_pending(failed)

    def _finish_pending(self, failed: bool) -> None:
        pending = self.pending
        assert pending is not None
        self.pending = None
        error = pending.errors[0] if pending.errors else None
        self._commit_or_raise(pending.step, pending.meta, failed, error)

    # --------------------------------------------------------------------------------------------- load
    def read_config(self, step: int) -> str | None:
        """The resolved run config (``config.yaml``) saved with ``step``; None when the folder has none."""
        try:
            return self.layout.step_storage(step).read_text(CHECKPOINT_CONFIG_NAME)
        except FileNotFoundError:
            return None

    def load(self, step: int, engine: Engine, ema: ShardedEMA | None) -> dict[str, Any]:
        """Collective: restore engine + EMA of ``step``, written by any number of ranks.

        Returns this rank's saved state (loader, RNG, skipped steps; rank 0's when this rank did not exist in the
        saved run) with ``saved_world_size`` added: RNG states are only meaningful when it equals this world size.
        """
        step_storage = self.layout.step_storage(step)
        meta = step_storage.read_json(CHECKPOINT_META_NAME)
        saved_world = int(meta["world_size"])
        if meta.get("engine", engine.name) != engine.name:
            raise RuntimeError(
                f"checkpoint {step_storage.url} was written by the {meta['engine']} engine, this run uses {engine.name}"
            )
        self._load_engine(step, step_storage, engine, saved_world)
        if ema is not None:
            ema.load_state_dict(self._read_ema(step_storage, meta, engine))
        state = step_storage.read_json(rank_state_name(self.ctx.rank if self.ctx.rank < saved_world else 0))
        return {**state, "saved_world_size": saved_world}

    def _read_ema(
        self, step_storage: Storage, meta: dict[str, Any], engine: Engine
    ) -> Iterator[tuple[str, torch.Tensor]]:
        """This rank's EMA slices from the checkpoint, one tensor at a time: its own file when the slicing is
        unchanged, else cut out of the full tensors (the full file, or every saved rank's slices joined), so a
        resume on another world size holds one full tensor at a time, never the full EMA."""
        saved_world = int(meta["world_size"])
        if not meta.get("sharded_ema"):
            full = iter_safetensors(step_storage, ema_file_name(None))
        else:
            layout = meta.get("ema_layout", engine.slice_layout)
            if engine.sharded_params and saved_world == self.ctx.world_size and layout == engine.slice_layout:
                return iter_safetensors(step_storage, ema_file_name(self.ctx.rank))
            shapes = engine.full_shapes()
            names = list(safetensors_specs(step_storage, ema_file_name(0)))
            unexpected = sorted(set(names) - set(shapes))
            if unexpected:
                raise KeyError(f"EMA state does not match the model: unexpected {unexpected[:5]}")
            full = iter_sharded_ema(step_storage, layout, saved_world, {name: shapes[name] for name in names})
        return (piece for name, tensor in full for piece in engine.local_slice({name: tensor}).items())

    def _load_engine(self, step: int, step_storage: Storage, engine: Engine, saved_world: int) -> None:
        """``engine.load`` from the local ``engine/`` folder (downloaded to a staging folder first if remote)."""
        if self.storage.is_local:
            engine.load(step_storage.path(ENGINE_DIR), saved_world)
            return
        staging = tempfile.mkdtemp(prefix=f"resume-{step}-r{self.ctx.rank}-")
        try:
            step_storage.get_tree(ENGINE_DIR, staging)
            engine.load(staging, saved_world)
        finally:
            shutil.rmtree(staging, ignore_errors=True)


# ------------------------------------------------------------------------------------------------ exports
def full_weights(engine: Engine, ema: ShardedEMA | None) -> Iterator[tuple[str, torch.Tensor | None]]:
    """Collective generator: the full EMA weights (the live weights without EMA), fp32 CPU, one parameter at a time
    on rank 0 ((name, None) elsewhere): :meth:`Engine.iter_full`; every rank runs it to its end."""
    return engine.iter_full(ema.state_dict() if ema is not None else engine.live_weights())


def drain(stream: Iterator[Any]) -> None:
    """Run the rest of a collective generator (this rank's part of its collectives), dropping what it yields."""
    for _ in stream:
        pass


def write_full_export(
    engine: Engine,
    ema: ShardedEMA | None,
    url: str,
    card: ModelCard | None,
    storage_options: dict[str, Any] | None = None,
) -> str | None:
    """Collective: the full EMA weights (live weights without EMA) + ``card`` as an export at ``url``, written by
    rank 0 tensor by tensor while the engine gathers them (:func:`full_weights`): rank 0's extra memory is one
    gathered parameter, never a copy of the model. Returns the weights URL on rank 0, None elsewhere.

    If rank 0's write fails, it still runs the gather to its end (the other ranks are in its collectives), then
    raises; the export is absent or the previous one (the weights file is replaced atomically)."""
    stream = full_weights(engine, ema)
    if not engine.ctx.is_main:
        drain(stream)
        return None
    assert card is not None, "rank 0 writes the export's model card"
    try:
        return write_export(url, stream, card, storage_options, specs=engine.full_specs())
    finally:
        drain(stream)
