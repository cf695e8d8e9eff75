"""The import rules of the house, over the import graph of the project's own code
(scripts/arch_diagram.py reads it from the source: every `.py` under a top-level package of the
checkout, hxp, tasks, flows, blocks and the CLI's package, imports inside functions included).

- no module imports another module's `_private` name;
- no import cycle between modules (an import inside `if TYPE_CHECKING:` never runs, so it is
  not part of a cycle; it still counts for the private-name rule);
- a layer imports only the layers docs/architecture.md allows (below);
- the diagram in docs/architecture.md is the one the script draws from the code now.

The core's third-party imports (no Prefect, HTTP client, subprocess, socket) are checked by
tests/unit/test_purity.py over the same definition of the core.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from scripts import arch_diagram as graph
from scripts.arch_diagram import CORE

IMPORTS = graph.imports()
TOP = {"hxp", "tasks", "flows", "blocks"}

#: Which layers each layer may import at run time (docs/architecture.md, "What may import
#: what"). A top-level package other than hxp, tasks, flows and blocks is a client (the CLI):
#: it may import any layer but the backends, and no layer may import it.
ALLOWED: dict[str, set[str]] = {
    CORE: set(),
    "hxp.sim": {CORE},
    "hxp.store": {CORE},
    "hxp.backends": {CORE, "hxp.io", "hxp.store"},
    "hxp.io": {CORE, "hxp.backends", "hxp.store", "hxp.sim"},  # sim: calibration of doubles
    "blocks": {CORE},
    "tasks": {CORE, "hxp.io", "hxp.backends", "hxp.store", "blocks"},
    "flows": {CORE, "hxp.io", "hxp.store", "tasks", "blocks"},
}


def _is_client(layer: str) -> bool:
    return layer == "cli" or layer not in ALLOWED


def test_the_graph_covers_every_package() -> None:
    """Packages are discovered, not listed: a new one (the CLI's) is checked too."""
    assert set(graph.packages()) >= TOP
    found = {i.source.split(".")[0] for i in IMPORTS}
    assert found >= TOP
    assert any(i.function_level for i in IMPORTS)  # function-level imports are seen


def test_no_module_imports_a_private_name_of_another() -> None:
    private = [f"{i.where} imports {i.target}.{i.name}" for i in graph.private_imports(IMPORTS)]
    assert not private, "\n".join(private)


def test_no_import_cycle() -> None:
    problems = []
    for group in graph.cycles(IMPORTS):
        inside = sorted(
            {
                f"{i.where} -> {i.target}"
                for i in IMPORTS
                if i.source in group and i.target in group and not i.typing_only
            }
        )
        problems.append(f"{' <-> '.join(group)}: {'; '.join(inside)}")
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("layer", sorted(ALLOWED))
def test_layer_imports_only_what_it_may(layer: str) -> None:
    wrong = sorted(
        f"{i.where} imports {i.target} ({graph.layer(i.target)})"
        for i in IMPORTS
        if not i.typing_only
        and graph.layer(i.source) == layer
        and graph.layer(i.target) != layer
        and graph.layer(i.target) not in ALLOWED[layer]
    )
    assert not wrong, "\n".join(wrong)


def test_nothing_imports_the_cli() -> None:
    wrong = sorted(
        f"{i.where} imports {i.target}"
        for i in IMPORTS
        if _is_client(graph.layer(i.target)) and graph.layer(i.source) != graph.layer(i.target)
    )
    assert not wrong, "\n".join(wrong)


READ_ONLY_BACKEND = {
    ("hxp.backends", "observe_all"),
    # process facts the warm runner (hxp_cli/runner.py) records and passes on: no host changes
    ("hxp.backends.supervisor", "current_umask"),
    ("hxp.backends.supervisor", "start_ticks"),
}


def test_the_cli_package_drives_no_backend() -> None:
    """A client package outside hxp/ (the CLI) changes hosts only through flows.

    It may read what runs through `observe_all`, the same read-only function the deploy's
    observe task calls (`hxp plan` and `hxp status` must answer without a flow run)."""
    wrong = sorted(
        f"{i.where} imports {i.target}.{i.name}"
        for i in IMPORTS
        if i.source.split(".")[0] not in TOP
        and not i.typing_only
        and graph.layer(i.target) == "hxp.backends"
        and (i.target, i.name) not in READ_ONLY_BACKEND
    )
    assert not wrong, "\n".join(wrong)


def test_the_committed_diagram_is_the_code_now() -> None:
    doc = graph.DOC.read_text()
    assert graph.render_doc(doc, graph.mermaid()) == doc, (
        "docs/architecture.md's diagram is stale: run python3 scripts/arch_diagram.py"
    )


def test_rules_catch_what_they_should(tmp_path: Path) -> None:
    """The graph reader on a made-up project: private imports (a name, a private module, an
    attribute of an imported module), a cycle through a function-level import, a
    TYPE_CHECKING-only import that closes no cycle."""
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from pkg.b import _hidden\n")
    (pkg / "b.py").write_text("def f():\n    from pkg import a\n    return a\n_hidden = 1\n")
    (pkg / "c.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg.d import X\n"
    )
    (pkg / "d.py").write_text("from pkg.c import TYPE_CHECKING\nX = 1\n")
    (pkg / "sub").mkdir()
    (pkg / "sub" / "__init__.py").write_text("from pkg.sub import _impl\n")  # its own: fine
    (pkg / "sub" / "_impl.py").write_text("")
    (pkg / "e.py").write_text("from pkg.sub import _impl\n")
    (pkg / "f.py").write_text("import pkg.b as bee\nfrom pkg import c\nbee._hidden, c._x\n")
    found = graph.imports(tmp_path)
    assert sorted((i.source, i.target, i.name) for i in graph.private_imports(found)) == [
        ("pkg.a", "pkg.b", "_hidden"),
        ("pkg.e", "pkg.sub._impl", None),
        ("pkg.f", "pkg.b", "_hidden"),
        ("pkg.f", "pkg.c", "_x"),
    ]
    assert graph.cycles(found) == [["pkg.a", "pkg.b"]]
    assert [i.function_level for i in found if i.source == "pkg.b"] == [True]
