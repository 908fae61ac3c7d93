"""Score one run's checkpoints with the study's protocols, through the trainer's own periodic evaluator
(``train.periodic_eval.Evaluator``: the generate path of ``deepflow sample``, the registered metric of the run's
``eval.extractor``, e.g. the small-data classifier's Frechet distance and class accuracy).

    deepflow study --config STUDY.yaml --evaluate-run LABEL:SEED     (what ``deepflow study`` runs per run)

Results go to ``<run>/evaluations.json``, one record per (step, protocol), rewritten atomically after each one, so
an interrupted evaluation continues where it stopped; the sample grids go to TensorBoard under
``<run>/study-eval/<protocol>/``. The run's own saved ``config.yaml`` (resolved by the trainer against its dataset)
rebuilds the model.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from deepflow.artifacts import COMMIT_NAME, ENGINE_DIR, load_weights, step_dir_name
from deepflow.platform.study.config import ProtocolSpec, StudyConfig, VariantSpec, slug
from deepflow.platform.train.config import RunConfig
from deepflow.platform.train.distributed import DistContext
from deepflow.platform.train.engines.ddp import MODEL_FILE
from deepflow.storage import Storage

__all__ = ["EVALUATIONS_FILE", "committed", "evaluate_run", "pending", "read_evaluations", "step_folder"]

EVALUATIONS_FILE = "evaluations.json"


def step_folder(run_dir: Path, step: int) -> Path:
    return StudyConfig.checkpoints_dir(run_dir) / step_dir_name(step)


def committed(run_dir: Path, step: int) -> bool:
    return (step_folder(run_dir, step) / COMMIT_NAME).is_file()


def read_evaluations(run_dir: Path) -> list[dict[str, Any]]:
    """The records ``{"step", "protocol", "metrics": {name: value}, "seconds"}`` written so far."""
    storage = Storage(str(run_dir))
    return storage.read_json(EVALUATIONS_FILE) if storage.exists(EVALUATIONS_FILE) else []


def _weights(folder: Path, which: str) -> dict[str, torch.Tensor]:
    """EMA weights (``artifacts.load_weights`` of the step folder) or the raw weights of the DDP engine's files."""
    if which == "ema":
        return load_weights(str(folder))[0]
    if not (folder / COMMIT_NAME).is_file():
        raise FileNotFoundError(f"{folder}: no committed checkpoint (did the run train to this step?)")
    path = folder / ENGINE_DIR / MODEL_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing (raw weights of a DDP checkpoint)")
    return load_file(str(path))


def _eval_config(run_cfg: RunConfig, study: StudyConfig, protocol: ProtocolSpec, run_dir: Path) -> RunConfig:
    """The run's config with the protocol's sampler and the study's sample count; grids under study-eval/."""
    out = run_dir / "study-eval" / slug(protocol.label)
    eval_section = run_cfg.eval.model_copy(update={
        "sampler": protocol.sampler, "num_samples": study.num_samples, "all_ranks": False,
        "batch_size": min(run_cfg.eval.batch_size, study.num_samples),
    })
    return run_cfg.model_copy(update={
        "eval": eval_section,
        "run": run_cfg.run.model_copy(update={"output_dir": str(out)}),
        "logging": run_cfg.logging.model_copy(update={"tensorboard_dir": str(out / "tensorboard")}),
    })


def pending(study: StudyConfig, variant: VariantSpec, run_dir: Path) -> list[tuple[int, ProtocolSpec]]:
    """(step, protocol) pairs of this run that have no record yet."""
    done = {(r["step"], r["protocol"]) for r in read_evaluations(run_dir)}
    return [(step, protocol) for step in study.eval_points(variant) for protocol in study.protocols_for(variant, step)
            if (step, protocol.label) not in done]


def evaluate_run(study: StudyConfig, variant: VariantSpec, seed: int, device: torch.device) -> list[dict[str, Any]]:
    """Evaluate every pending (step, protocol) of the run of (variant, seed); returns all its records."""
    from deepflow.platform.train.config import load_config
    from deepflow.platform.train.periodic_eval import Evaluator
    from deepflow.platform.train.tb_logging import TrainLogger

    run_dir = study.run_dir(variant, seed)
    saved = run_dir / "config.yaml"
    if not saved.is_file():
        raise FileNotFoundError(f"{saved}: missing (the run of {variant.label!r} seed {seed} has not started)")
    run_cfg = load_config(saved)
    records = read_evaluations(run_dir)
    if not run_cfg.eval.extractor:
        raise ValueError(f"{saved}: eval.extractor is not set, so there is no metric to compute "
                         "(e.g. eval.extractor=classifier with eval.extractor_options.dataset=fashion_mnist)")
    ctx = DistContext(rank=0, world_size=1, local_rank=0, device=device, backend=None)
    evaluators: dict[str, tuple[Any, Any]] = {}
    try:
        for step, protocol in pending(study, variant, run_dir):
            if protocol.label not in evaluators:
                cfg = _eval_config(run_cfg, study, protocol, run_dir)
                logger = TrainLogger(str(cfg.logging.tensorboard_dir), enabled=True)
                evaluators[protocol.label] = (Evaluator(cfg, ctx, logger), logger)
            evaluator, _ = evaluators[protocol.label]
            started = time.perf_counter()
            metrics = evaluator.run(_weights(step_folder(run_dir, step), protocol.weights), step)
            records.append({"step": step, "protocol": protocol.label, "seconds": time.perf_counter() - started,
                            "metrics": {name.removeprefix("eval/"): value for name, value in metrics.items()}})
            Storage(str(run_dir)).write_json(EVALUATIONS_FILE, records)  # atomic: a kill keeps the old list
    finally:
        for _, logger in evaluators.values():
            logger.close()
    return records
