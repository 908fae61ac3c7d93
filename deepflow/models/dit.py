"""DeepFlowDiT: a SiT trunk split into k deeply supervised branches joined by VeRA blocks (k = 1 is SiT).

Shapes: B batch, C channels, (Hi, Wi) latent size, p patch, N = (Hi/p)(Wi/p) tokens, H hidden width, k branches.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.utils._pytree as pytree
from torch import nn
from torch.utils.checkpoint import checkpoint

from deepflow.models.layers import (
    AdaLNBlock,
    FinalLayer,
    LabelEmbedder,
    PatchEmbed,
    TimestepEmbedder,
    _xavier_linears,
    sincos_pos_embed_2d,
    unpatchify,
)
from deepflow.models.vera import VeRABlock

__all__ = ["BranchOutputs", "DeepFlowDiT", "build_projector", "VERA_MODES"]

VERA_MODES = ("full", "no_cross_attention", "identity")


@dataclass
class BranchOutputs:
    """Training outputs of all branches.

    velocities: k tensors [B,C,Hi,Wi]; accelerations: k-1 tensors [B,C,Hi,Wi] (empty for SiT);
    projections: k-1 tensors [B,N,z_dim] (empty without SSL alignment).
    """

    velocities: list[torch.Tensor]
    accelerations: list[torch.Tensor] = field(default_factory=list)
    projections: list[torch.Tensor] = field(default_factory=list)


# A pytree node, so that FSDP2 / DDP / torch.compile see the tensors inside (backward hooks on outputs).
pytree.register_dataclass(BranchOutputs)


def build_projector(hidden_size: int, projector_dim: int, z_dim: int) -> nn.Sequential:
    """SSL (REPA) projector: Linear(H,P)-SiLU-Linear(P,P)-SiLU-Linear(P,z) (indices 0, 2, 4)."""
    return nn.Sequential(
        nn.Linear(hidden_size, projector_dim), nn.SiLU(),
        nn.Linear(projector_dim, projector_dim), nn.SiLU(),
        nn.Linear(projector_dim, z_dim),
    )


class DeepFlowDiT(nn.Module):
    """DeepFlow-{S,B,L,XL}/p-{k}T (k = len(key_layers)); SiT when k = 1.

    ``key_layers`` are 1-based block counts ending each branch, strictly increasing, the last = depth.
    The model draws no randomness: label dropout (``class_dropout``, null label = ``num_classes``) is the
    objective's job. Set ``gradient_checkpointing = True`` to recompute each block in backward.
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
    ) -> None:
        super().__init__()
        if vera_mode not in VERA_MODES:
            raise ValueError(f"vera_mode must be one of {VERA_MODES}, got {vera_mode!r}")
        key_layers = list(key_layers) if key_layers is not None else [depth]
        _check_key_layers(key_layers, depth)
        if input_size % patch_size:
            raise ValueError(f"input_size {input_size} is not divisible by patch_size {patch_size}")
        if ssl_align and (len(key_layers) < 2 or vera_mode == "identity"):
            raise ValueError("ssl_align needs at least 2 branches: the SSL projectors sit on the VeRA blocks")
        if not 0.0 <= class_dropout < 1.0:
            raise ValueError(f"class_dropout must be in [0, 1), got {class_dropout}")
        self.input_size = input_size
        self.patch_size = patch_size
        self.in_channels = in_channels
        self.hidden_size = hidden_size
        self.depth = depth
        self.num_heads = num_heads
        self.mlp_ratio = mlp_ratio
        self.num_classes = num_classes
        self.class_dropout = class_dropout
        self.key_layers = key_layers
        self.num_branches = len(key_layers)
        self.ssl_align = ssl_align
        self.z_dim = z_dim
        self.projector_dim = projector_dim
        self.acc_widths = tuple(acc_widths)
        self.vera_mode = vera_mode
        # Ablations: "identity" = deep supervision only (branches joined directly, no acceleration outputs);
        # "no_cross_attention" = VeRA without the cross-space attention.
        self.has_vera = len(key_layers) > 1 and vera_mode != "identity"
        self.grid_size = input_size // patch_size
        self.gradient_checkpointing = False

        self.x_embedder = PatchEmbed(patch_size, in_channels, hidden_size)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size)
        self.pos_embed = nn.Parameter(torch.zeros(1, self.grid_size**2, hidden_size), requires_grad=False)
        self.blocks = nn.ModuleList(AdaLNBlock(hidden_size, num_heads, mlp_ratio) for _ in range(depth))
        k = self.num_branches
        if self.has_vera:
            self.dt_embedder = TimestepEmbedder(2 * hidden_size)
            self.vera_blocks = nn.ModuleList(
                VeRABlock(hidden_size, num_heads, self.acc_widths, cross_attention=vera_mode == "full")
                for _ in range(k - 1)
            )
            self.acc_head = FinalLayer(hidden_size, patch_size, in_channels)
        # velocity_heads[0] is shared by every intermediate branch; velocity_heads[-1] is the last branch's.
        self.velocity_heads = nn.ModuleList(
            FinalLayer(hidden_size, patch_size, in_channels) for _ in range(1 if k == 1 else 2)
        )
        if ssl_align:
            self.projectors = nn.ModuleList(
                build_projector(hidden_size, projector_dim, z_dim) for _ in range(k - 1)
            )
        self.init_weights()

    # ------------------------------------------------------------------ setup
    def init_weights(self) -> None:
        """(Re)initialise every parameter (DiT scheme; zero-init adaLN and heads). Also after ``to_empty``."""
        _xavier_linears(self)
        self.x_embedder.reset_parameters()
        self.t_embedder.reset_parameters()
        self.y_embedder.reset_parameters()
        for block in self.blocks:
            block.reset_parameters()
        for head in self.velocity_heads:
            head.reset_parameters()
        if self.has_vera:
            self.dt_embedder.reset_parameters()
            for vera in self.vera_blocks:
                vera.reset_parameters()
            self.acc_head.reset_parameters()
        with torch.no_grad():
            pe = sincos_pos_embed_2d(self.hidden_size, self.grid_size)
            self.pos_embed.copy_(pe.unsqueeze(0).to(self.pos_embed.device, self.pos_embed.dtype))

    def shard_units(self) -> list[nn.Module]:
        """Transformer blocks then VeRA blocks: the units to wrap one by one (FSDP2 ``fully_shard``)."""
        units: list[nn.Module] = list(self.blocks)
        if self.has_vera:
            units.extend(self.vera_blocks)
        return units

    def branch_ranges(self) -> list[tuple[int, int]]:
        """[start, end) block indices of each branch."""
        starts = [0] + self.key_layers[:-1]
        return list(zip(starts, self.key_layers))

    @property
    def num_tokens(self) -> int:
        return self.grid_size**2

    # ---------------------------------------------------------------- forward
    def forward_train(self, x: torch.Tensor, times: torch.Tensor, y: torch.Tensor) -> BranchOutputs:
        """x_{t1} [B,C,Hi,Wi], times [B,k], y [B] -> BranchOutputs (all heads). Goes through ``__call__``."""
        return self(x, times, y, return_all=True)

    def forward(
        self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, return_all: bool = False
    ) -> torch.Tensor | BranchOutputs:
        """Inference: x [B,C,Hi,Wi], t [B] (or scalar, or [B,k]), y [B] long -> final velocity [B,C,Hi,Wi].

        With ``return_all=True`` t must be [B,k] and all heads run (see ``forward_train``).
        """
        b = x.shape[0]
        k = self.num_branches
        if t.ndim == 0:
            t = t.expand(b)
        per_branch = t.ndim == 2
        if per_branch and t.shape[1] != k:
            raise ValueError(f"times must be [B, {k}] for a {k}-branch model, got {tuple(t.shape)}")
        if return_all and not per_branch:
            raise ValueError(f"return_all=True needs times [B, {k}], got {tuple(t.shape)}")

        x_tokens = self.x_embedder(x) + self.pos_embed
        y_emb = self.y_embedder(y)
        if per_branch:
            t_emb = self.t_embedder(t.transpose(0, 1).reshape(-1)).view(k, b, -1)
            conds = [t_emb[i] + y_emb for i in range(k)]
        else:
            conds = [self.t_embedder(t) + y_emb] * k
        gaps: list[torch.Tensor] = []
        if self.has_vera:
            if per_branch:
                dt = (t[:, 1:] - t[:, :-1]).transpose(0, 1).reshape(-1)
                gaps = list(self.dt_embedder(dt).view(k - 1, b, -1).unbind(0))
            else:
                gaps = [self.dt_embedder(torch.zeros_like(t))] * (k - 1)

        velocities: list[torch.Tensor] = []
        accelerations: list[torch.Tensor] = []
        projections: list[torch.Tensor] = []
        h = x_tokens
        for i, (start, end) in enumerate(self.branch_ranges()):
            c = conds[i]
            for block in self.blocks[start:end]:
                h = self._maybe_checkpoint(block, h, c)
            if i == k - 1:
                break
            if return_all:
                velocities.append(self._to_image(self.velocity_heads[0](h, c)))
            if not self.has_vera:
                continue
            h, acc_tokens = self._maybe_checkpoint(self.vera_blocks[i], h, x_tokens, gaps[i])
            if return_all:
                accelerations.append(self._to_image(self.acc_head(acc_tokens, c)))
                if self.ssl_align:
                    projections.append(self.projectors[i](h))
        v_last = self._to_image(self.velocity_heads[-1](h, conds[-1]))
        if not return_all:
            return v_last
        velocities.append(v_last)
        return BranchOutputs(velocities, accelerations, projections)

    def _maybe_checkpoint(self, module: nn.Module, *args: torch.Tensor):
        if self.gradient_checkpointing and torch.is_grad_enabled():
            return checkpoint(module, *args, use_reentrant=False)
        return module(*args)

    def _to_image(self, patches: torch.Tensor) -> torch.Tensor:
        return unpatchify(patches, self.patch_size, self.in_channels, self.grid_size, self.grid_size)

    # ------------------------------------------------------------------ FLOPs
    def flops_per_image(self, train: bool = False, attention: bool = False) -> int:
        """Multiply-accumulates of the linear layers (and patch conv) for one image (the paper's "GFLOPs" x 1e9).

        train=False: the inference forward (last head only; VeRA blocks run). train=True: the training forward
        (all velocity/acceleration heads, SSL projectors, k time and k-1 gap embeddings); a training step is
        about 3x that (forward + backward). attention=True adds the QK^T and AV matmuls (2 N^2 H per attention).
        """
        n, hd, k = self.num_tokens, self.hidden_size, self.num_branches
        out = self.patch_size**2 * self.in_channels
        mlp_hidden = int(hd * self.mlp_ratio)
        time_embeds = k if train else 1
        total = n * self.in_channels * self.patch_size**2 * hd  # patch embedding conv
        total += time_embeds * (256 * hd + hd * hd)
        per_block = n * (4 * hd * hd + 2 * hd * mlp_hidden) + 6 * hd * hd
        total += self.depth * per_block
        head = 2 * hd * hd + n * hd * out
        if self.has_vera:
            w0, w1, w2 = self.acc_widths
            vera = n * (hd * w0 + w0 * w1 + w1 * w2 + w2 * hd)  # ACC_MLP
            vera += 8 * hd * hd + n * (4 * hd * hd + 2 * hd * hd)  # gap modulation + its MLP
            if self.vera_mode == "full":
                vera += n * 4 * hd * hd  # cross attention: q, k, v, out projections
            total += (k - 1) * vera
            total += (k - 1 if train else 1) * (256 * 2 * hd + 4 * hd * hd)  # gap embeddings
        heads_run = (2 * k - 1 if self.has_vera else k) if train else 1
        total += heads_run * head
        if train and self.ssl_align:
            p = self.projector_dim
            total += (k - 1) * n * (hd * p + p * p + p * self.z_dim)
        if attention:
            cross_attentions = k - 1 if self.has_vera and self.vera_mode == "full" else 0
            total += (self.depth + cross_attentions) * 2 * n * n * hd
        return total


def _check_key_layers(key_layers: list[int], depth: int) -> None:
    if not key_layers or key_layers[-1] != depth:
        raise ValueError(f"key_layers {key_layers} must end with depth {depth}")
    if any(b <= a for a, b in zip([0] + key_layers[:-1], key_layers)):
        raise ValueError(f"key_layers {key_layers} must be strictly increasing 1-based block counts > 0")
