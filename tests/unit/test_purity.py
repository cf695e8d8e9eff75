"""The core stays pure: no Prefect, HTTP, Docker, subprocess or socket imports, and no process
spawned, outside the edge of hxp/ (hxp/io, hxp/backends, hxp/store.py, hxp/sim, the CLI).

Which modules are the core is decided by scripts/arch_diagram.py's `layer()`, the same
definition docs/architecture.md and tests/unit/test_architecture.py use."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

CORE = Path(__file__).parents[2] / "hxp"
FORBIDDEN = {
    "prefect", "httpx", "docker", "subprocess", "socket", "requests", "pynvml", "aiohttp",
    "urllib3", "urllib.request", "http.client",
}  # fmt: skip
#: Calls that start a process without importing subprocess.
SPAWNERS = {
    "asyncio": {"create_subprocess_exec", "create_subprocess_shell"},
    "os": {"system", "popen", "fork", "forkpty", "posix_spawn", "posix_spawnp", "execv",
           "execve", "execvp", "execvpe", "execl", "execle", "execlp", "execlpe", "spawnv",
           "spawnve", "spawnvp", "spawnvpe", "spawnl", "spawnle", "spawnlp", "spawnlpe"},
}  # fmt: skip


def core_modules() -> list[Path]:
    from scripts.arch_diagram import CORE as CORE_LAYER
    from scripts.arch_diagram import layer, modules

    return sorted(path for name, path in modules().items() if layer(name) == CORE_LAYER)


@pytest.mark.parametrize("path", core_modules(), ids=lambda p: str(p.relative_to(CORE)))
def test_core_module_imports_nothing_that_touches_hosts(path: Path) -> None:
    tree = ast.parse(path.read_text())
    imported: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                imported.update(_prefixes(alias.name))
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            imported.update(_prefixes(node.module))
            imported.update(f"{node.module}.{alias.name}" for alias in node.names)
    assert not imported & FORBIDDEN, f"{path.name} imports {sorted(imported & FORBIDDEN)}"


def _prefixes(dotted: str) -> set[str]:
    parts = dotted.split(".")
    return {".".join(parts[: i + 1]) for i in range(len(parts))}


@pytest.mark.parametrize("path", core_modules(), ids=lambda p: str(p.relative_to(CORE)))
def test_core_module_starts_no_process(path: Path) -> None:
    tree = ast.parse(path.read_text())
    calls = {
        f"{node.value.id}.{node.attr}"
        for node in ast.walk(tree)
        if isinstance(node, ast.Attribute)
        and isinstance(node.value, ast.Name)
        and node.attr in SPAWNERS.get(node.value.id, ())
    }
    assert not calls, f"{path.name} starts processes: {sorted(calls)}"


def test_the_core_is_what_the_architecture_says() -> None:
    """The pure core is hxp/ without its edge (a check that the layer rule still bites)."""
    names = {str(p.relative_to(CORE)) for p in core_modules()}
    assert {"spec.py", "plan.py", "metrics.py", "metric_names.py", "promtext.py"} <= names
    assert not {n for n in names if n.split("/")[0] in ("io", "backends", "sim")}
    assert not names & {"store.py", "cli.py"}


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
