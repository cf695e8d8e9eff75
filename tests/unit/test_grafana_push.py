"""The optional push through Grafana's HTTP API.

Grafana cannot run on this machine: these tests run against a LOCAL STAND-IN that implements
only the two endpoints hxp uses (`POST /api/datasources`, `POST /api/dashboards/db`), with
Grafana's documented status codes (200, 409 for an existing datasource, 401 without a valid
token). They check what hxp sends, not Grafana's behaviour.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from hxp.config import load_config
from hxp.errors import MonitoringError
from hxp.io.monitoring import push_grafana
from hxp.monitoring import monitoring_files
from tests.support.stacks import free_port

TOKEN = "glsa_test_token_value"


class StandIn:
    def __init__(self) -> None:
        self.requests: list[tuple[str, str, dict[str, Any], str]] = []
        self.datasources: set[str] = set()
        self.refuse_dashboards = False


@pytest.fixture
def grafana() -> Iterator[tuple[str, StandIn]]:
    state = StandIn()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            state.requests.append(("POST", self.path, body, self.headers.get("Authorization", "")))
            if self.headers.get("Authorization") != f"Bearer {TOKEN}":
                return self._reply(401, {"message": "Unauthorized"})
            if self.path == "/api/datasources":
                if body["uid"] in state.datasources:
                    return self._reply(
                        409, {"message": "data source with the same uid already exists"}
                    )
                state.datasources.add(body["uid"])
                return self._reply(200, {"message": "Datasource added", "id": 1})
            if self.path == "/api/dashboards/db":
                if state.refuse_dashboards:
                    return self._reply(412, {"message": "version-mismatch"})
                uid = body["dashboard"]["uid"]
                return self._reply(200, {"status": "success", "uid": uid, "version": 1})
            return self._reply(404, {"message": "Not found"})

        def _reply(self, status: int, payload: dict[str, Any]) -> None:
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, format: str, *args: Any) -> None:
            return

    port = free_port()
    server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{port}", state
    server.shutdown()
    server.server_close()


def boards() -> list[dict[str, Any]]:
    stack = load_config(["examples/gpu-fleet/stack.yaml"], environ={}).stack
    return [json.loads(f.content) for f in monitoring_files(stack) if f.path.endswith(".json")]


DS = {"name": "hxp fleet", "uid": "hxp-fleet", "type": "prometheus", "url": "http://p:9090"}


def test_push_creates_datasource_and_every_dashboard(grafana: tuple[str, StandIn]) -> None:
    url, state = grafana
    result = push_grafana(url, TOKEN, DS, boards())
    assert result.datasource == "created"
    assert sorted(result.dashboards) == [
        "hxp-fleet-fleet",
        "hxp-fleet-orchestrator",
        "hxp-fleet-vllm-chat",
        "hxp-fleet-vllm-coder",
    ]
    posted = [r for r in state.requests if r[1] == "/api/dashboards/db"]
    assert all(r[2]["overwrite"] is True and r[2]["dashboard"]["id"] is None for r in posted)
    assert all(r[3] == f"Bearer {TOKEN}" for r in state.requests)
    again = push_grafana(url, TOKEN, DS, boards())  # idempotent: the datasource exists
    assert again.datasource == "exists"


def test_a_refusal_names_the_dashboard_and_never_the_token(grafana: tuple[str, StandIn]) -> None:
    url, state = grafana
    state.refuse_dashboards = True
    with pytest.raises(MonitoringError, match="dashboard 'hxp-fleet-") as err:
        push_grafana(url, TOKEN, DS, boards())
    assert "HTTP 412" in str(err.value)
    assert TOKEN not in str(err.value)


def test_a_bad_token_fails_clearly(grafana: tuple[str, StandIn]) -> None:
    url, _ = grafana
    with pytest.raises(MonitoringError, match="HTTP 401") as err:
        push_grafana(url, "wrong", DS, boards())
    assert "wrong" not in str(err.value)


def test_the_flow_task_reads_the_token_block(grafana: tuple[str, StandIn], tmp_path) -> None:  # type: ignore[no-untyped-def]
    """push_dashboards resolves `monitoring.grafana.token_block` (here from STATE/secrets/)."""
    from prefect.logging import disable_run_logger

    from hxp.monitoring import MonitoringFile
    from tasks.monitoring import RenderedMonitoring, push_dashboards

    url, state = grafana
    stack = load_config(["examples/gpu-fleet/stack.yaml"], environ={}).stack
    assert stack.monitoring is not None
    grafana_spec = stack.monitoring.grafana.model_copy(update={"url": url})  # type: ignore[union-attr]
    stack = stack.model_copy(
        update={"monitoring": stack.monitoring.model_copy(update={"grafana": grafana_spec})}
    )
    secrets = tmp_path / "secrets"
    secrets.mkdir()
    (secrets / "grafana-token").write_text(TOKEN + "\n")
    (secrets / "grafana-token").chmod(0o600)
    files = [MonitoringFile(f"grafana/dashboards/{b['uid']}.json", json.dumps(b)) for b in boards()]
    with disable_run_logger():
        pushed = push_dashboards.fn(stack, str(tmp_path), RenderedMonitoring(files))
    assert len(pushed) == 4
    assert state.datasources == {"hxp-fleet"}
