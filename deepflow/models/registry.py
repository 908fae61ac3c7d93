"""Named architectures: "SiT-{S,B,L,XL}/{2,4,8}" and "DeepFlow-{S,B,L,XL}/{2,4,8}-{k}T".

``create_model(name, **overrides)`` builds on the current default device, so
``with torch.device("meta"): create_model(...)`` allocates nothing.
"""

from __future__ import annotations

import re
from typing import Any

from deepflow.models.dit import DeepFlowDiT

__all__ = ["create_model", "list_models", "parse_model_name", "even_key_layers", "SIZES"]

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
_OVERRIDES = {
    "depth", "key_layers", "input_size", "in_channels", "num_classes", "ssl_align", "z_dim", "projector_dim",
    "class_dropout", "hidden_size", "num_heads", "mlp_ratio", "acc_widths", "patch_size",
}


def list_models() -> list[str]:
    """Every registered name."""
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


def create_model(name: str, **overrides: Any) -> DeepFlowDiT:
    """Build a named architecture; overrides: depth, key_layers, input_size, in_channels, num_classes,
    ssl_align, z_dim, projector_dim, class_dropout, hidden_size, num_heads, mlp_ratio, acc_widths, patch_size.
    """
    unknown = sorted(set(overrides) - _OVERRIDES)
    if unknown:
        raise TypeError(f"create_model({name!r}): unknown overrides {unknown}; allowed: {sorted(_OVERRIDES)}")
    size, patch, k = parse_model_name(name)
    hidden, heads, _ = SIZES[size]
    depth = overrides.pop("depth", None) or default_depth(size, k)
    key_layers = overrides.pop("key_layers", None)
    if key_layers is None:
        key_layers = even_key_layers(depth, k)
    elif len(key_layers) != k:
        raise ValueError(f"create_model({name!r}): key_layers {list(key_layers)} must have {k} entries")
    config: dict[str, Any] = dict(
        input_size=32, patch_size=patch, in_channels=4, hidden_size=hidden, num_heads=heads,
        num_classes=1000, class_dropout=0.1, ssl_align=False, z_dim=768,
    )
    config.update(overrides)
    return DeepFlowDiT(depth=depth, key_layers=list(key_layers), **config)
