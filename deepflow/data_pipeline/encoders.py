"""Image encoders of the precompute job: ``pixel`` (identity) and ``vae`` (diffusers AutoencoderKL).

An encoder maps a batch of preprocessed images ``uint8 [B, C, R, R]`` to the shard fields of that batch
(numpy arrays with the sample axis first, see :mod:`deepflow.data_pipeline.shards`) and describes itself
for the manifest.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from .config import PixelEncoderConfig, VaeEncoderConfig

TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def to_unit_range(pixels: torch.Tensor) -> torch.Tensor:
    """``uint8 [B, C, H, W]`` (0..255) -> float32 in [-1, 1]."""
    return pixels.to(torch.float32) / 127.5 - 1.0


def unit_range_to_uint8(pixels: np.ndarray) -> np.ndarray:
    """float [..] in [-1, 1] -> uint8 0..255: the exact inverse of :func:`to_unit_range` (float16 pixel shards store
    ``u / 127.5 - 1``; their rounding error, < 0.07 levels, vanishes in the rounding)."""
    return np.clip(np.rint((pixels.astype(np.float32) + 1.0) * 127.5), 0, 255).astype(np.uint8)


class PixelEncoder:
    """Identity: stores ``pixels`` as uint8 ``[B, C, R, R]`` or float16 in [-1, 1]."""

    kind = "pixel"

    def __init__(self, config: PixelEncoderConfig) -> None:
        self.config = config

    def output_shape(self, channels: int, resolution: int) -> list[int]:
        return [channels, resolution, resolution]

    @property
    def field_dtypes(self) -> dict[str, str]:
        return {"pixels": self.config.dtype}

    @property
    def stats_field(self) -> str:
        return "pixels"

    def encode(self, pixels: torch.Tensor) -> dict[str, np.ndarray]:
        """``uint8 [B, C, R, R]`` -> ``{"pixels": [B, C, R, R]}`` (uint8 or float16 in [-1, 1])."""
        if self.config.dtype == "uint8":
            return {"pixels": pixels.numpy().astype(np.uint8, copy=False)}
        return {"pixels": to_unit_range(pixels).to(torch.float16).numpy()}

    def describe(self) -> dict[str, Any]:
        return {"name": "pixel", "dtype": self.config.dtype, "version": 1}


class VaeEncoder:
    """diffusers ``AutoencoderKL`` posterior: mean and std ``float16 [B, 4, R/8, R/8]`` (unscaled).

    Training draws ``(mean + std * eps) * scale`` each step.  With ``flip_copy`` the posterior of the
    horizontally flipped image is stored as well (``mean_flip``/``std_flip``), so a flip is exact.
    """

    kind = "vae"

    def __init__(self, config: VaeEncoderConfig, device: torch.device) -> None:
        from diffusers import AutoencoderKL

        self.config = config
        self.device = device
        self.dtype = TORCH_DTYPES[config.dtype]
        if config.random_init is not None:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(0)  # identical weights on every rank
                self.vae = AutoencoderKL(**config.random_init)
        else:
            self.vae = AutoencoderKL.from_pretrained(config.model, subfolder=config.subfolder,
                                                     revision=config.revision)
        self.vae = self.vae.to(device=device, dtype=self.dtype).eval().requires_grad_(False)
        self.latent_channels = int(self.vae.config.latent_channels)
        self.downsample = 2 ** (len(self.vae.config.block_out_channels) - 1)

    def output_shape(self, channels: int, resolution: int) -> list[int]:
        if resolution % self.downsample:
            raise ValueError(f"preprocess.resolution: {resolution} is not a multiple of the VAE's factor {self.downsample}")
        size = resolution // self.downsample
        return [self.latent_channels, size, size]

    @property
    def field_dtypes(self) -> dict[str, str]:
        names = ["mean", "std"] + (["mean_flip", "std_flip"] if self.config.flip_copy else [])
        return {name: "float16" for name in names}

    @property
    def stats_field(self) -> str:
        return "mean"

    @torch.inference_mode()
    def posterior(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """float images in [-1, 1] ``[B, 3, R, R]`` -> (mean, std), float16 ``[B, 4, R/8, R/8]``."""
        distribution = self.vae.encode(images.to(self.device, self.dtype)).latent_dist
        return distribution.mean.to(torch.float16), distribution.std.to(torch.float16)

    def encode(self, pixels: torch.Tensor) -> dict[str, np.ndarray]:
        """``uint8 [B, 3, R, R]`` -> ``mean``/``std`` (and ``mean_flip``/``std_flip``) ``float16 [B, 4, r, r]``."""
        if pixels.shape[1] != 3:
            raise ValueError(f"vae encoder: expected 3-channel images, got shape {list(pixels.shape)}")
        images = to_unit_range(pixels)
        batch = images.shape[0]
        if self.config.flip_copy:
            images = torch.cat([images, images.flip(-1)])
        mean, std = self.posterior(images)
        mean, std = mean.cpu().numpy(), std.cpu().numpy()
        fields = {"mean": mean[:batch], "std": std[:batch]}
        if self.config.flip_copy:
            fields.update({"mean_flip": mean[batch:], "std_flip": std[batch:]})
        return fields

    def describe(self) -> dict[str, Any]:
        import diffusers

        return {
            "name": "vae",
            "class": "diffusers.AutoencoderKL",
            "model": "random_init" if self.config.random_init is not None else self.config.model,
            "subfolder": self.config.subfolder,
            "revision": self.config.revision,
            "random_init": self.config.random_init,
            "diffusers_version": diffusers.__version__,
            "compute_dtype": self.config.dtype,
            "scale": self.config.scale,
            "flip_copy": self.config.flip_copy,
            "version": 1,
        }


def build_encoder(config: PixelEncoderConfig | VaeEncoderConfig, device: torch.device) -> PixelEncoder | VaeEncoder:
    if isinstance(config, PixelEncoderConfig):
        return PixelEncoder(config)
    return VaeEncoder(config, device)
