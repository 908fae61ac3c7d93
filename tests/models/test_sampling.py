"""Samplers recover Gaussian data from its exact velocity field; CFG batching and guidance interval."""

from __future__ import annotations

import pytest
import torch

from deepflow.models.sampling import sample, sde_times

from .helpers import randomize_, tiny_model

MU = torch.tensor([-1.0, 0.5, 2.0]).view(1, 3, 1, 1)
SIGMA = torch.tensor([0.5, 1.0, 0.2]).view(1, 3, 1, 1)


def gaussian_velocity(x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, mu=MU, sigma=SIGMA) -> torch.Tensor:
    """Exact E[eps - x0 | x_t] for x0 ~ N(mu, sigma^2) per channel and x_t = (1 - t) x0 + t eps."""
    t = t.view(-1, 1, 1, 1)
    var = (1 - t) ** 2 * sigma**2 + t**2
    centred = x - (1 - t) * mu
    return (t - (1 - t) * sigma**2) * centred / var - mu


@pytest.mark.parametrize("method,steps", [("sde", 250), ("euler", 100), ("heun", 25)])
def test_samplers_recover_gaussian_target(method, steps):
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(4000, 3, 2, 2, generator=g)
    y = torch.zeros(4000, dtype=torch.long)
    x = sample(gaussian_velocity, noise, y, method=method, steps=steps, generator=g)
    mean = x.mean(dim=(0, 2, 3))
    std = x.std(dim=(0, 2, 3))
    torch.testing.assert_close(mean, MU.flatten(), atol=0.05, rtol=0)
    torch.testing.assert_close(std, SIGMA.flatten(), atol=0, rtol=0.06)


def test_sde_grid_and_determinism():
    grid = sde_times(5)
    assert grid[0] == 1.0 and abs(grid[-2] - 0.04) < 1e-12 and grid[-1] == 0.0 and len(grid) == 6
    noise = torch.randn(8, 3, 2, 2)
    y = torch.zeros(8, dtype=torch.long)
    a = sample(gaussian_velocity, noise, y, steps=10, generator=torch.Generator().manual_seed(1))
    b = sample(gaussian_velocity, noise, y, steps=10, generator=torch.Generator().manual_seed(1))
    c = sample(gaussian_velocity, noise, y, steps=10, generator=torch.Generator().manual_seed(2))
    assert torch.equal(a, b) and not torch.equal(a, c)


class CountingFn:
    """Class-dependent Gaussian velocity (null label = 2 -> a third mean) that records batch sizes and times."""

    def __init__(self):
        self.calls: list[tuple[int, float]] = []
        self.mus = torch.tensor([-2.0, 2.0, 0.0])

    def __call__(self, x, t, y):
        self.calls.append((x.shape[0], float(t[0])))
        return gaussian_velocity(x, t, y, mu=self.mus[y].view(-1, 1, 1, 1), sigma=0.5)


@pytest.mark.parametrize("method", ["sde", "euler", "heun"])
def test_cfg_scale_one_equals_conditional_sample(method):
    noise = torch.randn(6, 1, 2, 2)
    y = torch.tensor([0, 1, 0, 1, 0, 1])
    fn_cfg, fn_plain = CountingFn(), CountingFn()
    a = sample(fn_cfg, noise, y, method=method, steps=8, cfg_scale=1.0, null_label=2,
               generator=torch.Generator().manual_seed(0))
    b = sample(fn_plain, noise, y, method=method, steps=8, generator=torch.Generator().manual_seed(0))
    assert torch.equal(a, b)
    assert all(n == 6 for n, _ in fn_cfg.calls)  # no unconditional half computed


def test_cfg_one_batched_forward_inside_the_guidance_interval_only():
    noise = torch.randn(4, 1, 2, 2)
    y = torch.tensor([0, 1, 0, 1])
    fn = CountingFn()
    sample(fn, noise, y, method="euler", steps=10, cfg_scale=4.0, guidance_interval=(0.0, 0.5), null_label=2)
    assert len(fn.calls) == 10  # one forward per step, cond + uncond concatenated
    for n, t in fn.calls:
        assert n == (8 if t <= 0.5 else 4)

    # guided velocity = v_u + s (v_c - v_u): one Euler step checked by hand
    fn2 = CountingFn()
    x1 = sample(fn2, noise, y, method="euler", steps=1, cfg_scale=3.0, null_label=2)
    t1 = torch.ones(4)
    v_c = fn2(noise, t1, y)
    v_u = fn2(noise, t1, torch.full_like(y, 2))
    torch.testing.assert_close(x1, noise - (v_u + 3.0 * (v_c - v_u)))


def test_sample_with_a_real_model_uses_its_null_label():
    model = randomize_(tiny_model("DeepFlow-S/2-2T", depth=2), std=0.05).eval()
    noise = torch.randn(2, 4, 8, 8)
    y = torch.tensor([3, 4])
    x = sample(model, noise, y, method="heun", steps=2, cfg_scale=2.0)  # null_label = model.num_classes
    assert x.shape == noise.shape and torch.isfinite(x).all()


def test_bad_arguments():
    noise, y = torch.randn(2, 1, 2, 2), torch.zeros(2, dtype=torch.long)
    with pytest.raises(ValueError, match="method"):
        sample(gaussian_velocity, noise, y, method="ddim", steps=2)
    with pytest.raises(ValueError, match="null_label"):
        sample(gaussian_velocity, noise, y, method="euler", steps=2, cfg_scale=2.0)
    with pytest.raises(ValueError, match="guidance_interval"):
        sample(gaussian_velocity, noise, y, method="euler", steps=2, guidance_interval=(0.8, 0.2))
