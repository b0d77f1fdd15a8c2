"""No import circle inside any package (issue 19): every import, top-level or inside a function, read with ``ast``.

A function-level import still closes a circle at run time, and it hides the layering a reader relies on (the
circle runner -> safety -> evaluate -> snapshots -> runner went through two of them), so both kinds count. Imports
under ``if TYPE_CHECKING:`` never run and are left out (``app/turn_stream.py`` names ``ChatService`` in a type).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tests.conftest import REPO

PACKAGE = "training"
PACKAGES = ("feedback", "app", "pipelines", "training", "cli", "infra", "benchmarks")


def _type_only(tree: ast.AST) -> set[int]:
    """ids of the import nodes under ``if TYPE_CHECKING:`` (they never run)."""
    out: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            out |= {id(n) for stmt in node.body for n in ast.walk(stmt)}
    return out


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph(root: Path, package: str = PACKAGE) -> dict[str, set[str]]:
    """Module -> the modules of ``package`` it imports (``from a import b`` counts ``a.b`` when that is a module)."""
    files = {module_name(p, root): p for p in (root / package).rglob("*.py")}
    graph: dict[str, set[str]] = {m: set() for m in files}
    for mod, path in files.items():
        is_pkg = path.name == "__init__.py"
        tree = ast.parse(path.read_text(), str(path))
        skip = _type_only(tree)
        for node in ast.walk(tree):
            if id(node) in skip:
                continue
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: resolve against this module's package
                    pkg = mod.split(".") if is_pkg else mod.split(".")[:-1]
                    pkg = pkg[: len(pkg) - node.level + 1]
                    base = ".".join([*pkg, base] if base else pkg)
                targets = [base, *(f"{base}.{a.name}" for a in node.names)]
            for t in targets:
                if t in files and t != mod:
                    graph[mod].add(t)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_checker_finds_a_circle_and_a_relative_import(tmp_path):
    pkg = tmp_path / PACKAGE
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from training import b\n")
    (pkg / "b.py").write_text("def f():\n    from training.sub.c import X\n")
    (pkg / "sub" / "c.py").write_text("from ..a import Y\n")
    (pkg / "d.py").write_text("import training.a\n")
    (pkg / "e.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from training import a\n")
    graph = import_graph(tmp_path)
    assert graph["training.sub.c"] == {"training.a"} and graph["training.d"] == {"training.a"}
    assert graph["training.e"] == set(), "a type-only import never runs"
    assert cycles(graph) == [["training.a", "training.b", "training.sub.c"]]


@pytest.mark.parametrize("package", PACKAGES)
def test_no_package_has_an_import_cycle(package):
    graph = import_graph(REPO, package)
    assert len(graph) > 1
    assert cycles(graph) == [], f"import circles inside {package}/: move the shared name below its users"


def test_errors_and_suites_sit_below_everything():
    """The shared error types and the suite reader import nothing that could import them back."""
    graph = import_graph(REPO)
    assert graph["training.errors"] == set()
    assert graph["training.suites"] <= {"training.scoring"} and graph["training.scoring"] == set()
