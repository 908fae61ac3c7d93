"""ShardedEMA arithmetic on real model parameters (the sharded engines are covered end to end in
tests/integration/test_train_engines.py, where gathered FSDP2/ZeRO-3 EMA equals the replicated one)."""

from __future__ import annotations

import pytest
import torch

from deepflow.models import create_model
from deepflow.platform.train.ema import ShardedEMA


def _tiny() -> torch.nn.Module:
    torch.manual_seed(0)
    return create_model("DeepFlow-S/2-2T", depth=2, hidden_size=32, num_heads=2, input_size=8, in_channels=1,
                        num_classes=10, acc_widths=(16, 16, 16))


def test_ema_is_initialised_as_a_copy_and_follows_the_decay_formula() -> None:
    model = _tiny()
    params = dict(model.named_parameters())
    ema = ShardedEMA(params, decay=0.9)
    for name, p in params.items():
        assert torch.equal(ema.shadow[name], p) and ema.shadow[name].data_ptr() != p.data_ptr()
    before = {k: v.clone() for k, v in ema.shadow.items()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    assert ema.update(params, step=1)
    for name, p in params.items():
        torch.testing.assert_close(ema.shadow[name], 0.9 * before[name] + 0.1 * p.detach())


def test_start_step_copies_and_every_skips() -> None:
    model = _tiny()
    params = dict(model.named_parameters())
    ema = ShardedEMA(params, decay=0.5, start_step=3, every=2)
    with torch.no_grad():
        next(model.parameters()).fill_(2.0)
    name = next(iter(params))
    ema.update(params, step=1)  # before start: plain copy
    assert torch.equal(ema.shadow[name], params[name])
    with torch.no_grad():
        params[name].fill_(4.0)
    assert not ema.update(params, step=3)  # odd step with every=2
    assert torch.all(ema.shadow[name] == 2.0)
    assert ema.update(params, step=4)
    assert torch.allclose(ema.shadow[name], torch.full_like(ema.shadow[name], 3.0))


def test_bf16_slices_accumulate_in_fp32_and_state_round_trips() -> None:
    local = {"w": torch.ones(5, dtype=torch.bfloat16)}
    ema = ShardedEMA(local, decay=0.999)
    assert ema.shadow["w"].dtype == torch.float32
    local["w"].fill_(2.0)
    ema.update(local, step=1)
    assert ema.shadow["w"][0].item() == pytest.approx(1.001, abs=1e-6)  # not representable in bf16
    other = ShardedEMA({"w": torch.zeros(5)}, decay=0.999)
    other.load_state_dict(ema.state_dict())
    assert torch.equal(other.shadow["w"], ema.shadow["w"])
    with pytest.raises(ValueError, match="not this rank's slice"):
        other.load_state_dict({"w": torch.zeros(3)})
    with pytest.raises(KeyError, match="missing"):
        other.load_state_dict({})
