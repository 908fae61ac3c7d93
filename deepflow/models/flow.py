"""Flow matching with deep supervision: interpolant, time samplers and the DeepFlow loss terms.

Convention: t = 0 data, t = 1 noise, x_t = (1 - t) x0 + t eps, target velocity V = eps - x0.
Every random draw comes from an explicit ``torch.Generator``; tensors are drawn on the generator's device and
then moved to the data's device, so a CPU generator gives the same numbers whatever the training device.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Literal, Sequence

import torch
import torch.nn.functional as F

from deepflow.models.conditions import Condition, NullCondition, is_text_condition, nullify_rows
from deepflow.models.dit import BranchOutputs

__all__ = ["FlowDraws", "FlowObjective", "interpolate", "sample_times", "branch_times", "drop_labels"]

TimeSampling = Literal["uniform", "lognormal"]
ModelFn = Callable[[torch.Tensor, torch.Tensor, Condition], BranchOutputs]


def _expand(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """t [B] -> [B,1,1,...] broadcastable against ``like`` [B,...]."""
    return t.reshape(t.shape[0], *([1] * (like.ndim - 1))).to(like.dtype)


def interpolate(x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """x_t = (1 - t) x0 + t eps for x0/eps [B,...] and t [B]."""
    t = _expand(t, x0)
    return (1 - t) * x0 + t * eps


def _rand(shape: Sequence[int], generator: torch.Generator, device: torch.device, normal: bool = False) -> torch.Tensor:
    fn = torch.randn if normal else torch.rand
    return fn(tuple(shape), generator=generator, device=generator.device).to(device)


def sample_times(
    batch: int, method: TimeSampling, generator: torch.Generator, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """t1 [B] float32 in [0,1]: ``uniform`` U(0,1) or ``lognormal`` sigmoid(N(0,1)) (SD3's logit-normal)."""
    if method == "uniform":
        return _rand([batch], generator, torch.device(device))
    if method == "lognormal":
        return torch.sigmoid(_rand([batch], generator, torch.device(device), normal=True))
    raise ValueError(f"time_sampling must be 'uniform' or 'lognormal', got {method!r}")


def gap_sign(generator: torch.Generator) -> float:
    """The direction of one batch's time gaps: +1 or -1 with p = 0.5 (one U(0,1) draw)."""
    return 1.0 if bool(_rand([1], generator, generator.device)[0] < 0.5) else -1.0


def branch_times(
    t1: torch.Tensor, num_branches: int, alpha: float, generator: torch.Generator, sign: float | None = None
) -> torch.Tensor:
    """Per-branch times [B,k]: t_{i+1} = clamp(t_i + s u alpha, 0, 1), one sign s per batch (p = 0.5, drawn here
    unless given), u ~ U(0,1) per sample and branch (the gaps accumulate)."""
    times = [t1]
    if num_branches > 1:
        sign = gap_sign(generator) if sign is None else sign
        u = _rand([t1.shape[0], num_branches - 1], generator, t1.device)
        for i in range(num_branches - 1):
            times.append((times[-1] + sign * alpha * u[:, i]).clamp(0.0, 1.0))
    return torch.stack(times, dim=1)


def drop_labels(y: torch.Tensor, prob: float, null_label: int, generator: torch.Generator) -> torch.Tensor:
    """Replace each label by ``null_label`` with probability ``prob`` (classifier-free guidance training)."""
    if prob <= 0:
        return y
    drop = _rand([y.shape[0]], generator, y.device) < prob
    return torch.where(drop, torch.full_like(y, null_label), y)


@dataclass
class FlowDraws:
    """The random part of one loss evaluation, per sample: ``times`` [B,k] float32 (t1 and the branch times),
    ``eps`` noise like x0 [B,C,H,W], ``drop`` [B] bool (condition dropped) or None when nothing is dropped.

    Drawn as a whole (:meth:`FlowObjective.draw`) or per chunk of samples and joined with :meth:`cat`, so that a
    sample's draws depend on its chunk, not on which rank computes it."""

    times: torch.Tensor
    eps: torch.Tensor
    drop: torch.Tensor | None

    @staticmethod
    def cat(parts: Sequence["FlowDraws"]) -> "FlowDraws":
        """Rows of ``parts`` in order."""
        drops = [part.drop for part in parts]
        return FlowDraws(
            times=torch.cat([part.times for part in parts]),
            eps=torch.cat([part.eps for part in parts]),
            drop=None if any(d is None for d in drops) else torch.cat(drops),  # type: ignore[arg-type]
        )


def _mse(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a.float() - b.float()).pow(2).mean()


class FlowObjective:
    """DeepFlow training objective.

    L_total = sum_i beta_i L_deep_i + acc_weight L_acc + proj_weight L_proj, where
    L_deep_i = mean |v_i - V|^2, L_acc = sum_{i<k} mean |x_{t_i} + sg(v_i) d_i + a_i d_i^2 / 2 - x0|^2
    (d_i = -t_i; stop-gradient on the velocity only), L_proj = mean over projectors, batch and tokens of the
    negative cosine similarity (fp32). betas default to 0.2 for intermediate branches and 1.0 for the last.
    """

    def __init__(
        self,
        time_sampling: TimeSampling = "lognormal",
        alpha: float = 0.01,
        betas: Sequence[float] | None = None,
        acc_weight: float = 1.0,
        proj_weight: float = 0.5,
        label_dropout: float = 0.1,
    ) -> None:
        if time_sampling not in ("uniform", "lognormal"):
            raise ValueError(f"time_sampling must be 'uniform' or 'lognormal', got {time_sampling!r}")
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha (max time gap) must be in [0, 1], got {alpha}")
        if not 0.0 <= label_dropout <= 1.0:
            raise ValueError(f"label_dropout must be in [0, 1], got {label_dropout}")
        self.time_sampling = time_sampling
        self.alpha = alpha
        self.betas = list(betas) if betas is not None else None
        self.acc_weight = acc_weight
        self.proj_weight = proj_weight
        self.label_dropout = label_dropout  # condition-drop probability: class labels and text alike

    def branch_betas(self, num_branches: int) -> list[float]:
        if self.betas is None:
            return [0.2] * (num_branches - 1) + [1.0]
        if len(self.betas) != num_branches:
            raise ValueError(f"betas {self.betas} must have one entry per branch ({num_branches})")
        return self.betas

    def draw(
        self,
        shape: Sequence[int],
        num_branches: int,
        generator: torch.Generator,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        sign: float | None = None,
    ) -> FlowDraws:
        """The draws of a batch of ``shape`` [B,C,H,W], in the order t1, the gap sign (unless ``sign`` is given:
        one sign shared by several chunks), the gaps, eps, the drop mask (only when label_dropout > 0)."""
        device = torch.device(device)
        b = int(shape[0])
        t1 = sample_times(b, self.time_sampling, generator, device)
        times = branch_times(t1, num_branches, self.alpha, generator, sign=sign)  # [B,k]
        eps = _rand(shape, generator, device, normal=True).to(dtype)
        drop = _rand([b], generator, device) < self.label_dropout if self.label_dropout > 0 else None
        return FlowDraws(times, eps, drop)

    def loss(
        self,
        model_fn: ModelFn,
        x0: torch.Tensor,
        y: Condition,
        generator: torch.Generator | None = None,
        ssl_targets: torch.Tensor | None = None,
        num_branches: int = 1,
        num_classes: int = 1000,
        null_condition: NullCondition | None = None,
        draws: FlowDraws | None = None,
    ) -> dict[str, torch.Tensor]:
        """x0 [B,C,H,W] clean data, ssl_targets [B,N,z] or None, y the condition: labels [B] long or a text dict
        {"text_emb" [B,L,D], "text_mask" [B,L] bool, "text_pooled" [B,P]} (see ``deepflow.models.conditions``).

        The randomness comes from ``draws`` or, without them, from ``generator`` (:meth:`draw`: t1, the gap sign
        and gaps, eps, the drop mask). Dropped rows (probability ``label_dropout``) get the null condition:
        ``null_condition`` (an int class id, or for text the empty caption's dict of unbatched or [1,...] tensors);
        for labels it defaults to ``num_classes``.
        Returns scalar terms "deep_0".."deep_{k-1}", "acc" (k > 1), "proj" (with ssl_targets), "total".
        """
        k = num_branches
        betas = self.branch_betas(k)
        if draws is None:
            if generator is None:
                raise ValueError("FlowObjective.loss needs a generator or draws")
            draws = self.draw(x0.shape, k, generator, x0.device, x0.dtype)
        times, eps = draws.times.to(x0.device), draws.eps.to(x0.device, x0.dtype)
        if null_condition is None:
            if is_text_condition(y) and self.label_dropout > 0:
                raise ValueError(
                    "text conditions with label_dropout > 0 need null_condition (the empty caption's encoding, "
                    "e.g. ShardLoader.null_text())"
                )
            null_condition = num_classes
        y_in = y if draws.drop is None else nullify_rows(y, draws.drop.to(x0.device), null_condition)
        x_t1 = interpolate(x0, eps, times[:, 0])
        target = eps - x0

        out = model_fn(x_t1, times, y_in)
        if len(out.velocities) != k:
            raise ValueError(f"model returned {len(out.velocities)} velocities for num_branches={k}")
        terms: dict[str, torch.Tensor] = {}
        total = x0.new_zeros((), dtype=torch.float32)
        for i, v in enumerate(out.velocities):
            terms[f"deep_{i}"] = _mse(v, target)
            total = total + betas[i] * terms[f"deep_{i}"]
        if k > 1 and out.accelerations:  # none from a deep-supervision-only ablation (vera_mode="identity")
            if len(out.accelerations) != k - 1:
                raise ValueError(f"model returned {len(out.accelerations)} accelerations, expected {k - 1}")
            acc = x0.new_zeros((), dtype=torch.float32)
            for i, a in enumerate(out.accelerations):
                t_i = times[:, i]
                d = _expand(-t_i, x0)
                x_ti = interpolate(x0, eps, t_i)
                pred_x0 = x_ti + out.velocities[i].detach() * d + 0.5 * a * d * d
                acc = acc + _mse(pred_x0, x0)
            terms["acc"] = acc
            total = total + self.acc_weight * acc
        if ssl_targets is not None:
            if not out.projections:
                raise ValueError("ssl_targets given but the model returned no projections (build it with ssl_align)")
            terms["proj"] = projection_loss(out.projections, ssl_targets)
            total = total + self.proj_weight * terms["proj"]
        terms["total"] = total
        return terms


def projection_loss(projections: Sequence[torch.Tensor], target: torch.Tensor) -> torch.Tensor:
    """Negative cosine similarity per token, averaged over tokens, projectors and batch (float32).

    projections: tensors [B,N,z]; target [B,N,z] (e.g. DINOv2-B patch tokens).
    """
    z = F.normalize(target.float(), dim=-1)
    losses = [-(F.normalize(p.float(), dim=-1) * z).sum(dim=-1).mean() for p in projections]
    return torch.stack(losses).mean()
