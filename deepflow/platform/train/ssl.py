"""REPA alignment targets: patch features of a frozen DINOv2 (transformers ``Dinov2Model``).

The shard's uint8 images [B,3,H,W] are resized (bicubic) to ``image_size`` (224 for DINOv2-B/14 -> 16x16 = 256
tokens, matching a 32x32 latent with patch 2), normalised with the ImageNet mean/std, and encoded; the targets
are the patch tokens after the final layernorm (``last_hidden_state[:, 1:]``, the CLS token dropped, register
tokens too when the model has them), in float32. The encoder is frozen, in eval mode, and runs under
``torch.no_grad``.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

__all__ = ["DinoFeatures", "IMAGENET_MEAN", "IMAGENET_STD"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class DinoFeatures:
    """Callable: uint8 images [B,3,H,W] (or [B,1,H,W]) -> float32 patch tokens [B, N, D]."""

    def __init__(
        self,
        encoder: str | torch.nn.Module = "facebook/dinov2-base",
        image_size: int = 224,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> None:
        from transformers import Dinov2Model

        if isinstance(encoder, torch.nn.Module):
            model = encoder
        else:
            try:
                model = Dinov2Model.from_pretrained(encoder, local_files_only=os.path.isdir(encoder))
            except OSError as error:
                raise OSError(
                    f"ssl.encoder: cannot load DINOv2 from {encoder!r} (a hub id needs network or a cached copy; "
                    f"a local directory needs config.json + weights): {error}"
                ) from None
        self.device = torch.device(device)
        self.dtype = dtype
        self.model = model.to(self.device, dtype).eval().requires_grad_(False)
        self.image_size = image_size
        patch = int(self.model.config.patch_size)
        if image_size % patch:
            raise ValueError(f"ssl.image_size {image_size} is not a multiple of the encoder's patch size {patch}")
        self.num_tokens = (image_size // patch) ** 2
        self.num_registers = int(getattr(self.model.config, "num_register_tokens", 0) or 0)
        self.dim = int(self.model.config.hidden_size)
        self._mean = torch.tensor(IMAGENET_MEAN, device=self.device).view(1, 3, 1, 1)
        self._std = torch.tensor(IMAGENET_STD, device=self.device).view(1, 3, 1, 1)

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        if images.ndim != 4 or images.shape[1] not in (1, 3):
            raise ValueError(f"ssl: expected uint8 images [B,3,H,W] or [B,1,H,W], got {tuple(images.shape)}")
        x = images.to(self.device, non_blocking=True).float() / 255.0
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        if x.shape[-2:] != (self.image_size, self.image_size):
            x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bicubic", align_corners=False)
        x = ((x.clamp(0.0, 1.0) - self._mean) / self._std).to(self.dtype)
        hidden = self.model(pixel_values=x).last_hidden_state
        return hidden[:, 1 + self.num_registers :].float()
