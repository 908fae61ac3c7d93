"""REPA targets from a frozen DINOv2 (a tiny randomly initialised Dinov2Config saved like a hub checkpoint)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from transformers import Dinov2Config, Dinov2Model

from deepflow.platform.train.ssl import IMAGENET_MEAN, IMAGENET_STD, DinoFeatures


@pytest.fixture(scope="module")
def tiny_dino(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    config = Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                          patch_size=14, image_size=56)
    path = tmp_path_factory.mktemp("dino") / "tiny-dinov2"
    Dinov2Model(config).save_pretrained(path)
    return path


def test_patch_tokens_after_layernorm_fp32(tiny_dino: Path) -> None:
    encoder = DinoFeatures(str(tiny_dino), image_size=56)
    assert not any(p.requires_grad for p in encoder.model.parameters()) and not encoder.model.training
    images = torch.randint(0, 256, (3, 3, 8, 8), dtype=torch.uint8)
    feats = encoder(images)
    assert feats.shape == (3, 16, 32) and feats.dtype == torch.float32  # (56 / 14)^2 tokens
    # the same computation by hand: resize, normalise, encode, final layernorm, drop CLS
    x = F.interpolate(images.float() / 255.0, size=(56, 56), mode="bicubic", align_corners=False).clamp(0, 1)
    x = (x - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    model = Dinov2Model.from_pretrained(tiny_dino)
    with torch.no_grad():
        hidden = model(pixel_values=x, output_hidden_states=True)
    expected = model.layernorm(hidden.hidden_states[-1])[:, 1:]
    torch.testing.assert_close(feats, expected, atol=1e-5, rtol=1e-5)
    gray = encoder(images[:, :1])
    assert gray.shape == (3, 16, 32)


def test_bad_inputs_are_named(tiny_dino: Path) -> None:
    with pytest.raises(ValueError, match="ssl.image_size 50 is not a multiple"):
        DinoFeatures(str(tiny_dino), image_size=50)
    with pytest.raises(OSError, match="ssl.encoder: cannot load DINOv2"):
        DinoFeatures(str(tiny_dino.parent / "missing"))
    with pytest.raises(ValueError, match=r"expected uint8 images \[B,3,H,W\]"):
        DinoFeatures(str(tiny_dino), image_size=28)(torch.zeros(2, 4, 8, 8, dtype=torch.uint8))
