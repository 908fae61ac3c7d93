"""Tiny configurations of the real model classes for fast CPU tests."""

from __future__ import annotations

import torch

from deepflow.models import DeepFlowDiT, create_model

TINY = dict(hidden_size=32, num_heads=2, input_size=8, in_channels=4, num_classes=10, acc_widths=(24, 48, 24),
            projector_dim=24, z_dim=16)


def tiny_model(name: str = "DeepFlow-S/2-2T", depth: int = 4, **overrides) -> DeepFlowDiT:
    cfg = {**TINY, **overrides}
    return create_model(name, depth=depth, **cfg)


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
