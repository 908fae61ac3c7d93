"""The one config system of every job: a YAML file (local path or any storage URL) + dotted ``--set a.b=v``
overrides, validated by a pydantic model whose sections forbid unknown keys.

A path may index lists (``extractors.0.options.dataset=digits``). Override values are parsed as YAML scalars (``2e-4`` -> float, ``true`` -> bool, ``[1, 2]`` -> list, ``null`` ->
None; an empty value is the empty string); missing sections are created. Every problem becomes a
:class:`ConfigError` whose message has one ``field.path: what is wrong`` line per problem.

Jobs turn their command-line flags into overrides (:func:`flag_overrides`), so a flag is sugar for a field and the
same run can be described by a file, by flags, or both (flags win).
"""
from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

__all__ = [
    "ConfigError",
    "ConfigSection",
    "apply_override",
    "apply_overrides",
    "flag_overrides",
    "format_validation_error",
    "load_tree",
    "load_validated",
    "parse_value",
    "validate_tree",
]

M = TypeVar("M", bound=BaseModel)


class ConfigError(ValueError):
    """A configuration that cannot be used; ``str(error)`` lists one ``field.path: message`` per line."""


class ConfigSection(BaseModel):
    """Base of every config section: unknown keys are errors, assignments are validated, aliases accepted."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, populate_by_name=True)


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
        raise ConfigError(f"--set {assignment!r}: expected dotted.path=value")
    dotted, _, raw_value = assignment.partition("=")
    keys = [key for key in dotted.strip().split(".") if key]
    if not keys:
        raise ConfigError(f"--set {assignment!r}: empty field path")
    node: Any = tree
    for depth, key in enumerate(keys[:-1]):
        child = _child(node, key, ".".join(keys[: depth + 1]))
        if child is None:
            child = node[key] = {}
        if not isinstance(child, (dict, list)):
            raise ConfigError(f"{'.'.join(keys[: depth + 1])}: is not a section, cannot set {dotted.strip()}")
        node = child
    if isinstance(node, list):
        node[_list_index(node, keys[-1], dotted.strip())] = parse_value(raw_value)
    else:
        node[keys[-1]] = parse_value(raw_value)


def _list_index(items: list[Any], key: str, path: str) -> int:
    if not key.isdigit() or int(key) >= len(items):
        raise ConfigError(f"{path}: {key!r} is not an index of the list (0..{len(items) - 1})")
    return int(key)


def _child(node: dict[str, Any] | list[Any], key: str, path: str) -> Any:
    """``node[key]`` for a section (None when absent) or a list (``key`` an index: ``extractors.0.kind``)."""
    if isinstance(node, list):
        return node[_list_index(node, key, path)]
    return node.get(key)


def apply_overrides(tree: dict[str, Any], overrides: list[str] | None) -> dict[str, Any]:
    """Apply ``a.b.c=value`` overrides to a raw tree (in place) and return it."""
    for override in overrides or []:
        apply_override(tree, override)
    return tree


def flag_overrides(values: Mapping[str, Any]) -> list[str]:
    """``{"sampler.steps": 50, "out": None}`` -> ``["sampler.steps=50"]``: flags given on the command line (not
    None) as overrides, values encoded as JSON (valid YAML) so lists and strings survive."""
    return [f"{field}={json.dumps(value)}" for field, value in values.items() if value is not None]


def load_tree(path: str | Path | None, storage_options: dict[str, Any] | None = None) -> dict[str, Any]:
    """The raw YAML mapping of ``path`` (a local path or storage URL); ``{}`` for None or an empty file."""
    if path is None:
        return {}
    from deepflow.storage import read_url_text

    try:
        text = read_url_text(str(path), storage_options)
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except (OSError, ValueError) as error:
        raise ConfigError(f"{path}: cannot read the config file ({error})") from None
    try:
        loaded = yaml.safe_load(text)
    except yaml.YAMLError as error:
        first_line = str(error).splitlines()[0] if str(error) else "syntax error"
        raise ConfigError(f"{path}: not valid YAML ({first_line})") from None
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections, got {type(loaded).__name__}")
    return loaded


def format_validation_error(error: ValidationError) -> str:
    """One ``field.path: message`` line per pydantic error (a model validator's message names its own field)."""
    lines = []
    for item in error.errors():
        path = ".".join(str(part) for part in item["loc"]) or "<root>"
        message = item["msg"]
        if message.startswith("Value error, "):
            message = message[len("Value error, "):]
        lines.append(message if path == "<root>" and ":" in message.split(" ")[0] else f"{path}: {message}")
    return "\n".join(lines)


def validate_tree(model: type[M], tree: Mapping[str, Any]) -> M:
    """Validate a raw tree against ``model``; :class:`ConfigError` names every bad field path."""
    try:
        return model.model_validate(dict(tree))
    except ValidationError as error:
        raise ConfigError(format_validation_error(error)) from None


def load_validated(
    model: type[M],
    path: str | Path | None = None,
    overrides: list[str] | None = None,
    tree: Mapping[str, Any] | None = None,
) -> M:
    """Read ``path`` (or take a copy of ``tree``), apply ``overrides``, validate against ``model``."""
    raw = json.loads(json.dumps(dict(tree))) if tree is not None else load_tree(path)
    apply_overrides(raw, overrides)
    return validate_tree(model, raw)
