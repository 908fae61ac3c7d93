"""Samplers for flow models: the paper's SDE (Euler-Maruyama) and exponential integrators of the same SDE, ODE
solvers (Euler, Heun, midpoint, DPM-Solver++(2M)), an experimental step with DeepFlow's acceleration output; time
grids (uniform, shifted, EDM); CFG with a guidance interval; named presets.

``fn(x, t, y) -> v`` is a model or any callable: x [B,C,H,W], t [B] float in [0,1], y the condition: labels [B]
long, or a text dict {"text_emb" [B,L,D], "text_mask" [B,L] bool, "text_pooled" [B,P]} (``deepflow.models.conditions``).
The "accel" method also calls ``fn(x, t, y, return_acceleration=True) -> (v, a)`` (``DeepFlowDiT.forward``).
Integration runs from t = 1 (noise) to t = 0 (data) on the linear path x_t = (1 - t) x0 + t eps, v = eps - x0, so
the x0-prediction is x - t v and the noise prediction x + (1 - t) v.

Forward passes per image (:func:`forward_passes`; a guided step counts 2: the conditional and the unconditional
half): "sde": ``steps`` (steps - 1 stochastic steps on a grid from 1 to ``last_step_size``, then the last step to 0);
"sde-exp", "sde-2m", "euler", "dpm++2m", "accel": ``steps`` (one per interval of a grid 1 -> 0); "heun",
"midpoint": 2 x ``steps``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any, Literal, get_args

import torch
from tqdm.auto import tqdm

from deepflow.models.conditions import (
    Condition,
    NullCondition,
    concat_conditions,
    condition_batch_size,
    is_text_condition,
    null_condition_batch,
)

__all__ = [
    "DIFFUSIONS",
    "GRIDS",
    "LAST_STEPS",
    "METHODS",
    "PRESETS",
    "GuidedVelocity",
    "edm_times",
    "forward_passes",
    "ode_times",
    "sample",
    "sde_times",
    "time_grid",
]

VelocityFn = Callable[..., Any]
Method = Literal["sde", "sde-exp", "sde-2m", "euler", "heun", "midpoint", "dpm++2m", "accel"]
Grid = Literal["uniform", "edm"]
LastStep = Literal["mean", "tweedie", "euler"]
Diffusion = Literal["sbdm", "sigma", "constant"]
METHODS: tuple[str, ...] = get_args(Method)
GRIDS: tuple[str, ...] = get_args(Grid)
LAST_STEPS: tuple[str, ...] = get_args(LastStep)
DIFFUSIONS: tuple[str, ...] = get_args(Diffusion)
#: EDM's noise levels sigma = t / (1 - t) (Karras et al. 2022): the top one is replaced by t = 1
EDM_SIGMA_MAX, EDM_SIGMA_MIN = 80.0, 0.002

#: Named sampler settings (the options of :func:`sample`). "paper": the paper's FID protocol (SDE, 250 steps; the
#: default, for reported numbers). "fast": the paper's SDE at noise level eta = 3 through the second-order exponential
#: integrator, 25 forward passes per image (unguided): it reached SDE 250's classifier FD within the sampling-seed
#: spread in the sampler study (docs/sampling/report.md); on the analytic Gaussian target its samples are 7-9% too
#: wide at 25 steps, so it is for evaluations and previews, not for reported FID.
PRESETS: dict[str, dict[str, Any]] = {
    "paper": {"method": "sde", "steps": 250},
    "fast": {"method": "sde-2m", "steps": 25, "diffusion_norm": 3.0},
}


class GuidedVelocity:
    """Classifier-free guided velocity: v_u + s (v_c - v_u), cond and uncond in ONE batched forward.

    Guidance applies only for lo <= t <= hi and scale != 1; otherwise only the conditional half runs.
    (Guiding the velocity equals guiding the SDE drift: the drift is affine in v with a cond-free offset.)
    The null condition is ``null_condition`` if given, else ``null_label``: an int class id, or for text the
    empty caption's dict of unbatched or [1,...] tensors.
    """

    def __init__(
        self, fn: VelocityFn, y: Condition, cfg_scale: float, guidance_interval: tuple[float, float],
        null_label: int | None, null_condition: NullCondition | None = None,
    ) -> None:
        null = null_condition if null_condition is not None else null_label
        if cfg_scale != 1.0 and null is None:
            if is_text_condition(y):
                raise ValueError(
                    "cfg_scale != 1 with text conditions needs null_condition (the empty caption's encoding)"
                )
            raise ValueError("cfg_scale != 1 needs null_label (the model's num_classes)")
        lo, hi = guidance_interval
        if not 0.0 <= lo <= hi <= 1.0:
            raise ValueError(f"guidance_interval must satisfy 0 <= lo <= hi <= 1, got {guidance_interval}")
        self.fn, self.y, self.scale, self.lo, self.hi = fn, y, cfg_scale, lo, hi
        self.y_both = y
        if null is not None and cfg_scale != 1.0:
            self.y_both = concat_conditions(y, null_condition_batch(null, condition_batch_size(y), y))

    def guided(self, t: float) -> bool:
        """Whether the step at time ``t`` runs the guided pair (2 forward rows per sample)."""
        return self.scale != 1.0 and self.lo <= t <= self.hi

    def __call__(self, x: torch.Tensor, t: float) -> torch.Tensor:
        """x [B,C,H,W] at time t -> guided velocity [B,C,H,W]."""
        b = x.shape[0]
        if not self.guided(t):
            return self.fn(x, torch.full((b,), t, device=x.device, dtype=x.dtype), self.y)
        t_both = torch.full((2 * b,), t, device=x.device, dtype=x.dtype)
        v_cond, v_uncond = self.fn(torch.cat([x, x]), t_both, self.y_both).chunk(2)
        return v_uncond + self.scale * (v_cond - v_uncond)

    def with_acceleration(self, x: torch.Tensor, t: float) -> tuple[torch.Tensor, torch.Tensor]:
        """x [B,C,H,W] at time t -> (guided velocity, guided acceleration), both [B,C,H,W]; ``fn`` must accept
        ``return_acceleration=True`` (DeepFlow models with VeRA blocks)."""
        b = x.shape[0]
        if not self.guided(t):
            return self.fn(x, torch.full((b,), t, device=x.device, dtype=x.dtype), self.y, return_acceleration=True)
        t_both = torch.full((2 * b,), t, device=x.device, dtype=x.dtype)
        v, a = self.fn(torch.cat([x, x]), t_both, self.y_both, return_acceleration=True)
        (v_c, v_u), (a_c, a_u) = v.chunk(2), a.chunk(2)
        return v_u + self.scale * (v_c - v_u), a_u + self.scale * (a_c - a_u)


# ---------------------------------------------------------------------------------------------------- time grids
def sde_times(steps: int, t_min: float = 0.04) -> list[float]:
    """linspace(1, t_min, steps) followed by 0: steps-1 stochastic steps then one deterministic step."""
    if steps < 2:
        raise ValueError(f"the SDE sampler needs steps >= 2, got {steps}")
    grid = torch.linspace(1.0, t_min, steps, dtype=torch.float64).tolist()
    return grid + [0.0]


def ode_times(steps: int) -> list[float]:
    """Uniform grid 1 -> 0 with ``steps`` intervals."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    return torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64).tolist()


def edm_times(points: int, t_low: float, rho: float = 7.0) -> list[float]:
    """``points`` times from 1 down to ``t_low`` > 0, evenly spaced in sigma^(1/rho) with sigma = t / (1 - t)
    (EDM's grid between sigma_max = 80 and sigma(t_low); the first point, sigma_max, is replaced by t = 1)."""
    if points < 1:
        raise ValueError(f"an EDM grid needs >= 1 point, got {points}")
    if points == 1:
        return [1.0]
    low = (t_low / (1.0 - t_low)) ** (1.0 / rho)
    high = EDM_SIGMA_MAX ** (1.0 / rho)
    sigmas = [(high + i / (points - 1) * (low - high)) ** rho for i in range(points)]
    return [1.0] + [s / (1.0 + s) for s in sigmas[1:]]


def _shifted(t: float, shift: float) -> float:
    """SD3's time shift s t / (1 + (s - 1) t): s > 1 spends more steps near the noise, s < 1 near the data."""
    return shift * t / (1.0 + (shift - 1.0) * t)


def time_grid(
    method: str, steps: int, *, grid: str = "uniform", shift: float = 1.0, rho: float = 7.0,
    last_step_size: float = 0.04,
) -> list[float]:
    """The times t_0 = 1 > t_1 > ... > t_n = 0 the sampler steps through.

    "sde": ``steps`` points from 1 to ``last_step_size``, then 0 (the uniform, unshifted grid is
    :func:`sde_times`). Every other method: ``steps`` intervals from 1 to 0 (uniform unshifted: :func:`ode_times`).
    ``grid`` "edm": evenly spaced in sigma^(1/rho), sigma = t / (1 - t), ending at ``last_step_size`` for the SDE and
    at sigma = 0.002 otherwise, then 0. ``shift`` (uniform grid only) maps u -> s u / (1 + (s - 1) u) on the
    grid's fraction u in [0, 1] of the way from its last nonzero point to 1.
    """
    if grid not in GRIDS:
        raise ValueError(f"grid must be one of {GRIDS}, got {grid!r}")
    if shift <= 0.0:
        raise ValueError(f"shift must be > 0, got {shift}")
    if grid == "edm" and shift != 1.0:
        raise ValueError("shift applies to the uniform grid only (the EDM grid has its own spacing, rho)")
    sde = method == "sde"
    if sde and steps < 2:
        raise ValueError(f"the SDE sampler needs steps >= 2, got {steps}")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if sde and not 0.0 < last_step_size < 1.0:
        raise ValueError(f"last_step_size must be in (0, 1), got {last_step_size}")
    if grid == "edm":
        low = last_step_size if sde else EDM_SIGMA_MIN / (1.0 + EDM_SIGMA_MIN)
        return edm_times(steps, low, rho) + [0.0]
    if shift == 1.0:
        return sde_times(steps, last_step_size) if sde else ode_times(steps)
    low = last_step_size if sde else 0.0
    fractions = torch.linspace(1.0, 0.0, steps if sde else steps + 1, dtype=torch.float64).tolist()
    times = [low + (1.0 - low) * _shifted(u, shift) for u in fractions]
    return times + [0.0] if sde else times


# ------------------------------------------------------------------------------------------------------- steps
Velocity = Callable[[torch.Tensor, float], torch.Tensor]


def _sde_drift(x: torch.Tensor, v: torch.Tensor, t: float, w: float | None = None) -> torch.Tensor:
    """d = v - 0.5 w s with the linear-path score s = -(x + (1 - t) v) / t; w = 2t (the paper's) by default."""
    score = -(x + (1.0 - t) * v) / t
    if w is None:
        return v - t * score
    return v - 0.5 * w * score


def diffusion_coefficient(t: float, form: str = "sbdm", norm: float = 1.0) -> float:
    """w(t) of the reverse SDE dx = (v - w s / 2) dt + sqrt(w) dW in this time convention: "sbdm" 2 norm t (score-
    based diffusion's choice for this path; the paper's with norm 1), "sigma" norm t (the path's noise scale),
    "constant" norm."""
    if form == "sbdm":
        return 2.0 * norm * t
    if form == "sigma":
        return norm * t
    if form == "constant":
        return norm
    raise ValueError(f"diffusion must be one of {DIFFUSIONS}, got {form!r}")


def _noise_like(x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """z ~ N(0, I) [B,C,H,W] drawn on the generator's device (then moved to x's)."""
    gen_device = generator.device if generator is not None else x.device
    return torch.randn(x.shape, generator=generator, device=gen_device, dtype=x.dtype).to(x.device)


def _sde_em(
    velocity: Velocity, x: torch.Tensor, grid: list[float], generator: torch.Generator | None, progress: bool,
    last_step: str, diffusion: str, norm: float,
) -> torch.Tensor:
    """Euler-Maruyama on the grid's stochastic intervals, then ``last_step`` from grid[-2] to 0: "mean" (the drift
    step without noise, the paper's), "tweedie" (the x0-prediction x - t v), "euler" (the ODE step x - t v: for
    this path the same point as "tweedie"; kept as SiT's name)."""
    paper = diffusion == "sbdm" and norm == 1.0
    pairs = list(zip(grid[:-1], grid[1:]))
    for i, (t_cur, t_next) in enumerate(tqdm(pairs, disable=not progress, desc="sde")):
        dt = t_next - t_cur
        v = velocity(x, t_cur)
        last = i == len(pairs) - 1
        if last and last_step != "mean":
            return x + v * dt  # = x - t v: the x0-prediction (t_next = 0)
        w = 2.0 * t_cur if paper else diffusion_coefficient(t_cur, diffusion, norm)
        x = x + (_sde_drift(x, v, t_cur) if paper else _sde_drift(x, v, t_cur, w)) * dt
        if not last:
            x = x + w**0.5 * abs(dt) ** 0.5 * _noise_like(x, generator)
    return x


def _exp_weights(s: float, t: float, eta: float) -> tuple[float, float, float]:
    """Weights of the exact solution of the SDE's mean from s to t < s (w = 2 eta t): with x0(u) = x0_s + (u - s) g
    over the step, x_t = k x_s + c0 x0_s + c1 g + noise, where k = r^(1+eta), r = t / s,
    c0 = (1 - t) - k (1 - s) and c1 = t^(1+eta) int_t^s u^-(2+eta) (1 + eta - eta u) (u - s) du (<= 0)."""
    r = t / s
    k = r ** (1.0 + eta)
    c0 = (1.0 - t) - k * (1.0 - s)
    if t <= 0.0:
        return k, c0, 0.0
    i1 = math.log(s / t) if eta == 0.0 else (t**-eta - s**-eta) / eta  # int u^-(1+eta)
    i2 = math.log(s / t) if eta == 1.0 else (s ** (1.0 - eta) - t ** (1.0 - eta)) / (1.0 - eta)  # int u^-eta
    c1 = t ** (1.0 + eta) * ((1.0 + eta) * i1 - eta * i2) - s * c0
    return k, c0, c1


def _sde_exp(
    velocity: Velocity, x: torch.Tensor, grid: list[float], generator: torch.Generator | None, progress: bool,
    norm: float, multistep: bool = False,
) -> torch.Tensor:
    """The paper's SDE (diffusion w = 2 eta t, eta = ``norm``) with its linear part integrated exactly (an
    exponential integrator, DDIM-like): from s to t < s, r = t / s,

        x <- r^(1+eta) x + ((1 - t) - r^(1+eta) (1 - s)) x0_hat + c1 g + t sqrt(1 - r^(2 eta)) z,

    x0_hat = x - s v held over the step (g = 0: "sde-exp", exact for a point-mass data distribution; eta = 0 is
    the Euler ODE step) or, with ``multistep`` ("sde-2m"), linear in t through the previous step's x0_hat
    (g = its slope; :func:`_exp_weights`). The last step (t = 0) returns the x0-prediction."""
    pairs = list(zip(grid[:-1], grid[1:]))
    x0_prev: torch.Tensor | None = None
    t_prev = 1.0
    for t_cur, t_next in tqdm(pairs, disable=not progress, desc="sde-2m" if multistep else "sde-exp"):
        x0 = x - t_cur * velocity(x, t_cur)
        keep, c0, c1 = _exp_weights(t_cur, t_next, norm)
        x = keep * x + c0 * x0
        if multistep and x0_prev is not None and t_next > 0.0:
            x = x + c1 * (x0_prev - x0) / (t_prev - t_cur)
        if t_next > 0.0 and norm > 0.0:
            x = x + t_next * (1.0 - (t_next / t_cur) ** (2.0 * norm)) ** 0.5 * _noise_like(x, generator)
        x0_prev, t_prev = x0, t_cur
    return x


def _one_step_ode(
    method: str, velocity: Velocity, x: torch.Tensor, t_cur: float, t_next: float
) -> torch.Tensor:
    """One step of Euler, Heun (trapezoid, 2 evaluations) or explicit midpoint (2 evaluations)."""
    dt = t_next - t_cur
    v_cur = velocity(x, t_cur)
    if method == "midpoint":
        return x + velocity(x + 0.5 * dt * v_cur, t_cur + 0.5 * dt) * dt
    x_next = x + v_cur * dt
    if method == "heun":
        x_next = x + 0.5 * (v_cur + velocity(x_next, t_next)) * dt
    return x_next


def _log_snr(t: float) -> float:
    """lambda = log(alpha / sigma) = log((1 - t) / t) of the linear path (+-inf at t = 0, 1)."""
    if t <= 0.0:
        return math.inf
    if t >= 1.0:
        return -math.inf
    return math.log((1.0 - t) / t)


def _dpm_2m(velocity: Velocity, x: torch.Tensor, grid: list[float], progress: bool) -> torch.Tensor:
    """DPM-Solver++(2M) in the x0-prediction for alpha = 1 - t, sigma = t: from s to t, r = t / s,

        x <- r x + ((1 - t) - r (1 - s)) D,  D = (1 + 1/(2q)) x0_s - 1/(2q) x0_prev,  q = h_prev / h,

    h = lambda_t - lambda_s. D = x0_s (first order, the Euler step) where a step size in lambda is infinite: the
    first two steps (lambda(1) = -inf) and the last one (to t = 0, which returns x0_s)."""
    pairs = list(zip(grid[:-1], grid[1:]))
    x0_prev: torch.Tensor | None = None
    h_prev = math.inf
    for t_cur, t_next in tqdm(pairs, disable=not progress, desc="dpm++2m"):
        x0 = x - t_cur * velocity(x, t_cur)
        h = _log_snr(t_next) - _log_snr(t_cur)
        target = x0
        if x0_prev is not None and math.isfinite(h) and math.isfinite(h_prev):
            c = 0.5 * h / h_prev
            target = (1.0 + c) * x0 - c * x0_prev
        r = t_next / t_cur
        x = r * x + ((1.0 - t_next) - r * (1.0 - t_cur)) * target
        x0_prev, h_prev = x0, h
    return x


def _accel(velocity: GuidedVelocity, x: torch.Tensor, grid: list[float], progress: bool) -> torch.Tensor:
    """Second-order Taylor steps x <- x + v dt + a dt^2 / 2 with (v, a) from one forward pass
    (``fn(..., return_acceleration=True)``). With the exact trajectory acceleration a = dv/dt along the ODE this is
    a second-order method; DeepFlow's acceleration output is a different quantity (docs/sampling/report.md)."""
    pairs = list(zip(grid[:-1], grid[1:]))
    for t_cur, t_next in tqdm(pairs, disable=not progress, desc="accel"):
        dt = t_next - t_cur
        v, a = velocity.with_acceleration(x, t_cur)
        x = x + v * dt + 0.5 * a * dt * dt
    return x


# ----------------------------------------------------------------------------------------------------- sample
def _check_options(method: str, last_step: str, diffusion: str, diffusion_norm: float) -> None:
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(map(repr, METHODS))}, got {method!r}")
    if last_step not in LAST_STEPS:
        raise ValueError(f"last_step must be one of {LAST_STEPS}, got {last_step!r}")
    if diffusion not in DIFFUSIONS:
        raise ValueError(f"diffusion must be one of {DIFFUSIONS}, got {diffusion!r}")
    if diffusion_norm < 0.0:
        raise ValueError(f"diffusion_norm must be >= 0, got {diffusion_norm}")
    if method in ("sde-exp", "sde-2m") and diffusion != "sbdm":
        raise ValueError(f"method {method!r} integrates the 'sbdm' diffusion (w = 2 norm t), got {diffusion!r}")


@torch.no_grad()
def sample(
    fn: VelocityFn,
    noise: torch.Tensor,
    y: Condition,
    method: Method = "sde",
    steps: int = 250,
    cfg_scale: float = 1.0,
    guidance_interval: tuple[float, float] = (0.0, 1.0),
    null_label: int | None = None,
    generator: torch.Generator | None = None,
    progress: bool = False,
    null_condition: NullCondition | None = None,
    *,
    grid: Grid = "uniform",
    shift: float = 1.0,
    rho: float = 7.0,
    last_step: LastStep = "mean",
    last_step_size: float = 0.04,
    diffusion: Diffusion = "sbdm",
    diffusion_norm: float = 1.0,
) -> torch.Tensor:
    """Integrate from noise [B,C,H,W] at t = 1 to a sample at t = 0.

    method "sde": Euler-Maruyama on linspace(1, ``last_step_size``, steps) with diffusion w(t) = 2t, then one last
    deterministic step to 0 (``steps`` velocity evaluations; the paper's sampler). "sde-exp": the same SDE with its
    linear part integrated exactly (``steps`` intervals to 0). "euler" / "heun" / "midpoint" / "dpm++2m":
    probability-flow ODE with ``steps`` intervals (Heun, midpoint: 2 evaluations per step). "accel": Taylor steps
    with the model's acceleration output (experimental). Keyword-only options: ``grid`` / ``shift`` / ``rho``
    (:func:`time_grid`); for the SDEs ``diffusion`` / ``diffusion_norm`` (:func:`diffusion_coefficient`; "sde-exp":
    "sbdm" only, norm = its eta) and for "sde" ``last_step`` ("mean", "tweedie", "euler"); the defaults give the
    samplers as they were. ``null_label`` defaults to ``fn.num_classes`` when ``fn`` has that attribute.
    ``generator`` drives the SDE noise (drawn on the generator's device, then moved). CFG: see ``GuidedVelocity``;
    for text conditions pass ``null_condition`` = the empty caption's {"text_emb", "text_mask", "text_pooled"}.
    """
    _check_options(method, last_step, diffusion, diffusion_norm)
    if null_label is None and null_condition is None and not is_text_condition(y):
        null_label = getattr(fn, "num_classes", None)
    velocity = GuidedVelocity(fn, y, cfg_scale, guidance_interval, null_label, null_condition)
    times = time_grid(method, steps, grid=grid, shift=shift, rho=rho, last_step_size=last_step_size)
    x = noise
    if method == "sde":
        return _sde_em(velocity, x, times, generator, progress, last_step, diffusion, diffusion_norm)
    if method in ("sde-exp", "sde-2m"):
        return _sde_exp(velocity, x, times, generator, progress, diffusion_norm, multistep=method == "sde-2m")
    if method == "dpm++2m":
        return _dpm_2m(velocity, x, times, progress)
    if method == "accel":
        return _accel(velocity, x, times, progress)
    for t_cur, t_next in tqdm(list(zip(times[:-1], times[1:])), disable=not progress, desc=method):
        x = _one_step_ode(method, velocity, x, t_cur, t_next)
    return x


class _Counter:
    """A zero velocity (and acceleration) field that counts forward rows per sample."""

    def __init__(self) -> None:
        self.rows = 0

    def __call__(self, x: torch.Tensor, t: torch.Tensor, y: Any, return_acceleration: bool = False) -> Any:
        self.rows += x.shape[0]
        return (torch.zeros_like(x), torch.zeros_like(x)) if return_acceleration else torch.zeros_like(x)


def forward_passes(
    method: str = "sde", steps: int = 250, cfg_scale: float = 1.0,
    guidance_interval: Iterable[float] = (0.0, 1.0), **options: Any,
) -> int:
    """Network forward passes per image of :func:`sample` with these settings: every call counted once per
    sample, both halves of a guided pair counted (2 inside the guidance interval when cfg_scale != 1). Counted by
    running the sampler on a zero field."""
    counter = _Counter()
    lo, hi = tuple(guidance_interval)
    sample(counter, torch.zeros(1, 1, 1, 1), torch.zeros(1, dtype=torch.long), method=method, steps=steps,  # type: ignore[arg-type]
           cfg_scale=cfg_scale, guidance_interval=(lo, hi), null_label=0, **options)
    return counter.rows
