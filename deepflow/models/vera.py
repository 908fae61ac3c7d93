"""The VeRA block (velocity refiner with acceleration) that sits between two DeepFlow branches.

Shapes: B batch, N tokens, H hidden width.
"""

from __future__ import annotations

import torch
from torch import nn

from deepflow.models.layers import Mlp, _xavier_linears, modulate, multihead_sdpa

__all__ = ["AccMlp", "GapModulation", "CrossSpaceAttention", "VeRABlock", "GAP_SCALE_BOUND"]

#: The bound of the clamped gap-modulation scale: scale in [-GAP_SCALE_BOUND, GAP_SCALE_BOUND].
GAP_SCALE_BOUND = 5.0


class AccMlp(nn.Sequential):
    """ACC_MLP: Linear(H,w0)-SiLU-Linear(w0,w1)-SiLU-Linear(w1,w2)-SiLU-Linear(w2,H) (indices 0,2,4,6).

    The reference widths are (2048, 4096, 2048); tests shrink them.
    """

    def __init__(self, hidden_size: int, widths: tuple[int, int, int] = (2048, 4096, 2048)) -> None:
        w0, w1, w2 = widths
        super().__init__(
            nn.Linear(hidden_size, w0), nn.SiLU(),
            nn.Linear(w0, w1), nn.SiLU(),
            nn.Linear(w1, w2), nn.SiLU(),
            nn.Linear(w2, hidden_size),
        )


class GapModulation(nn.Module):
    """Time-gap modulation on z = concat(h, a*) [B,N,2H] with the gap embedding e [B,2H] -> [B,N,H].

    LayerNorm(2H) without affine; shift, scale (that order) from SiLU+Linear(2H,4H) (zero-init), scale clamped
    to [-5, 5] when ``clamp_scale`` (the reference's ``--legacy-scaling``; left as is otherwise); then
    Mlp 2H -> 2H -> H (tanh-GELU). No gate, no residual.
    """

    def __init__(self, hidden_size: int, clamp_scale: bool = True) -> None:
        super().__init__()
        if not isinstance(clamp_scale, bool):
            raise ValueError(f"clamp_gap_scale must be true or false, got {clamp_scale!r}")
        self.clamp_scale = clamp_scale
        width = 2 * hidden_size
        self.norm_final = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(width, width, hidden_size)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 2 * width))

    def forward(self, z: torch.Tensor, gap_emb: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(gap_emb).chunk(2, dim=-1)
        if self.clamp_scale:
            scale = scale.clamp(-GAP_SCALE_BOUND, GAP_SCALE_BOUND)
        return self.mlp(modulate(self.norm_final(z), shift, scale))

    def extra_repr(self) -> str:
        return f"clamp_scale={self.clamp_scale}"


class CrossSpaceAttention(nn.Module):
    """Cross-space attention: query = patch-embedded x_{t1} [B,N,H], key/value = refined features [B,N,H].

    One affine LayerNorm (eps 1e-5) normalises both query and key/value; output = LN(query) + attention.
    Parameters keep nn.MultiheadAttention's layout (``in_proj_weight`` [3H,H] with q,k,v rows stacked,
    ``in_proj_bias`` [3H], ``out_proj``) but the math runs through F.scaled_dot_product_attention.
    """

    def __init__(self, hidden_size: int, num_heads: int) -> None:
        super().__init__()
        if hidden_size % num_heads:
            raise ValueError(f"hidden size {hidden_size} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * hidden_size, hidden_size))
        self.in_proj_bias = nn.Parameter(torch.empty(3 * hidden_size))
        self.out_proj = nn.Linear(hidden_size, hidden_size)
        self.layer_norm = nn.LayerNorm(hidden_size)

    def forward(self, query: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
        hidden = query.shape[-1]
        q_in = self.layer_norm(query)
        kv_in = self.layer_norm(kv)
        w_q, w_kv = self.in_proj_weight.split([hidden, 2 * hidden], dim=0)
        b_q, b_kv = self.in_proj_bias.split([hidden, 2 * hidden], dim=0)
        q = nn.functional.linear(q_in, w_q, b_q)
        k, v = nn.functional.linear(kv_in, w_kv, b_kv).chunk(2, dim=-1)
        return q_in + self.out_proj(multihead_sdpa(q, k, v, self.num_heads))

    def reset_parameters(self) -> None:
        nn.init.xavier_uniform_(self.in_proj_weight)
        nn.init.zeros_(self.in_proj_bias)
        nn.init.xavier_uniform_(self.out_proj.weight)
        nn.init.zeros_(self.out_proj.bias)
        self.layer_norm.reset_parameters()


class VeRABlock(nn.Module):
    """h [B,N,H] (branch i's tokens), x_query [B,N,H] (embedded x_{t1}), gap_emb [B,2H] -> (next_h, a*).

    next_h [B,N,H] is the input of branch i+1; a* [B,N,H] are the acceleration tokens (fed to the shared
    acceleration head by the model when training). ``clamp_gap_scale``: clamp the gap-modulation scale to
    [-5, 5] (see ``GapModulation``).
    """

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        acc_widths: tuple[int, int, int] = (2048, 4096, 2048),
        cross_attention: bool = True,
        clamp_gap_scale: bool = True,
    ) -> None:
        super().__init__()
        self.acc_mlp = AccMlp(hidden_size, acc_widths)
        self.acc_norm = GapModulation(hidden_size, clamp_scale=clamp_gap_scale)
        # Without cross-space attention (an ablation), the modulated features are the next branch's input.
        self.cross_attention = CrossSpaceAttention(hidden_size, num_heads) if cross_attention else None

    def forward(
        self, h: torch.Tensor, x_query: torch.Tensor, gap_emb: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        acc = self.acc_mlp(h)
        refined = self.acc_norm(torch.cat([h, acc], dim=-1), gap_emb)
        if self.cross_attention is None:
            return refined, acc
        return self.cross_attention(x_query, refined), acc

    def reset_parameters(self) -> None:
        _xavier_linears(self)
        if self.cross_attention is not None:
            self.cross_attention.reset_parameters()
        nn.init.zeros_(self.acc_norm.adaLN_modulation[1].weight)
        nn.init.zeros_(self.acc_norm.adaLN_modulation[1].bias)
