"""Reusable transformer pieces of the SiT / DeepFlow family (also used by the MMDiT).

Shapes: B batch, N tokens, H hidden width, C image channels, p patch size.
All attention goes through ``F.scaled_dot_product_attention`` (flash / memory-efficient kernels on GPU).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "modulate",
    "multihead_sdpa",
    "timestep_features",
    "sincos_pos_embed_2d",
    "TimestepEmbedder",
    "LabelEmbedder",
    "PatchEmbed",
    "Attention",
    "Mlp",
    "AdaLNBlock",
    "FinalLayer",
    "unpatchify",
]


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN modulation: x [B,N,D], shift/scale [B,D] -> x * (1 + scale) + shift, broadcast over tokens."""
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


def multihead_sdpa(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_heads: int, attn_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Multi-head scaled dot-product attention on packed heads.

    q [B,Nq,D], k/v [B,Nk,D] with D = num_heads * head_dim -> [B,Nq,D]. Softmax scale 1/sqrt(head_dim).
    ``attn_mask``: optional bool mask broadcastable to [B, heads, Nq, Nk] (True = attend).
    """
    b, nq, d = q.shape
    nk = k.shape[1]
    head_dim = d // num_heads
    q = q.view(b, nq, num_heads, head_dim).transpose(1, 2)
    k = k.view(b, nk, num_heads, head_dim).transpose(1, 2)
    v = v.view(b, nk, num_heads, head_dim).transpose(1, 2)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
    return out.transpose(1, 2).reshape(b, nq, d)


def timestep_features(t: torch.Tensor, dim: int = 256, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal features of raw times t [B] (t in [0,1], not rescaled) -> [B, dim] float32.

    Layout: cos(t f_k) for k < dim/2, then sin(t f_k), with f_k = exp(-ln(max_period) k / (dim/2)).
    """
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


def sincos_pos_embed_2d(embed_dim: int, grid_size: int) -> torch.Tensor:
    """Fixed 2-D sin-cos position embedding in the MAE/DiT layout -> [grid_size**2, embed_dim] float32.

    Token n = row * grid_size + col. The first half of the channels encodes the column coordinate, the second
    half the row coordinate (MAE's np.meshgrid(w, h) order); each half is [sin(pos * omega), cos(pos * omega)] with omega_k = 1 / 10000^(k / (D/4)).
    """
    if embed_dim % 4:
        raise ValueError(f"sin-cos position embedding needs hidden_size divisible by 4, got {embed_dim}")
    coords = torch.arange(grid_size, dtype=torch.float64, device="cpu")
    grid_w, grid_h = torch.meshgrid(coords, coords, indexing="xy")  # grid_w varies along columns

    def one_axis(pos: torch.Tensor) -> torch.Tensor:
        omega = torch.arange(embed_dim // 4, dtype=torch.float64, device="cpu") / (embed_dim / 4.0)
        omega = 1.0 / 10000**omega
        out = pos.reshape(-1)[:, None] * omega[None]
        return torch.cat([torch.sin(out), torch.cos(out)], dim=1)

    emb = torch.cat([one_axis(grid_w), one_axis(grid_h)], dim=1)
    return emb.float()


class TimestepEmbedder(nn.Module):
    """Scalar times [B] -> [B, hidden]: 256 sinusoidal features, Linear-SiLU-Linear (``mlp.0``, ``mlp.2``)."""

    def __init__(self, hidden_size: int, frequency_size: int = 256) -> None:
        super().__init__()
        self.frequency_size = frequency_size
        self.mlp = nn.Sequential(
            nn.Linear(frequency_size, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size)
        )

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        feats = timestep_features(t, self.frequency_size).to(self.mlp[0].weight.dtype)
        return self.mlp(feats)

    def reset_parameters(self) -> None:
        for i in (0, 2):
            nn.init.normal_(self.mlp[i].weight, std=0.02)
            nn.init.zeros_(self.mlp[i].bias)


class LabelEmbedder(nn.Module):
    """Class labels [B] long -> [B, hidden]. Row ``num_classes`` is the null label of classifier-free guidance.

    Draws no randomness: label dropout is done by the objective (explicit generator).
    """

    def __init__(self, num_classes: int, hidden_size: int) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.embedding_table = nn.Embedding(num_classes + 1, hidden_size)

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        return self.embedding_table(y)

    def reset_parameters(self) -> None:
        nn.init.normal_(self.embedding_table.weight, std=0.02)


class PatchEmbed(nn.Module):
    """Images [B,C,H,W] -> tokens [B, (H/p)(W/p), hidden] with a stride-p convolution (``proj``)."""

    def __init__(self, patch_size: int, in_channels: int, hidden_size: int) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_channels, hidden_size, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)

    def reset_parameters(self) -> None:
        w = self.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.proj.bias)


class Attention(nn.Module):
    """Self-attention with a fused qkv projection (rows q, k, v) and an output projection ``proj``."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"hidden size {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [B,N,D] -> [B,N,D]."""
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        return self.proj(multihead_sdpa(q, k, v, self.num_heads))


class Mlp(nn.Module):
    """fc1 - tanh-GELU - fc2 (the timm/DiT MLP layout)."""

    def __init__(self, in_features: int, hidden_features: int, out_features: int | None = None) -> None:
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden_features, out_features or in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class AdaLNBlock(nn.Module):
    """DiT/SiT adaLN-Zero transformer block: x [B,N,H], c [B,H] -> [B,N,H].

    ``adaLN_modulation.1`` rows: shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp (zero-init).
    """

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads, qkv_bias=True)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=-1)
        x = x + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))
        x = x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))
        return x

    def reset_parameters(self) -> None:
        _xavier_linears(self)
        nn.init.zeros_(self.adaLN_modulation[1].weight)
        nn.init.zeros_(self.adaLN_modulation[1].bias)


class FinalLayer(nn.Module):
    """Velocity / acceleration head: tokens [B,N,H], c [B,H] -> per-token patches [B,N,p*p*C] (zero-init).

    LayerNorm without affine, shift/scale (in that order) from SiLU+Linear(H,2H), then ``linear``.
    """

    def __init__(self, hidden_size: int, patch_size: int, out_channels: int) -> None:
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=-1)
        return self.linear(modulate(self.norm_final(x), shift, scale))

    def reset_parameters(self) -> None:
        for lin in (self.linear, self.adaLN_modulation[1]):
            nn.init.zeros_(lin.weight)
            nn.init.zeros_(lin.bias)


def unpatchify(x: torch.Tensor, patch_size: int, channels: int, grid_h: int, grid_w: int) -> torch.Tensor:
    """Per-token patches [B, h*w, p*p*C] laid out (p, p, C) -> images [B, C, h*p, w*p]."""
    b = x.shape[0]
    p = patch_size
    x = x.reshape(b, grid_h, grid_w, p, p, channels)
    x = torch.einsum("nhwpqc->nchpwq", x)
    return x.reshape(b, channels, grid_h * p, grid_w * p)


def _xavier_linears(module: nn.Module) -> None:
    """Xavier-uniform weights and zero biases for every nn.Linear under ``module``."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
