"""The layout keeps its promises: imports point one way, no cycle, and only ``jaxmp.cli`` speaks in flags.

Read from the source with ``ast`` (nothing is imported), so a violation names the file and line.
"""

import ast
import re
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "jaxmp"
ENTRY_POINTS = {
    "jaxmp.train",
    "jaxmp.compare",
    "jaxmp.diagnose",
    "jaxmp.evaluate",
    "jaxmp.generate",
    "jaxmp.policy",
    "jaxmp.predict",
    "jaxmp.tune",
}
# What each layer may not import (by module-name prefix); the numerics and models are the rest.
FORBIDDEN = {
    "jaxmp.cli": (),
    "jaxmp.training": ("jaxmp.cli", "jaxmp.inference"),
    "jaxmp.inference": ("jaxmp.cli",),
    "jaxmp.data": ("jaxmp.cli", "jaxmp.training", "jaxmp.inference"),
    "jaxmp": ("jaxmp.cli", "jaxmp.training", "jaxmp.inference", "jaxmp.data"),  # numerics, models, hf
}
FLAG = re.compile(r"(?<![\w-])--[a-z][a-z0-9]*(-[a-z0-9]+)*")


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def layer(name: str) -> str:
    return next(prefix for prefix in FORBIDDEN if name == prefix or name.startswith(prefix + "."))


def imports(path: Path, *, top_level_only: bool = False) -> list[tuple[str, int]]:
    """The jaxmp modules ``path`` imports, with line numbers (``from jaxmp import x`` names ``jaxmp.x``)."""
    tree = ast.parse(path.read_text())
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    found = []
    for node in nodes:
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                candidate = f"{node.module}.{alias.name}"
                found.append((candidate if candidate in MODULES else node.module, node.lineno))
    return [(name, line) for name, line in found if name == "jaxmp" or name.startswith("jaxmp.")]


def test_the_layers_import_only_downwards():
    violations = [
        f"{path}:{line} imports {imported}"
        for name, path in MODULES.items()
        if name not in ENTRY_POINTS
        for imported, line in imports(path)
        if any(imported == bad or imported.startswith(bad + ".") for bad in FORBIDDEN[layer(name)])
        or (imported in ENTRY_POINTS and not name.startswith("jaxmp.cli"))
    ]
    assert not violations, "\n".join(violations)


def test_entry_points_only_run_their_command():
    for name in ENTRY_POINTS:
        imported = [module for module, _ in imports(MODULES[name])]
        assert imported == [f"jaxmp.cli.{name.split('.')[-1]}"], (name, imported)


def test_no_import_cycle_among_module_level_imports():
    graph = {
        name: {m for m, _ in imports(path, top_level_only=True) if m in MODULES}
        for name, path in MODULES.items()
    }
    for package in [name for name, path in MODULES.items() if path.name == "__init__.py"]:
        graph[package] -= {m for m in graph[package] if m.startswith(package + ".")}  # a package's re-exports
    visiting, done = [], set()

    def visit(name: str) -> None:
        if name in done:
            return
        assert name not in visiting, "import cycle: " + " -> ".join([*visiting[visiting.index(name) :], name])
        visiting.append(name)
        for imported in sorted(graph[name]):
            visit(imported)
        visiting.pop()
        done.add(name)

    for name in sorted(graph):
        visit(name)


def _strings_outside_docstrings(tree: ast.AST):
    docstrings = {
        id(node.body[0].value)
        for node in ast.walk(tree)
        if isinstance(node, (ast.Module, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
        and node.body
        and isinstance(node.body[0], ast.Expr)
        and isinstance(node.body[0].value, ast.Constant)
    }
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
            yield node


def test_no_library_message_spells_a_flag():
    violations = [
        f"{path}:{node.lineno}: {node.value!r}"
        for name, path in MODULES.items()
        if layer(name) != "jaxmp.cli" and name not in ENTRY_POINTS
        for node in _strings_outside_docstrings(ast.parse(path.read_text()))
        if FLAG.search(node.value)
    ]
    assert not violations, "\n".join(violations)


@pytest.mark.parametrize(
    "source, bad",
    [
        ("from jaxmp.cli import run_cli\n", "imports jaxmp.cli"),
        ("raise ValueError(f'--seq-len must be >= 1, got {n}')\n", "--seq-len"),
    ],
)
def test_the_checks_catch_a_violation(tmp_path, monkeypatch, source, bad):
    """A library module that imports the CLI or spells a flag fails the tests above."""
    fake = PACKAGE / "training" / "loop.py"
    monkeypatch.setitem(MODULES, "jaxmp.training.loop", tmp_path / "loop.py")
    (tmp_path / "loop.py").write_text(fake.read_text() + source)
    check = (
        test_the_layers_import_only_downwards if "import" in source else test_no_library_message_spells_a_flag
    )
    with pytest.raises(AssertionError, match=re.escape(bad)):
        check()
