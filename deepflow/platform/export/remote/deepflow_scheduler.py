"""DeepFlowFlowScheduler: the deepflow flow samplers as a diffusers ``SchedulerMixin``.

Written into ``scheduler/`` by ``deepflow export --format diffusers`` (the deepflow package's
``deepflow/platform/export/remote/deepflow_scheduler.py``). Sampling is done by the package's own
``deepflow/models/sampling.py``, copied next to this file (``deepflow_<tag>_sampling.py``, imports rewritten), so
every method that module provides is available here, with the same numbers as ``deepflow sample``: the SDE
(Euler-Maruyama on linspace(1, 0.04, N) with w(t) = 2t, then one deterministic step to 0), ODE Euler and Heun, and
whatever the module gained since. ``method`` and the ``sampler_options`` are checked against the copied module.

Time convention: t = 1 is noise, t = 0 is data; sampling integrates from 1 down to 0.
"""
from __future__ import annotations

import inspect
import os
import sys
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers.scheduling_utils import SchedulerMixin

from .deepflow_export_common import EXPORT_VERSION, check_export_version, copy_code, tidy_config

# diffusers copies into its module cache only the modules that this file imports directly, so every copied deepflow
# module is imported here (the export writes this block).
# <deepflow-export:imports>
from .deepflow_models_sampling import sample as _sample_function

CODE_MODULES: tuple[str, ...] = ("deepflow_models_sampling",)
# </deepflow-export:imports>

#: the copied ``deepflow/models/sampling.py``
sampling = sys.modules[_sample_function.__module__]

CONFIG_FILE = "scheduler/scheduler_config.json"
#: arguments of ``sampling.sample`` that the scheduler sets itself (the rest may come from ``sampler_options``)
_OWN_ARGUMENTS = ("fn", "noise", "y", "method", "steps", "cfg_scale", "guidance_interval", "null_label", "generator",
                  "progress", "null_condition")


def sampler_option_names() -> tuple[str, ...]:
    """Keyword arguments of ``sampling.sample`` that ``sampler_options`` may set."""
    parameters = inspect.signature(sampling.sample).parameters
    return tuple(name for name in parameters if name not in _OWN_ARGUMENTS)


def _check_method(method: str, where: str) -> None:
    if method not in sampling.METHODS:
        raise ValueError(f"{where}: method must be one of {', '.join(sampling.METHODS)}; got {method!r}")


def _check_options(options: dict[str, Any], where: str) -> None:
    allowed = sampler_option_names()
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        known = ", ".join(allowed) if allowed else "none"
        raise ValueError(f"{where}: unknown sampler option(s) {', '.join(unknown)} (this sampler takes: {known})")


class DeepFlowFlowScheduler(SchedulerMixin, ConfigMixin):
    """Flow-matching sampler from t = 1 (noise) to t = 0 (data) with classifier-free guidance in an interval.

    Config (the defaults of the pipeline call): ``method``, ``num_inference_steps`` (velocity evaluations; Heun: 2
    per step), ``guidance_scale`` (1 = no guidance), ``guidance_interval`` (times where guidance applies),
    ``sampler_options`` (further keyword arguments of the deepflow ``sample`` function), ``export_version``.
    """

    config_name = "scheduler_config.json"
    order = 1

    @register_to_config
    def __init__(
        self,
        method: str = "sde",
        num_inference_steps: int = 250,
        guidance_scale: float = 1.0,
        guidance_interval: tuple[float, float] | list[float] = (0.0, 1.0),
        sampler_options: Optional[dict[str, Any]] = None,
        export_version: int = EXPORT_VERSION,
    ) -> None:
        check_export_version(export_version, CONFIG_FILE)
        _check_method(method, f"{CONFIG_FILE}: method")
        _check_options(dict(sampler_options or {}), f"{CONFIG_FILE}: sampler_options")
        self.timesteps: Optional[torch.Tensor] = None
        self.num_inference_steps: Optional[int] = None

    @classmethod
    def extract_init_dict(cls, config_dict: dict[str, Any], **kwargs: Any) -> Any:
        """The config as read from ``scheduler_config.json``: its export version is checked first."""
        check_export_version(config_dict.get("export_version"), CONFIG_FILE)
        return super().extract_init_dict(config_dict, **kwargs)

    def _options(self, options: dict[str, Any]) -> dict[str, Any]:
        merged = {**dict(self.config.sampler_options or {}), **options}
        _check_options(merged, "sampler options")
        return merged

    def set_timesteps(self, num_inference_steps: int, device: str | torch.device | None = None,
                      **options: Any) -> None:
        """``self.timesteps``: the times 1 = t_0 > ... > t_n = 0 the sampler steps through (float64; the sampling
        module's ``time_grid``), for information: :meth:`sample` integrates."""
        self.num_inference_steps = num_inference_steps
        merged = self._options(options)
        accepted = inspect.signature(sampling.time_grid).parameters
        grid = sampling.time_grid(self.config.method, num_inference_steps,
                                  **{k: v for k, v in merged.items() if k in accepted})
        self.timesteps = torch.tensor(grid, dtype=torch.float64, device=device)

    def evaluations(self, num_inference_steps: int, **options: Any) -> int:
        """Network calls of one sampling run (a guided call runs both halves in one batch), counted by the sampling
        module's ``forward_passes``."""
        return int(sampling.forward_passes(self.config.method, num_inference_steps, 1.0, (0.0, 1.0),
                                           **self._options(options)))

    def sample(
        self,
        velocity: Callable[[torch.Tensor, torch.Tensor, Any], torch.Tensor],
        noise: torch.Tensor,
        condition: Any,
        *,
        num_inference_steps: Optional[int] = None,
        guidance_scale: Optional[float] = None,
        guidance_interval: Optional[tuple[float, float]] = None,
        null_label: Optional[int] = None,
        null_condition: Any = None,
        generator: Optional[torch.Generator] = None,
        **options: Any,
    ) -> torch.Tensor:
        """x0 [B,C,H,W] integrated from ``noise`` [B,C,H,W] at t = 1 by the deepflow ``sample`` function.

        ``velocity(x [B,C,H,W], t [B], condition) -> v [B,C,H,W]``; ``condition``: class labels [B] long or the
        text dict; guidance pushes away from ``null_label`` (class models: ``num_classes``) or ``null_condition``
        (the empty caption's text dict, unbatched). ``generator`` draws the SDE's step noise. Arguments left None
        take this scheduler's config; ``options`` override its ``sampler_options``.
        """
        extra = self._options(options)
        interval = self.config.guidance_interval if guidance_interval is None else guidance_interval
        arguments: dict[str, Any] = {
            "method": self.config.method,
            "steps": int(num_inference_steps or self.config.num_inference_steps),
            "cfg_scale": float(self.config.guidance_scale if guidance_scale is None else guidance_scale),
            "guidance_interval": (float(interval[0]), float(interval[1])),
            "null_label": null_label,
            "generator": generator,
            "progress": False,
            "null_condition": null_condition,
        }
        accepted = inspect.signature(sampling.sample).parameters
        arguments = {key: value for key, value in arguments.items() if key in accepted}
        return sampling.sample(velocity, noise, condition, **arguments, **extra)

    # ------------------------------------------------------------------------------------------------ saving
    def save_pretrained(self, save_directory: str | os.PathLike[str], *args: Any, **kwargs: Any) -> None:
        """diffusers' save (``scheduler_config.json``), plus this file and the deepflow modules it imports."""
        super().save_pretrained(save_directory, *args, **kwargs)
        copy_code(CODE_MODULES, __file__, save_directory)
        tidy_config(Path(save_directory) / self.config_name)

    def __len__(self) -> int:
        return int(self.config.num_inference_steps)
