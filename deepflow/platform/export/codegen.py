"""The Python code of an exported diffusers folder, generated from the package's own sources (one source of truth).

- Model and sampler code: the modules of ``deepflow/models`` that the transformer (``registry.create_model``) and the
  scheduler (``sampling.sample``) need, found by following their ``deepflow.models`` imports, copied with those
  imports rewritten to relative ones (``from deepflow.models.layers import X`` -> ``from .deepflow_<tag>_layers
  import X``). ``<tag>`` is a hash of the generated code: diffusers copies every local folder's modules into ONE
  module cache directory, so two exports of different code loaded in one process must not share module names.
- The component wrappers (``remote/deepflow_transformer.py``, ``remote/deepflow_scheduler.py``) and the pipeline
  (``remote/pipeline_deepflow.py``) are templates kept in this package; the export fills their generated blocks:
  the imports of the copied modules (diffusers copies only the modules a component file imports directly) and, in
  the pipeline, the package's own ``to_uint8``, ``seed_for`` and ``initial_noise`` (so images and noise are those
  of ``deepflow sample``).
- What the three share (``EXPORT_VERSION``, its check, saving code and configs) is one more template,
  ``remote/deepflow_export_common.py``, written like a copied model module: as ``deepflow_<tag>_export_common.py``
  into each folder whose file imports it (``from .deepflow_export_common import`` rewritten to that name), since
  diffusers loads a component's modules from the component's folder and the pipeline's from the root.
"""
from __future__ import annotations

import ast
import hashlib
import inspect
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import deepflow.models
from deepflow.platform.inference.conditions import seed_for
from deepflow.platform.inference.generate import initial_noise, to_uint8

__all__ = ["EXPORT_VERSION", "GeneratedCode", "generate_code", "model_module_closure"]

#: version of the folder layout and of the configs the code in it reads; bump it when either changes
EXPORT_VERSION = 1

MODELS_PACKAGE = "deepflow.models"
MODELS_DIR = Path(deepflow.models.__file__).resolve().parent
REMOTE_DIR = Path(__file__).resolve().parent / "remote"
TEMPLATE_PREFIX = "deepflow_models_"
PIPELINE_FILE = "pipeline_deepflow.py"
TRANSFORMER_FILE = "deepflow_transformer.py"
SCHEDULER_FILE = "deepflow_scheduler.py"
COMMON_FILE = "deepflow_export_common.py"
#: the name of the common module in an export, after ``deepflow_<tag>_``
COMMON_SUFFIX = "export_common"
#: functions of the package copied into the pipeline file, in dependency order
PIPELINE_FUNCTIONS: tuple[Callable[..., object], ...] = (to_uint8, seed_for, initial_noise)

_IMPORTS_BLOCK = re.compile(r"# <deepflow-export:imports>\n.*?# </deepflow-export:imports>\n", re.S)
_FUNCTIONS_BLOCK = re.compile(r"# <deepflow-export:functions>\n.*?# </deepflow-export:functions>\n", re.S)
_VERSION_LINE = re.compile(r"^EXPORT_VERSION = \d+$", re.M)
_COMMON_IMPORT = re.compile(rf"^(\s*)from \.{COMMON_FILE[: -len('.py')]} import", re.M)
_COMMON_LEFT = re.compile(rf"^\s*(from|import)\b.*\b{COMMON_FILE[: -len('.py')]}\b", re.M)


@dataclass(frozen=True)
class GeneratedCode:
    """The code files of an export: ``files`` maps a path relative to the folder to the file's text."""

    tag: str
    files: dict[str, str]
    transformer_modules: tuple[str, ...]
    scheduler_modules: tuple[str, ...]


def _model_imports(tree: ast.Module, where: str) -> list[str]:
    """Short names of the ``deepflow.models`` modules imported by ``tree`` (any other deepflow import: an error)."""
    found: list[str] = []
    for node in ast.walk(tree):
        names: list[str] = []
        if isinstance(node, ast.ImportFrom):
            if node.level:
                raise ValueError(f"{where}: relative imports cannot be rewritten for the export")
            names = [node.module or ""]
        elif isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        for name in names:
            if name == "deepflow" or name.startswith("deepflow."):
                if not name.startswith(MODELS_PACKAGE + ".") or name.count(".") != 2:
                    raise ValueError(f"{where}: imports {name}; only modules of {MODELS_PACKAGE} can be exported")
                found.append(name.rsplit(".", 1)[1])
    return found


def model_module_closure(roots: tuple[str, ...]) -> list[str]:
    """``roots`` and every ``deepflow.models`` module they import, directly or not (short names, sorted)."""
    seen: set[str] = set()
    pending = list(roots)
    while pending:
        name = pending.pop()
        if name in seen:
            continue
        path = MODELS_DIR / f"{name}.py"
        if not path.is_file():
            raise ValueError(f"{MODELS_PACKAGE}.{name}: no module {path.name} to export")
        seen.add(name)
        pending.extend(_model_imports(ast.parse(path.read_text(), str(path)), str(path)))
    return sorted(seen)


def _rewrite_imports(source: str, prefix: str) -> str:
    """``from deepflow.models.X import ...`` -> ``from .<prefix>X import ...`` (also ``import deepflow.models.X``
    is refused by :func:`_model_imports` before this runs)."""
    rewritten = re.sub(r"^(\s*)from deepflow\.models\.(\w+) import", rf"\1from .{prefix}\2 import", source, flags=re.M)
    if re.search(r"^\s*(from|import) deepflow\b", rewritten, flags=re.M):
        raise ValueError("an import of the deepflow package was left after rewriting")
    return rewritten


def _first_public_name(source: str, where: str) -> str:
    """A name defined at the top of a module (to import it, so that diffusers copies the module)."""
    for node in ast.parse(source, where).body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)) and not node.name.startswith("_"):
            return node.name
    raise ValueError(f"{where}: defines no public function or class")


def _imports_block(modules: list[str], prefix: str, primary: tuple[str, str], sources: dict[str, str]) -> str:
    """The generated imports of a component file: ``primary`` (module, name) imported by name, every other module
    through one of its names, and ``CODE_MODULES`` (the module names, for ``save_pretrained``)."""
    lines = ["# <deepflow-export:imports>", f"from .{prefix}{primary[0]} import {primary[1]}"]
    for name in modules:
        if name != primary[0]:
            symbol = _first_public_name(sources[name], name)
            lines.append(f"from .{prefix}{name} import {symbol} as _copied_{name}  # noqa: F401")
    lines += ["", "CODE_MODULES: tuple[str, ...] = (", *(f'    "{prefix}{name}",' for name in modules), ")",
              "# </deepflow-export:imports>", ""]
    return "\n".join(lines)


def _fill(template: str, block: re.Pattern[str], text: str, what: str) -> str:
    if not block.search(template):
        raise RuntimeError(f"export template {what}: its generated block is missing")
    return block.sub(lambda _: text, template, count=1)


def _common_module(template: str) -> str:
    """The common module's text: self-contained (no deepflow or relative import), this package's ``EXPORT_VERSION``."""
    _model_imports(ast.parse(template, COMMON_FILE), COMMON_FILE)
    if not _VERSION_LINE.search(template):
        raise RuntimeError(f"export template {COMMON_FILE}: its EXPORT_VERSION line is missing")
    return _VERSION_LINE.sub(f"EXPORT_VERSION = {EXPORT_VERSION}", template, count=1)


def _import_common(text: str, prefix: str) -> tuple[str, bool]:
    """(``text`` with its imports of the common module renamed to ``<prefix>export_common``, whether it has any)."""
    rewritten, count = _COMMON_IMPORT.subn(rf"\1from .{prefix}{COMMON_SUFFIX} import", text)
    return rewritten, count > 0


def _functions_block() -> str:
    bodies = [inspect.getsource(function).rstrip() + "\n" for function in PIPELINE_FUNCTIONS]
    header = "# <deepflow-export:functions>\n# copied from the deepflow package by the export\n"
    return header + "\n\n".join(bodies) + "# </deepflow-export:functions>\n"


def generate_code() -> GeneratedCode:
    """Every code file of an exported folder (paths relative to the folder), generated from the package."""
    transformer_modules = model_module_closure(("registry",))
    scheduler_modules = model_module_closure(("sampling",))
    sources = {name: (MODELS_DIR / f"{name}.py").read_text() for name in {*transformer_modules, *scheduler_modules}}
    if COMMON_SUFFIX in sources:
        raise RuntimeError(f"{MODELS_PACKAGE}.{COMMON_SUFFIX}: its export name is the common module's")
    templates = {name: (REMOTE_DIR / name).read_text()
                 for name in (PIPELINE_FILE, TRANSFORMER_FILE, SCHEDULER_FILE, COMMON_FILE)}
    digest = hashlib.sha256()
    for name in sorted(sources):
        digest.update(f"{name}\0{sources[name]}\0".encode())
    for name in sorted(templates):
        digest.update(f"{name}\0{templates[name]}\0".encode())
    digest.update(f"{EXPORT_VERSION}\0{_functions_block()}".encode())
    tag = digest.hexdigest()[:10]
    prefix = f"deepflow_{tag}_"

    files: dict[str, str] = {}
    for folder, modules in (("transformer", transformer_modules), ("scheduler", scheduler_modules)):
        for name in modules:
            header = (f'# Generated by `deepflow export` from the deepflow package\'s {MODELS_PACKAGE}.{name} '
                      '(imports rewritten); do not edit.\n')
            files[f"{folder}/{prefix}{name}.py"] = header + _rewrite_imports(sources[name], prefix)
    files[f"transformer/{TRANSFORMER_FILE}"] = _fill(
        templates[TRANSFORMER_FILE], _IMPORTS_BLOCK,
        _imports_block(transformer_modules, prefix, ("registry", "create_model"), sources), TRANSFORMER_FILE)
    files[f"scheduler/{SCHEDULER_FILE}"] = _fill(
        templates[SCHEDULER_FILE], _IMPORTS_BLOCK,
        _imports_block(scheduler_modules, prefix, ("sampling", "sample as _sample_function"), sources),
        SCHEDULER_FILE)
    files[PIPELINE_FILE] = _fill(templates[PIPELINE_FILE], _FUNCTIONS_BLOCK, _functions_block(), PIPELINE_FILE)
    common = _common_module(templates[COMMON_FILE])
    for path in (f"transformer/{TRANSFORMER_FILE}", f"scheduler/{SCHEDULER_FILE}", PIPELINE_FILE):
        files[path], imported = _import_common(files[path], prefix)
        if imported:  # beside the file that imports it: diffusers loads it from there
            files[Path(path).with_name(f"{prefix}{COMMON_SUFFIX}.py").as_posix()] = common
    for path, text in files.items():
        if TEMPLATE_PREFIX in text or _COMMON_LEFT.search(text):
            raise RuntimeError(f"export code {path}: a template module name was left unreplaced")
        compile(text, path, "exec")
    return GeneratedCode(tag, files, tuple(transformer_modules), tuple(scheduler_modules))
