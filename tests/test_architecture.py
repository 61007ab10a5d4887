"""The package's import structure: floors, imports only downward or sideways, no circles.

Every import inside the package counts, including those inside functions: a lazy import is
still a dependency, and one that only exists to dodge a circle hides a tangle instead of
removing it. Lazy imports of heavy third-party packages (transformers, tqdm) are not affected.
"""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "odelta_fast"
# Where each installed subpackage lives in the source tree (pyproject's package-dir).
SOURCES = {PACKAGE: ROOT / "odelta_fast", f"{PACKAGE}.kernels": ROOT / "kernels"}

# Floors, lowest first. A module may import modules of its own floor or of a lower one.
FLOORS: list[tuple[str, tuple[str, ...]]] = [
    ("foundations", ("version", "markers", "logging_utils", "quantized", "projections")),
    ("kernels", ("kernels",)),
    ("ops", ("ops",)),
    ("names and files", ("structure", "addressing", "checkpoint", "peft_format")),
    ("wiring", ("routing", "merging", "visualize", "utils")),
    ("lifecycle", ("configs", "delta")),
    ("methods", ("methods",)),
    ("assembly", ("auto", "multi", "integrations", "delta_models")),
    ("entry points", ("commands", "cli", "demo", "__init__")),
]


def _floor_of(module: str) -> int:
    parts = module.split(".")
    first = parts[1] if len(parts) > 1 else "__init__"
    for level, (_, names) in enumerate(FLOORS):
        if first in names:
            return level
    raise AssertionError(f"{module} is on no floor; add it to FLOORS in {Path(__file__).name}")


def _modules() -> dict[str, Path]:
    found = {}
    for package, directory in SOURCES.items():
        for path in directory.rglob("*.py"):
            rel = path.relative_to(directory).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            name = ".".join([package, *parts])
            found[name] = path
    return found


def _type_checking_lines(tree: ast.Module) -> set[int]:
    """Lines of imports inside ``if TYPE_CHECKING:``: annotations only, no runtime dependency."""
    lines: set[int] = set()
    for node in ast.walk(tree):
        test = getattr(node, "test", None)
        if isinstance(node, ast.If) and getattr(test, "id", getattr(test, "attr", None)) == "TYPE_CHECKING":
            lines.update(inner.lineno for inner in ast.walk(node) if isinstance(inner, (ast.Import, ast.ImportFrom)))
    return lines


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    """Package modules ``name`` imports (module-level or inside functions)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    skip = _type_checking_lines(tree)
    base = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    targets: set[str] = set()
    for node in ast.walk(tree):
        if not isinstance(node, (ast.Import, ast.ImportFrom)) or node.lineno in skip:
            continue
        if isinstance(node, ast.Import):
            candidates = [alias.name for alias in node.names]
        else:
            if node.level:
                anchor = base.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                module = ".".join(anchor + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            # ``from .pkg import mod`` imports the module; ``from .mod import name`` the module too.
            candidates = [f"{module}.{alias.name}" if f"{module}.{alias.name}" in known else module
                          for alias in node.names]
        for candidate in candidates:
            while candidate and candidate not in known:  # the longest package module it names
                candidate = candidate.rpartition(".")[0]
            # ``from . import name`` reads the package's __init__: a dependency on it like any other.
            if candidate and candidate != name:
                targets.add(candidate)
    return targets


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(name, path, set(modules)) for name, path in modules.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []
    counter = [0]

    def visit(node: str) -> None:
        index[node] = low[node] = counter[0]
        counter[0] += 1
        stack.append(node)
        on_stack.add(node)
        for nxt in graph.get(node, ()):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return components


def test_every_module_is_on_a_floor():
    for name in _modules():
        _floor_of(name)


def test_no_import_circles():
    assert _cycles(_graph()) == []


def test_imports_go_down_or_sideways_only():
    upward = []
    for module, targets in sorted(_graph().items()):
        for target in sorted(targets):
            if _floor_of(target) > _floor_of(module):
                upward.append(f"{module} ({FLOORS[_floor_of(module)][0]}) -> {target} "
                              f"({FLOORS[_floor_of(target)][0]})")
    assert upward == []


def test_kernels_import_nothing_of_the_package():
    graph = _graph()
    for module, targets in graph.items():
        if module.startswith(f"{PACKAGE}.kernels"):
            assert all(t.startswith(f"{PACKAGE}.kernels") for t in targets), (module, targets)
