"""The compiled fast paths give the eager results (fp32 tolerance): a training step through the ddp engine with
``distributed.compile: true`` and sampling with ``sampler.compile: true`` (one compiled forward reused at every
step, one graph for the guided and one for the unguided batch)."""

from __future__ import annotations

import pytest
import torch

from deepflow.models import create_model
from deepflow.models.flow import FlowObjective
from deepflow.platform.inference.generate import SamplerConfig, sample_latents
from deepflow.platform.train.distributed import DistContext
from deepflow.platform.train.engines import ENGINES
from deepflow.platform.train.engines.base import OptimizerSettings

TINY = dict(depth=2, hidden_size=32, num_heads=2, input_size=8, in_channels=4, num_classes=10,
            acc_widths=(32, 32, 32))


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    model = create_model("DeepFlow-S/2-2T", **TINY)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:  # non-zero heads, so every path matters
                param.normal_(0.0, 0.05)
    return model


def _train(compiled: bool) -> tuple[list[float], dict[str, torch.Tensor]]:
    settings = OptimizerSettings(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, grad_clip=1.0,
                                 grad_accumulation=1, precision="fp32", compile=compiled, per_rank_batch_size=6)
    model = _model()
    engine = ENGINES["ddp"](model, settings, DistContext(0, 1, 0, torch.device("cpu"), None))
    objective = FlowObjective()
    data = torch.Generator().manual_seed(1)
    x, y = torch.randn(6, 4, 8, 8, generator=data), torch.randint(0, 10, (6,), generator=data)
    losses = []
    for step in range(3):
        with engine.micro_step(boundary=True):
            terms = objective.loss(engine.forward_train, x, y, torch.Generator().manual_seed(step), num_branches=2,
                                   num_classes=10)
            engine.backward(terms["total"])
        engine.step()
        losses.append(float(terms["total"]))
    return losses, {name: p.detach().clone() for name, p in model.named_parameters()}


@pytest.mark.slow
def test_compiled_training_step_equals_eager() -> None:
    eager_losses, eager_weights = _train(compiled=False)
    compiled_losses, compiled_weights = _train(compiled=True)
    assert compiled_losses == pytest.approx(eager_losses, rel=1e-5)
    for name, tensor in eager_weights.items():
        torch.testing.assert_close(compiled_weights[name], tensor, rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.slow
def test_compiled_sampling_equals_eager_inside_and_outside_the_guidance_interval() -> None:
    model = _model().eval()
    noise = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    labels = torch.tensor([1, 2, 3])
    sampler = SamplerConfig(method="sde", steps=6, cfg_scale=2.0, guidance_interval=(0.3, 0.8))
    eager = sample_latents(model, noise, labels, sampler, generator=torch.Generator().manual_seed(0))
    compiled = sample_latents(model, noise, labels, sampler.model_copy(update={"compile": True}),
                              generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-5)
    assert not torch.equal(eager, sample_latents(model, noise, labels, sampler.model_copy(update={"cfg_scale": 1.0}),
                                                 generator=torch.Generator().manual_seed(0)))
