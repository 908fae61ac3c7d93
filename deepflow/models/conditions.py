"""Conditions of the flow models: class labels or text, batched, dropped and paired with their null condition.

A condition is either
- a class condition: ``y`` LongTensor [B] (null = the model's ``num_classes``), or
- a text condition: a dict ``{"text_emb": [B,L,D] float, "text_mask": [B,L] bool, "text_pooled": [B,P] float}``
  (the loader's batch keys; ``text_mask`` is True on real tokens). The null text is the empty caption's encoding
  (``ShardLoader.null_text()``), given unbatched ([L,D], [L], [P]) or with a leading batch dimension of 1.

Every helper here works on both kinds, so the objective and the samplers never branch on the model family.
"""

from __future__ import annotations

from typing import Mapping, Union

import torch

__all__ = [
    "TEXT_KEYS",
    "Condition",
    "NullCondition",
    "is_text_condition",
    "condition_batch_size",
    "check_text_condition",
    "null_condition_batch",
    "concat_conditions",
    "where_condition",
    "drop_conditions",
    "nullify_rows",
    "condition_to",
    "slice_condition",
    "condition_from_batch",
]

TEXT_KEYS: tuple[str, str, str] = ("text_emb", "text_mask", "text_pooled")
Condition = Union[torch.Tensor, Mapping[str, torch.Tensor]]
NullCondition = Union[int, Mapping[str, torch.Tensor]]
# tensor rank of each text key WITHOUT the batch dimension
_UNBATCHED_NDIM = {"text_emb": 2, "text_mask": 1, "text_pooled": 1}


def is_text_condition(cond: object) -> bool:
    """True for a text-condition mapping, False for a class-label tensor."""
    return isinstance(cond, Mapping)


def check_text_condition(cond: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Validate a batched text condition (keys, ranks, matching B and L, bool mask); return it as a plain dict."""
    missing = [k for k in TEXT_KEYS if k not in cond]
    if missing:
        raise ValueError(f"text condition is missing {missing}; expected keys {list(TEXT_KEYS)}")
    emb, mask, pooled = (cond[k] for k in TEXT_KEYS)
    if emb.ndim != 3 or mask.ndim != 2 or pooled.ndim != 2:
        raise ValueError(
            "text condition must be batched: text_emb [B,L,D], text_mask [B,L], text_pooled [B,P]; got "
            f"{tuple(emb.shape)}, {tuple(mask.shape)}, {tuple(pooled.shape)}"
        )
    if mask.shape != emb.shape[:2] or pooled.shape[0] != emb.shape[0]:
        raise ValueError(
            f"text condition shapes disagree: text_emb {tuple(emb.shape)}, text_mask {tuple(mask.shape)}, "
            f"text_pooled {tuple(pooled.shape)}"
        )
    if mask.dtype != torch.bool:
        raise ValueError(f"text_mask must be a bool tensor (True = real token), got {mask.dtype}")
    return {k: cond[k] for k in TEXT_KEYS}


def condition_batch_size(cond: Condition) -> int:
    """B of a class-label tensor [B] or of a text dict."""
    if is_text_condition(cond):
        return int(cond["text_emb"].shape[0])
    return int(cond.shape[0])


def null_condition_batch(null: NullCondition, batch: int, like: Condition) -> Condition:
    """The null condition repeated ``batch`` times, on ``like``'s device (and, for text, its float dtype).

    ``null`` is an int class id (-> LongTensor [batch]) or a text dict of unbatched or [1,...] tensors
    (-> a text dict with batch dimension ``batch``). ``like`` is a condition of the kind expected.
    """
    if is_text_condition(like):
        if not is_text_condition(null):
            raise TypeError(
                "text conditions need a text null condition (the empty caption's text_emb/text_mask/text_pooled), "
                f"got {type(null).__name__}"
            )
        out: dict[str, torch.Tensor] = {}
        for key in TEXT_KEYS:
            if key not in null:
                raise ValueError(f"null text condition is missing {key!r}; expected keys {list(TEXT_KEYS)}")
            value, ref = null[key], like[key]
            if value.ndim == _UNBATCHED_NDIM[key]:
                value = value.unsqueeze(0)
            if value.ndim != ref.ndim or value.shape[0] != 1 or value.shape[1:] != ref.shape[1:]:
                raise ValueError(
                    f"null text condition {key!r} has shape {tuple(null[key].shape)}; expected {tuple(ref.shape[1:])} "
                    f"or {(1, *ref.shape[1:])} to match the batch's {tuple(ref.shape)}"
                )
            out[key] = value.to(device=ref.device, dtype=ref.dtype).expand(batch, *ref.shape[1:])
        return out
    if is_text_condition(null):
        raise TypeError("class-label conditions need an int null label, got a text condition")
    return torch.full((batch,), int(null), dtype=like.dtype, device=like.device)


def concat_conditions(first: Condition, second: Condition) -> Condition:
    """[first; second] along the batch dimension (both of the same kind)."""
    if is_text_condition(first):
        return {k: torch.cat([first[k], second[k]]) for k in TEXT_KEYS}
    return torch.cat([first, second])


def slice_condition(cond: Condition, index: slice | torch.Tensor) -> Condition:
    """Rows ``index`` of a condition (a slice or an index tensor)."""
    if is_text_condition(cond):
        return {k: cond[k][index] for k in TEXT_KEYS}
    return cond[index]


def where_condition(mask: torch.Tensor, replacement: Condition, cond: Condition) -> Condition:
    """Row-wise select: rows where ``mask`` [B] bool is True come from ``replacement``, the rest from ``cond``."""
    if is_text_condition(cond):
        out = {}
        for key in TEXT_KEYS:
            value = cond[key]
            m = mask.reshape(-1, *([1] * (value.ndim - 1)))
            out[key] = torch.where(m, replacement[key], value)
        return out
    return torch.where(mask, replacement, cond)


def drop_conditions(
    cond: Condition, prob: float, null: NullCondition, generator: torch.Generator
) -> tuple[Condition, torch.Tensor | None]:
    """Replace each row by the null condition with probability ``prob`` (classifier-free guidance training).

    Draws one U(0,1) per row from ``generator`` (on the generator's device, then moved), nothing when prob <= 0.
    Returns (condition, drop mask [B] bool or None when nothing was drawn).
    """
    if prob <= 0:
        return cond, None
    b = condition_batch_size(cond)
    device = cond["text_emb"].device if is_text_condition(cond) else cond.device
    drop = torch.rand((b,), generator=generator, device=generator.device).to(device) < prob
    return nullify_rows(cond, drop, null), drop


def nullify_rows(cond: Condition, mask: torch.Tensor, null: NullCondition) -> Condition:
    """``cond`` with the rows where ``mask`` [B] bool is True replaced by the null condition."""
    return where_condition(mask, null_condition_batch(null, condition_batch_size(cond), cond), cond)


def condition_to(cond: Condition, device: torch.device | str, dtype: torch.dtype | None = None) -> Condition:
    """Move a condition to ``device``; ``dtype`` (if given) applies to the float tensors of a text condition."""
    if is_text_condition(cond):
        out = {}
        for key in TEXT_KEYS:
            value = cond[key].to(device, non_blocking=True)
            if dtype is not None and value.is_floating_point():
                value = value.to(dtype)
            out[key] = value
        return out
    return cond.to(device, non_blocking=True)


def condition_from_batch(batch: Mapping[str, torch.Tensor], device: torch.device | str | None = None) -> Condition:
    """The model condition of a loader batch: the text dict when the batch has ``text_emb`` (caption datasets),
    else the labels ``y`` [B]; moved to ``device`` if given."""
    if "text_emb" in batch:
        cond: Condition = check_text_condition(batch)
    elif "y" in batch:
        cond = batch["y"]
    else:
        raise KeyError(f"batch has neither text keys {list(TEXT_KEYS)} nor labels 'y': {sorted(batch)}")
    return condition_to(cond, device) if device is not None else cond
