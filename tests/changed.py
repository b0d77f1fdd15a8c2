"""Which test files a change can break, for ``make test-changed`` (prints them, one per line).

Why: the full suite takes minutes; most changes touch one package, and only the tests that import it, directly or
through another module, can notice. The rule is deliberately simple:

- what changed: files that differ from the merge base with ``origin/main`` (or ``HEAD~1`` where there is no such
  branch; ``BASE=<rev>`` overrides), committed or not, and untracked files;
- a changed file inside a project package (``feedback/``, ``app/``, ``training/``, ``pipelines/``, ``cli/``,
  ``infra/``, ``benchmarks/``; code, configs or data) touches that whole package;
- a test file is picked when it, or the ``conftest.py`` files above it, import a module of a touched package,
  directly or through other project modules (read from the import statements; a dotted module name in a string, as in
  ``python -m benchmarks.faults``, counts as imported);
- a changed test file picks itself, a changed test helper (``tests/fixture_cache.py``) picks the tests importing
  it, a changed ``conftest.py`` picks every test below it;
- ``pyproject.toml``, ``constraints.txt``, the ``Makefile`` and ``infra/setup.sh`` pick everything; docs nothing.

    python -m tests.changed              # against origin/main or HEAD~1
    python -m tests.changed HEAD~5       # against another revision
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from collections.abc import Iterable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("feedback", "app", "training", "pipelines", "cli", "infra", "benchmarks")
EVERYTHING = {"pyproject.toml", "constraints.txt", "Makefile", "infra/setup.sh"}


def git(*args: str) -> str:
    return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, check=True).stdout


def base_revision(requested: str | None = None) -> str:
    if requested:
        return requested
    try:
        return git("merge-base", "HEAD", "origin/main").strip()
    except subprocess.CalledProcessError:
        return "HEAD~1"


def changed_files(base: str) -> set[str]:
    try:
        diff = git("diff", "--name-only", base)
    except subprocess.CalledProcessError as e:
        raise SystemExit(
            f"test-changed: git cannot diff against {base!r}: pass BASE=<revision> ({e.stderr.strip()})"
        ) from None
    untracked = git("ls-files", "--others", "--exclude-standard")
    return {p for p in (diff + untracked).splitlines() if p}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def project_modules() -> dict[str, Path]:
    files: list[Path] = []
    for top in (*PACKAGES, "tests"):
        files += [f for f in (REPO / top).rglob("*.py") if "__pycache__" not in f.parts]
    return {module_name(f): f for f in files}


def imports_of(path: Path, modules: dict[str, Path]) -> set[str]:
    """Project modules a file imports anywhere in it (functions included), or names in a string."""
    tree = ast.parse(path.read_text(), filename=str(path))
    here = module_name(path).split(".")
    found: set[str] = set()
    for node in ast.walk(tree):
        names: Iterable[str] = ()
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            pkg = here[: len(here) - node.level] if node.level else []
            base = ".".join([*pkg, node.module] if node.module else pkg)
            names = [base, *(f"{base}.{a.name}" for a in node.names)]
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and "." in node.value:
            if node.value not in modules:  # a dotted module name in a string: `python -m benchmarks.faults`
                continue
            names = [node.value]
        for name in names:
            while name and name not in modules:  # `import a.b.c` where only a.b is a file: its nearest module
                name = name.rpartition(".")[0]
            if name:
                found.add(name)
    return found


def closure(roots: set[str], graph: dict[str, set[str]]) -> set[str]:
    seen, todo = set(), list(roots)
    while todo:
        m = todo.pop()
        if m not in seen:
            seen.add(m)
            todo += graph.get(m, ())
    return seen


def select(changed: set[str]) -> list[str]:
    modules = project_modules()
    tests = sorted(p for p in (REPO / "tests").rglob("test_*.py") if "__pycache__" not in p.parts)
    rel = {p: str(p.relative_to(REPO)) for p in tests}
    if changed & EVERYTHING or "tests/conftest.py" in changed:
        return [rel[p] for p in tests]
    packages = {c.split("/", 1)[0] for c in changed if "/" in c and c.split("/", 1)[0] in PACKAGES}
    helpers = {module_name(REPO / c) for c in changed if c.startswith("tests/") and c.endswith(".py")}
    conftests = {str(Path(c).parent) for c in changed if c.endswith("conftest.py")}
    graph = {m: imports_of(f, modules) for m, f in modules.items()}
    picked = []
    for p in tests:
        if rel[p] in changed or any(rel[p].startswith(d + "/") for d in conftests):
            picked.append(rel[p])
            continue
        roots = {module_name(p)}
        for parent in p.relative_to(REPO).parents:
            if (REPO / parent / "conftest.py").exists():
                roots.add(module_name(REPO / parent / "conftest.py"))
        reach = closure(roots, graph)
        if reach & helpers or {m.split(".", 1)[0] for m in reach} & packages:
            picked.append(rel[p])
    return picked


def main(argv: list[str]) -> int:
    base = base_revision(argv[0] if argv else os.environ.get("BASE") or None)
    changed = changed_files(base)
    picked = select(changed)
    print(f"test-changed: {len(changed)} files changed since {base}; {len(picked)} test files", file=sys.stderr)
    print("\n".join(picked))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
