"""The package layering of docs/architecture.md, checked on the source: no import circle, nothing imports upward.

Every ``import`` counts, also the ones inside functions (a lazy import is still a dependency); only the imports under
``if TYPE_CHECKING:`` (annotations, never executed) do not.
"""
from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "deepflow"

#: module prefix -> the deepflow prefixes it may import (besides itself)
ALLOWED: dict[str, tuple[str, ...]] = {
    "deepflow.models": (),
    "deepflow.storage": (),
    "deepflow.ranks": (),
    "deepflow.errors": (),
    "deepflow.precision": (),
    "deepflow.runtime": ("deepflow.ranks",),
    "deepflow.configuration": ("deepflow.storage", "deepflow.errors", "deepflow.runtime"),
    "deepflow.artifacts": ("deepflow.storage",),
    "deepflow.data_pipeline": ("deepflow.storage", "deepflow.errors", "deepflow.artifacts", "deepflow.configuration",
                               "deepflow.models", "deepflow.ranks"),
    "deepflow.platform.eval": ("deepflow.storage", "deepflow.errors", "deepflow.artifacts", "deepflow.configuration", "deepflow.models",
                               "deepflow.data_pipeline"),
    "deepflow.platform.inference": ("deepflow.storage", "deepflow.errors", "deepflow.artifacts", "deepflow.configuration",
                                    "deepflow.models", "deepflow.data_pipeline", "deepflow.ranks", "deepflow.precision"),
    "deepflow.platform.export": ("deepflow.storage", "deepflow.errors", "deepflow.artifacts", "deepflow.configuration",
                                 "deepflow.models", "deepflow.data_pipeline", "deepflow.platform.inference"),
    "deepflow.cli": ("deepflow",),  # the top: the command line may import anything
    "deepflow.platform.train": ("deepflow.storage", "deepflow.errors", "deepflow.artifacts", "deepflow.configuration", "deepflow.models",
                                "deepflow.data_pipeline", "deepflow.ranks", "deepflow.precision",
                                "deepflow.platform.eval", "deepflow.platform.inference", "deepflow.platform.export"),
    "deepflow.platform.study": ("deepflow.storage", "deepflow.errors", "deepflow.artifacts", "deepflow.configuration",
                                "deepflow.models", "deepflow.data_pipeline", "deepflow.platform.train",
                                "deepflow.platform.inference"),
}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _imports(path: Path) -> set[str]:
    """Absolute names of the deepflow modules ``path`` imports (relative imports resolved)."""
    module = _module_name(path)
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    found: set[str] = set()
    tree = ast.parse(path.read_text(), str(path))
    type_only = {id(inner) for node in ast.walk(tree) if isinstance(node, ast.If) and _is_type_checking(node.test)
                 for inner in ast.walk(node)}
    for node in ast.walk(tree):
        if id(node) in type_only:
            continue
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            found.add(target)
            found.update(f"{target}.{alias.name}" for alias in node.names)
    return {name for name in found if name == "deepflow" or name.startswith("deepflow.")}


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _graph() -> dict[str, set[str]]:
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = defaultdict(set)
    for name, path in modules.items():
        for target in _imports(path):
            while target not in modules and "." in target:  # "pkg.mod.Symbol" -> "pkg.mod"
                target = target.rsplit(".", 1)[0]
            if target in modules and target != name:
                graph[name].add(target)
        graph.setdefault(name, set())
    return graph


def _layer(module: str) -> str | None:
    matches = [prefix for prefix in ALLOWED if module == prefix or module.startswith(prefix + ".")]
    return max(matches, key=len) if matches else None


def test_nothing_imports_upward() -> None:
    violations = []
    for module, targets in sorted(_graph().items()):
        layer = _layer(module)
        if layer is None:
            continue
        for target in sorted(targets):
            target_layer = _layer(target)
            if target_layer is None or target_layer == layer:
                if target_layer is None and target.startswith("deepflow.") and target != "deepflow":
                    violations.append(f"{module} -> {target} (a module outside the documented layers)")
                continue
            if target_layer not in ALLOWED[layer] and "deepflow" not in ALLOWED[layer]:
                violations.append(f"{module} -> {target}")
    assert not violations, "imports against the layering of docs/architecture.md:\n" + "\n".join(violations)


def test_no_import_circle() -> None:
    graph = _graph()
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []
    counter = [0]

    def visit(node: str) -> None:  # Tarjan's strongly connected components
        index[node] = low[node] = counter[0]
        counter[0] += 1
        stack.append(node)
        on_stack.add(node)
        for target in graph[node]:
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    # a package's __init__ re-exporting its own modules is not a circle between modules
    cycles = [c for c in cycles if not all(m == c[0] or m.startswith(c[0] + ".") for m in c)]
    assert not cycles, f"import circles: {cycles}"


@pytest.mark.parametrize("layer", ["deepflow.models", "deepflow.data_pipeline"])
def test_lower_layers_have_no_platform_code(layer: str) -> None:
    """models/ and data_pipeline/ import nothing above them (in particular nothing of deepflow.platform)."""
    upward = [(m, t) for m, targets in _graph().items() if _layer(m) == layer
              for t in targets if t.startswith("deepflow.platform")]
    assert not upward, upward
