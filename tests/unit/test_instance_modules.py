"""tasks.deploy and tasks.lifecycle build on tasks.instances and never on each other: no import
between them at any level (a function-level import would hide the cycle), no private name of
another module, no module-level alias that exists only to be imported elsewhere."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

TASKS = Path(__file__).parents[2] / "tasks"
MODULES = {"tasks.deploy": "deploy.py", "tasks.lifecycle": "lifecycle.py"}


def imports(tree: ast.AST) -> list[tuple[str, str, int]]:
    """(module, name, line) of every import anywhere in the tree ("" name: a plain import)."""
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(a.name, "", node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            out += [(node.module, a.name, node.lineno) for a in node.names]
    return out


@pytest.mark.parametrize("module", sorted(MODULES))
def test_neither_imports_the_other_nor_a_private_name(module: str) -> None:
    tree = ast.parse((TASKS / MODULES[module]).read_text())
    other = next(m for m in MODULES if m != module)
    found = imports(tree)
    package, name = other.split(".")
    assert [(m, n, line) for m, n, line in found if m == other or (m, n) == (package, name)] == []
    assert [(m, n, line) for m, n, line in found if n.startswith("_")] == []
    nested = [
        node.lineno
        for fn in ast.walk(tree)
        if isinstance(fn, ast.FunctionDef | ast.AsyncFunctionDef)
        for node in ast.walk(fn)
        if isinstance(node, ast.Import | ast.ImportFrom)
    ]
    assert nested == []  # every import at the top, where a cycle would show


@pytest.mark.parametrize("module", sorted(MODULES))
def test_no_module_level_alias_of_a_function(module: str) -> None:
    tree = ast.parse((TASKS / MODULES[module]).read_text())
    aliases = [
        node.lineno
        for node in tree.body
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Name)
    ]
    assert aliases == []
