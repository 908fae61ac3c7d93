"""Tiny configurations of the real model classes for fast CPU tests, and checks shared by DiT and MMDiT tests.

``cond`` below is the model's condition: class labels y [B] long (DeepFlowDiT) or a text dict (DeepFlowMMDiT).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from deepflow.models import BranchOutputs, DeepFlowDiT, DeepFlowMMDiT, create_model
from deepflow.models.layers import sincos_pos_embed_2d

TINY = dict(hidden_size=32, num_heads=2, input_size=8, in_channels=4, num_classes=10, acc_widths=(24, 48, 24),
            projector_dim=24, z_dim=16)
TINY_MMDIT = dict(hidden_size=32, num_heads=2, input_size=8, in_channels=4, context_dim=24, pooled_dim=16,
                  max_text_length=6, acc_widths=(24, 48, 24), projector_dim=24, z_dim=16)

Model = DeepFlowDiT | DeepFlowMMDiT


def tiny_model(name: str = "DeepFlow-S/2-2T", depth: int = 4, **overrides) -> DeepFlowDiT:
    cfg = {**TINY, **overrides}
    return create_model(name, depth=depth, **cfg)


def tiny_mmdit(name: str = "DeepFlow-MMDiT-4-2T", **overrides) -> DeepFlowMMDiT:
    return create_model(name, **{**TINY_MMDIT, **overrides})


def randomize_(model: torch.nn.Module, seed: int = 0, std: float = 0.2) -> torch.nn.Module:
    """Overwrite every trainable parameter (including the zero-initialised ones) with N(0, std^2)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * std)
    return model


def inputs(model: DeepFlowDiT, batch: int = 3, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, model.in_channels, model.input_size, model.input_size, generator=g)
    t = torch.rand(batch, generator=g)
    y = torch.randint(0, model.num_classes + 1, (batch,), generator=g)
    return x, t, y


def text_inputs(model: DeepFlowMMDiT, batch: int = 3, length: int = 6, seed: int = 1):
    """x [B,C,S,S], t [B], a text dict whose rows have 1..length real tokens (then padding)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, model.in_channels, model.input_size, model.input_size, generator=g)
    t = torch.rand(batch, generator=g)
    lengths = torch.tensor([1 + (i * 2) % length for i in range(batch)])
    cond = {
        "text_emb": torch.randn(batch, length, model.context_dim, generator=g),
        "text_mask": torch.arange(length)[None, :] < lengths[:, None],
        "text_pooled": torch.randn(batch, model.pooled_dim, generator=g),
    }
    return x, t, cond


def counted_macs(fn: Callable[[], Any]) -> int:
    """Multiply-accumulates of matmuls and convolutions (no attention kernels) measured by FlopCounterMode."""
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        fn()
    counts = counter.get_flop_counts()["Global"]
    ops = {"mm", "addmm", "bmm", "baddbmm", "convolution"}
    return sum(v for op, v in counts.items() if op.__name__.split(".")[0] in ops) // 2


# ---------------------------------------------------------------- checks shared by test_dit and test_mmdit
def materialize_and_check_pos_embed(model: Model) -> Model:
    """A meta-built model: ``to_empty`` + ``init_weights``; the fixed sin-cos pos_embed [1,N,H] is restored."""
    model.to_empty(device="cpu")
    model.init_weights()
    assert torch.equal(model.pos_embed[0], sincos_pos_embed_2d(model.hidden_size, model.grid_size))
    assert not model.pos_embed.requires_grad
    return model


def check_zero_initialised_outputs(model: Model, x: torch.Tensor, t: torch.Tensor, cond: Any) -> None:
    """Zero-init heads: every velocity / acceleration [B,C,Hi,Wi] is 0; k-1 projections [B,N,16] with SSL."""
    k = model.num_branches
    assert torch.count_nonzero(model(x, t, cond)) == 0
    out = model.forward_train(x, t[:, None].expand(-1, k), cond)
    assert len(out.velocities) == k and len(out.accelerations) == k - 1
    for tensor in out.velocities + out.accelerations:
        assert tensor.shape == x.shape and torch.count_nonzero(tensor) == 0
    if k > 1:
        assert len(out.projections) == k - 1 and out.projections[0].shape == (x.shape[0], model.num_tokens, 16)


def check_inference_equals_last_branch(model: Model, x: torch.Tensor, t: torch.Tensor, cond: Any) -> None:
    """model(x, t [B]) = last velocity of forward_train at times t for every branch; other branch times matter."""
    k = model.num_branches
    v = model(x, t, cond)
    out = model.forward_train(x, t[:, None].expand(-1, k), cond)
    assert isinstance(out, BranchOutputs)
    torch.testing.assert_close(v, out.velocities[-1], rtol=1e-4, atol=1e-5)
    assert v.abs().mean() > 1e-3  # non-trivial output after randomisation
    if k > 1:
        # different branch times change the output: the gap embedding and per-branch conditions are used
        times = torch.stack([t] + [(t + 0.3 * (i + 1)).clamp(0, 1) for i in range(k - 1)], dim=1)
        assert not torch.allclose(model.forward_train(x, times, cond).velocities[-1], v)


def check_time_shape_errors(model: Model, x: torch.Tensor, t: torch.Tensor, cond: Any) -> None:
    """A 2-branch model rejects times [B,3] and return_all with times [B]."""
    with pytest.raises(ValueError, match=r"times must be \[B, 2\]"):
        model(x, torch.rand(3, 3), cond)
    with pytest.raises(ValueError, match="return_all=True needs times"):
        model(x, t, cond, return_all=True)


def check_gradient_checkpointing(model: Model, x: torch.Tensor, times: torch.Tensor, cond: Any) -> None:
    """Gradients with ``gradient_checkpointing`` equal the plain ones; shard units = blocks + VeRA blocks."""

    def grads() -> list[torch.Tensor]:
        model.zero_grad()
        out = model.forward_train(x, times, cond)
        sum(o.square().mean() for o in out.velocities + out.accelerations).backward()
        return [p.grad.clone() for p in model.parameters() if p.requires_grad]

    plain = grads()
    model.gradient_checkpointing = True
    for a, b in zip(plain, grads()):
        torch.testing.assert_close(a, b)
    assert len(model.shard_units()) == model.depth + model.num_branches - 1


def check_compile_fullgraph(model: Model, x: torch.Tensor, t: torch.Tensor, times: torch.Tensor, cond: Any) -> None:
    """torch.compile(fullgraph) of the inference and training forwards matches eager; then backward runs."""
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x, t, cond), model(x, t, cond))
    out = compiled(x, times, cond, return_all=True)
    ref = model.forward_train(x, times, cond)
    assert isinstance(out, BranchOutputs)
    for a, b in zip(out.velocities + out.accelerations, ref.velocities + ref.accelerations):
        torch.testing.assert_close(a, b)
    sum(v.mean() for v in out.velocities).backward()  # the compiled training graph differentiates


def check_flops_match_measured(model: Model, x: torch.Tensor, t: torch.Tensor, cond: Any, **flop_kwargs: Any) -> None:
    """``flops_per_image`` (inference and train=True) x batch = the MACs FlopCounterMode measures."""
    batch, k = x.shape[0], model.num_branches
    assert counted_macs(lambda: model(x, t, cond)) == batch * model.flops_per_image(**flop_kwargs)
    times = t[:, None].expand(-1, k)
    assert counted_macs(lambda: model.forward_train(x, times, cond)) == batch * model.flops_per_image(
        train=True, **flop_kwargs
    )
