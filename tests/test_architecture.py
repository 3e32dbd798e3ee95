"""The package's layers: every import in keel/ (module level or inside a function, or a module path handed to
importlib) goes down the layer order documented in keel/__init__.py, and no modules import each other in a cycle."""

from __future__ import annotations

import ast
from pathlib import Path

import keel

PACKAGE = Path(keel.__file__).parent


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path, known: set[str]) -> set[str]:
    """The keel modules `path` imports anywhere in its body (a `from pkg import name` counts name if it is a module)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in known else node.module
                     for a in node.names]
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", "")) == "import_module":
            names = [a.value for a in node.args if isinstance(a, ast.Constant) and isinstance(a.value, str)]
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value in known:
            names = [node.value]  # a module path in a table handed to importlib later
        found.update(n for n in names if n.split(".")[0] == "keel")
    return found


def graph() -> dict[str, set[str]]:
    files = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    return {mod: imports_of(path, set(files)) - {mod} for mod, path in files.items()}


def layer(mod: str) -> int:
    """The layer's index; keel/__init__.py (the version and this list) is below every layer, keel.cli above."""
    if mod == "keel":
        return -1
    parts = mod.split(".")
    top = parts[1] if len(parts) > 1 else ""
    return keel.LAYERS.index(top) if top in keel.LAYERS else len(keel.LAYERS)


def find_cycle(g: dict[str, set[str]]) -> list[str] | None:
    """One import cycle among keel's modules, as a path that returns to its start, or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(mod: str) -> list[str] | None:
        state[mod] = 1
        stack.append(mod)
        for dep in sorted(g.get(mod, ())):
            if dep not in g:
                continue
            if state.get(dep) == 1:
                return stack[stack.index(dep):] + [dep]
            if dep not in state and (cycle := visit(dep)):
                return cycle
        stack.pop()
        state[mod] = 2
        return None

    for mod in sorted(g):
        if mod not in state and (cycle := visit(mod)):
            return cycle
    return None


def test_no_import_cycles():
    cycle = find_cycle(graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_imports_go_down_the_layers():
    upward = [f"{mod} imports {dep}" for mod, deps in graph().items() for dep in deps
              if layer(dep) > layer(mod) and layer(mod) < len(keel.LAYERS)]
    assert not upward, "imports up the layer order " + " < ".join(keel.LAYERS) + ":\n" + "\n".join(sorted(upward))


def test_every_package_is_a_layer():
    packages = {p.parent.name for p in PACKAGE.glob("*/__init__.py")}
    assert packages == set(keel.LAYERS)


def test_cycle_finder_sees_a_cycle():
    g = {"keel.a": {"keel.b"}, "keel.b": {"keel.c"}, "keel.c": {"keel.a"}, "keel.d": set()}
    assert find_cycle(g) == ["keel.a", "keel.b", "keel.c", "keel.a"]


def test_contributing_names_every_module():
    """CONTRIBUTING.md's layout table names every module, so a new one cannot be added without a line there."""
    table = (PACKAGE.parent / "CONTRIBUTING.md").read_text(encoding="utf-8")
    missing = [str(p.relative_to(PACKAGE)) for p in sorted(PACKAGE.rglob("*.py"))
               if p.name not in ("__init__.py", "__main__.py") and str(p.relative_to(PACKAGE)) not in table]
    assert not missing, "CONTRIBUTING.md's layout table does not name: " + ", ".join(missing)


def test_tests_import_shared_code_from_helpers_or_their_own_folder():
    """A test module imports another test module only by its path in the mirror folders (tests/PACKAGE/...); shared
    pieces live in tests/helpers.py. An import of a test file that has moved fails collection for the whole suite."""
    tests = PACKAGE.parent / "tests"
    for path in tests.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("tests."):
                target = tests.parent / (node.module.replace(".", "/") + ".py")
                assert target.is_file(), f"{path.relative_to(tests.parent)} imports {node.module}, which is not a file"
