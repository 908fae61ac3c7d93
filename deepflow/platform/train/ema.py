"""Exponential moving average of the weights, kept on each rank's LOCAL slice of every parameter.

The engine decides what a slice is (:meth:`Engine.named_local_params`): the full tensor (DDP, ZeRO-1/2), the FSDP2
DTensor local shard, or the ZeRO-3 partition ``ds_tensor``. So an update touches only local memory and never
gathers the model; :meth:`Engine.iter_full` assembles full weights, one tensor at a time, only for evaluation and
export (so rank 0 never holds a second copy of the model). Checkpoints
hold the slices (or, unsharded, the full tensors); a resume on another world size cuts this rank's slices out of
them, tensor by tensor, with :meth:`Engine.local_slice` into :meth:`ShardedEMA.load_state_dict`.

ema <- decay * ema + (1 - decay) * param, in fp32, every ``every`` steps from ``start_step`` on (before that the
EMA copies the weights). Initialised as a copy of the model.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch

__all__ = ["ShardedEMA"]


class ShardedEMA:
    """fp32 EMA buffers shaped like the engine's local parameter slices."""

    def __init__(
        self, local_params: dict[str, torch.Tensor], decay: float = 0.9999, start_step: int = 0, every: int = 1
    ) -> None:
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"ema.decay must be in [0, 1], got {decay}")
        self.decay = decay
        self.start_step = start_step
        self.every = every
        self.shadow: dict[str, torch.Tensor] = {
            name: tensor.detach().to(torch.float32, copy=True) for name, tensor in local_params.items()
        }

    @torch.no_grad()
    def update(self, local_params: dict[str, torch.Tensor], step: int) -> bool:
        """Fold the current weights in after optimizer step ``step`` (1-based); True if an update happened."""
        if step < self.start_step:
            self._copy(local_params)
            return True
        if step % self.every:
            return False
        names = list(self.shadow)
        shadows = [self.shadow[name] for name in names]
        params = [local_params[name].detach() for name in names]
        if any(p.dtype != torch.float32 for p in params):
            params = [p.float() for p in params]
        torch._foreach_lerp_(shadows, params, 1.0 - self.decay)
        return True

    @torch.no_grad()
    def _copy(self, local_params: dict[str, torch.Tensor]) -> None:
        for name, shadow in self.shadow.items():
            shadow.copy_(local_params[name].detach())

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The local EMA slices (live tensors; clone before writing asynchronously)."""
        return self.shadow

    @torch.no_grad()
    def load_state_dict(self, state: Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy ``state`` (slices shaped like this rank's: see :meth:`Engine.local_slice`) into the EMA buffers.

        ``state``: a dict, or (name, slice) pairs read one at a time (a checkpoint being read: each is copied and
        dropped, so loading holds one tensor beside the EMA). KeyError for names the EMA lacks or misses."""
        pairs = state.items() if isinstance(state, Mapping) else state
        if isinstance(state, Mapping):
            self._check_names(set(state))
        seen: set[str] = set()
        for name, value in pairs:
            if name not in self.shadow:
                raise KeyError(f"EMA state does not match the model: unexpected [{name!r}]")
            shadow = self.shadow[name]
            if value.shape != shadow.shape:
                raise ValueError(
                    f"EMA tensor {name}: shape {tuple(value.shape)} in the checkpoint, {tuple(shadow.shape)} here "
                    "(not this rank's slice of this model: cut it with Engine.local_slice)"
                )
            shadow.copy_(value)
            seen.add(name)
        self._check_names(seen)

    def _check_names(self, names: set[str]) -> None:
        missing = sorted(set(self.shadow) - names)
        unexpected = sorted(names - set(self.shadow))
        if missing or unexpected:
            raise KeyError(f"EMA state does not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
