"""Named architectures: "SiT-{S,B,L,XL}/{2,4,8}", "DeepFlow-{S,B,L,XL}/{2,4,8}-{k}T" (class-conditional DiT)
and "MMDiT-{depth}", "DeepFlow-MMDiT-{depth}-{k}T" (text-to-image; hidden 32 x depth, depth heads, patch 2).

``create_model(name, **overrides)`` builds on the current default device, so
``with torch.device("meta"): create_model(...)`` allocates nothing.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass
from typing import Any, Literal

from deepflow.models.dit import DeepFlowDiT
from deepflow.models.mmdit import DeepFlowMMDiT

__all__ = [
    "create_model", "create_mmdit", "list_models", "model_spec", "ModelSpec", "parse_model_name", "parse_mmdit_name",
    "even_key_layers", "SIZES", "MMDIT_HIDDEN_PER_LAYER",
]

# size -> (hidden_size, num_heads, SiT depth)
SIZES: dict[str, tuple[int, int, int]] = {
    "S": (384, 6, 12),
    "B": (768, 12, 12),
    "L": (1024, 16, 24),
    "XL": (1152, 16, 28),
}
PATCH_SIZES = (2, 4, 8)
BRANCH_COUNTS = (2, 3, 4)
# The paper's default depths of DeepFlow configs; other (size, k) use the SiT depth rounded down to a multiple of k.
PAPER_DEPTHS: dict[tuple[str, int], int] = {("B", 2): 12, ("L", 3): 18, ("XL", 3): 24, ("XL", 4): 28}

_NAME = re.compile(r"^(?P<family>SiT|DeepFlow)-(?P<size>S|B|L|XL)/(?P<patch>\d+)(?:-(?P<k>\d+)T)?$")
_MMDIT_NAME = re.compile(r"^(?:(?P<deepflow>DeepFlow)-)?MMDiT-(?P<depth>\d+)(?:-(?P<k>\d+)T)?$")
# REPA's COCO MMDiT: hidden size 32 x depth, heads = depth (head width 32)
MMDIT_HIDDEN_PER_LAYER = 32
_MMDIT_OVERRIDES = {
    "key_layers", "input_size", "in_channels", "patch_size", "context_dim", "pooled_dim", "max_text_length",
    "text_dropout", "class_dropout", "hidden_size", "num_heads", "mlp_ratio", "qk_norm", "ssl_align", "z_dim",
    "projector_dim", "acc_widths", "clamp_gap_scale",
}
_OVERRIDES = {
    "depth", "key_layers", "input_size", "in_channels", "num_classes", "ssl_align", "z_dim", "projector_dim",
    "class_dropout", "hidden_size", "num_heads", "mlp_ratio", "acc_widths", "patch_size", "vera_mode",
    "clamp_gap_scale",
}


def list_models() -> list[str]:
    """Every registered DiT-family name (MMDiT names are parametric in depth: "MMDiT-24", "DeepFlow-MMDiT-24-3T")."""
    names = [f"SiT-{s}/{p}" for s in SIZES for p in PATCH_SIZES]
    names += [f"DeepFlow-{s}/{p}-{k}T" for s in SIZES for p in PATCH_SIZES for k in BRANCH_COUNTS]
    return names


def parse_model_name(name: str) -> tuple[str, int, int]:
    """"DeepFlow-XL/2-3T" -> ("XL", 2, 3); "SiT-B/4" -> ("B", 4, 1). Raises ValueError on a bad name."""
    m = _NAME.match(name.strip()) if isinstance(name, str) else None
    if m is None:
        raise ValueError(
            f"unknown model name {name!r}: expected 'SiT-{{S,B,L,XL}}/{{2,4,8}}' or "
            f"'DeepFlow-{{S,B,L,XL}}/{{2,4,8}}-{{2,3,4}}T'"
        )
    family, size, patch = m["family"], m["size"], int(m["patch"])
    if patch not in PATCH_SIZES:
        raise ValueError(f"model name {name!r}: patch size {patch} not in {PATCH_SIZES}")
    if family == "SiT":
        if m["k"] is not None:
            raise ValueError(f"model name {name!r}: SiT has one branch; use 'DeepFlow-{size}/{patch}-kT'")
        return size, patch, 1
    if m["k"] is None:
        raise ValueError(f"model name {name!r}: DeepFlow needs a branch count, e.g. 'DeepFlow-{size}/{patch}-3T'")
    k = int(m["k"])
    if k not in BRANCH_COUNTS:
        raise ValueError(f"model name {name!r}: branch count {k} not in {BRANCH_COUNTS}")
    return size, patch, k


def default_depth(size: str, k: int) -> int:
    """The paper's depth for named DeepFlow configs (B-2T 12, L-3T 18, XL-3T 24, XL-4T 28), else SiT's."""
    if (size, k) in PAPER_DEPTHS:
        return PAPER_DEPTHS[(size, k)]
    sit_depth = SIZES[size][2]
    return sit_depth - sit_depth % k


def even_key_layers(depth: int, k: int) -> list[int]:
    """Evenly spaced 1-based key layers, the last = depth: (24, 3) -> [8, 16, 24]."""
    if depth < k:
        raise ValueError(f"depth {depth} is smaller than the branch count {k}")
    return [round(depth * (i + 1) / k) for i in range(k)]


def _reject_unknown(name: str, overrides: dict[str, Any], allowed: set[str], depth_in_name: bool = False) -> None:
    """TypeError naming the overrides outside ``allowed`` (with a hint when the depth is fixed by the name)."""
    unknown = sorted(set(overrides) - allowed)
    if unknown:
        hint = " (the depth is part of the name)" if depth_in_name and "depth" in unknown else ""
        raise TypeError(f"create_model({name!r}): unknown overrides {unknown}{hint}; allowed: {sorted(allowed)}")


def _pop_key_layers(name: str, overrides: dict[str, Any], depth: int, k: int) -> list[int]:
    """The ``key_layers`` override (popped; it must have k entries) or k evenly spaced key layers."""
    key_layers = overrides.pop("key_layers", None)
    if key_layers is None:
        return even_key_layers(depth, k)
    if len(key_layers) != k:
        raise ValueError(f"create_model({name!r}): key_layers {list(key_layers)} must have {k} entries")
    return list(key_layers)


def parse_mmdit_name(name: str) -> tuple[int, int] | None:
    """"DeepFlow-MMDiT-24-3T" -> (24, 3); "MMDiT-24" -> (24, 1); None for a non-MMDiT name; ValueError if malformed."""
    if not isinstance(name, str) or "MMDiT" not in name:
        return None
    m = _MMDIT_NAME.match(name.strip())
    if m is None:
        raise ValueError(
            f"unknown model name {name!r}: expected 'MMDiT-{{depth}}' or 'DeepFlow-MMDiT-{{depth}}-{{k}}T'"
        )
    depth = int(m["depth"])
    if depth < 1:
        raise ValueError(f"model name {name!r}: depth must be >= 1")
    if m["deepflow"] is None:
        if m["k"] is not None:
            raise ValueError(f"model name {name!r}: MMDiT has one branch; use 'DeepFlow-MMDiT-{depth}-kT'")
        return depth, 1
    if m["k"] is None:
        raise ValueError(f"model name {name!r}: DeepFlow needs a branch count, e.g. 'DeepFlow-MMDiT-{depth}-3T'")
    k = int(m["k"])
    if k not in BRANCH_COUNTS:
        raise ValueError(f"model name {name!r}: branch count {k} not in {BRANCH_COUNTS}")
    return depth, k


@dataclass(frozen=True)
class ModelSpec:
    """What the registry knows about a name before building it: the class, what it is conditioned on, its branch
    count and depth, and the ``create_model`` overrides it accepts. Configs ask this instead of parsing names."""

    name: str
    model_class: type[DeepFlowDiT] | type[DeepFlowMMDiT]
    condition: Literal["class", "text"]
    num_branches: int
    depth: int
    depth_in_name: bool
    accepted_overrides: frozenset[str]

    @property
    def takes_classes(self) -> bool:
        return self.condition == "class"


def model_spec(name: str) -> ModelSpec:
    """The :class:`ModelSpec` of a registered name; ValueError naming the close matches for an unknown one."""
    try:
        parsed = parse_mmdit_name(name)
        if parsed is not None:
            depth, k = parsed
            return ModelSpec(name, DeepFlowMMDiT, "text", k, depth, True, frozenset(_MMDIT_OVERRIDES))
        size, _, k = parse_model_name(name)
    except ValueError as error:
        close = difflib.get_close_matches(str(name), list_models() + ["MMDiT-24", "DeepFlow-MMDiT-24-3T"], n=3)
        hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        raise ValueError(f"{error}{hint}") from None
    return ModelSpec(name, DeepFlowDiT, "class", k, default_depth(size, k), False, frozenset(_OVERRIDES))


def create_mmdit(name: str, **overrides: Any) -> DeepFlowMMDiT:
    """Build "MMDiT-{depth}" / "DeepFlow-MMDiT-{depth}-{k}T"; the depth comes from the name. Overrides: key_layers,
    input_size, in_channels, patch_size, context_dim, pooled_dim, max_text_length, text_dropout (alias
    class_dropout), hidden_size, num_heads, mlp_ratio, qk_norm, ssl_align, z_dim, projector_dim, acc_widths,
    clamp_gap_scale.
    """
    parsed = parse_mmdit_name(name)
    if parsed is None:
        raise ValueError(f"{name!r} is not an MMDiT name")
    _reject_unknown(name, overrides, _MMDIT_OVERRIDES, depth_in_name=True)
    depth, k = parsed
    if "class_dropout" in overrides:
        if "text_dropout" in overrides and overrides["text_dropout"] != overrides["class_dropout"]:
            raise ValueError(f"create_model({name!r}): text_dropout and class_dropout disagree")
        overrides["text_dropout"] = overrides.pop("class_dropout")
    key_layers = _pop_key_layers(name, overrides, depth, k)
    config: dict[str, Any] = dict(
        input_size=32, patch_size=2, in_channels=4, hidden_size=MMDIT_HIDDEN_PER_LAYER * depth, num_heads=depth,
        context_dim=768, text_dropout=0.1,
    )
    config.update(overrides)
    return DeepFlowMMDiT(depth=depth, key_layers=key_layers, **config)


def create_model(name: str, **overrides: Any) -> DeepFlowDiT | DeepFlowMMDiT:
    """Build a named architecture; overrides: depth, key_layers, input_size, in_channels, num_classes,
    ssl_align, z_dim, projector_dim, class_dropout, hidden_size, num_heads, mlp_ratio, acc_widths, patch_size,
    vera_mode, clamp_gap_scale (True, the default: the VeRA gap-modulation scale is clamped to [-5, 5], the
    reference's ``--legacy-scaling``; False: not clamped, the reference scripts' default).
    MMDiT names ("MMDiT-24", "DeepFlow-MMDiT-24-3T") go to ``create_mmdit`` (its own override set).
    """
    if parse_mmdit_name(name) is not None:
        return create_mmdit(name, **overrides)
    _reject_unknown(name, overrides, _OVERRIDES)
    size, patch, k = parse_model_name(name)
    hidden, heads, _ = SIZES[size]
    depth = overrides.pop("depth", None) or default_depth(size, k)
    key_layers = _pop_key_layers(name, overrides, depth, k)
    config: dict[str, Any] = dict(
        input_size=32, patch_size=patch, in_channels=4, hidden_size=hidden, num_heads=heads,
        num_classes=1000, class_dropout=0.1, ssl_align=False, z_dim=768,
    )
    config.update(overrides)
    return DeepFlowDiT(depth=depth, key_layers=key_layers, **config)
