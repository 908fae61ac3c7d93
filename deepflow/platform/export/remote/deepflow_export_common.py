"""What the code files of an exported DeepFlow diffusers folder share: the export version they read, its check, and
the saving of their code and configs.

Written by ``deepflow export --format diffusers`` (the deepflow package's
``deepflow/platform/export/remote/deepflow_export_common.py``) as ``deepflow_<tag>_export_common.py`` into every
folder whose code imports it (the root for the pipeline, ``transformer/``, ``scheduler/``): diffusers loads each
component's modules from that component's folder, so each folder carries its own copy (the same text everywhere).
It imports nothing but the standard library.
"""
from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any, Callable, Optional

#: version of the folder layout and of the configs the code in it reads (the export writes the package's value)
EXPORT_VERSION = 1


def check_export_version(found: Any, where: str) -> None:
    """ValueError (one line naming ``where``) unless ``found`` is this code's ``EXPORT_VERSION``."""
    if found == EXPORT_VERSION:
        return
    if found is None:
        raise ValueError(f"{where}: no export_version: written by an older deepflow export that this code does not "
                         f"read (export version {EXPORT_VERSION}); export the model again with "
                         "`deepflow export --format diffusers`")
    raise ValueError(f"{where}: export_version {found!r}, but the code in this folder reads version "
                     f"{EXPORT_VERSION}; export the model again with `deepflow export --format diffusers`")


def copy_code(module_names: tuple[str, ...], module_file: str, save_directory: str | os.PathLike[str],
              file_name: Optional[str] = None) -> None:
    """Copy ``module_file`` (as ``file_name``, by default its own name), the modules ``module_names`` imported beside
    it and this module into ``save_directory``."""
    target = Path(save_directory)
    target.mkdir(parents=True, exist_ok=True)
    package = __name__.rpartition(".")[0]
    files = [(Path(module_file), file_name or Path(module_file).name)]
    for name in module_names:
        module = sys.modules.get(f"{package}.{name}" if package else name)
        if module is None or module.__file__ is None:
            raise RuntimeError(f"cannot save: module {name} of this DeepFlow component is not loaded")
        files.append((Path(module.__file__), Path(module.__file__).name))
    files.append((Path(__file__), Path(__file__).name))
    for path, name in files:
        if path.resolve() != (target / name).resolve():
            shutil.copyfile(path, target / name)


def tidy_config(path: str | os.PathLike[str],
                update: Optional[Callable[[dict[str, Any]], dict[str, Any]]] = None) -> None:
    """Rewrite the JSON config at ``path`` as the export writes it: the entries ``update(config)`` returns set,
    without diffusers' ``_name_or_path`` (a local path), keys sorted."""
    config_path = Path(path)
    config = json.loads(config_path.read_text())
    if update is not None:
        config.update(update(config))
    config.pop("_name_or_path", None)
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
