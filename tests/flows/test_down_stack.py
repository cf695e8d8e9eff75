"""`down-stack`: the stack leaves its hosts through the lifecycle and deploy tasks (drained,
stopped and recorded, then removed), dependents first, orphans of units no longer in the
stack included; a second down finds nothing."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from flows.deploy import deploy_stack
from flows.down import down_stack
from hxp.backends.process import ProcessBackend
from hxp.store import Store
from tests.support.stacks import free_port, web_stack

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("prefect_server")]


def test_down_stops_then_removes_everything_dependents_first(tmp_path: Path) -> None:
    path, _ports = web_stack(tmp_path)
    port = free_port()
    extra = tmp_path / "extra.yaml"
    extra.write_text(
        "services:\n  extra:\n    host: local\n"
        f"    command: [{sys.executable}, -m, http.server, '{port}', --bind, 127.0.0.1]\n"
        f"    ports: {{http: {port}}}\n    health: {{tcp: {{port: {port}}}}}\n"
    )
    state = tmp_path / "state"
    deploy_stack([str(path), str(extra)], state_dir=str(state))
    assert sorted(ProcessBackend(state).observe("t")) == ["api", "cache", "db", "extra"]
    store = Store(state)
    assert {r.state.value for r in store.lifecycle("t").values()} == {"running"}

    result = down_stack([str(path)], state_dir=str(state))  # `extra` is no longer in the stack

    assert result["removed"] == ["extra", "api", "cache", "db"]
    assert ProcessBackend(state).observe("t") == {}
    assert set(result["stopped"]) == {"api", "cache", "db"}
    assert result["stopped"]["db"]["db"].startswith("stopped")
    assert result["not_stopped"] == {}
    # The lifecycle went running -> draining -> stopping -> stopped, then the record went.
    transitions = [e["message"] for e in store.events("t") if e["kind"] == "lifecycle"]
    assert any("db" in m and "stopping -> stopped" in m for m in transitions), transitions
    assert store.lifecycle("t") == {}
    kinds = [e["kind"] for e in store.events("t")]
    assert kinds.count("removed") == 4
    assert kinds[-1] == "down"

    again = down_stack([str(path)], state_dir=str(state))
    assert again["removed"] == []
