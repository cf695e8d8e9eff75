"""The drain before a model's stop, against the vLLM double and a page that is not vLLM's:
drained, cut at the cap (and how many), or unknown (no drain metric: never "drained")."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest

from hxp.io.probes import DrainResult, wait_drained
from hxp.spec import Stack
from hxp.units import UnitInstance, expand_units
from tests.support.metrics_env import free_port, simulator

pytestmark = pytest.mark.slow


def model_at(port: int) -> UnitInstance:
    stack = Stack.model_validate({
        "stack": "dr", "hosts": {"local": {"backend": "process"}},
        "models": {"chat": {"host": "local", "model": "org/chat", "engine": "simulator",
                            "port": port, "vllm": {"version": "0.33.0"}}},
    })  # fmt: skip
    (inst,) = expand_units(stack)
    return inst


def long_requests(port: int, n: int) -> list[threading.Thread]:
    body = {"model": "chat", "prompt": "x", "max_tokens": 400, "ignore_eos": True}

    def call() -> None:
        with suppress(httpx.HTTPError):
            httpx.post(f"http://127.0.0.1:{port}/v1/completions", json=body, timeout=30)

    threads = [threading.Thread(target=call, daemon=True) for _ in range(n)]
    for t in threads:
        t.start()
    return threads


def running(port: int) -> float:
    page = httpx.get(f"http://127.0.0.1:{port}/metrics").text
    line = next(x for x in page.splitlines() if x.startswith("vllm:num_requests_running{"))
    return float(line.rsplit(" ", 1)[1])


def test_a_drain_cap_reached_says_how_many_requests_the_stop_cuts() -> None:
    port = free_port()
    with simulator(port, "chat", "--tokens-per-second", "20"):  # 400 tokens: 20 s
        long_requests(port, 3)
        deadline = time.monotonic() + 10
        while running(port) < 3:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        result = asyncio.run(wait_drained(model_at(port), 0.5))
    assert isinstance(result, DrainResult)
    assert result.cut == 3
    assert result.startswith("3 request(s) still in flight after the 0s drain cap")


def test_a_model_with_nothing_in_flight_is_drained_at_once() -> None:
    port = free_port()
    with simulator(port, "chat"):
        started = time.monotonic()
        result = asyncio.run(wait_drained(model_at(port), 5))
    assert time.monotonic() - started < 2
    assert result.startswith("drained in")
    assert isinstance(result, DrainResult)
    assert result.cut == 0


@contextmanager
def page_server(body: bytes) -> Iterator[int]:
    """A real HTTP server answering every GET with `body` (200, text/plain)."""

    class Page(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("content-type", "text/plain; version=0.0.4")
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Page)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield int(server.server_address[1])
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize(
    "page",
    [
        # vLLM with --disable-log-stats: the process families are there, vllm:* are not.
        b"# TYPE process_cpu_seconds_total counter\nprocess_cpu_seconds_total 1.5\n",
        b"<html><body>not a metrics page</body></html>",
    ],
    ids=["disable-log-stats", "not-metrics"],
)
def test_no_drain_metric_is_unknown_and_waits_the_whole_cap(page: bytes) -> None:
    with page_server(page) as port:
        started = time.monotonic()
        result = asyncio.run(wait_drained(model_at(port), 1.0))
    assert time.monotonic() - started >= 1.0
    assert isinstance(result, DrainResult)
    assert result.cut is None
    assert "in-flight requests unknown, waited the whole 1s drain cap" in result
