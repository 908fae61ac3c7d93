"""One validated configuration tree for a training run.

A run is described by a YAML file whose top-level sections mirror :class:`RunConfig`. Dotted overrides
(``--set optim.lr=2e-4``) are applied to the raw YAML tree before validation; their values are parsed as YAML
scalars (``2e-4`` -> float, ``true`` -> bool, ``[1, 2]`` -> list, ``null`` -> None).

Every section forbids unknown keys, so a typo fails loudly (with the close matches). Validation happens before any
process group is created; :class:`ConfigError` carries one line per problem, each starting with the field path, e.g.
``optim.lr: Input should be greater than 0``. It also checks that the model can be built (:func:`check_model_shape`:
depth vs branches, key layers, width vs heads, input vs patch size) and that URLs have a known protocol;
:func:`resolve_model_for_dataset` checks the model against the dataset's manifest (channels, size, classes, text vs
class labels) and :func:`resume_changes` lists what differs from a checkpoint's saved config (changes of the fields
in :data:`RESUME_FIXED_FIELDS` cannot resume).
"""

from __future__ import annotations

import difflib
import io
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import yaml
from pydantic import Field, field_validator, model_validator

from deepflow.artifacts import Manifest
from deepflow.configuration import (
    ConfigError,
    ConfigSection,
    StorageURL,
    apply_overrides,
    load_validated,
    validate_tree,
)
from deepflow.models.branches import VERA_MODES, check_key_layers
from deepflow.models.registry import MMDIT_HIDDEN_PER_LAYER, SIZES, ModelSpec, model_spec, parse_model_name
from deepflow.platform.inference.generate import SamplerConfig
from deepflow.storage import is_remote_url, write_url_text

__all__ = [
    "ConfigError",
    "RunConfig",
    "load_config",
    "save_config",
    "config_to_yaml",
    "apply_overrides",
    "config_from_tree",
    "is_remote_url",
    "storage_options_for",
    "resolve_model_for_dataset",
    "check_world_sizes",
    "ConfigChange",
    "RESUME_FIXED_FIELDS",
    "RESUME_FREE_FIELDS",
    "check_model_shape",
    "model_architecture",
    "resume_changes",
]


_Section = ConfigSection


class RunSection(_Section):
    """Identity of the run and where its outputs go (any fsspec URL or local path)."""

    name: str = Field("run", min_length=1)
    output_dir: StorageURL = Field("runs/default", min_length=1)
    seed: int = Field(0, ge=0)


class ModelSection(_Section):
    """Arguments of ``deepflow.models.create_model``.

    Text-to-image models ("MMDiT-{depth}", "DeepFlow-MMDiT-{depth}-{k}T") take their depth from the name and have no
    classes: ``num_classes`` is ignored for them, ``class_dropout`` is the text-dropout probability, and the text
    widths go in ``extra`` (``context_dim``, ``pooled_dim``; filled from / checked against the dataset manifest's
    ``text.dim`` / ``text.pooled_dim`` by :func:`resolve_model_for_dataset`).
    """

    name: str = "DeepFlow-B/2-2T"
    depth: int | None = Field(None, ge=1)
    input_size: int = Field(32, ge=1)
    in_channels: int = Field(4, ge=1)
    num_classes: int = Field(1000, ge=1)
    ssl_align: bool = False
    class_dropout: float = Field(0.1, ge=0.0, lt=1.0)
    gradient_checkpointing: bool = False
    hidden_size: int | None = Field(None, ge=1)
    num_heads: int | None = Field(None, ge=1)
    extra: dict[str, Any] = Field(default_factory=dict, description="further create_model keyword overrides")

    @field_validator("name")
    @classmethod
    def _registered(cls, name: str) -> str:
        model_spec(name)  # ValueError naming the close matches
        return name

    @property
    def spec(self) -> ModelSpec:
        """The registry's description of ``name`` (class, condition kind, branches, accepted overrides)."""
        return model_spec(self.name)

    @property
    def is_text(self) -> bool:
        """True for text-conditioned (MMDiT) models, False for class-conditional DiT/SiT models."""
        return self.spec.condition == "text"

    def create_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``create_model(self.name, **kwargs)`` (only the ones that are set and accepted:
        text models take no ``num_classes``, names that fix the depth take no ``depth``)."""
        spec = self.spec
        kwargs: dict[str, Any] = {
            "input_size": self.input_size,
            "in_channels": self.in_channels,
            "ssl_align": self.ssl_align,
            "class_dropout": self.class_dropout,
        }
        if spec.takes_classes:
            kwargs["num_classes"] = self.num_classes
        keys = ("hidden_size", "num_heads") if spec.depth_in_name else ("depth", "hidden_size", "num_heads")
        for key in keys:
            value = getattr(self, key)
            if value is not None:
                kwargs[key] = value
        kwargs.update(self.extra)
        return kwargs


class ObjectiveSection(_Section):
    """Arguments of ``deepflow.models.flow.FlowObjective``."""

    time_sampling: Literal["uniform", "lognormal"] = "lognormal"
    alpha: float = Field(0.01, ge=0.0, le=1.0)
    betas: list[float] | None = None
    acc_weight: float = Field(1.0, ge=0.0)
    proj_weight: float = Field(0.5, ge=0.0)


class DataSection(_Section):
    """Training shards (see docs/architecture.md, Data) and batch size."""

    url: StorageURL = Field("", description="dataset directory URL holding manifest.json and shards")
    storage_options: dict[str, Any] = Field(default_factory=dict)
    endpoint_url: str | None = None
    global_batch_size: int = Field(256, ge=1)
    num_workers: int = Field(0, ge=0, description="background reader threads per rank (speed only, not order)")
    shuffle_buffer: int = Field(1000, ge=0, description="minimum samples shuffled together in each stream")
    streams: int = Field(
        0, ge=0,
        description="sample streams the global batch is drawn from (the order's unit; a run resumes on any "
        "number of ranks that divides it); 0: chosen from the global batch and the shard count at the first start",
    )
    flip: bool = True
    on_error: Literal["skip", "raise"] = Field(
        "skip", description="a corrupt or missing shard: skip it (named once, counted in TensorBoard; the next "
        "readable shard of the epoch's order takes its place) or stop the run"
    )

    def resolved_storage_options(self) -> dict[str, Any] | None:
        """``storage_options`` with ``endpoint_url`` folded into s3fs's ``client_kwargs``."""
        options = dict(self.storage_options)
        if self.endpoint_url:
            client_kwargs = dict(options.get("client_kwargs", {}))
            client_kwargs["endpoint_url"] = self.endpoint_url
            options["client_kwargs"] = client_kwargs
        return options or None


class OptimSection(_Section):
    """AdamW hyper-parameters (the paper: lr 1e-4, betas (0.9, 0.999), no weight decay, clip 1.0)."""

    lr: float = Field(1e-4, gt=0.0)
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = Field(0.0, ge=0.0)
    eps: float = Field(1e-8, gt=0.0)
    grad_clip: float = Field(1.0, ge=0.0, description="max global grad norm; 0 disables clipping")
    warmup_steps: int = Field(0, ge=0)

    @field_validator("betas")
    @classmethod
    def _check_betas(cls, betas: tuple[float, float]) -> tuple[float, float]:
        if not all(0.0 <= beta < 1.0 for beta in betas):
            raise ValueError(f"each beta must lie in [0, 1), got {list(betas)}")
        return betas


class ScheduleSection(_Section):
    """Length of the run and how it is split into micro-steps."""

    total_steps: int = Field(400_000, ge=1)
    grad_accumulation: int = Field(1, ge=1)
    log_every: int = Field(100, ge=1)
    max_nonfinite_steps: int = Field(
        10, ge=1, description="stop the run after this many consecutive steps with a NaN/inf loss"
    )


class DistributedSection(_Section):
    """Engine and its options."""

    engine: str = Field("ddp", description="a registered engine: ddp, fsdp, deepspeed (engines.ENGINES)")
    zero_stage: Literal[1, 2, 3] = 2
    compile: bool | Literal["auto"] = Field(
        "auto", description="torch.compile every transformer block (forward and backward): true, false, or auto = "
        "on CUDA devices only (on a CPU the build costs minutes and the step gains little)",
    )
    backend: Literal["auto", "nccl", "gloo"] = "auto"
    collective_timeout_s: float = Field(
        300.0, gt=0.0, description="a collective that waits longer (a peer died) fails the rank, so the Job restarts"
    )
    rendezvous_timeout_s: float = Field(
        300.0, gt=0.0, description="how long the ranks wait for each other at start-up"
    )

    def compile_on(self, device_type: str) -> bool:
        """Whether the engine compiles the model on a ``device_type`` ("cuda", "cpu", ...) device."""
        return device_type == "cuda" if self.compile == "auto" else bool(self.compile)

    @field_validator("engine")
    @classmethod
    def _registered_engine(cls, name: str) -> str:
        from deepflow.platform.train.engines import ENGINES

        if name not in ENGINES:
            close = difflib.get_close_matches(name, list(ENGINES), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ValueError(f"unknown engine {name!r} (registered: {', '.join(sorted(ENGINES))}){hint}")
        return name


class CheckpointSection(_Section):
    """Where and how often checkpoints are written."""

    url: StorageURL | None = Field(None, description="defaults to <run.output_dir>/checkpoints")
    every: int = Field(5000, ge=1)
    keep_last: int = Field(3, ge=1)
    async_save: bool = Field(False, alias="async")
    resume: bool = True
    storage_options: dict[str, Any] = Field(default_factory=dict)
    export_ema: bool = Field(True, description="write export.safetensors (EMA weights) at the end of the run")
    export_diffusers: bool = Field(False, description="also write <run.output_dir>/diffusers, the export as a "
                                   "diffusers pipeline folder (`deepflow export --format diffusers`)")


class EMASection(_Section):
    """Exponential moving average of the weights (initialised as a copy of the model)."""

    enabled: bool = True
    decay: float = Field(0.9999, ge=0.0, le=1.0)
    start_step: int = Field(0, ge=0, description="before this step the EMA copies the weights")
    every: int = Field(1, ge=1)


class EvalSection(_Section):
    """Periodic evaluation: a sample grid and a Frechet distance in the features of ``extractor``; for text-to-image
    models the samples are conditioned on captions of the training shards and, with ``clip_model``, CLIP-scored."""

    every: int = Field(0, ge=0, description="0 disables periodic evaluation")
    num_samples: int = Field(64, ge=1)
    batch_size: int = Field(64, ge=1)
    grid_size: int = Field(16, ge=1)
    all_ranks: bool = Field(False, description="split sampling and feature extraction over all ranks")
    sampler: SamplerConfig = Field(default_factory=SamplerConfig, description="the sampler of the eval samples")
    extractor: str | None = Field(None, description="extractors.build_extractor kind; None: no Frechet distance")
    extractor_options: dict[str, Any] = Field(default_factory=dict)
    reference: str | None = Field(
        None, description="npz with mu/sigma (or arr_0 uint8 images); 'data': statistics of the training shards"
    )
    reference_samples: int = Field(1000, ge=2)
    vae: str | None = Field(None, description="diffusers AutoencoderKL id/path to decode latent samples")
    clip_model: str | None = Field(
        None, description="open_clip model name for the CLIP score of text-to-image samples (e.g. ViT-L-14); None: off"
    )
    clip_pretrained: str | None = Field(
        None, description="open_clip pretrained tag or local checkpoint path; None: random weights (tests only)"
    )
    clip_model_kwargs: dict[str, Any] = Field(
        default_factory=dict, description="open_clip.create_model architecture overrides (tiny models in tests)"
    )
    clip_batch_size: int = Field(64, ge=1)


class LoggingSection(_Section):
    """TensorBoard (rank 0) and console progress."""

    tensorboard_dir: StorageURL | None = Field(None, description="defaults to <run.output_dir>/tensorboard")
    console_every: int = Field(10, ge=1)
    peak_tflops: float | None = Field(None, gt=0.0, description="device peak for MFU; default by device")
    storage_options: dict[str, Any] = Field(default_factory=dict)


class SSLSection(_Section):
    """Frozen DINOv2 encoder used for REPA alignment targets (only when model.ssl_align)."""

    encoder: str = "facebook/dinov2-base"
    image_size: int = Field(224, ge=14)


class DebugSection(_Section):
    """Fault injection for tests."""

    inject_nan_steps: list[int] = Field(default_factory=list)
    sigkill_at_step: int | None = Field(None, ge=1, description="rank 0 SIGKILLs itself after this step")
    sigterm_at_step: int | None = Field(None, ge=1, description="every rank receives SIGTERM after this step")
    step_sleep_s: float = Field(0.0, ge=0.0)


class RunConfig(_Section):
    """The whole run. ``precision`` is fp32, bf16 (autocast / FSDP MixedPrecision / DeepSpeed bf16), fp16, or auto
    (bf16 where the device computes it natively, else fp32: :mod:`deepflow.precision`; the trainer resolves it and
    the resolved value is what checkpoints and exports record)."""

    run: RunSection = Field(default_factory=RunSection)
    model: ModelSection = Field(default_factory=ModelSection)
    objective: ObjectiveSection = Field(default_factory=ObjectiveSection)
    data: DataSection = Field(default_factory=DataSection)
    optim: OptimSection = Field(default_factory=OptimSection)
    schedule: ScheduleSection = Field(default_factory=ScheduleSection)
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "fp32"
    distributed: DistributedSection = Field(default_factory=DistributedSection)
    checkpoint: CheckpointSection = Field(default_factory=CheckpointSection)
    ema: EMASection = Field(default_factory=EMASection)
    eval: EvalSection = Field(default_factory=EvalSection)
    logging: LoggingSection = Field(default_factory=LoggingSection)
    ssl: SSLSection = Field(default_factory=SSLSection)
    debug: DebugSection = Field(default_factory=DebugSection)

    @model_validator(mode="after")
    def _cross_checks(self) -> "RunConfig":
        from deepflow.platform.train.engines import ENGINES

        supported = ENGINES[self.distributed.engine].precisions
        if self.precision != "auto" and self.precision not in supported:
            raise ValueError(f"precision: {self.precision} is not supported with distributed.engine="
                             f"{self.distributed.engine}; use one of {', '.join(supported)}")
        if self.model.ssl_align and self.objective.proj_weight == 0.0:
            raise ValueError("objective.proj_weight: must be > 0 when model.ssl_align is true")
        self._check_model_extra()
        check_model_shape(self.model)
        if self.model.is_text:
            self._check_text_model()
        elif self.eval.clip_model is not None:
            raise ValueError(
                f"eval.clip_model: CLIP score needs a text-to-image model (an MMDiT), got model.name={self.model.name}"
            )
        return self

    def _check_model_extra(self) -> None:
        """``model.extra`` keys must be overrides the model accepts (the named fields have their own keys)."""
        spec = self.model.spec
        named = {"depth", "input_size", "in_channels", "num_classes", "ssl_align", "class_dropout", "hidden_size",
                 "num_heads"}
        allowed = sorted(spec.accepted_overrides - named)
        for key in self.model.extra:
            if key not in spec.accepted_overrides and key not in ("num_classes", "depth", "text_dropout"):
                close = difflib.get_close_matches(key, allowed, n=2)
                hint = f" (did you mean {' or '.join(close)}?)" if close else ""
                raise ValueError(f"model.extra.{key}: not an option of {self.model.name}{hint}; allowed: {allowed}")

    def _check_text_model(self) -> None:
        model = self.model
        depth = model.spec.depth
        if model.depth is not None and model.depth != depth:
            raise ValueError(
                f"model.depth: {model.depth} contradicts model.name={model.name} (depth {depth}); the depth of an "
                "MMDiT is part of its name: remove model.depth or rename the model"
            )
        for key in ("num_classes", "depth", "text_dropout"):
            if key in model.extra:
                where = {"num_classes": "text models have no classes", "depth": "the depth is part of model.name",
                         "text_dropout": "use model.class_dropout (the condition-drop probability)"}[key]
                raise ValueError(f"model.extra.{key}: not allowed for {model.name}: {where}")
        for key in ("context_dim", "pooled_dim", "max_text_length"):
            value = model.extra.get(key)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise ValueError(f"model.extra.{key}: must be a positive integer, got {value!r}")

    # ----------------------------------------------------------------------------------------------- derived
    @property
    def checkpoint_url(self) -> str:
        return self.checkpoint.url or _join(self.run.output_dir, "checkpoints")

    @property
    def tensorboard_url(self) -> str:
        return self.logging.tensorboard_dir or _join(self.run.output_dir, "tensorboard")

    def checkpoint_storage_options(self) -> dict[str, Any]:
        return storage_options_for(
            self.checkpoint_url, self.checkpoint.storage_options, self.data.resolved_storage_options()
        )

    def output_storage_options(self) -> dict[str, Any]:
        """For files under run.output_dir (config copy, export, sample PNGs)."""
        return storage_options_for(
            self.run.output_dir, self.checkpoint.storage_options, self.data.resolved_storage_options()
        )

    def tensorboard_storage_options(self) -> dict[str, Any]:
        return storage_options_for(
            self.tensorboard_url,
            self.logging.storage_options,
            self.checkpoint.storage_options,
            self.data.resolved_storage_options(),
        )

    def per_rank_batch_size(self, world_size: int) -> int:
        """Micro-batch per rank; raises ConfigError naming ``data.global_batch_size`` if it does not divide."""
        denominator = world_size * self.schedule.grad_accumulation
        if self.data.global_batch_size % denominator:
            raise ConfigError(
                f"data.global_batch_size: {self.data.global_batch_size} is not divisible by world_size "
                f"({world_size}) x schedule.grad_accumulation ({self.schedule.grad_accumulation})"
            )
        per_rank = self.data.global_batch_size // denominator
        streams = self.data.streams
        if streams and streams % world_size:
            divisors = [n for n in range(1, streams + 1) if streams % n == 0]
            raise ConfigError(
                f"data.streams: the run's {streams} sample streams cannot be split evenly over {world_size} ranks; "
                f"run on a number of ranks that divides {streams} ({', '.join(map(str, divisors))})"
            )
        return per_rank

    @property
    def micro_batch_size(self) -> int:
        """Samples of one micro-step over all ranks: data.global_batch_size / schedule.grad_accumulation."""
        return self.data.global_batch_size // self.schedule.grad_accumulation


def model_architecture(model: ModelSection) -> dict[str, Any]:
    """What ``create_model(model.name, **model.create_kwargs())`` builds: depth, hidden_size, num_heads,
    patch_size, key_layers (None: evenly spaced), acc_widths, vera_mode (the registry's defaults + the overrides)."""
    spec = model.spec
    kwargs = model.create_kwargs()
    if spec.depth_in_name:
        depth, hidden, heads, patch = spec.depth, MMDIT_HIDDEN_PER_LAYER * spec.depth, spec.depth, 2
    else:
        size, patch, _ = parse_model_name(model.name)
        hidden, heads, _ = SIZES[size]
        depth = kwargs.get("depth") or spec.depth
    return {
        "depth": depth, "hidden_size": kwargs.get("hidden_size", hidden), "num_heads": kwargs.get("num_heads", heads),
        "patch_size": kwargs.get("patch_size", patch), "key_layers": kwargs.get("key_layers"),
        "acc_widths": kwargs.get("acc_widths"), "vera_mode": kwargs.get("vera_mode", "full"),
    }


def check_model_shape(model: ModelSection) -> None:
    """ValueError naming the field for a model that cannot be built: depth below the branch count, key layers that
    do not fit the depth, a width not divisible by the heads (or by 4, the sin-cos position embedding), an input
    size not divisible by the patch size, malformed ``acc_widths`` / ``vera_mode``, SSL alignment without VeRA."""
    arch, k, name = model_architecture(model), model.spec.num_branches, model.name
    depth_field = "model.name" if model.spec.depth_in_name else "model.depth"
    if arch["depth"] < k:
        raise ValueError(f"{depth_field}: depth {arch['depth']} is smaller than the {k} branches of {name}")
    _check_key_layers(arch["key_layers"], arch["depth"], k)
    hidden, heads = arch["hidden_size"], arch["num_heads"]
    if hidden % heads:
        raise ValueError(f"model.hidden_size: {hidden} is not divisible by model.num_heads ({heads}) of {name}")
    if hidden % 4:
        raise ValueError(f"model.hidden_size: {hidden} must be divisible by 4 (sin-cos position embedding)")
    if model.input_size % arch["patch_size"]:
        raise ValueError(f"model.input_size: {model.input_size} is not divisible by the patch size "
                         f"{arch['patch_size']} of {name}")
    widths = arch["acc_widths"]  # the widths of the VeRA blocks (models with >= 2 branches)
    if k > 1 and widths is not None and not _positive_ints(widths, 3):
        raise ValueError(f"model.extra.acc_widths: must be 3 positive integers, got {widths!r}")
    if arch["vera_mode"] not in VERA_MODES:
        raise ValueError(f"model.extra.vera_mode: {arch['vera_mode']!r} is not one of {', '.join(VERA_MODES)}")
    if model.ssl_align and (k < 2 or arch["vera_mode"] == "identity"):
        raise ValueError(f"model.ssl_align: {name} has no VeRA blocks to put the SSL projectors on (needs >= 2 "
                         "branches and model.extra.vera_mode other than 'identity')")


def _positive_ints(value: Any, count: int) -> bool:
    """True for a list / tuple of ``count`` positive integers."""
    return (isinstance(value, (list, tuple)) and len(value) == count
            and all(isinstance(item, int) and not isinstance(item, bool) and item >= 1 for item in value))


def _check_key_layers(key_layers: Any, depth: int, k: int) -> None:
    """``model.extra.key_layers``: k strictly increasing 1-based block counts ending with the depth."""
    if key_layers is None:
        return
    if not isinstance(key_layers, (list, tuple)) or not all(isinstance(b, int) for b in key_layers):
        raise ValueError(f"model.extra.key_layers: must be a list of {k} block counts, got {key_layers!r}")
    try:
        if len(key_layers) != k:
            raise ValueError("wrong length")
        check_key_layers(list(key_layers), depth)
    except ValueError:
        raise ValueError(f"model.extra.key_layers: {list(key_layers)} must be {k} strictly increasing block counts "
                         f"ending with the depth ({depth})") from None


def resolve_model_for_dataset(cfg: RunConfig, manifest: Manifest | None,
                              world_sizes: Sequence[int] = ()) -> RunConfig:
    """Check the model against the dataset's manifest and fill what the dataset decides; return the updated config.

    Every model: ``model.in_channels`` / ``model.input_size`` must equal the manifest's ``shape`` [C,H,W] (VAE
    latents or pixels). Class-conditional models are refused on caption datasets (no labels) and need
    ``model.num_classes`` >= the dataset's ``num_classes``. Text models need a caption dataset (manifest ``text``
    set); ``model.extra.context_dim`` / ``pooled_dim`` are taken from the manifest's ``text.dim`` /
    ``text.pooled_dim`` when unset and must equal them when set; ``max_text_length`` (FLOP count only) is filled
    from ``text.max_length``. Every mismatch is a :class:`ConfigError` naming the field. A config without a
    manifest is returned unchanged.

    ``world_sizes``: every world size an elastic run can take (``torchrun --nnodes MIN:MAX``: n * nproc for n in
    [MIN, MAX]; empty for a fixed-size run): each must divide the global batch (with the accumulation) and
    ``data.streams``, and an automatic stream count is chosen among the numbers they all divide.
    """
    if manifest is None:
        return cfg
    updated = cfg.model_copy(deep=True)
    if cfg.model.is_text:
        updated.model.extra = _text_extra(cfg, manifest)
    else:
        _check_class_dataset(cfg, manifest)
    _check_sample_shape(cfg, manifest)
    check_world_sizes(cfg, world_sizes)
    updated.data.streams = _resolve_streams(cfg, manifest, world_sizes)
    check_world_sizes(updated, world_sizes)
    return updated


def check_world_sizes(cfg: RunConfig, world_sizes: Sequence[int]) -> None:
    """Every world size in ``world_sizes`` splits the micro-step batch (``data.global_batch_size``) and a fixed
    ``data.streams``; otherwise one :class:`ConfigError` naming the field and the sizes that do not divide."""
    sizes = sorted(set(world_sizes))
    micro = cfg.micro_batch_size
    bad = [n for n in sizes if cfg.data.global_batch_size % (n * cfg.schedule.grad_accumulation)]
    if bad:
        raise ConfigError(
            f"data.global_batch_size: {cfg.data.global_batch_size} (x schedule.grad_accumulation "
            f"{cfg.schedule.grad_accumulation}) cannot be split over world size(s) {_sizes(bad)} of the elastic "
            f"range {_sizes(sizes)}; use a multiple of {math.lcm(*sizes) * cfg.schedule.grad_accumulation}"
        )
    streams = cfg.data.streams
    bad = [n for n in sizes if streams and streams % n]
    if bad:
        raise ConfigError(
            f"data.streams: {streams} streams cannot be split over world size(s) {_sizes(bad)} of the elastic range "
            f"{_sizes(sizes)}; use a multiple of {math.lcm(*sizes)} that divides {micro}, or 0 (automatic)"
        )


def _sizes(sizes: Sequence[int]) -> str:
    return ", ".join(map(str, sizes))


#: auto ``data.streams``: the shard counts of the streams may differ by at most this fraction (a stream with fewer
#: shards cycles through its samples faster, so they would be drawn more often)
STREAM_IMBALANCE = 0.1


def _balanced(shards: int, streams: int) -> bool:
    """Every stream gets the same number of shards, or the counts differ by at most :data:`STREAM_IMBALANCE`."""
    return shards % streams == 0 or shards // streams >= round(1 / STREAM_IMBALANCE)


def _resolve_streams(cfg: RunConfig, manifest: Manifest, world_sizes: Sequence[int] = ()) -> int:
    """``data.streams``, or when 0 the largest divisor of the micro-step batch (global batch / accumulation) that
    splits the dataset's non-empty shards evenly (within :data:`STREAM_IMBALANCE`), so that every sample is drawn
    equally often and the run resumes on any number of ranks that divides it; with ``world_sizes`` (an elastic
    run), the largest such number that every one of them divides."""
    micro = cfg.micro_batch_size
    shards = sum(1 for shard in manifest.shards if int(shard.num_samples) > 0)
    streams = cfg.data.streams
    if streams:
        if micro % streams:
            raise ConfigError(f"data.streams: {streams} must divide the micro-step batch of {micro} samples "
                              "(data.global_batch_size / schedule.grad_accumulation)")
        if streams > shards:
            raise ConfigError(f"data.streams: {streams} streams need as many non-empty shards, but data.url="
                              f"{cfg.data.url} has {shards}; use fewer streams or precompute smaller shards")
        return streams
    unit = math.lcm(1, *world_sizes)
    choices = [n for n in range(unit, micro + 1, unit)
               if micro % n == 0 and n <= max(shards, 1) and _balanced(shards, n)]
    if not choices:
        raise ConfigError(
            f"data.streams: no automatic stream count suits every world size of the elastic range "
            f"({_sizes(sorted(set(world_sizes)))}: a multiple of {unit}) with {shards} non-empty shards in "
            f"data.url={cfg.data.url}; precompute more (smaller) shards or narrow the range"
        )
    return max(choices)


def _dataset_words(cfg: RunConfig, manifest: Manifest) -> str:
    """``data.url=<url> holds VAE latents [4, 32, 32] [C,H,W]`` (or pixel images)."""
    kind = "VAE latents" if manifest.kind == "vae" else "pixel images"
    return f"data.url={cfg.data.url} holds {kind} of shape {list(manifest.shape)} [C,H,W]"


def _check_sample_shape(cfg: RunConfig, manifest: Manifest) -> None:
    """``model.in_channels`` and ``model.input_size`` equal the dataset's [C, H, W] (square samples)."""
    shape = manifest.shape
    if len(shape) != 3:
        return
    channels, height, width = (int(value) for value in shape)
    model = cfg.model
    if height != width:
        raise ConfigError(f"model.input_size: the model takes square inputs but {_dataset_words(cfg, manifest)}")
    for field_name, value, expected in (("in_channels", model.in_channels, channels),
                                        ("input_size", model.input_size, height)):
        if int(value) != expected:
            raise ConfigError(f"model.{field_name}: {value} does not match the dataset: {_dataset_words(cfg, manifest)}"
                              f"; set model.{field_name}={expected}")


def _check_class_dataset(cfg: RunConfig, manifest: Manifest) -> None:
    """A class-conditional model needs labels (not captions) and an embedding row for every class."""
    model, url = cfg.model, cfg.data.url
    if manifest.text or manifest.has_captions:
        raise ConfigError(
            f"model.name: {model.name} is class-conditional but data.url={url} is a caption dataset (no class "
            "labels); use a text-to-image model such as 'DeepFlow-MMDiT-24-3T'"
        )
    if manifest.num_classes > model.num_classes:
        raise ConfigError(
            f"model.num_classes: {model.num_classes} is smaller than the {manifest.num_classes} classes of "
            f"data.url={url} (labels 0..{manifest.num_classes - 1}); set model.num_classes={manifest.num_classes}"
        )


def _text_extra(cfg: RunConfig, manifest: Manifest) -> dict[str, Any]:
    """``model.extra`` of a text model with the caption widths of the dataset filled in (and checked)."""
    model, url, text = cfg.model, cfg.data.url, manifest.text
    if not text:
        raise ConfigError(
            f"model.name: {model.name} is a text-to-image model but data.url={url} has no caption embeddings "
            "(manifest 'text' is null); precompute the dataset with a text_encoder"
        )
    extra = dict(model.extra)
    for key, manifest_key in (("context_dim", "dim"), ("pooled_dim", "pooled_dim")):
        expected = int(getattr(text, manifest_key))
        given = extra.get(key)
        if given is None:
            extra[key] = expected
        elif int(given) != expected:
            encoder = text.encoder.get("model", "?")
            raise ConfigError(
                f"model.extra.{key}: {given} does not match the dataset's text features: data.url={url} was "
                f"encoded with {encoder} (manifest text.{manifest_key} = {expected}); set model.extra.{key}: "
                f"{expected} or remove it to take it from the manifest"
            )
    if extra.get("max_text_length") is None and text.max_length:
        extra["max_text_length"] = int(text.max_length)
    return extra


def storage_options_for(url: str, *candidates: dict[str, Any] | None) -> dict[str, Any]:
    """The first non-empty candidate when ``url`` is remote, else {} (local filesystems take no S3 options)."""
    if not is_remote_url(url):
        return {}
    for candidate in candidates:
        if candidate:
            return dict(candidate)
    return {}


def _join(base: str, name: str) -> str:
    return base.rstrip("/") + "/" + name


def config_from_tree(tree: dict[str, Any]) -> RunConfig:
    """Validate a raw tree; raise :class:`ConfigError` naming every bad field path."""
    return validate_tree(RunConfig, tree)


def load_config(path: str | os.PathLike[str] | None, overrides: list[str] | None = None) -> RunConfig:
    """Load a YAML run config (local path or storage URL), apply dotted overrides, validate."""
    return load_validated(RunConfig, None if path is None else str(path), overrides)


_SECRET_WORDS = ("secret", "password", "token", "credential", "key")
_NOT_SECRET = {"endpoint_url", "region_name", "client_kwargs", "config_kwargs", "anon", "use_ssl"}


def _redact(node: Any, inside_options: bool = False) -> Any:
    """Replace credential-like values inside any ``storage_options`` mapping by "***"."""
    if isinstance(node, dict):
        out = {}
        for key, value in node.items():
            lowered = str(key).lower()
            if inside_options and lowered not in _NOT_SECRET and any(w in lowered for w in _SECRET_WORDS):
                out[key] = "***"
            else:
                out[key] = _redact(value, inside_options or lowered == "storage_options")
        return out
    if isinstance(node, list):
        return [_redact(item, inside_options) for item in node]
    return node


def config_to_yaml(config: RunConfig, redact_secrets: bool = True) -> str:
    """The fully resolved config (defaults included) as YAML; credentials in storage_options are redacted
    (pass them through the environment: AWS_ACCESS_KEY_ID, GOOGLE_APPLICATION_CREDENTIALS, ...)."""
    data = config.model_dump(mode="json", by_alias=True)
    if redact_secrets:
        data = _redact(data)
    stream = io.StringIO()
    yaml.safe_dump(data, stream, sort_keys=False)
    return stream.getvalue()


def save_config(config: RunConfig, url: str | os.PathLike[str], storage_options: dict[str, Any] | None = None) -> None:
    """Write the resolved config to a local path or fsspec URL."""
    write_url_text(str(url), config_to_yaml(config), storage_options)


# ------------------------------------------------------------------------------------------------- resume
#: settings a checkpoint cannot resume with when changed: the model's shape (every ``model.*`` field except
#: :data:`RESUME_FREE_FIELDS`), the engine and its state layout, and how the global batch is split
RESUME_FIXED_FIELDS = ("model", "distributed.engine", "distributed.zero_stage", "data.global_batch_size",
                       "data.streams", "data.shuffle_buffer", "run.seed", "schedule.grad_accumulation", "precision")
#: fields under a fixed prefix that may still change (no effect on the saved state)
RESUME_FREE_FIELDS = ("model.gradient_checkpointing",)


@dataclass(frozen=True)
class ConfigChange:
    """One field whose value differs between a checkpoint's config and the current one."""

    path: str
    saved: Any
    current: Any

    @property
    def fixed(self) -> bool:
        """True when a checkpoint cannot resume with this change (see :data:`RESUME_FIXED_FIELDS`)."""
        if _under(self.path, RESUME_FREE_FIELDS):
            return False
        return _under(self.path, RESUME_FIXED_FIELDS)

    def __str__(self) -> str:
        return f"{self.path} ({_short(self.saved)} -> {_short(self.current)})"


def _under(path: str, prefixes: tuple[str, ...]) -> bool:
    return any(path == prefix or path.startswith(prefix + ".") for prefix in prefixes)


def _short(value: Any) -> str:
    text = "unset" if value is _ABSENT else repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


_ABSENT = object()


def _flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}`` (lists are values)."""
    if not isinstance(node, dict) or (prefix and not node):
        return {prefix: node}
    flat: dict[str, Any] = {}
    for key, value in node.items():
        flat.update(_flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return flat


def _merged(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    """``base`` updated recursively by ``top``."""
    out = dict(base)
    for key, value in top.items():
        out[key] = _merged(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def resume_changes(saved_yaml: str, cfg: RunConfig) -> list[ConfigChange]:
    """The fields of ``cfg`` that differ from a checkpoint's ``config.yaml`` (both resolved, secrets redacted;
    fields the saved config lacks, e.g. added by a later version, count with their default)."""
    defaults = yaml.safe_load(config_to_yaml(RunConfig()))
    saved = _flatten(_merged(defaults, yaml.safe_load(saved_yaml) or {}))
    current = _flatten(yaml.safe_load(config_to_yaml(cfg)))
    changes = []
    for path in sorted(set(saved) | set(current)):
        before, after = saved.get(path, _ABSENT), current.get(path, _ABSENT)
        if before != after:
            changes.append(ConfigChange(path, before, after))
    return changes
