"""The package's layering, read from the source (every import, including those inside
functions; ``if TYPE_CHECKING:`` blocks excluded): no import cycles, and the layers depend
only downwards — adapter math knows nothing of allocation or training, tasks nothing of
methods, and nothing imports the command line."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "increlora"


def _module_name(path: Path) -> str:
    parts = ["increlora", *path.relative_to(SRC).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in SRC.rglob("*.py")}


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(name: str, path: Path) -> set[str]:
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child):
                for stmt in child.orelse:
                    visit(stmt)
                continue
            if isinstance(child, ast.Import):
                found.update(a.name for a in child.names)
            elif isinstance(child, ast.ImportFrom):
                if child.level:
                    base = package.split(".")
                    base = base[: len(base) - (child.level - 1)]
                    target = ".".join(base + ([child.module] if child.module else []))
                else:
                    target = child.module or ""
                for alias in child.names:
                    sub = f"{target}.{alias.name}"
                    found.add(sub if sub in MODULES else target)
            visit(child)

    visit(ast.parse(path.read_text(encoding="utf-8")))
    return {m for m in found if m in MODULES and m != name}


GRAPH = {name: _imports(name, path) for name, path in MODULES.items()}


def _cycles() -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in GRAPH[v]:
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(GRAPH):
        if v not in index:
            connect(v)
    return out


def test_no_import_cycles():
    cycles = [c for c in _cycles() if not (len(c) == 2 and "increlora" in c)]
    cycles = [[m for m in c if m != "increlora"] for c in cycles]
    assert [c for c in cycles if len(c) > 1] == []


def _reaches(source: str, prefixes: tuple[str, ...]) -> list[str]:
    return sorted(m for m in GRAPH[source] if m.startswith(prefixes))


@pytest.mark.parametrize(
    "layer,forbidden",
    [
        (
            "increlora.layers",
            ("increlora.allocation", "increlora.training", "increlora.runner", "increlora.methods"),
        ),
        ("increlora.tasks", ("increlora.methods", "increlora.layers", "increlora.allocation")),
        ("increlora.allocation", ("increlora.training", "increlora.runner", "increlora.methods")),
    ],
)
def test_layers_depend_only_downwards(layer, forbidden):
    bad = {m: _reaches(m, forbidden) for m in GRAPH if m.startswith(layer)}
    assert {m: r for m, r in bad.items() if r} == {}


def test_nothing_imports_the_command_line():
    assert sorted(m for m, deps in GRAPH.items() if "increlora.cli" in deps) == []
