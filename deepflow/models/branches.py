"""The DeepFlow branch machinery shared by DeepFlowDiT (class labels) and DeepFlowMMDiT (text).

A trunk of ``depth`` blocks is split at ``key_layers`` into k branches; branch i runs with its own condition
c_i = t_embed(t_i) + cond_embed. Between branches a VeRA block (gap embedding of t_{i+1} - t_i) refines the tokens;
every intermediate branch shares ``velocity_heads[0]``, the last branch has ``velocity_heads[-1]``, the VeRA
acceleration tokens go to the shared ``acc_head`` and (with SSL alignment) to one projector per VeRA block.

Shapes: B batch, C channels, (Hi, Wi) latent size, p patch, N = (Hi/p)(Wi/p) image tokens, H hidden width,
k branches.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.utils._pytree as pytree
from torch import nn
from torch.utils.checkpoint import checkpoint

from deepflow.models.layers import (
    FinalLayer,
    PatchEmbed,
    TimestepEmbedder,
    _xavier_linears,
    sincos_pos_embed_2d,
    unpatchify,
)
from deepflow.models.vera import VeRABlock

__all__ = ["BranchOutputs", "DeepFlowBranches", "build_projector", "check_key_layers", "VERA_MODES"]

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


def check_key_layers(key_layers: list[int], depth: int) -> None:
    """Raise ValueError unless ``key_layers`` are strictly increasing 1-based block counts ending with depth."""
    if not key_layers or key_layers[-1] != depth:
        raise ValueError(f"key_layers {key_layers} must end with depth {depth}")
    if any(b <= a for a, b in zip([0] + key_layers[:-1], key_layers)):
        raise ValueError(f"key_layers {key_layers} must be strictly increasing 1-based block counts > 0")


class DeepFlowBranches(nn.Module):
    """Base of the DeepFlow models: config, patch/time embedders, branch loop, VeRA blocks, heads, projectors.

    A subclass calls ``super().__init__(...)`` (validates, stores the shared config, builds ``x_embedder`` and
    ``t_embedder``), builds its condition embedders, then calls ``_build_trunk(blocks)`` and ``init_weights()``.
    It supplies ``_block_step`` (one trunk block, with whatever side state the blocks carry, e.g. text tokens),
    ``_reset_condition_parameters`` and ``_trunk_flops``; its ``forward`` embeds the condition and calls
    ``_check_times``, ``_branch_conditions`` and ``_run_branches``.
    """

    def __init__(
        self,
        *,
        input_size: int,
        patch_size: int,
        in_channels: int,
        hidden_size: int,
        depth: int,
        num_heads: int,
        mlp_ratio: float,
        key_layers: list[int] | tuple[int, ...] | None,
        ssl_align: bool,
        z_dim: int,
        projector_dim: int,
        acc_widths: tuple[int, int, int],
        dropout_name: str,
        dropout: float,
        vera_mode: str = "full",
        clamp_gap_scale: bool = True,
        check_heads: bool = False,
    ) -> None:
        """``dropout_name``/``dropout``: the condition-drop probability (stored as ``class_dropout``) and its name
        in error messages; ``check_heads`` checks hidden_size % num_heads before the SSL / dropout checks;
        ``clamp_gap_scale``: the VeRA gap-modulation scale is clamped to [-5, 5] (the reference's
        ``--legacy-scaling``; our default) or left unbounded (False)."""
        super().__init__()
        if vera_mode not in VERA_MODES:
            raise ValueError(f"vera_mode must be one of {VERA_MODES}, got {vera_mode!r}")
        if not isinstance(clamp_gap_scale, bool):
            raise ValueError(f"clamp_gap_scale must be true or false, got {clamp_gap_scale!r}")
        key_layers = list(key_layers) if key_layers is not None else [depth]
        check_key_layers(key_layers, depth)
        if input_size % patch_size:
            raise ValueError(f"input_size {input_size} is not divisible by patch_size {patch_size}")
        if check_heads and hidden_size % num_heads:
            raise ValueError(f"hidden size {hidden_size} is not divisible by num_heads {num_heads}")
        # "identity" = deep supervision only (branches joined directly, no acceleration outputs);
        # "no_cross_attention" = VeRA without the cross-space attention.
        has_vera = len(key_layers) > 1 and vera_mode != "identity"
        if ssl_align and not has_vera:
            raise ValueError("ssl_align needs at least 2 branches: the SSL projectors sit on the VeRA blocks")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"{dropout_name} must be in [0, 1), got {dropout}")
        self.input_size = input_size
        self.patch_size = patch_size
        self.in_channels = in_channels
        self.hidden_size = hidden_size
        self.depth = depth
        self.num_heads = num_heads
        self.mlp_ratio = mlp_ratio
        self.class_dropout = dropout
        self.key_layers = key_layers
        self.num_branches = len(key_layers)
        self.ssl_align = ssl_align
        self.z_dim = z_dim
        self.projector_dim = projector_dim
        self.acc_widths = tuple(acc_widths)
        self.vera_mode = vera_mode
        self.clamp_gap_scale = clamp_gap_scale
        self.has_vera = has_vera
        self.grid_size = input_size // patch_size
        self.gradient_checkpointing = False

        self.x_embedder = PatchEmbed(patch_size, in_channels, hidden_size)
        self.t_embedder = TimestepEmbedder(hidden_size)

    def _build_trunk(self, blocks: nn.ModuleList) -> None:
        """Register pos_embed [1,N,H], the trunk ``blocks`` and the branch modules (VeRA blocks, heads, projectors)."""
        hd, k = self.hidden_size, self.num_branches
        self.pos_embed = nn.Parameter(torch.zeros(1, self.grid_size**2, hd), requires_grad=False)
        self.blocks = blocks
        if self.has_vera:
            self.dt_embedder = TimestepEmbedder(2 * hd)
            self.vera_blocks = nn.ModuleList(
                VeRABlock(hd, self.num_heads, self.acc_widths, cross_attention=self.vera_mode == "full",
                          clamp_gap_scale=self.clamp_gap_scale)
                for _ in range(k - 1)
            )
            self.acc_head = FinalLayer(hd, self.patch_size, self.in_channels)
        # velocity_heads[0] is shared by every intermediate branch; velocity_heads[-1] is the last branch's.
        self.velocity_heads = nn.ModuleList(
            FinalLayer(hd, self.patch_size, self.in_channels) for _ in range(1 if k == 1 else 2)
        )
        if self.ssl_align:
            self.projectors = nn.ModuleList(
                build_projector(hd, self.projector_dim, self.z_dim) for _ in range(k - 1)
            )

    # ------------------------------------------------------------------ setup
    def init_weights(self) -> None:
        """(Re)initialise every parameter (DiT/SD3 scheme; zero-init adaLN and heads). Also after ``to_empty``."""
        _xavier_linears(self)
        self.x_embedder.reset_parameters()
        self.t_embedder.reset_parameters()
        self._reset_condition_parameters()
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

    def _reset_condition_parameters(self) -> None:
        """Re-initialise the model's own condition embedders (called by ``init_weights`` after the time embedder)."""
        raise NotImplementedError

    def shard_units(self) -> list[nn.Module]:
        """Trunk blocks then VeRA blocks: the units to wrap one by one (FSDP2 ``fully_shard``)."""
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
        """Image tokens N."""
        return self.grid_size**2

    # ---------------------------------------------------------------- forward
    def _check_times(
        self, x: torch.Tensor, t: torch.Tensor, return_all: bool
    ) -> tuple[torch.Tensor, bool]:
        """x [B,C,Hi,Wi], t scalar / [B] / [B,k] -> (t [B] or [B,k], whether t is per branch). Checks the shape."""
        k = self.num_branches
        if t.ndim == 0:
            t = t.expand(x.shape[0])
        per_branch = t.ndim == 2
        if per_branch and t.shape[1] != k:
            raise ValueError(f"times must be [B, {k}] for a {k}-branch model, got {tuple(t.shape)}")
        if return_all and not per_branch:
            raise ValueError(f"return_all=True needs times [B, {k}], got {tuple(t.shape)}")
        return t, per_branch

    def _branch_conditions(
        self, b: int, t: torch.Tensor, per_branch: bool, cond_emb: torch.Tensor
    ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Batch b, t [B] or [B,k], condition embedding [B,H] -> (k conditions [B,H], gap embeddings [B,2H]).

        Gaps: k-1 embeddings of t_{i+1} - t_i (zero gaps for t [B]); none without VeRA blocks.
        """
        k = self.num_branches
        if per_branch:
            t_emb = self.t_embedder(t.transpose(0, 1).reshape(-1)).view(k, b, -1)
            conds = [t_emb[i] + cond_emb for i in range(k)]
        else:
            conds = [self.t_embedder(t) + cond_emb] * k
        gaps: list[torch.Tensor] = []
        if self.has_vera:
            if per_branch:
                dt = (t[:, 1:] - t[:, :-1]).transpose(0, 1).reshape(-1)
                gaps = list(self.dt_embedder(dt).view(k - 1, b, -1).unbind(0))
            else:
                gaps = [self.dt_embedder(torch.zeros_like(t))] * (k - 1)
        return conds, gaps

    def _block_step(self, block: nn.Module, h: torch.Tensor, c: torch.Tensor, side: Any) -> tuple[torch.Tensor, Any]:
        """One trunk block: image tokens h [B,N,H], condition c [B,H], model-specific side state -> (h', side')."""
        raise NotImplementedError

    def _run_branches(
        self, x_tokens: torch.Tensor, conds: list[torch.Tensor], gaps: list[torch.Tensor], side: Any,
        return_all: bool, return_acceleration: bool = False,
    ) -> torch.Tensor | BranchOutputs | tuple[torch.Tensor, torch.Tensor]:
        """Embedded x [B,N,H] through all branches -> final velocity [B,C,Hi,Wi], or BranchOutputs (return_all),
        or with ``return_acceleration`` (final velocity, first VeRA block's acceleration), both [B,C,Hi,Wi].

        ``side`` is threaded through ``_block_step`` (the VeRA blocks act on the image tokens only).
        """
        k = self.num_branches
        if return_acceleration and not self.has_vera:
            raise ValueError("return_acceleration needs a DeepFlow model with VeRA blocks (>= 2 branches, "
                             f"vera_mode full or no_cross_attention); this one has {k} branch(es), {self.vera_mode}")
        velocities: list[torch.Tensor] = []
        accelerations: list[torch.Tensor] = []
        projections: list[torch.Tensor] = []
        h = x_tokens
        for i, (start, end) in enumerate(self.branch_ranges()):
            c = conds[i]
            for block in self.blocks[start:end]:
                h, side = self._block_step(block, h, c, side)
            if i == k - 1:
                break
            if return_all:
                velocities.append(self._to_image(self.velocity_heads[0](h, c)))
            if not self.has_vera:
                continue
            h, acc_tokens = self._maybe_checkpoint(self.vera_blocks[i], h, x_tokens, gaps[i])
            if return_all or (return_acceleration and i == 0):
                accelerations.append(self._to_image(self.acc_head(acc_tokens, c)))
            if return_all and self.ssl_align:
                projections.append(self.projectors[i](h))
        v_last = self._to_image(self.velocity_heads[-1](h, conds[-1]))
        if return_acceleration and not return_all:
            return v_last, accelerations[0]
        if not return_all:
            return v_last
        velocities.append(v_last)
        return BranchOutputs(velocities, accelerations, projections)

    def _maybe_checkpoint(self, module: nn.Module, *args: torch.Tensor) -> Any:
        """module(*args), recomputed in backward when ``gradient_checkpointing`` is on and grad is enabled."""
        if self.gradient_checkpointing and torch.is_grad_enabled():
            return checkpoint(module, *args, use_reentrant=False)
        return module(*args)

    def _to_image(self, patches: torch.Tensor) -> torch.Tensor:
        """Per-token patches [B,N,p*p*C] -> images [B,C,Hi,Wi]."""
        return unpatchify(patches, self.patch_size, self.in_channels, self.grid_size, self.grid_size)

    # ------------------------------------------------------------------ FLOPs
    def _branch_flops(self, train: bool, attention: bool) -> int:
        """MACs per image outside the trunk blocks and condition embedders: patch conv, time and gap embeddings,
        VeRA blocks, heads, SSL projectors; with ``attention`` the VeRA cross-attention matmuls (2 N^2 H each)."""
        n, hd, k = self.num_tokens, self.hidden_size, self.num_branches
        out = self.patch_size**2 * self.in_channels
        time_embeds = k if train else 1
        total = n * self.in_channels * self.patch_size**2 * hd  # patch embedding conv
        total += time_embeds * (256 * hd + hd * hd)
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
        if attention and self.has_vera and self.vera_mode == "full":
            total += (k - 1) * 2 * n * n * hd
        return total
