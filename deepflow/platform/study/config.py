"""The study config: which training runs to make (variants x seeds, all from one base run config) and how to
evaluate their checkpoints (protocols). See ``configs/study/fmnist-convergence.yaml`` for an annotated example.

Every run is ``deepflow train`` of the base config plus, in this order: the study's ``overrides``, the variant's
``set`` and the fields the study owns (``run.output_dir``, ``run.seed``, ``schedule.total_steps``,
``checkpoint.every``/``keep_last``, the checkpoint and TensorBoard folders inside the run folder, ``eval.every=0``:
the study evaluates, not the trainer). Seeds pair the runs:
variants trained with the same seed see the same data order and the same evaluation noise.
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from deepflow.configuration import ConfigError, ConfigSection, load_validated
from deepflow.platform.inference.generate import SamplerConfig
from deepflow.platform.train.config import RunConfig, load_config

__all__ = ["ProtocolSpec", "StudyConfig", "VariantSpec", "ensure_datasets", "load_study", "run_overrides", "slug"]

#: run-config fields the study sets itself (a variant or override that sets them is an error)
STUDY_FIELDS = ("run.output_dir", "run.seed", "schedule.total_steps", "checkpoint.every", "checkpoint.keep_last",
                "checkpoint.url", "logging.tensorboard_dir", "eval.every")


def slug(label: str) -> str:
    """A label as a folder name: ``DeepFlow-2T (lr 5e-4)`` -> ``deepflow-2t-lr-5e-4``."""
    return re.sub(r"[^a-z0-9.]+", "-", label.lower()).strip("-")


class VariantSpec(ConfigSection):
    """One training recipe: the base run config with ``set`` applied."""

    label: str = Field(min_length=1)
    set: list[str] = Field(default_factory=list, description="run-config overrides, key=value")
    curve: bool = Field(True, description="evaluated at every evaluation point (false: only at the last step)")
    seeds: list[int] | None = Field(None, description="default: the study's seeds")
    steps: int | None = Field(None, ge=1, description="default: the study's steps")


class ProtocolSpec(ConfigSection):
    """How a checkpoint is scored: which weights, which sampler. The first protocol is the headline one."""

    label: str = Field(min_length=1)
    weights: Literal["ema", "raw"] = "ema"
    sampler: SamplerConfig = Field(default_factory=SamplerConfig)
    every_point: bool = Field(False, description="at every evaluation point of curve variants (default: last step)")
    variants: list[str] | None = Field(None, description="labels of the variants to score (default: all)")


class StudyConfig(ConfigSection):
    """A convergence study (see the module doc)."""

    name: str = Field("study", min_length=1)
    output_dir: str = Field("runs/study", min_length=1, description="a local folder: runs, evaluations, report")
    base_config: str = Field(min_length=1, description="the run config every run starts from (path, relative to "
                             "this file)")
    precompute_config: str | None = Field(None, description="precompute config (relative to this file) that "
                                          "builds the runs' data.url when it has no manifest yet")
    overrides: list[str] = Field(default_factory=list, description="run-config overrides of every run")
    seeds: list[int] = Field(default_factory=lambda: [0, 1, 2], min_length=1)
    steps: int = Field(ge=1)
    eval_every: int = Field(ge=1, description="evaluation points: every eval_every steps and the last step")
    num_samples: int = Field(1000, ge=2, description="samples per evaluation")
    variants: list[VariantSpec] = Field(min_length=1)
    protocols: list[ProtocolSpec] = Field(min_length=1)
    parallel: int | Literal["auto"] = Field("auto", description="runs at once; auto: GPUs / nproc_per_run on a GPU "
                                            "machine, else cores / (threads_per_run x nproc_per_run)")
    threads_per_run: int = Field(1, ge=1, description="CPU threads of each run (OMP_NUM_THREADS)")
    nproc_per_run: int = Field(1, ge=1, description="ranks per run (torchrun when > 1); GPUs are split between runs")
    compare: tuple[str, str] | None = Field(None, description="(baseline, method) labels compared in the report; "
                                            "default: the first two variants")

    @field_validator("seeds")
    @classmethod
    def _distinct(cls, seeds: list[int]) -> list[int]:
        if len(set(seeds)) != len(seeds) or min(seeds) < 0:
            raise ValueError(f"must be distinct non-negative integers, got {seeds}")
        return seeds

    @model_validator(mode="after")
    def _consistent(self) -> StudyConfig:
        labels = [v.label for v in self.variants]
        repeated = sorted({label for label in labels if labels.count(label) > 1})
        if repeated:
            raise ValueError(f"variants: labels must be unique, {repeated} repeat")
        slugs = [slug(label) for label in labels]
        if len(set(slugs)) != len(slugs):
            raise ValueError(f"variants: labels {labels} name the same folders {slugs}")
        for protocol in self.protocols:
            unknown = [name for name in protocol.variants or [] if name not in labels]
            if unknown:
                raise ValueError(f"protocols: {protocol.label!r} names unknown variants {unknown} (known: {labels})")
        protocol_labels = [p.label for p in self.protocols]
        if len(set(map(slug, protocol_labels))) != len(protocol_labels):
            raise ValueError(f"protocols: labels {protocol_labels} must be unique")
        for pair in [self.compare] if self.compare else []:
            unknown = [name for name in pair if name not in labels]
            if unknown:
                raise ValueError(f"compare: unknown variants {unknown} (known: {labels})")
        if self.compare is None and len(labels) < 2:
            raise ValueError("variants: a study compares at least two variants")
        return self

    # ------------------------------------------------------------------------------------------------ plan
    @property
    def comparison(self) -> tuple[str, str]:
        return self.compare or (self.variants[0].label, self.variants[1].label)

    def variant(self, label: str) -> VariantSpec:
        return next(v for v in self.variants if v.label == label)

    def seeds_of(self, variant: VariantSpec) -> list[int]:
        return variant.seeds if variant.seeds is not None else self.seeds

    def steps_of(self, variant: VariantSpec) -> int:
        return variant.steps or self.steps

    def eval_points(self, variant: VariantSpec) -> list[int]:
        """Steps at which the variant's checkpoints are evaluated (always including its last step)."""
        steps = self.steps_of(variant)
        if not variant.curve:
            return [steps]
        return sorted(set(range(self.eval_every, steps + 1, self.eval_every)) | {steps})

    def protocols_for(self, variant: VariantSpec, step: int) -> list[ProtocolSpec]:
        """Protocols that score ``variant`` at ``step``: the headline one wherever the variant is evaluated, the
        others at the last step (or every point when ``every_point``)."""
        last = step == self.steps_of(variant)
        return [
            p for index, p in enumerate(self.protocols)
            if (p.variants is None or variant.label in p.variants) and (index == 0 or p.every_point or last)
        ]

    def run_dir(self, variant: VariantSpec, seed: int) -> Path:
        return Path(self.output_dir) / "runs" / slug(variant.label) / f"seed-{seed}"

    @staticmethod
    def checkpoints_dir(run_dir: Path) -> Path:
        return run_dir / "checkpoints"

    @staticmethod
    def tensorboard_dir(run_dir: Path) -> Path:
        return run_dir / "tensorboard"

    def parallel_runs(self, gpus: int = 0, cpu_count: int | None = None) -> int:
        """Runs at once: ``parallel``, or auto: one per ``nproc_per_run`` GPUs on a GPU machine, else one per
        ``threads_per_run x nproc_per_run`` CPU cores."""
        if self.parallel != "auto":
            return self.parallel
        if gpus:
            return max(1, gpus // self.nproc_per_run)
        return max(1, (cpu_count or os.cpu_count() or 1) // (self.threads_per_run * self.nproc_per_run))


def run_overrides(study: StudyConfig, variant: VariantSpec, seed: int) -> list[str]:
    """The overrides that turn the base config into the run of (variant, seed)."""
    points = study.eval_points(variant)
    run_dir = study.run_dir(variant, seed)
    owned = [
        f"run.output_dir={run_dir}",
        f"run.name={study.name}-{slug(variant.label)}-seed{seed}",
        f"run.seed={seed}",
        f"schedule.total_steps={study.steps_of(variant)}",
        f"checkpoint.every={study.eval_every if variant.curve else study.steps_of(variant)}",
        f"checkpoint.keep_last={len(points) + 1}",
        f"checkpoint.url={study.checkpoints_dir(run_dir)}",
        f"logging.tensorboard_dir={study.tensorboard_dir(run_dir)}",
        "eval.every=0",
    ]
    return [*study.overrides, *variant.set, *owned]


def _check_owned(where: str, overrides: list[str]) -> None:
    for assignment in overrides:
        key = assignment.split("=", 1)[0].strip()
        if key in STUDY_FIELDS:
            raise ConfigError(f"{where}: {key} is set by the study (steps, seeds, eval_every, output_dir); remove it")


def _relative_file(field: str, name: str, study_path: str | Path) -> Path:
    """``name`` resolved against the study file's folder; a ConfigError naming ``field`` when it is no file."""
    resolved = Path(name) if Path(name).is_absolute() else Path(study_path).resolve().parent / name
    if not resolved.is_file():
        raise ConfigError(f"{field}: {resolved} is not a file (paths are relative to {study_path})")
    return resolved


def load_study(path: str | Path, overrides: list[str] | None = None) -> tuple[StudyConfig, dict[str, RunConfig]]:
    """The study config and the run config of every variant (seed 0's), all validated up front: a typo anywhere
    is one error naming the variant and the field."""
    study = load_validated(StudyConfig, str(path), overrides)
    base = _relative_file("base_config", study.base_config, path)
    study.base_config = str(base)
    if study.precompute_config is not None:
        study.precompute_config = str(_relative_file("precompute_config", study.precompute_config, path))
    _check_owned("overrides", study.overrides)
    configs: dict[str, RunConfig] = {}
    for variant in study.variants:
        _check_owned(f"variants[{variant.label}].set", variant.set)
        try:
            configs[variant.label] = load_config(base, run_overrides(study, variant, study.seeds_of(variant)[0]))
        except ConfigError as error:
            raise ConfigError(f"variants[{variant.label}]: {error}") from None
    _check_weights(study, configs)
    return study, configs


def _check_weights(study: StudyConfig, configs: dict[str, RunConfig]) -> None:
    """Raw (non-EMA) weights are read from the DDP engine's checkpoint files (others shard them)."""
    for protocol in study.protocols:
        if protocol.weights != "raw":
            continue
        for label in protocol.variants or list(configs):
            engine = configs[label].distributed.engine
            if engine != "ddp":
                raise ConfigError(f"protocols[{protocol.label}].weights: raw weights need distributed.engine=ddp "
                                  f"(variant {label!r} trains with {engine}, whose checkpoints shard them)")


def describe(study: StudyConfig) -> dict[str, Any]:
    """A JSON-able record of the study (written beside its results)."""
    return study.model_dump(mode="json")


def ensure_datasets(study: StudyConfig, configs: dict[str, RunConfig], print_line: Any = print) -> None:
    """Build every run's ``data.url`` that has no manifest yet with ``precompute_config`` (when given)."""
    from deepflow.artifacts import MANIFEST_NAME
    from deepflow.storage import Storage

    for url in sorted({cfg.data.url for cfg in configs.values()}):
        if study.precompute_config is None or Storage(url).exists(MANIFEST_NAME):
            continue
        from deepflow.data_pipeline.config import load_config as load_precompute_config
        from deepflow.data_pipeline.precompute import run_precompute

        print_line(f"precomputing {url} with {study.precompute_config}")
        run_precompute(load_precompute_config(study.precompute_config, [f"output.url={url}"]), 0, 1, progress=True)
