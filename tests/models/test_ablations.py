"""The ablation variants of the convergence study: deep supervision only, VeRA without cross-space attention."""
from __future__ import annotations

import pytest
import torch

from deepflow.models.flow import FlowObjective
from tests.models.helpers import counted_macs, inputs, randomize_, tiny_model


@pytest.mark.parametrize("mode", ["identity", "no_cross_attention"])
def test_ablation_forward_loss_and_flops(mode: str) -> None:
    model = randomize_(tiny_model("DeepFlow-S/2-3T", depth=3, vera_mode=mode))
    full = tiny_model("DeepFlow-S/2-3T", depth=3)
    assert sum(p.numel() for p in model.parameters()) < sum(p.numel() for p in full.parameters())
    x, t, y = inputs(model)
    times = t[:, None].expand(-1, 3)
    out = model.forward_train(x, times, y)
    assert len(out.velocities) == 3
    assert len(out.accelerations) == (0 if mode == "identity" else 2)
    torch.testing.assert_close(model(x, t, y), out.velocities[-1])
    assert counted_macs(lambda: model(x, t, y)) == x.shape[0] * model.flops_per_image()
    assert counted_macs(lambda: model.forward_train(x, times, y)) == x.shape[0] * model.flops_per_image(train=True)

    terms = FlowObjective(alpha=0.05).loss(
        model.forward_train, x, y, torch.Generator().manual_seed(0), num_branches=3, num_classes=10
    )
    assert ("acc" in terms) == (mode != "identity")
    terms["total"].backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_identity_mode_passes_hidden_state_straight_through() -> None:
    """Deep supervision only = a SiT trunk with extra heads: its last velocity equals SiT's with the same weights."""
    ablation = randomize_(tiny_model("DeepFlow-S/2-2T", depth=4, vera_mode="identity"))
    sit = tiny_model("SiT-S/2", depth=4)
    missing, unexpected = sit.load_state_dict(ablation.state_dict(), strict=False)
    assert not missing and all(key.startswith("velocity_heads.1.") for key in unexpected)
    sit.velocity_heads[0].load_state_dict(ablation.velocity_heads[1].state_dict())  # SiT's only head = the last one
    x, t, y = inputs(sit)
    torch.testing.assert_close(sit(x, t, y), ablation(x, t, y))


def test_bad_vera_mode_is_rejected() -> None:
    with pytest.raises(ValueError, match="vera_mode"):
        tiny_model(vera_mode="partial")
    with pytest.raises(ValueError, match="ssl_align"):
        tiny_model(vera_mode="identity", ssl_align=True)
