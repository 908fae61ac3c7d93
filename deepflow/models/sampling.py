"""Samplers for flow models: SDE Euler-Maruyama (the paper's), ODE Euler and Heun; CFG with a guidance interval.

``fn(x, t, y) -> v`` is a model or any callable: x [B,C,H,W], t [B] float in [0,1], y the condition: labels [B]
long, or a text dict {"text_emb" [B,L,D], "text_mask" [B,L] bool, "text_pooled" [B,P]} (``deepflow.models.conditions``).
Integration runs from t = 1 (noise) to t = 0 (data).
"""

from __future__ import annotations

from typing import Callable, Literal

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

__all__ = ["sample", "sde_times", "ode_times", "GuidedVelocity"]

VelocityFn = Callable[[torch.Tensor, torch.Tensor, Condition], torch.Tensor]


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

    def __call__(self, x: torch.Tensor, t: float) -> torch.Tensor:
        b = x.shape[0]
        if self.scale == 1.0 or not self.lo <= t <= self.hi:
            return self.fn(x, torch.full((b,), t, device=x.device, dtype=x.dtype), self.y)
        t_both = torch.full((2 * b,), t, device=x.device, dtype=x.dtype)
        v_cond, v_uncond = self.fn(torch.cat([x, x]), t_both, self.y_both).chunk(2)
        return v_uncond + self.scale * (v_cond - v_uncond)


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


def _sde_drift(x: torch.Tensor, v: torch.Tensor, t: float) -> torch.Tensor:
    """d = v - 0.5 w s with w = 2t and the linear-path score s = -(x + (1 - t) v) / t."""
    score = -(x + (1.0 - t) * v) / t
    return v - t * score


@torch.no_grad()
def sample(
    fn: VelocityFn,
    noise: torch.Tensor,
    y: Condition,
    method: Literal["sde", "euler", "heun"] = "sde",
    steps: int = 250,
    cfg_scale: float = 1.0,
    guidance_interval: tuple[float, float] = (0.0, 1.0),
    null_label: int | None = None,
    generator: torch.Generator | None = None,
    progress: bool = False,
    null_condition: NullCondition | None = None,
) -> torch.Tensor:
    """Integrate from noise [B,C,H,W] at t = 1 to a sample at t = 0.

    method "sde": Euler-Maruyama on linspace(1, 0.04, steps) with diffusion w(t) = 2t, then one last
    deterministic step to 0 (``steps`` velocity evaluations). "euler" / "heun": probability-flow ODE on a
    uniform grid of ``steps`` intervals (Heun: 2 evaluations per step). ``null_label`` defaults to
    ``fn.num_classes`` when ``fn`` has that attribute. ``generator`` drives the SDE noise
    (drawn on the generator's device, then moved). CFG: see ``GuidedVelocity``; for text conditions pass
    ``null_condition`` = the empty caption's {"text_emb", "text_mask", "text_pooled"} (unbatched or [1,...]).
    """
    if null_label is None and null_condition is None and not is_text_condition(y):
        null_label = getattr(fn, "num_classes", None)
    velocity = GuidedVelocity(fn, y, cfg_scale, guidance_interval, null_label, null_condition)
    x = noise
    if method == "sde":
        grid = sde_times(steps)
        pairs = list(zip(grid[:-1], grid[1:]))
        for i, (t_cur, t_next) in enumerate(tqdm(pairs, disable=not progress, desc="sde")):
            dt = t_next - t_cur
            drift = _sde_drift(x, velocity(x, t_cur), t_cur)
            x = x + drift * dt
            if i < len(pairs) - 1:
                gen_device = generator.device if generator is not None else x.device
                z = torch.randn(x.shape, generator=generator, device=gen_device, dtype=x.dtype).to(x.device)
                x = x + (2.0 * t_cur) ** 0.5 * abs(dt) ** 0.5 * z
        return x
    if method not in ("euler", "heun"):
        raise ValueError(f"method must be 'sde', 'euler' or 'heun', got {method!r}")
    grid = ode_times(steps)
    for t_cur, t_next in tqdm(list(zip(grid[:-1], grid[1:])), disable=not progress, desc=method):
        dt = t_next - t_cur
        v_cur = velocity(x, t_cur)
        x_next = x + v_cur * dt
        if method == "heun":
            x_next = x + 0.5 * (v_cur + velocity(x_next, t_next)) * dt
        x = x_next
    return x
