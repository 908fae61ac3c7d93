"""CLIP score of generated images against their captions (open_clip image and text towers).

CLIP-S (Hessel et al., 2021, with weight 100 instead of 2.5, as text-to-image papers report it):
``score_i = max(100 * cos(E_image(x_i), E_text(c_i)), 0)`` and the CLIP score is the mean over the pairs.
(torchmetrics' ``CLIPScore`` clips the mean instead of each pair; the two agree unless some pair has a negative
cosine, which does not happen with trained CLIP models on real captions.)

Images: uint8 [B, 3|1, H, W] (NCHW; grayscale repeated), centre-cropped to a square, resized (bicubic, antialiased)
to the model's input size and normalised with its mean/std: CLIP's own preprocessing for square crops.
Weights come from a local path or an open_clip pretrained tag given by the user; nothing is downloaded otherwise.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from deepflow.platform.eval.feature_extractors import resize_and_normalize
from deepflow.platform.eval.inception import as_rgb_uint8

__all__ = ["load_clip", "clip_preprocess", "clip_score_from_features", "clip_score", "ClipScorer"]

Tokenizer = Callable[[list[str]], Tensor]


def load_clip(
    model_name: str = "ViT-L-14", pretrained: str | None = None, device: torch.device | str = "cpu", **model_kwargs: Any
) -> tuple[nn.Module, Tokenizer]:
    """(open_clip model in eval mode without grad, its tokenizer). ``pretrained``: a local checkpoint path or an
    open_clip tag (e.g. "openai", which downloads when online); None leaves random weights (tests only)."""
    import open_clip

    model = open_clip.create_model(model_name, pretrained=pretrained, device=device, **model_kwargs)
    model.eval().requires_grad_(False)
    # the model's own context length: architecture overrides (model_kwargs text_cfg) may change it
    context_length = getattr(model, "context_length", None)
    return model, open_clip.get_tokenizer(model_name, context_length=context_length)


def _image_size_and_stats(model: nn.Module) -> tuple[int, tuple[float, ...], tuple[float, ...]]:
    import open_clip

    cfg = open_clip.get_model_preprocess_cfg(model) or {}
    size = cfg.get("size", getattr(model.visual, "image_size", 224))
    if isinstance(size, (tuple, list)):
        if size[0] != size[1]:
            raise ValueError(f"clip score: non-square CLIP input size {tuple(size)} is not supported")
        size = size[0]
    mean = tuple(cfg.get("mean", open_clip.OPENAI_DATASET_MEAN))
    std = tuple(cfg.get("std", open_clip.OPENAI_DATASET_STD))
    return int(size), mean, std


def clip_preprocess(images: Tensor, size: int, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    """uint8 [B, 3|1, H, W] -> float32 [B, 3, size, size]: centre square crop, bicubic resize, (x/255 - mean)/std."""
    images = as_rgb_uint8(images)
    h, w = images.shape[-2:]
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    return resize_and_normalize(images[..., top : top + side, left : left + side], size, tuple(mean), tuple(std))


def clip_score_from_features(image_features: Tensor, text_features: Tensor) -> Tensor:
    """Per-pair CLIP-S: image/text features [B, E] (any norm) -> [B] float32 = max(100 cos, 0)."""
    if image_features.shape != text_features.shape or image_features.ndim != 2:
        raise ValueError(
            f"clip score: image and text features must both be [B, E], got {tuple(image_features.shape)} and "
            f"{tuple(text_features.shape)}"
        )
    cos = (F.normalize(image_features.float(), dim=-1) * F.normalize(text_features.float(), dim=-1)).sum(dim=-1)
    return (100.0 * cos).clamp_min(0.0)


class ClipScorer:
    """CLIP-S of (image, caption) pairs with one open_clip model: ``scorer(images, captions) -> [B]`` per-pair scores.

    ``model`` is an open_clip CLIP model (``encode_image``, ``encode_text``); ``tokenizer`` maps a list of captions
    to token ids [B, context_length]. Runs in ``batch_size`` chunks on the model's device.
    """

    def __init__(self, model: nn.Module, tokenizer: Tokenizer, batch_size: int = 64) -> None:
        if batch_size < 1:
            raise ValueError(f"clip score: batch_size must be >= 1, got {batch_size}")
        self.model, self.tokenizer, self.batch_size = model, tokenizer, batch_size
        self.size, self.mean, self.std = _image_size_and_stats(model)

    @torch.no_grad()
    def __call__(self, images: Tensor | np.ndarray, captions: Sequence[str]) -> Tensor:
        if isinstance(images, np.ndarray):
            images = torch.from_numpy(images)
        captions = list(captions)
        if images.ndim != 4 or images.shape[0] != len(captions):
            raise ValueError(
                f"clip score: {len(captions)} captions for images of shape {tuple(images.shape)} (expected [B,3,H,W])"
            )
        device = next(self.model.parameters()).device
        scores = []
        for start in range(0, len(captions), self.batch_size):
            chunk = images[start : start + self.batch_size].to(device)
            pixels = clip_preprocess(chunk, self.size, self.mean, self.std)
            tokens = self.tokenizer(captions[start : start + self.batch_size]).to(device)
            scores.append(clip_score_from_features(self.model.encode_image(pixels), self.model.encode_text(tokens)))
        if not scores:
            raise ValueError("clip score: no images")
        return torch.cat(scores).cpu()


def clip_score(
    images: Tensor | np.ndarray, captions: Sequence[str], model: nn.Module, tokenizer: Tokenizer, batch_size: int = 64
) -> float:
    """Mean CLIP-S in [0, 100] of uint8 images [B, 3|1, H, W] against their B captions (see module docstring)."""
    return float(ClipScorer(model, tokenizer, batch_size)(images, captions).mean())
