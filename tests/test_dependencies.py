"""Every package medseg's source imports is a declared runtime dependency, and every one is pinned in
constraints.txt (the versions we test with)."""

import ast
import re
import sys
from importlib import metadata
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")

ROOT = Path(__file__).resolve().parents[1]


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def requirement_name(requirement: str) -> str:
    return canonical(re.split(r"[<>=!~;\[ ]", requirement, maxsplit=1)[0])


def imported_modules() -> dict[str, tuple[str, bool]]:
    """{top-level module: (first file importing it, whether every import of it is inside a function)} over
    src/medseg, absolute imports only."""
    found: dict[str, tuple[str, bool]] = {}
    for path in sorted((ROOT / "src" / "medseg").rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        lazy = {id(n) for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
                for n in ast.walk(f)}
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                module = name.split(".")[0]
                where, was_lazy = found.get(module, (str(path.relative_to(ROOT)), True))
                found[module] = (where, was_lazy and id(node) in lazy)
    return found


def test_every_runtime_import_is_a_declared_dependency_and_pinned():
    """Imported at module level: a dependency. Imported only inside a function: a dependency or an optional
    extra (e.g. a training logger), never only the test extra."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = {requirement_name(r) for r in project["dependencies"]}
    extras = {requirement_name(r) for name, group in project.get("optional-dependencies", {}).items()
              if name != "test" for r in group}
    distributions = metadata.packages_distributions()
    undeclared = []
    for module, (where, lazy) in imported_modules().items():
        if module in sys.stdlib_module_names or module in ("medseg", "__future__"):
            continue
        owners = {canonical(d) for d in distributions.get(module, [])}
        assert owners, f"{module} (imported in {where}) belongs to no installed distribution"
        if not owners & (declared | extras if lazy else declared):
            undeclared.append(f"{module} ({'/'.join(sorted(owners))}, imported in {where})")
    assert undeclared == [], f"imported at run time but not declared in pyproject.toml: {undeclared}"
    pinned = {canonical(line.split("==")[0]) for line in (ROOT / "constraints.txt").read_text().splitlines()
              if "==" in line and not line.startswith("#")}
    unpinned = sorted((declared | extras) - pinned)
    assert unpinned == [], f"declared in pyproject.toml but not pinned in constraints.txt: {unpinned}"
