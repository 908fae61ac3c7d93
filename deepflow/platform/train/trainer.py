"""The training loop: batch -> FlowObjective loss terms -> engine backward/step -> EMA -> log -> eval -> checkpoint.

Determinism and world-size invariance: the data are read as ``data.streams`` sample streams
(:mod:`deepflow.data_pipeline.stream`); a micro-step's global batch is one chunk of every stream, a rank computes
the chunks of its streams, and each chunk's objective randomness (times, gaps, noise, condition drop) comes from a
generator seeded from (run.seed, stream, step, micro-step); the gap sign is one per global micro-batch. So the
losses do not depend on how many ranks computed them (up to reduction order). Every stream's position is in
every rank's checkpoint state, so a run resumes exactly, on any number of ranks that divides the streams.

Non-finite losses: all ranks agree (one small all-reduce per micro-step, which also carries the SIGTERM flag)
and skip the step: no backward, no update, gradients dropped. After ``schedule.max_nonfinite_steps`` in a row
the run saves a checkpoint of the last good state (skipped steps never touched the weights) and stops with
:class:`NonFiniteLossError`.

SIGTERM: the current step finishes, a checkpoint is written (blocking), and :func:`train` returns normally (the
result says ``preempted``). The training process itself then exits 0 (:mod:`deepflow.platform.train.job`); under the
Kubernetes pod supervisor (``k8s_env``) the pod exits 75 (EX_TEMPFAIL) once every rank reported a committed
checkpoint, so the Job restarts it instead of counting it as succeeded
(:mod:`deepflow.platform.train.pod_supervisor`).
"""

from __future__ import annotations

import math
import os
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from deepflow.artifacts import ModelCard
from deepflow.errors import USER_ERRORS, UserError
from deepflow.models import DeepFlowDiT, DeepFlowMMDiT
from deepflow.models.conditions import condition_from_batch
from deepflow.models.flow import FlowDraws, gap_sign
from deepflow.platform.train.checkpoint import (
    CheckpointManager,
    capture_rng_state,
    full_weights,
    restore_rng_state,
    write_full_export,
)
from deepflow.platform.train.config import (
    ConfigError,
    RunConfig,
    config_to_yaml,
    resolve_model_for_dataset,
    resume_changes,
    save_config,
)
from deepflow.platform.train.distributed import (
    DistContext,
    init_distributed,
    seed_everything,
    shutdown_distributed,
    step_generator,
)
from deepflow.platform.train.ema import ShardedEMA
from deepflow.precision import choose_precision
from deepflow.platform.train.preemption import PreemptionHandler
from deepflow.platform.train.summary import startup_summary
from deepflow.platform.train.engines import Engine, build_engine, engine_class
from deepflow.platform.train.tb_logging import (
    TrainLogger,
    branch_layout,
    console_logger,
    peak_memory_gb,
    peak_tflops_for,
)
from deepflow.storage import join_url

if TYPE_CHECKING:
    from deepflow.data_pipeline.loader import ShardLoader

__all__ = ["Trainer", "TrainResult", "NonFiniteLossError", "train", "train_flops_per_image"]

#: the stream id whose generator draws a micro-step's gap sign (real streams are 0 .. data.streams - 1)
GAP_SIGN_STREAM = 2**31 - 1


class DataStopError(UserError):
    """Another rank met an unreadable shard under ``data.on_error: raise`` (that rank's error names it)."""


class NonFiniteLossError(RuntimeError):
    """Raised after too many consecutive steps with a NaN/inf loss (a checkpoint was saved first)."""


@dataclass
class TrainResult:
    final_step: int
    status: str  # "completed" | "preempted"
    losses: dict[int, float] = field(default_factory=dict)  # step -> mean total loss over ranks (log steps)
    skipped_steps: list[int] = field(default_factory=list)


def _build_model(cfg: RunConfig) -> torch.nn.Module:
    """The model of ``cfg.model`` (identical initial weights on every rank); a shape the config checks missed is a
    :class:`ConfigError` naming the section."""
    from deepflow.models import create_model

    torch.manual_seed(cfg.run.seed)
    try:
        return create_model(cfg.model.name, **cfg.model.create_kwargs())
    except (ValueError, TypeError) as error:
        raise ConfigError(f"model: cannot build {cfg.model.name}: {error}") from error


def _build_loader(cfg: RunConfig, ctx: DistContext) -> ShardLoader:
    from deepflow.data_pipeline.loader import ShardLoader

    if not cfg.data.url:
        raise ValueError("data.url: a dataset URL is required for training")
    return ShardLoader(
        cfg.data.url,
        batch_size=cfg.per_rank_batch_size(ctx.world_size),
        rank=ctx.rank,
        world_size=ctx.world_size,
        num_workers=cfg.data.num_workers,
        shuffle_buffer=cfg.data.shuffle_buffer,
        seed=cfg.run.seed,
        flip=cfg.data.flip,
        storage_options=cfg.data.resolved_storage_options(),
        on_error=cfg.data.on_error,
        streams=cfg.data.streams or None,
    )


def train_flops_per_image(model: DeepFlowDiT | DeepFlowMMDiT) -> float:
    """FLOPs of one training step per image: 2 FLOPs per MAC x (forward + 2x for backward)."""
    return 6.0 * float(model.flops_per_image(train=True, attention=True))


class Trainer:
    """Owns the engine, EMA, loader, checkpoints and logger of one run on one rank."""

    def __init__(self, cfg: RunConfig, ctx: DistContext) -> None:
        self.ctx = ctx
        self.log = console_logger(ctx.rank)
        self.loader = _build_loader(cfg, ctx)
        # text models: context_dim / pooled_dim come from (and are checked against) the dataset manifest; the
        # resolved values travel in the saved config, checkpoints and the export
        cfg = resolve_model_for_dataset(cfg, self.loader.manifest)
        # precision auto -> bf16 or fp32 for this device (deepflow.precision); the resolved value is what is saved
        self.precision = choose_precision(cfg.precision, ctx.device)
        cfg = cfg.model_copy(update={"precision": self.precision.precision})
        if self.precision.warning and ctx.is_main:
            self.log.warning(f"warning: {self.precision.warning}")  # this console shows no level names
        self.cfg = cfg
        self.config_yaml = config_to_yaml(cfg)
        model = _build_model(cfg)
        spec = cfg.model.spec
        self.num_branches = spec.num_branches
        self.num_classes = cfg.model.num_classes if spec.takes_classes else 0
        # the condition a dropped row gets: the dataset's empty-caption encoding (caption datasets; the config was
        # checked against the manifest above) or, for class models, the null class num_classes (None here)
        null_text = self.loader.null_text()
        self.null_condition = None if null_text is None else {k: v.to(ctx.device) for k, v in null_text.items()}
        self.flops_per_image = train_flops_per_image(model)
        from deepflow.models.flow import FlowObjective

        self.objective = FlowObjective(
            time_sampling=cfg.objective.time_sampling,
            alpha=cfg.objective.alpha,
            betas=cfg.objective.betas,
            acc_weight=cfg.objective.acc_weight,
            proj_weight=cfg.objective.proj_weight,
            label_dropout=cfg.model.class_dropout,
        )
        self.engine: Engine = build_engine(cfg, model, ctx)
        self.ema = (
            ShardedEMA(self.engine.named_local_params(), cfg.ema.decay, cfg.ema.start_step, cfg.ema.every)
            if cfg.ema.enabled
            else None
        )
        self.ssl = None
        if cfg.model.ssl_align:
            from deepflow.platform.train.ssl import DinoFeatures

            self.ssl = DinoFeatures(cfg.ssl.encoder, image_size=cfg.ssl.image_size, device=ctx.device)
        self.checkpoints = CheckpointManager(
            cfg.checkpoint_url,
            ctx,
            keep_last=cfg.checkpoint.keep_last,
            async_save=cfg.checkpoint.async_save,
            storage_options=cfg.checkpoint_storage_options(),
        )
        self.logger = TrainLogger(
            cfg.tensorboard_url,
            enabled=ctx.is_main,
            storage_options=cfg.tensorboard_storage_options(),
        )
        self.peak_tflops = cfg.logging.peak_tflops or peak_tflops_for(ctx.device, cfg.precision)
        self.evaluator = None
        if cfg.eval.every > 0:
            from deepflow.platform.train.periodic_eval import Evaluator

            self.evaluator = Evaluator(cfg, ctx, self.logger, manifest=self.loader.manifest)
        self.step = 0
        self.consecutive_nonfinite = 0
        self.skipped: list[int] = []
        self._unreadable_counts = (0.0, 0.0)  # (summed per-rank counts, distinct count): _distinct_unreadable_shards

    # ----------------------------------------------------------------------------------------- state
    def _rank_state(self) -> dict[str, Any]:
        """Collective: what this rank's checkpoint state file holds; the loader part is every rank's streams, so
        that any world size can resume from any rank's file."""
        loader_states = [self.loader.state_dict()]
        if self.ctx.distributed:
            loader_states = [None] * self.ctx.world_size  # type: ignore[list-item]
            dist.all_gather_object(loader_states, self.loader.state_dict())
        return {
            "step": self.step,
            "loader": self.loader.merge_states(loader_states),
            "rng": capture_rng_state(),
            "skipped": self.skipped[-100:],
        }

    def model_card(self) -> ModelCard:
        """What rebuilds this run's model from its weights (checkpoint ``model.json``, export ``export.json``)."""
        return ModelCard.for_dataset(
            self.cfg.model.name,
            self.cfg.model.create_kwargs(),
            self.loader.manifest,
            step=self.step,
            ema=self.ema is not None,
            data_url=self.cfg.data.url,
        )

    def save_checkpoint(self, blocking: bool | None = None) -> float:
        """Collective: checkpoint the current step, then upload TensorBoard up to it (so that a resume from this
        checkpoint finds every earlier step on the store)."""
        stall = self.checkpoints.save(
            self.step, self.engine, self.ema, self._rank_state(), self.config_yaml,
            card=self.model_card() if self.ctx.is_main else None, blocking=blocking,
        )
        self.log.info(f"checkpoint step {self.step} -> {self.checkpoints.step_url(self.step)} (stall {stall:.2f}s)")
        self.logger.sync()
        return stall

    def resume(self) -> None:
        if not self.cfg.checkpoint.resume:
            return
        latest = self.checkpoints.latest_step()
        if latest is None:
            return
        self._check_resumed_config(latest)
        state = self.checkpoints.load(latest, self.engine, self.ema)
        self.loader.load_state_dict(state["loader"])
        if state.get("saved_world_size", self.ctx.world_size) == self.ctx.world_size:
            restore_rng_state(state["rng"])  # (training draws only from seeded generators; kept for user code)
        self.skipped = list(state.get("skipped", []))
        self.step = latest
        self.log.info(f"resumed from {self.checkpoints.step_url(latest)}")

    def _check_resumed_config(self, step: int) -> None:
        """Compare the config with the one saved in checkpoint ``step``: changes of the model's shape, the engine's
        state layout or the batch split are refused (:class:`ConfigError` naming the fields); other changes (lr,
        schedule length, eval / logging / checkpoint settings ...) are applied with one warning line."""
        saved = self.checkpoints.read_config(step)
        if saved is None:
            return
        changes = resume_changes(saved, self.cfg)
        url = self.checkpoints.step_url(step)
        refused = [change for change in changes if change.fixed]
        if refused:
            fields = ", ".join(str(change) for change in refused)
            raise ConfigError(
                f"{fields}: cannot change when resuming from {url} (the model's shape, distributed.engine, "
                "distributed.zero_stage, data.global_batch_size, data.streams, data.shuffle_buffer, run.seed, "
                "schedule.grad_accumulation and precision are fixed by the checkpoint); restore the checkpoint's "
                "values or start a new run (another run.output_dir or checkpoint.url)"
            )
        if changes and self.ctx.is_main:
            self.log.warning(f"warning: resuming from {url} with changed settings (applied): "
                             + ", ".join(str(change) for change in changes))

    # ------------------------------------------------------------------------------------------ loop
    def _lr(self, step: int) -> float:
        warmup = self.cfg.optim.warmup_steps
        return self.cfg.optim.lr * (min(1.0, step / warmup) if warmup > 0 else 1.0)

    @property
    def _flag_device(self) -> torch.device:
        """Where small control tensors live: the GPU for nccl, the CPU for gloo / no group."""
        return self.ctx.device if self.ctx.backend == "nccl" else torch.device("cpu")

    def _agree(self, loss: torch.Tensor, stop: bool) -> tuple[bool, bool]:
        """One all-reduce (MAX) of [loss is NaN/inf, stop requested]: every rank takes the same decision."""
        nonfinite = (~torch.isfinite(loss.detach())).float().reshape(1).to(self._flag_device)
        flags = torch.cat([nonfinite, torch.tensor([float(stop)], device=self._flag_device)])
        if self.ctx.distributed:
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        nonfinite_any, stop_any = flags.tolist()
        return nonfinite_any > 0, stop_any > 0

    def _next_batch(self, data_iter: Any) -> dict[str, Any]:
        """The next batch. With ``data.on_error: raise`` on several ranks, the ranks first agree (one small
        all-reduce per micro-step, only in that mode) that every one has its batch, so an unreadable shard met by
        one rank stops every rank with one error line instead of leaving the others waiting in a collective
        (under ``skip`` a shard never stops the run, and "no readable shard" is met by every rank at once)."""
        if not (self.ctx.distributed and self.cfg.data.on_error == "raise"):
            return next(data_iter)
        failure: BaseException | None = None
        try:
            batch = next(data_iter)
        except USER_ERRORS as error:  # ShardError, FileNotFoundError: this rank's error line names the shard
            failure = error
        flag = torch.tensor([float(failure is not None)], device=self._flag_device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if failure is not None:
            raise failure
        if flag.item() > 0:
            raise DataStopError("data.url: another rank met an unreadable shard and stopped the run "
                                "(data.on_error: raise; its error line names the shard)")
        return batch

    def _distinct_unreadable_shards(self, summed: float) -> float:
        """Collective when ``summed`` (the ranks' counts of ``loader.unreadable``, added up) changed since the last
        call: the number of distinct unreadable shards over all ranks (one all_gather of their names)."""
        if not self.ctx.distributed:
            return summed
        if summed != self._unreadable_counts[0]:
            gathered: list[Any] = [None] * self.ctx.world_size
            dist.all_gather_object(gathered, sorted(self.loader.unreadable))
            self._unreadable_counts = (summed, float(len({name for names in gathered for name in names})))
        return self._unreadable_counts[1]

    def _reduce_over_ranks(self, means: dict[str, float], sums: dict[str, float]) -> dict[str, float]:
        """One all-reduce: ``means`` averaged over ranks, ``sums`` added up."""
        values = {**means, **sums}
        if not self.ctx.distributed or not values:
            return values
        keys = sorted(values)
        tensor = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=self._flag_device)
        dist.all_reduce(tensor)
        reduced = dict(zip(keys, tensor.cpu().tolist()))
        return {key: value / self.ctx.world_size if key in means else value for key, value in reduced.items()}

    def _draws(self, streams: list[int], x: torch.Tensor, micro: int) -> FlowDraws:
        """The objective's randomness of this rank's rows: one draw per stream chunk, from a generator seeded by
        (run.seed, stream, step, micro-step); the gap sign is shared by the whole global micro-batch."""
        seed, device = self.cfg.run.seed, self.ctx.device
        sign = gap_sign(step_generator(seed, GAP_SIGN_STREAM, self.step, micro, device))
        shape = (self.loader.chunk_size, *x.shape[1:])
        return FlowDraws.cat([
            self.objective.draw(shape, self.num_branches, step_generator(seed, stream, self.step, micro, device),
                                device, x.dtype, sign=sign)
            for stream in streams
        ])

    def _train_step(self, data_iter: Any, preempt: PreemptionHandler) -> tuple[dict[str, float], float, bool, float]:
        """One optimizer step. Returns (loss terms of this rank, grad norm, stop requested, data-wait seconds)."""
        cfg = self.cfg
        accumulation = cfg.schedule.grad_accumulation
        self.engine.set_lr(self._lr(self.step))
        sums: dict[str, torch.Tensor] = {}  # on the device: read once, after the step (no sync per micro-step)
        data_wait = 0.0
        nonfinite = stop = False
        for micro in range(accumulation):
            wait_start = time.perf_counter()
            batch = self._next_batch(data_iter)
            x = batch["x"].to(self.ctx.device, non_blocking=True)
            # labels [B] for class models; {"text_emb", "text_mask", "text_pooled"} for caption datasets
            y = condition_from_batch(batch, self.ctx.device)
            data_wait += time.perf_counter() - wait_start
            ssl_targets = self.ssl(batch["image"]) if self.ssl is not None else None
            draws = self._draws(batch["streams"], x, micro)
            with self.engine.micro_step(boundary=micro == accumulation - 1):
                terms = self.objective.loss(
                    self.engine.forward_train,
                    x,
                    y,
                    draws=draws,
                    ssl_targets=ssl_targets,
                    num_branches=self.num_branches,
                    num_classes=self.num_classes,
                    null_condition=self.null_condition,
                )
                loss = terms["total"]
                if self.step in cfg.debug.inject_nan_steps:
                    loss = loss * float("nan")
                nonfinite, stop_flag = self._agree(loss, preempt.requested)
                stop = stop or stop_flag
                if nonfinite:
                    break
                self.engine.backward(loss)
            for name, value in terms.items():
                sums[name] = sums.get(name, 0.0) + value.detach().float() / accumulation
        if nonfinite:
            self.engine.skip_step()
            return {}, math.nan, stop, data_wait
        grad_norm = self.engine.step()  # (reads the norm: the device has finished the step)
        if self.ema is not None:
            self.ema.update(self.engine.named_local_params(), self.step)
        values = torch.stack(list(sums.values())).tolist()
        return dict(zip(sums, values)), grad_norm, stop, data_wait

    def run(self, preempt: PreemptionHandler) -> TrainResult:
        """Train to ``schedule.total_steps`` (or until ``preempt`` reports SIGTERM: a checkpoint, then return)."""
        cfg = self.cfg
        self.resume()
        if self.ctx.is_main:
            for line in startup_summary(self):
                self.log.info(line)
        if self.ctx.is_main and self.step == 0:
            save_config(cfg, join_url(cfg.run.output_dir, "config.yaml"), cfg.output_storage_options())
            self.logger.set_layout(branch_layout(self.num_branches, cfg.model.ssl_align))
            self.logger.text("config", "```\n" + self.config_yaml + "\n```")
        result = TrainResult(final_step=self.step, status="completed")
        data_iter = iter(self.loader)
        window = {"start": time.perf_counter(), "steps": 0, "wait": 0.0, "sums": {}, "count": 0}
        self.engine.train(True)
        total = cfg.schedule.total_steps
        try:
            while self.step < total:
                self.step += 1
                terms, grad_norm, stop, wait = self._train_step(data_iter, preempt)
                window["steps"] += 1
                window["wait"] += wait
                if terms:
                    self.consecutive_nonfinite = 0
                    window["count"] += 1
                    for key, value in terms.items():
                        window["sums"][key] = window["sums"].get(key, 0.0) + value
                    window["grad_norm"] = grad_norm
                else:
                    self.consecutive_nonfinite += 1
                    self.skipped.append(self.step)
                    self.log.warning(
                        f"step {self.step}: non-finite loss on some rank; step skipped "
                        f"({self.consecutive_nonfinite} in a row)"
                    )
                    self.logger.scalars(self.step, {"optim/skipped_steps": float(len(self.skipped))})
                self.checkpoints.poll()
                if self.step % cfg.schedule.log_every == 0 or self.step == total or self.step % cfg.logging.console_every == 0:
                    self._log_window(window, result)
                if self.consecutive_nonfinite >= cfg.schedule.max_nonfinite_steps:
                    self.save_checkpoint(blocking=True)
                    raise NonFiniteLossError(
                        f"loss was NaN/inf for {self.consecutive_nonfinite} consecutive steps (up to step "
                        f"{self.step}); stopped. The last good weights are in {self.checkpoints.step_url(self.step)}"
                    )
                if self.evaluator is not None and self.step % cfg.eval.every == 0:
                    self.evaluate()
                if stop:
                    self.log.warning(f"termination signal received: saving a checkpoint at step {self.step}")
                    self.save_checkpoint(blocking=True)
                    result.status = "preempted"
                    break
                if self.step % cfg.checkpoint.every == 0 and self.step < total:
                    self.save_checkpoint()
                self._debug_hooks()
            if result.status == "completed":
                self.checkpoints.wait()
                if self.checkpoints.latest_step() != self.step:
                    self.save_checkpoint(blocking=True)
                if cfg.checkpoint.export_ema:
                    self.export()
        finally:
            self.logger.close()
            self.loader.close()
        result.final_step = self.step
        result.skipped_steps = list(self.skipped)
        return result

    def _debug_hooks(self) -> None:
        debug = self.cfg.debug
        if debug.step_sleep_s:
            time.sleep(debug.step_sleep_s)
        if debug.sigterm_at_step is not None and self.step == debug.sigterm_at_step:
            os.kill(os.getpid(), signal.SIGTERM)
        if debug.sigkill_at_step is not None and self.step == debug.sigkill_at_step and self.ctx.is_main:
            self.logger.sync()
            os.kill(os.getpid(), signal.SIGKILL)

    def _log_window(self, window: dict[str, Any], result: TrainResult) -> None:
        cfg = self.cfg
        now = time.perf_counter()
        elapsed = max(now - window["start"], 1e-9)
        steps = window["steps"]
        count = max(window["count"], 1)
        local_terms = {f"loss/{k}": v / count for k, v in window["sums"].items()}
        is_log_step = self.step % cfg.schedule.log_every == 0 or self.step == cfg.schedule.total_steps
        if is_log_step:
            # data/skipped_shards: distinct unreadable shards met so far by the streams of all ranks (each once)
            terms = self._reduce_over_ranks(local_terms, {"data/skipped_shards": float(len(self.loader.unreadable))})
            terms["data/skipped_shards"] = self._distinct_unreadable_shards(terms["data/skipped_shards"])
            images_per_s = steps * cfg.data.global_batch_size / elapsed
            tflops = images_per_s * self.flops_per_image / self.ctx.world_size / 1e12
            scalars = dict(terms)
            scalars.update(
                {
                    "optim/grad_norm": float(window.get("grad_norm", math.nan)),
                    "optim/lr": self._lr(self.step),
                    "perf/images_per_s": images_per_s,
                    "perf/tflops": tflops,
                    "perf/peak_mem_gb": peak_memory_gb(self.ctx.device),
                    "perf/data_wait_frac": window["wait"] / elapsed,
                }
            )
            if self.peak_tflops:
                scalars["perf/mfu"] = tflops / self.peak_tflops
            self.logger.scalars(self.step, scalars)
            if "loss/total" in terms:
                result.losses[self.step] = terms["loss/total"]
        if self.step % cfg.logging.console_every == 0 or self.step == cfg.schedule.total_steps:
            loss = local_terms.get("loss/total", math.nan)
            rate = steps / elapsed
            eta = (cfg.schedule.total_steps - self.step) / max(rate, 1e-9)
            self.log.info(
                f"step {self.step}/{cfg.schedule.total_steps} loss {loss:.4f} "
                f"grad {window.get('grad_norm', math.nan):.3f} lr {self._lr(self.step):.2e} {rate:.2f} it/s "
                f"{rate * cfg.data.global_batch_size:.1f} img/s data {window['wait'] / elapsed:.0%} "
                f"eta {int(eta) // 3600:d}:{int(eta) % 3600 // 60:02d}:{int(eta) % 60:02d}"
            )
        if is_log_step or self.step % cfg.logging.console_every == 0:
            window.update({"start": now, "steps": 0, "wait": 0.0, "sums": {}, "count": 0})

    # ------------------------------------------------------------------------------------ eval/export
    def ema_weights(self) -> Iterator[tuple[str, torch.Tensor | None]]:
        """Collective generator (every rank runs it to its end): the full EMA weights (fp32, CPU; the live weights
        when EMA is disabled) one parameter at a time on rank 0, (name, None) elsewhere."""
        return full_weights(self.engine, self.ema)

    def evaluate(self) -> dict[str, float]:
        """Collective: the evaluator loads the EMA weights as they are gathered (no gathered copy of the model)."""
        assert self.evaluator is not None
        return self.evaluator.run(self.ema_weights(), self.step)

    def export(self) -> None:
        """Collective: the EMA weights (live weights without EMA) + model card to ``<run.output_dir>/export``,
        written tensor by tensor while they are gathered (rank 0 holds one gathered parameter at a time)."""
        url = join_url(self.cfg.run.output_dir, "export")
        card = self.model_card() if self.ctx.is_main else None
        written = write_full_export(self.engine, self.ema, url, card, self.cfg.output_storage_options())
        if written is not None:
            self.log.info(f"exported EMA weights to {written}")
            if self.cfg.checkpoint.export_diffusers:
                from deepflow.platform.export import export_diffusers

                folder = export_diffusers(url, join_url(self.cfg.run.output_dir, "diffusers"), overwrite=True,
                                          storage_options=lambda _: self.cfg.output_storage_options())
                self.log.info(f"exported the diffusers pipeline to {folder.url}")


def train(cfg: RunConfig, local_rank_arg: int | None = None, preempt: PreemptionHandler | None = None,
          ) -> TrainResult:
    """Full lifecycle on this process: process group, trainer, run, clean shutdown. SIGTERM is caught from the
    start (``preempt``, installed by the caller, or here): a preemption during start-up stops the run after its
    first step, with a checkpoint."""
    handler = preempt or PreemptionHandler()
    try:
        return _train(cfg, local_rank_arg, handler)
    finally:
        if preempt is None:
            handler.restore()


def _train(cfg: RunConfig, local_rank_arg: int | None, preempt: PreemptionHandler) -> TrainResult:
    require_group = engine_class(cfg.distributed.engine).requires_process_group
    ctx = init_distributed(
        cfg.distributed.backend, local_rank_arg, require_group=require_group,
        collective_timeout_s=cfg.distributed.collective_timeout_s,
        rendezvous_timeout_s=cfg.distributed.rendezvous_timeout_s,
    )
    try:
        cfg.per_rank_batch_size(ctx.world_size)  # fail early with the field path
        seed_everything(cfg.run.seed, ctx.rank)
        trainer = Trainer(cfg, ctx)
        result = trainer.run(preempt)
    except USER_ERRORS:
        # every rank found the same mistake (same config, same files), or the ranks agreed to stop on a data error
        # (_next_batch): leave without a collective
        if ctx.distributed:
            dist.destroy_process_group()
        raise
    except NonFiniteLossError:
        shutdown_distributed(ctx)
        raise
    shutdown_distributed(ctx)
    return result
