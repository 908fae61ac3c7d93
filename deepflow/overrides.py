"""Dotted ``a.b.c=value`` overrides of a raw YAML config tree, shared by the package's config loaders.

The value is parsed as a YAML scalar (``2e-4`` -> float, ``true`` -> bool, ``[1, 2]`` -> list, ``null`` -> None);
an empty value is the empty string. Missing sections are created.
"""
from __future__ import annotations

from typing import Any

import yaml


class OverrideError(ValueError):
    """A malformed override; the message names it."""


def parse_value(text: str) -> Any:
    """YAML scalar of ``text``; text that is not valid YAML stays a string."""
    if not text.strip():
        return ""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def apply_override(tree: dict[str, Any], assignment: str) -> None:
    """Apply one ``a.b.c=value`` override to ``tree`` in place."""
    if "=" not in assignment:
        raise OverrideError(f"override {assignment!r}: expected dotted.path=value")
    dotted, _, raw_value = assignment.partition("=")
    keys = [key for key in dotted.strip().split(".") if key]
    if not keys:
        raise OverrideError(f"override {assignment!r}: empty field path")
    node: Any = tree
    for depth, key in enumerate(keys[:-1]):
        child = node.get(key)
        if child is None:
            child = node[key] = {}
        if not isinstance(child, dict):
            raise OverrideError(f"{'.'.join(keys[: depth + 1])}: is not a section, cannot set {dotted.strip()}")
        node = child
    node[keys[-1]] = parse_value(raw_value)
