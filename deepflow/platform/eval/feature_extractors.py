"""Feature extractors other than Inception for Frechet distances: DINOv2 (FD-DINOv2) and CLIP image towers.

Every extractor is called on uint8 images [B, 3|1, H, W] (grayscale repeated to 3 channels) and returns float32
features [B, dim]. Weights come from a hub id or a local path given by the user; nothing is downloaded unless the
user names a hub id and the machine is online.
"""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from deepflow.platform.eval.inception import as_rgb_uint8

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def resize_and_normalize(images: Tensor, size: int, mean: tuple[float, ...], std: tuple[float, ...]) -> Tensor:
    """uint8 [B, 3|1, H, W] -> float32 [B, 3, size, size]: bicubic (antialiased) resize, then (x/255 - mean) / std."""
    x = as_rgb_uint8(images).float() / 255.0
    if x.shape[-2:] != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bicubic", align_corners=False, antialias=True).clamp(0.0, 1.0)
    mean_t = torch.tensor(mean, device=x.device).view(1, 3, 1, 1)
    std_t = torch.tensor(std, device=x.device).view(1, 3, 1, 1)
    return (x - mean_t) / std_t


class DinoV2Extractor(nn.Module):
    """DINOv2 CLS features (after the final LayerNorm) as in FD-DINOv2. uint8 [B,3|1,H,W] -> [B, hidden_size].

    ``model``: a transformers hub id (e.g. ``facebook/dinov2-large``, the FD-DINOv2 choice) or a local directory
    written by ``save_pretrained``. Images are resized to ``image_size`` (224) and ImageNet-normalised.
    """

    name = "dinov2"

    def __init__(self, model: str = "facebook/dinov2-large", image_size: int = 224) -> None:
        super().__init__()
        from transformers import Dinov2Model

        if model.startswith(("/", ".", "~")) and not os.path.isdir(os.path.expanduser(model)):
            raise FileNotFoundError(f"{model}: no such DINOv2 directory (give a save_pretrained folder or a hub id)")
        self.net = Dinov2Model.from_pretrained(model)
        self.image_size = image_size
        self.dim = int(self.net.config.hidden_size)
        self.eval().requires_grad_(False)

    @torch.no_grad()
    def forward(self, images: Tensor) -> Tensor:
        device = next(self.net.parameters()).device
        x = resize_and_normalize(images.to(device), self.image_size, IMAGENET_MEAN, IMAGENET_STD)
        return self.net(pixel_values=x).pooler_output.float()


class ClipImageExtractor(nn.Module):
    """open_clip image-tower embeddings (not normalised). uint8 [B,3|1,H,W] -> [B, embed_dim].

    ``model_name``: an open_clip architecture (``ViT-L-14``...); ``pretrained``: a local checkpoint path or an
    open_clip pretrained tag; ``None`` leaves random weights (tests only).
    """

    name = "clip"

    def __init__(self, model_name: str = "ViT-L-14", pretrained: str | None = None) -> None:
        super().__init__()
        import open_clip

        model = open_clip.create_model(model_name, pretrained=pretrained)
        self.visual = model.visual
        cfg = getattr(self.visual, "preprocess_cfg", {}) or {}
        size = getattr(self.visual, "image_size", 224)
        self.image_size = int(size[0] if isinstance(size, (tuple, list)) else size)
        self.mean = tuple(cfg.get("mean", open_clip.OPENAI_DATASET_MEAN))
        self.std = tuple(cfg.get("std", open_clip.OPENAI_DATASET_STD))
        self.dim = int(getattr(self.visual, "output_dim", model.text_projection.shape[-1]))
        self.eval().requires_grad_(False)

    @torch.no_grad()
    def forward(self, images: Tensor) -> Tensor:
        device = next(self.visual.parameters()).device
        x = resize_and_normalize(images.to(device), self.image_size, self.mean, self.std)
        return self.visual(x).float()
