"""The samplers for fewer forward passes (deepflow.models.sampling): each recovers the analytic Gaussian target, the
higher-order ones show their order as steps double, forward passes are counted as run, the old methods are unchanged
by the new options' defaults, DeepFlow's acceleration output is exposed, and the compiled path equals the eager one."""

from __future__ import annotations

import pytest
import torch

from deepflow.models.sampling import METHODS, PRESETS, forward_passes, sample, time_grid
from deepflow.platform.inference.generate import _COMPILED, SamplerConfig, sample_latents

from .helpers import randomize_, tiny_model
from .test_sampling import MU, SIGMA, CountingFn, gaussian_velocity


def gaussian_acceleration(x: torch.Tensor, t: torch.Tensor, mu=MU, sigma=SIGMA) -> torch.Tensor:
    """d^2 x / dt^2 along the probability-flow ODE of x0 ~ N(mu, sigma^2): x_t = (1 - t) mu + s_t e with
    s_t = sqrt((1 - t)^2 sigma^2 + t^2), so a = s_t'' e = ((1 + sigma^2) - s_t'^2) / s_t^2 (x - (1 - t) mu)."""
    t = t.view(-1, 1, 1, 1)
    s = ((1 - t) ** 2 * sigma**2 + t**2).sqrt()
    ds = (t - (1 - t) * sigma**2) / s
    return ((1 + sigma**2) - ds**2) / s**2 * (x - (1 - t) * mu)


def gaussian_field(x, t, y, return_acceleration: bool = False):
    """The exact velocity, and with ``return_acceleration`` the exact trajectory acceleration (the "accel" test)."""
    v = gaussian_velocity(x, t, y)
    return (v, gaussian_acceleration(x, t)) if return_acceleration else v


# method, steps, options: every new sampler and grid, at about 25-50 forward passes
RECOVERY = [
    ("sde-2m", 25, {}),
    ("sde-2m", 25, {"diffusion_norm": 0.5}),
    ("sde-2m", 100, {"diffusion_norm": 3.0}),  # the "fast" preset's SDE (at 25 steps its std is ~7% high here)
    ("sde-exp", 100, {}),
    ("sde", 60, {"last_step": "tweedie"}),
    ("sde", 100, {"diffusion": "sigma"}),
    ("sde", 60, {"grid": "edm", "last_step_size": 0.02}),
    ("midpoint", 12, {}),
    ("dpm++2m", 20, {}),
    ("dpm++2m", 40, {"grid": "edm"}),
    ("heun", 12, {"shift": 0.5}),
    ("heun", 25, {"grid": "edm"}),
    ("euler", 100, {"shift": 0.7}),
    ("accel", 20, {}),
]


@pytest.mark.parametrize("method,steps,options", RECOVERY, ids=[f"{m}-{s}-{o}" for m, s, o in RECOVERY])
def test_new_samplers_recover_the_gaussian_target(method, steps, options):
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(4000, 3, 2, 2, generator=g)
    y = torch.zeros(4000, dtype=torch.long)
    x = sample(gaussian_field, noise, y, method=method, steps=steps, generator=g, **options)
    torch.testing.assert_close(x.mean(dim=(0, 2, 3)), MU.flatten(), atol=0.05, rtol=0)
    torch.testing.assert_close(x.std(dim=(0, 2, 3)), SIGMA.flatten(), atol=0, rtol=0.06)


def _ode_error(method: str, steps: int, **options) -> float:
    """Max error against the exact ODE map noise -> mu + sigma noise."""
    noise = torch.randn(64, 3, 2, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    y = torch.zeros(64, dtype=torch.long)
    x = sample(gaussian_field, noise, y, method=method, steps=steps, **options)
    return float((x - (MU + SIGMA * noise)).abs().max())


@pytest.mark.parametrize("method,order,options", [
    ("euler", 1, {}), ("heun", 2, {}), ("midpoint", 2, {}), ("accel", 2, {}), ("sde-2m", 2, {"diffusion_norm": 0.0}),
    ("heun", 2, {"grid": "edm"}), ("midpoint", 2, {"shift": 3.0}), ("dpm++2m", 2, {"grid": "edm"}),
])
def test_order_of_the_ode_solvers(method, order, options):
    """Doubling the steps divides the error by at least about 2^order (16 -> 32 -> 64 steps). (Midpoint happens to
    reach order 3 on this linear field; DPM-Solver++(2M) extrapolates in log-SNR, which is second order on grids
    even in log-SNR such as EDM's, but not on a grid uniform in t, whose steps near t = 0 stay ~log 2 in log-SNR.)"""
    errors = [_ode_error(method, n, **options) for n in (16, 32, 64)]
    rates = [torch.log2(torch.tensor(a / b)).item() for a, b in zip(errors, errors[1:])]
    assert all(order - 0.35 < rate for rate in rates), (errors, rates)
    if order == 1:
        assert all(rate < 1.35 for rate in rates), (errors, rates)


def test_sde_exp_without_noise_is_the_euler_ode_and_is_exact_for_a_point_mass():
    noise = torch.randn(8, 3, 2, 2, dtype=torch.float64)
    y = torch.zeros(8, dtype=torch.long)
    torch.testing.assert_close(sample(gaussian_field, noise, y, method="sde-exp", steps=7, diffusion_norm=0.0),
                               sample(gaussian_field, noise, y, method="euler", steps=7))
    # data = the point mu: v = (x - mu) / t exactly, so every step lands on the exact marginal and the end is mu
    point = lambda x, t, y: (x - MU.double()) / t.view(-1, 1, 1, 1)  # noqa: E731
    x = sample(point, noise, y, method="sde-exp", steps=3, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(x, MU.double().expand_as(x))


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("cfg_scale,interval", [(1.0, (0.0, 1.0)), (3.0, (0.0, 0.5))])
def test_forward_passes_count_what_runs(method, cfg_scale, interval):
    fn = CountingFn()
    calls: list[int] = []

    def counted(x, t, y, return_acceleration=False):
        calls.append(x.shape[0])
        v = fn(x, t, y)
        return (v, torch.zeros_like(v)) if return_acceleration else v

    noise, y = torch.randn(4, 1, 2, 2), torch.tensor([0, 1, 0, 1])
    sample(counted, noise, y, method=method, steps=6, cfg_scale=cfg_scale, guidance_interval=interval, null_label=2,
           generator=torch.Generator().manual_seed(0))
    assert sum(calls) // 4 == forward_passes(method, 6, cfg_scale, interval)
    assert forward_passes(method, 6) == (12 if method in ("heun", "midpoint") else 6)


def test_grids_and_presets():
    assert time_grid("euler", 4) == [1.0, 0.75, 0.5, 0.25, 0.0]
    shifted = time_grid("euler", 4, shift=3.0)
    assert shifted[0] == 1.0 and shifted[-1] == 0.0 and shifted[2] == pytest.approx(0.75)
    sde = time_grid("sde", 5, shift=0.5, last_step_size=0.1)
    assert sde[0] == 1.0 and sde[-2] == pytest.approx(0.1) and sde[-1] == 0.0 and len(sde) == 6
    edm = time_grid("heun", 6, grid="edm")
    assert edm[0] == 1.0 and edm[-1] == 0.0 and all(a > b for a, b in zip(edm, edm[1:]))
    assert edm[-2] == pytest.approx(0.002 / 1.002)
    assert SamplerConfig(preset="paper") == SamplerConfig(preset="paper", method="sde", steps=250)
    fast = SamplerConfig(preset="fast", cfg_scale=1.5)
    assert fast.method == PRESETS["fast"]["method"] and fast.cfg_scale == 1.5
    assert SamplerConfig(preset="fast").forward_passes() <= 25
    assert SamplerConfig(preset="fast", steps=40).steps == 40  # a field given beside the preset wins


def test_bad_options_name_the_field():
    noise, y = torch.randn(2, 1, 2, 2), torch.zeros(2, dtype=torch.long)
    for options, field in [({"grid": "karras"}, "grid"), ({"last_step": "ddpm"}, "last_step"),
                           ({"diffusion": "vp"}, "diffusion"), ({"shift": 0.0}, "shift"),
                           ({"grid": "edm", "shift": 2.0}, "shift"), ({"method": "sde-exp", "diffusion": "sigma"},
                                                                       "sbdm")]:
        with pytest.raises(ValueError, match=field):
            sample(gaussian_field, noise, y, **{"method": "euler", "steps": 2, **options})
    with pytest.raises(ValueError, match="return_acceleration"):
        sample(randomize_(tiny_model("SiT-S/2", depth=2)).eval(), torch.randn(2, 4, 8, 8), torch.tensor([1, 2]),
               method="accel", steps=2)


def test_deepflow_exposes_its_acceleration_output():
    model = randomize_(tiny_model("DeepFlow-S/2-2T", depth=2), std=0.05).eval()
    x, t, y = torch.randn(3, 4, 8, 8), torch.rand(3), torch.tensor([1, 2, 3])
    v, a = model(x, t, y, return_acceleration=True)
    assert torch.equal(v, model(x, t, y))
    times = torch.stack([t, t], dim=1)
    torch.testing.assert_close(a, model(x, times, y, return_all=True).accelerations[0])  # the trained head, gap 0


@pytest.fixture(scope="module")
def tiny_deepflow():
    """A tiny DeepFlow whose compiled forward (``inference_forward``'s cache) is built with the aot_eager backend:
    the sampler's use of the compiled callable is what is tested here (inductor's code: tests/platform/train/
    test_compile.py), in seconds instead of a minute."""
    model = randomize_(tiny_model("DeepFlow-S/2-2T", depth=2), std=0.05).eval()
    _COMPILED[model] = torch.compile(model, dynamic=False, backend="aot_eager")
    return model


@pytest.mark.parametrize("method,steps", [("sde", 4), ("sde-exp", 3), ("sde-2m", 3), ("midpoint", 2), ("dpm++2m", 3),
                                          ("accel", 3), ("heun", 2)])
def test_compiled_path_equals_eager(tiny_deepflow, method, steps):
    """sampler.compile reuses one compiled forward (plus one for the acceleration output) for every method."""
    noise = torch.randn(4, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    labels = torch.tensor([0, 1, 2, 3])
    sampler = SamplerConfig(method=method, steps=steps, grid="edm" if method == "heun" else "uniform")
    eager = sample_latents(tiny_deepflow, noise, labels, sampler, generator=torch.Generator().manual_seed(2))
    compiled = sample_latents(tiny_deepflow, noise, labels, sampler.model_copy(update={"compile": True}),
                              generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-5)
