"""The one generate path: condition plan -> sampler -> decoder -> uint8, used by the batch sampling job and by the
periodic evaluation during training.

Sample ``i`` is a function of (seed, i) and the settings only: its initial noise comes from a generator seeded by
(seed, 0, i); the SDE's per-step noise of a batch from a generator seeded by (seed, 1, first index of the batch);
its condition from the plan (``conditions``). So neither the batch a sample falls in (for the ODE samplers), nor
the world size, nor a restart changes it.

Decoding: pixel models are mapped from [-1, 1]; latent models go through a diffusers ``AutoencoderKL``
(``vae.decode(z / latent_scale)``), the scale being the one recorded with the model or its data, else
:data:`DEFAULT_LATENT_SCALE`. uint8 = clamp(127.5 x + 128, 0, 255) truncated (:func:`to_uint8`, the DiT / ADM rule
the FID reference batches were made with; it maps dataset pixels u/127.5 - 1 back to u exactly).
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from pydantic import Field, ValidationInfo, field_validator, model_validator

from deepflow.artifacts import SD_VAE_LATENT_SCALE, Manifest, ModelCard
from deepflow.configuration import ConfigSection
from deepflow.models import create_model
from deepflow.models.sampling import PRESETS, Diffusion, Grid, LastStep, Method, forward_passes, sample
from deepflow.platform.inference.conditions import ConditionPlan, seed_for

__all__ = [
    "DEFAULT_LATENT_SCALE",
    "DecodeSpec",
    "Decoder",
    "SamplerConfig",
    "build_model",
    "generate",
    "inference_forward",
    "initial_noise",
    "latent_scale",
    "sample_latents",
    "to_uint8",
]

#: Latent scale of the SD VAE (stabilityai/sd-vae-ft-*), used when neither the model nor its data records one.
DEFAULT_LATENT_SCALE = SD_VAE_LATENT_SCALE
_AUTOCAST = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


class SamplerConfig(ConfigSection):
    """How a sample is integrated from noise (``deepflow.models.sampling.sample``; forward passes per image:
    ``deepflow.models.sampling.forward_passes``). ``preset`` fills in the fields this config does not set from a
    named setting (``deepflow.models.sampling.PRESETS``): "paper" (SDE 250, the FID protocol) or "fast"."""

    preset: Literal["paper", "fast"] | None = Field(
        None, description="named setting whose fields fill in those not given here: paper (SDE 250, the paper's FID "
        "protocol, for reported numbers) or fast (a tenth of the forward passes at the same quality in our study)"
    )
    method: Method = Field("sde", description="sde (Euler-Maruyama, the paper's), sde-exp (the same SDE, "
                           "exponential integrator; sde-2m: its second-order multistep form), euler, heun, midpoint, "
                           "dpm++2m (ODE), accel (experimental)")
    steps: int = Field(250, ge=1, description="sde: grid points = forward passes; others: intervals (heun, midpoint: "
                       "2 forward passes per interval)")
    cfg_scale: float = Field(1.0, ge=0.0, description="classifier-free guidance scale; 1 = no guidance")
    guidance_interval: tuple[float, float] = Field((0.0, 1.0), description="times t where CFG applies")
    grid: Grid = Field("uniform", description="time grid: uniform in t (with shift) or edm (sigma^(1/rho) spacing)")
    shift: float = Field(1.0, gt=0.0, description="uniform grid: t -> s t / (1 + (s - 1) t); > 1 denser near noise")
    rho: float = Field(7.0, gt=0.0, description="edm grid exponent")
    last_step: LastStep = Field("mean", description="sde: last step to 0: mean (drift only, the paper's), tweedie "
                                "(x0-prediction), euler (ODE step; the same point for this path)")
    last_step_size: float = Field(0.04, gt=0.0, lt=1.0, description="sde: the last grid time before 0")
    diffusion: Diffusion = Field("sbdm", description="sde: diffusion w(t): sbdm (2 norm t, the paper's), sigma "
                                 "(norm t), constant (norm); sde-exp: sbdm only")
    diffusion_norm: float = Field(1.0, ge=0.0, description="sde / sde-exp: the diffusion's scale (0: no noise)")
    compile: bool = Field(
        False, description="torch.compile the inference forward once and reuse it at every step (CUDA graphs on a "
        "GPU); pays off for long sampling jobs, costs a build of tens of seconds"
    )

    @model_validator(mode="before")
    @classmethod
    def _apply_preset(cls, data: Any) -> Any:
        """Fields the preset names and ``data`` does not set take the preset's values."""
        if isinstance(data, dict) and data.get("preset") in PRESETS:
            return {**PRESETS[data["preset"]], **data}
        return data

    @field_validator("steps")
    @classmethod
    def _enough_steps(cls, value: int, info: ValidationInfo) -> int:
        if info.data.get("method") == "sde" and value < 2:
            raise ValueError(f"the SDE sampler needs >= 2 steps (the last one is deterministic), got {value}")
        return value

    @field_validator("guidance_interval")
    @classmethod
    def _ordered(cls, value: tuple[float, float]) -> tuple[float, float]:
        low, high = value
        if not 0.0 <= low <= high <= 1.0:
            raise ValueError(f"must satisfy 0 <= low <= high <= 1, got [{low}, {high}]")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> SamplerConfig:
        if self.grid == "edm" and self.shift != 1.0:
            raise ValueError("shift applies to grid=uniform only (the edm grid's spacing is rho)")
        if self.method == "sde-exp" and self.diffusion != "sbdm":
            raise ValueError(f"method sde-exp integrates diffusion=sbdm only, got {self.diffusion}")
        return self

    def options(self) -> dict[str, Any]:
        """The keyword options of ``sample`` beyond method, steps and guidance."""
        return {"grid": self.grid, "shift": self.shift, "rho": self.rho, "last_step": self.last_step,
                "last_step_size": self.last_step_size, "diffusion": self.diffusion,
                "diffusion_norm": self.diffusion_norm}

    def forward_passes(self) -> int:
        """Network forward passes per image (a guided step counts 2)."""
        return forward_passes(self.method, self.steps, self.cfg_scale, self.guidance_interval, **self.options())


# ----------------------------------------------------------------------------------------------------- images
def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """float [B,C,H,W] in [-1, 1] -> uint8 [B,C,H,W] via clamp(127.5 x + 128, 0, 255) (DiT / ADM)."""
    return torch.clamp(127.5 * images.float() + 128.0, 0, 255).to(torch.uint8)


def latent_scale(*recorded: float | None) -> float:
    """The first recorded scale (an explicit setting first), else :data:`DEFAULT_LATENT_SCALE`."""
    for value in recorded:
        if value:
            return float(value)
    return DEFAULT_LATENT_SCALE


@dataclass(frozen=True)
class DecodeSpec:
    """How model samples become images: ``kind`` "pixel" ([-1, 1] images) or "vae" (latents decoded by ``vae``,
    a diffusers AutoencoderKL hub id or path, at ``scale``)."""

    kind: Literal["vae", "pixel"]
    vae: str | None = None
    scale: float = DEFAULT_LATENT_SCALE

    @classmethod
    def resolve(
        cls,
        mode: Literal["auto", "vae", "pixel"] = "auto",
        *,
        vae: str | None = None,
        scale: float | None = None,
        card: ModelCard | None = None,
        manifest: Manifest | None = None,
        in_channels: int = 3,
    ) -> DecodeSpec:
        """Explicit settings first, then what the model card and the training data's manifest record; with
        nothing recorded, 1- or 3-channel samples are pixels unless a VAE is given."""
        data = manifest or (card.manifest if card is not None else None)
        kind = card.kind if card is not None else None
        kind = kind or (data.kind if data is not None else None)
        if mode != "auto":
            kind = mode
        elif kind is None:
            kind = "vae" if vae or in_channels not in (1, 3) else "pixel"
        if kind == "pixel":
            return cls("pixel")
        vae_id = vae or (card.vae if card is not None else None) or (data.vae_id if data is not None else None)
        return cls("vae", vae_id, latent_scale(scale, card.latent_scale if card is not None else None,
                                               data.latent_scale if data is not None else None))


class Decoder:
    """Model samples [B,C,h,w] -> uint8 images [B,C',H,W] on the CPU; latents go through the VAE in batches of
    ``batch_size``. The VAE is loaded on construction, so a bad id fails before any sampling."""

    def __init__(self, spec: DecodeSpec, device: torch.device | str = "cpu", batch_size: int = 32,
                 field: str = "decode.vae") -> None:
        self.spec, self.batch_size = spec, batch_size
        self.vae: Any = None
        if spec.kind == "vae":
            self.vae = _load_vae(spec.vae, torch.device(device), field)

    @torch.no_grad()
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.vae is None:
            return to_uint8(x).cpu()
        parts = []
        for start in range(0, x.shape[0], self.batch_size):
            z = x[start : start + self.batch_size].to(self.vae.device) / self.spec.scale
            parts.append(to_uint8(self.vae.decode(z.to(self.vae.dtype)).sample).cpu())
        return torch.cat(parts)


def _load_vae(vae_id: str | None, device: torch.device, field: str) -> Any:
    if not vae_id or vae_id == "random_init":
        raise ValueError(f"{field}: a latent model needs a VAE to decode (a diffusers AutoencoderKL hub id or local "
                         f"path); the model and its data record {vae_id!r}")
    from diffusers import AutoencoderKL

    try:
        vae = AutoencoderKL.from_pretrained(vae_id)
    except (OSError, ValueError) as error:
        raise ValueError(f"{field}: cannot load the AutoencoderKL {vae_id!r} ({str(error).splitlines()[0]})") from None
    return vae.to(device).eval().requires_grad_(False)


# ------------------------------------------------------------------------------------------------------ model
def build_model(state: dict[str, torch.Tensor], card: ModelCard, device: torch.device | str) -> torch.nn.Module:
    """``create_model(card.model, **card.kwargs)`` with ``state`` loaded (every parameter present, no unknown
    key); eval mode, no gradients, on ``device``."""
    kwargs = dict(card.kwargs)
    kwargs.pop("gradient_checkpointing", None)
    try:
        model = create_model(card.model, **kwargs)
    except (TypeError, ValueError) as error:
        raise ValueError(f"model card: cannot build {card.model} {kwargs}: {error}") from None
    for prefix in ("module.", "_orig_mod."):
        if state and all(key.startswith(prefix) for key in state):
            state = {key[len(prefix):]: value for key, value in state.items()}
    params = {name for name, _ in model.named_parameters()}
    missing = sorted(params - state.keys())
    unexpected = sorted(state.keys() - model.state_dict().keys())
    if missing or unexpected:
        raise ValueError(f"weights do not fit {card.model} {kwargs}: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}")
    model.load_state_dict(state, strict=False)
    return model.to(device).eval().requires_grad_(False)


# --------------------------------------------------------------------------------------------------- generate
def initial_noise(indices: np.ndarray, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """float32 [len(indices), *shape] on the CPU; row k from a generator seeded by (seed, 0, indices[k])."""
    rows = [torch.randn(shape, generator=torch.Generator().manual_seed(seed_for(seed, 0, int(i)))) for i in indices]
    return torch.stack(rows) if rows else torch.zeros((0, *shape))


_COMPILED: "weakref.WeakKeyDictionary[torch.nn.Module, Any]" = weakref.WeakKeyDictionary()


def inference_forward(model: torch.nn.Module, compile_model: bool) -> Any:
    """The callable the sampler evaluates: ``model`` itself, or its compiled forward (built once per model and
    reused by every later batch; on CUDA with CUDA graphs, ``mode="reduce-overhead"``). Shapes are static: one
    graph for the guided (2B rows) and one for the unguided batch."""
    if not compile_model:
        return model
    if model not in _COMPILED:
        device = next(model.parameters()).device
        mode = "reduce-overhead" if device.type == "cuda" else None
        _COMPILED[model] = torch.compile(model, dynamic=False, mode=mode)
    return _COMPILED[model]


@torch.no_grad()
def sample_latents(
    model: torch.nn.Module,
    noise: torch.Tensor,
    condition: Any,
    sampler: SamplerConfig,
    *,
    generator: torch.Generator | None = None,
    null_label: int | None = None,
    null_condition: Any = None,
    precision: Literal["fp32", "bf16", "fp16"] = "fp32",
) -> torch.Tensor:
    """x0 [B,C,H,W] float32 from ``noise`` [B,C,H,W] (on the model's device) and the condition (labels [B] or a
    text dict), integrated by ``sampler`` under ``precision`` autocast, guided against the null condition."""
    device = noise.device
    dtype = _AUTOCAST[precision]
    forward = inference_forward(model, sampler.compile)
    with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
        x0 = sample(
            forward, noise, condition, method=sampler.method, steps=sampler.steps, cfg_scale=sampler.cfg_scale,
            guidance_interval=tuple(sampler.guidance_interval), null_label=null_label, generator=generator,
            null_condition=null_condition, **sampler.options(),
        )
    return x0.float()


@torch.no_grad()
def generate(
    model: torch.nn.Module,
    plan: ConditionPlan,
    indices: np.ndarray,
    *,
    seed: int,
    sampler: SamplerConfig,
    decoder: Decoder,
    precision: Literal["fp32", "bf16", "fp16"] = "fp32",
) -> torch.Tensor:
    """uint8 images [b,C,H,W] (CPU) of samples ``indices`` (int64 [b], b >= 1), conditioned by ``plan`` and guided
    against its null condition; one batched forward per step (x2 rows with CFG)."""
    device = next(model.parameters()).device
    shape = (model.in_channels, model.input_size, model.input_size)
    noise = initial_noise(indices, shape, seed).to(device)
    generator = torch.Generator(device=device).manual_seed(seed_for(seed, 1, int(indices[0])))
    x0 = sample_latents(model, noise, plan.condition(indices, device), sampler, generator=generator,
                        null_label=plan.null_label, null_condition=plan.null, precision=precision)
    return decoder(x0)
