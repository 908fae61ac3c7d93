"""DeepFlowMMDiT: an SD3-style MMDiT for text-to-image, split into k deeply supervised branches (k = 1: MMDiT).

Shapes: B batch, C channels, (Hi, Wi) latent size, p patch, N = (Hi/p)(Wi/p) image tokens, L text tokens,
D text-encoder width (``context_dim``), P pooled text width (``pooled_dim``), H hidden width, k branches.

Layout (SD3's MMDiT, diffusers' JointTransformerBlock): image tokens = patch embedding + fixed 2-D sin-cos position
embedding; text tokens = Linear(D, H) of the encoder's per-token features (no position embedding: the encoder's
features carry it); c = t_embed(t) + pooled_embed(text_pooled). Each joint block has two streams (image, text), each
with its own adaLN-Zero modulation from c, its own qkv / output projections and MLP; attention runs jointly over the
concatenated [text, image] tokens, padding text tokens masked out as keys. The last block of the model only needs
the text stream's keys/values (SD3's ``context_pre_only``): it has no text output projection or MLP, so every
parameter receives gradient (DDP without find_unused_parameters).

DeepFlow: as DeepFlowDiT (see REFERENCE.md) with VeRA blocks acting on the image tokens only; the text tokens pass
unchanged from branch i to branch i+1. The model draws no randomness: text dropout is the objective's job.
"""

from __future__ import annotations

import torch
from torch import nn

from deepflow.models.branches import BranchOutputs, DeepFlowBranches
from deepflow.models.conditions import check_text_condition
from deepflow.models.layers import Mlp, _xavier_linears, modulate, multihead_sdpa

__all__ = ["DeepFlowMMDiT", "JointBlock", "JointStream", "PooledTextEmbedder", "joint_attention"]

TextCondition = dict[str, torch.Tensor]


def joint_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: torch.Tensor, num_heads: int
) -> torch.Tensor:
    """Masked multi-head SDPA: q [B,Nq,H], k/v [B,Nk,H], key_mask [B,Nk] bool (True = attend) -> [B,Nq,H]."""
    return multihead_sdpa(q, k, v, num_heads, attn_mask=key_mask[:, None, None, :])


class PooledTextEmbedder(nn.Module):
    """Pooled text vector [B,P] -> [B,H]: Linear-SiLU-Linear (``mlp.0``, ``mlp.2``), like SD3's text projection."""

    def __init__(self, pooled_dim: int, hidden_size: int) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(pooled_dim, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size))

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.mlp(pooled.to(self.mlp[0].weight.dtype))

    def reset_parameters(self) -> None:
        for i in (0, 2):
            nn.init.normal_(self.mlp[i].weight, std=0.02)
            nn.init.zeros_(self.mlp[i].bias)


class _QKNorm(nn.Module):
    """Optional per-head RMSNorm of queries and keys (SD3.5's qk-norm); identity when disabled.

    ``keys_only``: a key/value-only stream has no query norm (it would get no gradient).
    """

    def __init__(self, head_dim: int, enabled: bool, keys_only: bool = False) -> None:
        super().__init__()
        self.enabled = enabled
        self.head_dim = head_dim
        if enabled:
            self.k = nn.RMSNorm(head_dim, eps=1e-6)
            if not keys_only:
                self.q = nn.RMSNorm(head_dim, eps=1e-6)

    def _norm(self, norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return norm(x.view(*x.shape[:-1], -1, self.head_dim)).view(x.shape)

    def forward(self, q: torch.Tensor | None, k: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor]:
        """q (or None), k [B,N,H] -> normalised per head, same shapes."""
        if not self.enabled:
            return q, k
        return (None if q is None else self._norm(self.q, q)), self._norm(self.k, k)


class JointStream(nn.Module):
    """One stream (image or text) of a joint block: adaLN-Zero modulation from c, qkv, out-proj and MLP.

    ``adaLN_modulation.1`` rows: shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp (zero-init).
    With ``pre_only`` the stream only provides keys/values: modulation rows shift_msa, scale_msa, a fused
    ``qkv`` of k, v rows only ([2H, H]), no out-proj / MLP.
    """

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float, qk_norm: bool, pre_only: bool) -> None:
        super().__init__()
        self.pre_only = pre_only
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.qkv = nn.Linear(hidden_size, (2 if pre_only else 3) * hidden_size)
        self.qk_norm = _QKNorm(hidden_size // num_heads, qk_norm, keys_only=pre_only)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, (2 if pre_only else 6) * hidden_size))
        if not pre_only:
            self.proj = nn.Linear(hidden_size, hidden_size)
            self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
            self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))

    def pre_attention(
        self, x: torch.Tensor, c: torch.Tensor
    ) -> tuple[tuple[torch.Tensor | None, torch.Tensor, torch.Tensor], tuple[torch.Tensor, ...]]:
        """x [B,N,H], c [B,H] -> ((q, k, v) each [B,N,H]; q None if pre_only, the other modulation chunks [B,H])."""
        mods = self.adaLN_modulation(c).chunk(2 if self.pre_only else 6, dim=-1)
        qkv = self.qkv(modulate(self.norm1(x), mods[0], mods[1]))
        if self.pre_only:
            q, (k, v) = None, qkv.chunk(2, dim=-1)
        else:
            q, k, v = qkv.chunk(3, dim=-1)
        q, k = self.qk_norm(q, k)
        return (q, k, v), mods[2:]

    def post_attention(self, x: torch.Tensor, attn: torch.Tensor, mods: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """Residual updates of the stream: x [B,N,H], attention output [B,N,H] -> [B,N,H]."""
        gate_msa, shift_mlp, scale_mlp, gate_mlp = mods
        x = x + gate_msa.unsqueeze(1) * self.proj(attn)
        return x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))

    def reset_parameters(self) -> None:
        _xavier_linears(self)
        nn.init.zeros_(self.adaLN_modulation[1].weight)
        nn.init.zeros_(self.adaLN_modulation[1].bias)


class JointBlock(nn.Module):
    """MMDiT joint block: image tokens x [B,N,H], text tokens ctx [B,L,H], c [B,H], key mask [B,L+N] bool.

    Returns (x', ctx') [B,N,H], [B,L,H]. With ``context_pre_only`` the text stream only contributes keys/values
    (only image queries are computed) and ctx is returned unchanged.
    """

    def __init__(
        self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0, qk_norm: bool = False,
        context_pre_only: bool = False,
    ) -> None:
        super().__init__()
        if hidden_size % num_heads:
            raise ValueError(f"hidden size {hidden_size} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.context_pre_only = context_pre_only
        self.image = JointStream(hidden_size, num_heads, mlp_ratio, qk_norm, pre_only=False)
        self.text = JointStream(hidden_size, num_heads, mlp_ratio, qk_norm, pre_only=context_pre_only)

    def forward(
        self, x: torch.Tensor, ctx: torch.Tensor, c: torch.Tensor, key_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        (qi, ki, vi), mods_i = self.image.pre_attention(x, c)
        (qt, kt, vt), mods_t = self.text.pre_attention(ctx, c)
        k = torch.cat([kt, ki], dim=1)
        v = torch.cat([vt, vi], dim=1)
        n_text = ctx.shape[1]
        if self.context_pre_only:
            x = self.image.post_attention(x, joint_attention(qi, k, v, key_mask, self.num_heads), mods_i)
            return x, ctx
        attn = joint_attention(torch.cat([qt, qi], dim=1), k, v, key_mask, self.num_heads)
        attn_t, attn_i = attn[:, :n_text], attn[:, n_text:]
        return self.image.post_attention(x, attn_i, mods_i), self.text.post_attention(ctx, attn_t, mods_t)

    def reset_parameters(self) -> None:
        self.image.reset_parameters()
        self.text.reset_parameters()


class DeepFlowMMDiT(DeepFlowBranches):
    """DeepFlow-MMDiT-{depth}-{k}T (k = len(key_layers)); a plain MMDiT when k = 1.

    ``cond`` is a text dict {"text_emb": [B,L,D], "text_mask": [B,L] bool, "text_pooled": [B,P]}; any L works
    (``max_text_length`` only enters the FLOP count). ``key_layers`` are 1-based block counts ending each branch.
    Set ``gradient_checkpointing = True`` to recompute each block in backward. ``clamp_gap_scale``: clamp the
    VeRA time-gap modulation scale to [-5, 5] (default) or not (False), as in ``DeepFlowDiT``.
    """

    conditioning = "text"
    num_classes = None  # no class labels: the null condition is the empty caption, supplied by the caller

    def __init__(
        self,
        input_size: int = 32,
        patch_size: int = 2,
        in_channels: int = 4,
        hidden_size: int = 768,
        depth: int = 24,
        num_heads: int = 24,
        mlp_ratio: float = 4.0,
        context_dim: int = 768,
        pooled_dim: int | None = None,
        max_text_length: int = 77,
        text_dropout: float = 0.1,
        key_layers: list[int] | tuple[int, ...] | None = None,
        qk_norm: bool = False,
        ssl_align: bool = False,
        z_dim: int = 768,
        projector_dim: int = 2048,
        acc_widths: tuple[int, int, int] = (2048, 4096, 2048),
        clamp_gap_scale: bool = True,
    ) -> None:
        super().__init__(
            input_size=input_size, patch_size=patch_size, in_channels=in_channels, hidden_size=hidden_size,
            depth=depth, num_heads=num_heads, mlp_ratio=mlp_ratio, key_layers=key_layers, ssl_align=ssl_align,
            z_dim=z_dim, projector_dim=projector_dim, acc_widths=acc_widths, dropout_name="text_dropout",
            dropout=text_dropout, clamp_gap_scale=clamp_gap_scale, check_heads=True,
        )
        self.context_dim = context_dim
        self.pooled_dim = pooled_dim if pooled_dim is not None else context_dim
        self.max_text_length = max_text_length
        self.text_dropout = text_dropout  # also ``class_dropout``, the trainer's name for the condition-drop rate
        self.qk_norm = qk_norm

        self.pooled_embedder = PooledTextEmbedder(self.pooled_dim, hidden_size)
        self.context_embedder = nn.Linear(context_dim, hidden_size)
        self._build_trunk(nn.ModuleList(
            JointBlock(hidden_size, num_heads, mlp_ratio, qk_norm, context_pre_only=i == depth - 1)
            for i in range(depth)
        ))
        self.init_weights()

    def _reset_condition_parameters(self) -> None:
        """Pooled-text embedder and the qk-norm RMSNorms (the context embedder is a plain xavier Linear)."""
        self.pooled_embedder.reset_parameters()
        for m in self.modules():
            if isinstance(m, nn.RMSNorm):
                m.reset_parameters()

    # ---------------------------------------------------------------- forward
    def forward_train(self, x: torch.Tensor, times: torch.Tensor, cond: TextCondition) -> BranchOutputs:
        """x_{t1} [B,C,Hi,Wi], times [B,k], cond text dict -> BranchOutputs (all heads). Goes through ``__call__``."""
        return self(x, times, cond, return_all=True)

    def forward(
        self, x: torch.Tensor, t: torch.Tensor, cond: TextCondition, return_all: bool = False
    ) -> torch.Tensor | BranchOutputs:
        """Inference: x [B,C,Hi,Wi], t [B] (or scalar, or [B,k]), cond text dict -> final velocity [B,C,Hi,Wi].

        With ``return_all=True`` t must be [B,k] and all heads run (see ``forward_train``).
        """
        if not isinstance(cond, dict):
            raise TypeError(
                "DeepFlowMMDiT needs a text condition dict {text_emb [B,L,D], text_mask [B,L], text_pooled [B,P]}, "
                f"got {type(cond).__name__}"
            )
        cond = check_text_condition(cond)
        b = x.shape[0]
        t, per_branch = self._check_times(x, t, return_all)
        x_tokens = self.x_embedder(x) + self.pos_embed
        ctx = self.context_embedder(cond["text_emb"].to(self.context_embedder.weight.dtype))
        text_mask = cond["text_mask"]
        key_mask = torch.cat([text_mask, text_mask.new_ones(b, x_tokens.shape[1])], dim=1)  # [B, L+N]
        conds, gaps = self._branch_conditions(b, t, per_branch, self.pooled_embedder(cond["text_pooled"]))
        # the text tokens pass through the VeRA blocks unchanged
        return self._run_branches(x_tokens, conds, gaps, (ctx, key_mask), return_all)

    def _block_step(
        self, block: nn.Module, h: torch.Tensor, c: torch.Tensor, side: tuple[torch.Tensor, torch.Tensor]
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """Joint block: h [B,N,H], c [B,H], side (text tokens ctx [B,L,H], key mask [B,L+N]) -> (h', (ctx', mask))."""
        ctx, key_mask = side
        h, ctx = self._maybe_checkpoint(block, h, ctx, c, key_mask)
        return h, (ctx, key_mask)

    # ------------------------------------------------------------------ FLOPs
    def flops_per_image(self, train: bool = False, attention: bool = False, text_length: int | None = None) -> int:
        """Multiply-accumulates of the linear layers (and patch conv) for one image (the paper's "GFLOPs" x 1e9).

        ``text_length`` L (default ``max_text_length``) counts padding tokens too: they are computed. train=False:
        the inference forward (last head only; VeRA blocks run). train=True: all heads, SSL projectors, k time and
        k-1 gap embeddings. attention=True adds the QK^T and AV matmuls of the joint and VeRA attentions.
        """
        n, hd = self.num_tokens, self.hidden_size
        length = self.max_text_length if text_length is None else text_length
        mlp_hidden = int(hd * self.mlp_ratio)
        total = self._branch_flops(train, attention)
        total += self.pooled_dim * hd + hd * hd + length * self.context_dim * hd  # pooled + context embedders

        def stream(tokens: int) -> int:  # qkv + out-proj + MLP per token, plus the 6H adaLN modulation
            return tokens * (4 * hd * hd + 2 * hd * mlp_hidden) + 6 * hd * hd

        total += self.depth * stream(n) + (self.depth - 1) * stream(length)
        total += length * 2 * hd * hd + 2 * hd * hd  # last block's text stream: modulation + k, v only
        if attention:
            joint = n + length
            total += (self.depth - 1) * 2 * joint * joint * hd + 2 * n * joint * hd
        return total
