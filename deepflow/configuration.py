"""The one config system of every job: a YAML file (local path or any storage URL) + dotted ``--set a.b=v``
overrides, validated by a pydantic model whose sections forbid unknown keys.

A path may index lists (``extractors.0.options.dataset=digits``). Override values are parsed as YAML scalars (``2e-4`` -> float, ``true`` -> bool, ``[1, 2]`` -> list, ``null`` ->
None; an empty value is the empty string); missing sections are created. Every problem becomes a
:class:`ConfigError` whose message has one ``field.path: what is wrong`` line per problem.

Jobs turn their command-line flags into overrides (:func:`flag_overrides`), so a flag is sugar for a field and the
same run can be described by a file, by flags, or both (flags win).
"""
from __future__ import annotations

import difflib
import json
import types
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar, Union, get_args, get_origin

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, ValidationError

from deepflow.errors import UserError
from deepflow.storage import check_storage_url

__all__ = [
    "ConfigError",
    "ConfigSection",
    "StorageURL",
    "apply_override",
    "apply_overrides",
    "check_storage_url",
    "flag_overrides",
    "format_validation_error",
    "load_tree",
    "load_validated",
    "parse_value",
    "validate_tree",
]

M = TypeVar("M", bound=BaseModel)


class ConfigError(UserError):
    """A configuration that cannot be used; ``str(error)`` lists one ``field.path: message`` per line."""


class ConfigSection(BaseModel):
    """Base of every config section: unknown keys are errors, assignments are validated, aliases accepted."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, populate_by_name=True)


#: a ``str`` field holding a storage URL or local path, checked by :func:`check_storage_url`
StorageURL = Annotated[str, AfterValidator(check_storage_url)]


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
    from deepflow.runtime import resolve_config_path
    from deepflow.storage import read_url_text

    try:
        text = read_url_text(resolve_config_path(str(path)), storage_options)
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


def format_validation_error(error: ValidationError, model: type[BaseModel] | None = None) -> str:
    """One ``field.path: message`` line per pydantic error (a model validator's message names its own field).

    With ``model`` (the validated class) the paths are the user's: the tags of discriminated unions are dropped
    (``encoder.dtype``, not ``encoder.vae.dtype``), an unknown field names the close matches (``optim.lrr: unknown
    field; did you mean optim.lr?``) and an unknown ``kind`` the allowed ones.
    """
    lines = []
    for item in error.errors():
        parts, _ = _user_path(model, tuple(item["loc"]))
        path = ".".join(parts) or "<root>"
        message = _message(model, item, parts)
        if message.startswith("Value error, "):
            message = message[len("Value error, "):]
        if path == "<root>" and ":" in message.split(" ")[0]:
            lines.append(message)
        elif item["type"] in ("union_tag_invalid", "union_tag_not_found"):
            lines.append(message)
        else:
            lines.append(f"{path}: {message}")
    return "\n".join(lines)


def _message(model: type[BaseModel] | None, item: Any, parts: list[str]) -> str:
    """The text of one pydantic error; unknown fields and union tags get the allowed names."""
    kind = item["type"]
    if kind == "extra_forbidden":
        _, parent = _user_path(model, tuple(item["loc"][:-1]))
        names = _field_names(parent)
        close = difflib.get_close_matches(str(item["loc"][-1]), names, n=2, cutoff=0.6)
        prefix = ".".join(parts[:-1])
        if close:
            return "unknown field; did you mean " + " or ".join(".".join(filter(None, [prefix, c])) for c in close) + "?"
        return f"unknown field (allowed: {', '.join(names)})" if names else "unknown field"
    if kind in ("union_tag_invalid", "union_tag_not_found"):
        return _tag_message(item, parts, _user_path(model, tuple(item["loc"]))[1])
    return str(item["msg"])


def _tag_message(item: Any, parts: list[str], union: Any) -> str:
    """``source.kind: unknown kind 'digitz'; did you mean 'digits'? (one of: ...)`` for a discriminated union."""
    ctx = item.get("ctx") or {}
    key = str(ctx.get("discriminator", "kind")).strip("'\"")
    path = ".".join([*parts, key])
    expected = [str(tag) for member in _union_models(union) for tag in _literal_values(member, key)]
    allowed = f"one of: {', '.join(expected)}" if expected else str(ctx.get("expected_tags", ""))
    if item["type"] == "union_tag_not_found":
        return f"{path}: required ({allowed})"
    tag = str(ctx.get("tag", ""))
    close = difflib.get_close_matches(tag, expected, n=1, cutoff=0.6)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return f"{path}: unknown {key} {tag!r}{hint} ({allowed})"


def _literal_values(model: type[BaseModel], name: str) -> tuple[Any, ...]:
    """The values of ``model``'s Literal field ``name`` (() when it is not one)."""
    field = model.model_fields.get(name)
    if field is None or get_origin(field.annotation) is not Literal:
        return ()
    return get_args(field.annotation)


def _unwrap(annotation: Any) -> Any:
    """``Annotated[X, ...]`` -> X and ``X | None`` -> X (repeatedly)."""
    while True:
        origin = get_origin(annotation)
        if origin is Annotated:
            annotation = get_args(annotation)[0]
        elif origin in (Union, types.UnionType):
            members = [arg for arg in get_args(annotation) if arg is not type(None)]
            if len(members) != 1:
                return annotation
            annotation = members[0]
        else:
            return annotation


def _is_model(annotation: Any) -> bool:
    return isinstance(annotation, type) and issubclass(annotation, BaseModel)


def _union_models(annotation: Any) -> list[type[BaseModel]]:
    """The model classes of a union annotation ([] for anything else)."""
    if get_origin(annotation) not in (Union, types.UnionType):
        return []
    return [arg for arg in map(_unwrap, get_args(annotation)) if _is_model(arg)]


def _has_tag(model: type[BaseModel], tag: Any) -> bool:
    """True when ``tag`` is a value of one of ``model``'s Literal fields (a discriminated union's tag)."""
    return model.__name__ == tag or any(tag in _literal_values(model, name) for name in model.model_fields)


def _field_names(annotation: Any) -> list[str]:
    """The names a user writes for the fields of a model (aliases where set); [] for anything else."""
    if not _is_model(annotation):
        return []
    return [field.alias or name for name, field in annotation.model_fields.items()]


def _annotation_of(annotation: Any, part: Any) -> Any:
    """The annotation of ``part`` inside a model, list or mapping annotation (None when unknown)."""
    if _is_model(annotation):
        for name, field in annotation.model_fields.items():
            if part in (name, field.alias):
                return field.annotation
        return None
    args = get_args(annotation)
    if get_origin(annotation) in (list, dict) and args:
        return args[-1]
    return None


def _user_path(model: type[BaseModel] | None, loc: tuple[Any, ...]) -> tuple[list[str], Any]:
    """(the field path as the user writes it, the annotation found there) of a pydantic error location: the tags
    pydantic adds for discriminated unions are dropped."""
    parts: list[str] = []
    node: Any = model
    for part in loc:
        node = _unwrap(node)
        members = _union_models(node)
        if members and not _is_model(node):
            chosen = next((member for member in members if _has_tag(member, part)), None)
            if chosen is not None:
                node = chosen
                continue
        parts.append(str(part))
        node = _annotation_of(node, part)
    return parts, _unwrap(node)


def validate_tree(model: type[M], tree: Mapping[str, Any]) -> M:
    """Validate a raw tree against ``model``; :class:`ConfigError` names every bad field path."""
    try:
        return model.model_validate(dict(tree))
    except ValidationError as error:
        raise ConfigError(format_validation_error(error, model)) from None


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
