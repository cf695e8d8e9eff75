"""The CLI is a client: it changes hosts only through flow runs, on the one Prefect server."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

CLI = Path(__file__).parents[2] / "hxp_cli"
MODULES = sorted(CLI.glob("*.py"))
#: What changes a host or the gateway outside a flow: backend actions, the gateway object.
DRIVERS = ("hxp.backends.base", "hxp.io.gateway", "hxp.io.lifecycle", "tasks")


def _imports(node: ast.AST) -> list[tuple[int, str]]:
    out = []
    for n in ast.walk(node):
        if isinstance(n, ast.ImportFrom) and n.module and n.level == 0:
            out.append((n.lineno, n.module))
        elif isinstance(n, ast.Import):
            out.extend((n.lineno, a.name) for a in n.names)
    return out


def test_the_cli_lives_outside_the_core() -> None:
    assert not (CLI.parent / "hxp" / "cli.py").exists()
    assert {p.stem for p in MODULES} >= {"__init__", "common", "deploy", "lifecycle"}


@pytest.mark.parametrize("path", MODULES, ids=lambda p: p.name)
def test_no_backend_action_or_gateway_edit_outside_a_flow(path: Path) -> None:
    tree = ast.parse(path.read_text())
    bad = [m for _, m in _imports(tree) if m.startswith(DRIVERS)]
    assert bad == [], f"{path.name} imports {bad}: run a flow instead"


@pytest.mark.parametrize("path", MODULES, ids=lambda p: p.name)
def test_every_flow_runs_on_the_chosen_server(path: Path) -> None:
    """A command that imports a flow first points Prefect at its server (use_prefect)."""
    if path.name == "runner.py":  # imports the flows to hold them loaded; runs no flow
        return
    tree = ast.parse(path.read_text())
    for func in [n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)]:
        flows = [line for line, m in _imports(func) if m.split(".")[0] == "flows"]
        if not flows:
            continue
        chosen = [
            n.lineno
            for n in ast.walk(func)
            if isinstance(n, ast.Call) and getattr(n.func, "id", None) == "use_prefect"
        ]
        assert chosen, f"{path.name}:{func.name} runs a flow without use_prefect"
        assert min(chosen) < min(flows), f"{path.name}:{func.name} imports the flow first"
