"""The push-metrics task: no Pushgateway yet is a warning (the first deploy of a stack runs
before `hxp monitoring` starts it); a Pushgateway that answers with an error still fails."""

from __future__ import annotations

import threading
import urllib.error
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from prefect.logging import disable_run_logger

from hxp.store import Store
from tasks.metrics import push_metrics
from tests.support.stacks import free_port


class _Broken(BaseHTTPRequestHandler):
    def do_PUT(self) -> None:
        self.send_response(500)
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def broken_gateway() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Broken)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_nothing_listening_is_not_a_failure(tmp_path: Path) -> None:
    Store(tmp_path).add_event("t", "down", "removed 0 instance(s)")
    with disable_run_logger():
        assert (
            push_metrics.fn(f"http://127.0.0.1:{free_port()}", str(tmp_path), "t", "deploy")
            is False
        )


def test_a_gateway_answering_an_error_fails_the_task(tmp_path: Path, broken_gateway: str) -> None:
    Store(tmp_path).add_event("t", "down", "removed 0 instance(s)")
    with disable_run_logger(), pytest.raises(urllib.error.HTTPError):
        push_metrics.fn(broken_gateway, str(tmp_path), "t", "deploy")
