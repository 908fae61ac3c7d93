"""DeepFlowDiT: a SiT trunk split into k deeply supervised branches joined by VeRA blocks (k = 1 is SiT).

Shapes: B batch, C channels, (Hi, Wi) latent size, p patch, N = (Hi/p)(Wi/p) tokens, H hidden width, k branches.
"""

from __future__ import annotations

import torch
from torch import nn

from deepflow.models.branches import VERA_MODES, BranchOutputs, DeepFlowBranches, build_projector
from deepflow.models.layers import AdaLNBlock, LabelEmbedder

__all__ = ["BranchOutputs", "DeepFlowDiT", "build_projector", "VERA_MODES"]


class DeepFlowDiT(DeepFlowBranches):
    """DeepFlow-{S,B,L,XL}/p-{k}T (k = len(key_layers)); SiT when k = 1.

    ``key_layers`` are 1-based block counts ending each branch, strictly increasing, the last = depth.
    The model draws no randomness: label dropout (``class_dropout``, null label = ``num_classes``) is the
    objective's job. Set ``gradient_checkpointing = True`` to recompute each block in backward.
    ``vera_mode``: "full", "no_cross_attention" (VeRA without cross-space attention) or "identity" (deep
    supervision only: branches joined directly, no acceleration outputs).
    ``clamp_gap_scale``: clamp the VeRA time-gap modulation scale to [-5, 5] (default, as REFERENCE.md describes;
    the reference implementation does this only when trained with ``--legacy-scaling``) or not (False).
    """

    def __init__(
        self,
        input_size: int = 32,
        patch_size: int = 2,
        in_channels: int = 4,
        hidden_size: int = 1152,
        depth: int = 28,
        num_heads: int = 16,
        mlp_ratio: float = 4.0,
        num_classes: int = 1000,
        class_dropout: float = 0.1,
        key_layers: list[int] | tuple[int, ...] | None = None,
        ssl_align: bool = False,
        z_dim: int = 768,
        projector_dim: int = 2048,
        acc_widths: tuple[int, int, int] = (2048, 4096, 2048),
        vera_mode: str = "full",
        clamp_gap_scale: bool = True,
    ) -> None:
        super().__init__(
            input_size=input_size, patch_size=patch_size, in_channels=in_channels, hidden_size=hidden_size,
            depth=depth, num_heads=num_heads, mlp_ratio=mlp_ratio, key_layers=key_layers, ssl_align=ssl_align,
            z_dim=z_dim, projector_dim=projector_dim, acc_widths=acc_widths, dropout_name="class_dropout",
            dropout=class_dropout, vera_mode=vera_mode, clamp_gap_scale=clamp_gap_scale,
        )
        self.num_classes = num_classes
        self.y_embedder = LabelEmbedder(num_classes, hidden_size)
        self._build_trunk(nn.ModuleList(AdaLNBlock(hidden_size, num_heads, mlp_ratio) for _ in range(depth)))
        self.init_weights()

    def _reset_condition_parameters(self) -> None:
        self.y_embedder.reset_parameters()

    # ---------------------------------------------------------------- forward
    def forward_train(self, x: torch.Tensor, times: torch.Tensor, y: torch.Tensor) -> BranchOutputs:
        """x_{t1} [B,C,Hi,Wi], times [B,k], y [B] -> BranchOutputs (all heads). Goes through ``__call__``."""
        return self(x, times, y, return_all=True)

    def forward(
        self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, return_all: bool = False,
        return_acceleration: bool = False,
    ) -> torch.Tensor | BranchOutputs | tuple[torch.Tensor, torch.Tensor]:
        """Inference: x [B,C,Hi,Wi], t [B] (or scalar, or [B,k]), y [B] long -> final velocity [B,C,Hi,Wi].

        With ``return_all=True`` t must be [B,k] and all heads run (see ``forward_train``). With
        ``return_acceleration=True`` (models with VeRA blocks): (final velocity, acceleration a_1 [B,C,Hi,Wi]) - the
        first VeRA block's acceleration head output at the input time, trained so that x - t v_1 + t^2 a_1 / 2
        predicts x0 (v_1 = the first branch's velocity), i.e. a_1 ~ 2 (v_1 - E[V | x_t]) / t.
        """
        t, per_branch = self._check_times(x, t, return_all)
        x_tokens = self.x_embedder(x) + self.pos_embed
        conds, gaps = self._branch_conditions(x.shape[0], t, per_branch, self.y_embedder(y))
        return self._run_branches(x_tokens, conds, gaps, None, return_all, return_acceleration)

    def _block_step(self, block: nn.Module, h: torch.Tensor, c: torch.Tensor, side: None) -> tuple[torch.Tensor, None]:
        """AdaLN block: h [B,N,H], c [B,H] -> ([B,N,H], None)."""
        return self._maybe_checkpoint(block, h, c), side

    # ------------------------------------------------------------------ FLOPs
    def flops_per_image(self, train: bool = False, attention: bool = False) -> int:
        """Multiply-accumulates of the linear layers (and patch conv) for one image (the paper's "GFLOPs" x 1e9).

        train=False: the inference forward (last head only; VeRA blocks run). train=True: the training forward
        (all velocity/acceleration heads, SSL projectors, k time and k-1 gap embeddings); a training step is
        about 3x that (forward + backward). attention=True adds the QK^T and AV matmuls (2 N^2 H per attention).
        """
        n, hd = self.num_tokens, self.hidden_size
        per_block = n * (4 * hd * hd + 2 * hd * int(hd * self.mlp_ratio)) + 6 * hd * hd
        total = self._branch_flops(train, attention) + self.depth * per_block
        if attention:
            total += self.depth * 2 * n * n * hd
        return total
