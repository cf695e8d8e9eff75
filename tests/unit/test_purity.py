"""The core stays pure: no Prefect, HTTP, Docker or subprocess imports outside hxp/io."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

CORE = Path(__file__).parents[2] / "hxp"
FORBIDDEN = {"prefect", "httpx", "docker", "subprocess", "socket", "requests", "pynvml"}
EDGE = {"io", "backends", "sim"}  # host-touching code, the doubles (the CLI is hxp_cli/)


def core_modules() -> list[Path]:
    return [p for p in sorted(CORE.rglob("*.py")) if p.relative_to(CORE).parts[0] not in EDGE]


@pytest.mark.parametrize("path", core_modules(), ids=lambda p: str(p.relative_to(CORE)))
def test_core_module_imports_nothing_that_touches_hosts(path: Path) -> None:
    tree = ast.parse(path.read_text())
    imported: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            imported.add(node.module.split(".")[0])
    assert not imported & FORBIDDEN, f"{path.name} imports {sorted(imported & FORBIDDEN)}"


def test_cli_does_not_import_prefect_for_plain_commands() -> None:
    import subprocess
    import sys

    code = (
        "import sys, hxp_cli\n"
        "hxp_cli.main(['graph', '-f', 'examples/demo/stack.yaml'])\n"
        "sys.exit(1 if 'prefect' in sys.modules else 0)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=CORE.parent, capture_output=True, text=True, check=False
    )
    assert out.returncode == 0, out.stderr
