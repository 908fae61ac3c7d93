"""The package a user installs: the wheel holds the command, the configs and the assets; the metadata declares every
third-party import (core or an extra), an SPDX license with its file, one version; the set-up installs everything."""
from __future__ import annotations

import ast
import importlib.metadata
import re
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

import deepflow
from deepflow.cli import EXTRAS, JOBS

REPO = Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
DISTRIBUTION = PYPROJECT["project"]["name"]


def _normalized(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _requirement_name(requirement: str) -> str:
    return _normalized(re.split(r"[\s<>=!~;\[]", requirement, maxsplit=1)[0])


def _declared() -> dict[str, set[str]]:
    """Distribution -> where it is declared ("core" or the extras naming it)."""
    project = PYPROJECT["project"]
    declared: dict[str, set[str]] = {}
    for requirement in project["dependencies"]:
        declared.setdefault(_requirement_name(requirement), set()).add("core")
    for extra, requirements in project["optional-dependencies"].items():
        for requirement in requirements:
            declared.setdefault(_requirement_name(requirement), set()).add(extra)
    return declared


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> zipfile.ZipFile:
    """The wheel built from a copy of the sources (the build leaves nothing in the checkout)."""
    source = tmp_path_factory.mktemp("source")
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(REPO / name, source / name)
    shutil.copytree(REPO / "deepflow", source / "deepflow", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", str(source),
                    "-w", str(out)], check=True, capture_output=True, text=True, timeout=300)
    (path,) = out.glob("*.whl")
    return zipfile.ZipFile(path)


def test_the_wheel_holds_the_command_the_configs_and_the_assets(wheel: zipfile.ZipFile) -> None:
    names = set(wheel.namelist())
    assert {"deepflow/cli.py", "deepflow/__main__.py", "deepflow/runtime.py", "deepflow/demo.py",
            "deepflow/py.typed"} <= names
    assert {f"deepflow/{job}.py" for job in JOBS} <= names  # python -m deepflow.<job>
    shipped = {p.relative_to(REPO).as_posix() for p in (REPO / "deepflow" / "configs").rglob("*.yaml")}
    assert len(shipped) >= 20 and shipped <= names
    assert any(n.startswith("deepflow/platform/eval/assets/") and n.endswith(".safetensors") for n in names)
    dist_info = next(n.split("/")[0] for n in names if n.endswith(".dist-info/METADATA"))
    assert f"{dist_info}/licenses/LICENSE" in names
    entry_points = wheel.read(f"{dist_info}/entry_points.txt").decode()
    assert re.search(r"^deepflow = deepflow\.cli:main$", entry_points, re.M), entry_points
    metadata = wheel.read(f"{dist_info}/METADATA").decode()
    assert "License-Expression: Apache-2.0" in metadata and "License-File: LICENSE" in metadata
    assert f"Version: {deepflow.__version__}" in metadata
    assert "Requires-Dist: torchvision" in metadata


def test_one_version() -> None:
    assert PYPROJECT["project"]["dynamic"] == ["version"]
    assert PYPROJECT["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "deepflow.__version__"}
    assert importlib.metadata.version(DISTRIBUTION) == deepflow.__version__  # the installed (editable) package


def test_spdx_license_and_the_apache_text() -> None:
    project = PYPROJECT["project"]
    assert project["license"] == "Apache-2.0" and project["license-files"] == ["LICENSE"]
    assert any(r.startswith("setuptools>=") and int(r.split(">=")[1].split(".")[0]) >= 77
               for r in PYPROJECT["build-system"]["requires"])
    text = (REPO / "LICENSE").read_text()
    assert "Apache License" in text and "Version 2.0, January 2004" in text
    assert "TERMS AND CONDITIONS FOR USE, REPRODUCTION, AND DISTRIBUTION" in text
    assert "END OF TERMS AND CONDITIONS" in text


def _third_party_imports() -> dict[str, set[str]]:
    """Top-level module -> the deepflow files importing it (every import, also inside functions)."""
    found: dict[str, set[str]] = {}
    for path in (REPO / "deepflow").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                modules = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
                modules = [node.module]
            else:
                continue
            for module in modules:
                top = module.split(".")[0]
                if top != "deepflow" and top not in sys.stdlib_module_names and top != "__future__":
                    found.setdefault(top, set()).add(path.relative_to(REPO).as_posix())
    return found


def test_every_third_party_import_is_declared() -> None:
    """Each imported module's distribution is a dependency or in an extra (torchvision was imported, not declared)."""
    distributions = importlib.metadata.packages_distributions()
    declared = _declared()
    missing = []
    for module, files in sorted(_third_party_imports().items()):
        names = {_normalized(d) for d in distributions.get(module, [module])}
        if not names & set(declared):
            missing.append(f"{module} ({', '.join(sorted(names))}) imported by {', '.join(sorted(files))}")
    assert not missing, "undeclared dependencies:\n" + "\n".join(missing)


def test_extras_cover_the_optional_backends_and_all_installs_them() -> None:
    extras = PYPROJECT["project"]["optional-dependencies"]
    declared = _declared()
    for module, extra in EXTRAS.items():  # what the CLI tells a user to install for a missing module
        distribution = _normalized(importlib.metadata.packages_distributions().get(module, [module])[0])
        assert extra in declared.get(distribution, set()), (module, extra)
    (everything,) = extras["all"]
    assert set(everything.split("[")[1].rstrip("]").split(",")) == set(extras) - {"all", "dev"}
    assert "torch-fidelity" in declared and "dev" in declared["torch-fidelity"]
    constraints = (REPO / "constraints.txt").read_text()
    assert re.search(r"^torch-fidelity==\S+$", constraints, re.M)


def test_setup_installs_everything_and_builds_deepspeed_against_torch() -> None:
    setup = (REPO / "scripts" / "setup.sh").read_text()
    assert '-e ".[all,dev]"' in setup and "--no-build-isolation deepspeed" in setup


def test_ci_runs_only_the_readme_test_command_whose_setup_installs_the_system_packages() -> None:
    """CI (.ci/run) is `make test` on a clean clone and nothing else, so the README's two commands must install
    every system package the tests need themselves: tini (the pod tests' PID 1) beside the Debian data."""
    ci = [line.strip() for line in (REPO / ".ci" / "run").read_text().splitlines()
          if line.strip() and not line.lstrip().startswith("#")]
    assert ci[-1] == "make test" and not any(re.search(r"\b(apt-get|apt|pip)\b", line) for line in ci), ci
    setup = (REPO / "scripts" / "setup.sh").read_text()
    for package, probe in (("tini", "command -v tini"), ("dataset-fashion-mnist", "/usr/share/datasets/fashion-mnist"),
                           ("fonts-noto-color-emoji", "NotoColorEmoji.ttf")):
        assert f"missing+=({package})" in setup and probe in setup, package
    assert "setup:" in (REPO / "Makefile").read_text() and "test: setup" in (REPO / "Makefile").read_text()


def test_the_documented_configs_path_is_the_packaged_folder() -> None:
    assert (REPO / "configs").resolve() == (REPO / "deepflow" / "configs").resolve()
    assert (REPO / "configs" / "demo" / "train-digits.yaml").is_file()
