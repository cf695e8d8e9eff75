"""The sweep's network and command probes against real sockets and processes on 127.0.0.1:
HTTP (status, body, latency, chunked and close-delimited bodies, silence), TCP, commands."""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from hxp.health import (
    CommandProbe,
    HttpProbe,
    InstanceChecks,
    Layer,
    LayerResult,
    Probe,
    Status,
    SweepSettings,
    TcpProbe,
)
from hxp.io.probes import http_exchange, run_checks
from hxp.spec import HostSpec
from tests.support.stacks import free_port

LOCAL = {"local": HostSpec(backend="process")}
ROOT = Path(__file__).parents[2]


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        match self.path:
            case "/ok":
                self._send(200, b"all ok")
            case "/slow":
                time.sleep(0.3)
                self._send(200, b"ok, slowly")
            case "/down":
                self._send(503, b"")
            case "/chunked":
                self.send_response(200)
                self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()
                for part in (b"hello ", b"chunked ", b"world"):
                    self.wfile.write(b"%x\r\n%s\r\n" % (len(part), part))
                self.wfile.write(b"0\r\n\r\n")
            case "/until-close":
                self.send_response(200)
                self.send_header("Connection", "close")
                self.end_headers()
                self.wfile.write(b"no length, ends at close")
                self.close_connection = True
            case _:
                self._send(404, b"")

    def do_POST(self) -> None:
        size = int(self.headers.get("Content-Length", "0"))
        self._send(200, self.rfile.read(size))

    def _send(self, code: int, body: bytes) -> None:
        self.send_response(code)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


@pytest.fixture(scope="module")
def web() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def silent() -> Iterator[int]:
    """A port that accepts connections (the kernel's backlog) and never answers."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(16)
        yield int(s.getsockname()[1])


def run(probes: list[Probe], timeout: float = 1.0, **settings: float) -> list[LayerResult]:
    checks = [InstanceChecks("x", "x", "service", "local", None, timeout, tuple(probes))]
    return asyncio.run(run_checks(checks, LOCAL, {}, SweepSettings(**settings)))  # type: ignore[arg-type]


def one(probe: Probe, timeout: float = 1.0, **settings: float) -> LayerResult:
    (result,) = run([probe], timeout, **settings)
    return result


@pytest.mark.parametrize(
    ("path", "expect", "body", "status", "reason_has"),
    [
        pytest.param("/ok", 200, None, Status.HEALTHY, "status 200", id="ok"),
        pytest.param("/ok", 200, "all ok", Status.HEALTHY, "status 200", id="body-matches"),
        pytest.param("/ok", 200, "missing", Status.UNHEALTHY, "body lacks", id="body-differs"),
        pytest.param("/down", 200, None, Status.UNHEALTHY, "status 503, expected 200", id="503"),
        pytest.param("/down", 503, None, Status.HEALTHY, "status 503", id="503-expected"),
        pytest.param("/chunked", 200, "chunked world", Status.HEALTHY, "200", id="chunked"),
        pytest.param("/until-close", 200, "ends at close", Status.HEALTHY, "200", id="no-length"),
    ],
)
def test_http_probe(
    web: str, path: str, expect: int, body: str | None, status: Status, reason_has: str
) -> None:
    result = one(HttpProbe(Layer.HTTP, web + path, expect, body))
    assert result.status is status, result.reason
    assert reason_has in result.reason
    assert 0 < result.latency < 1.0
    assert result.at > 0


def test_http_probe_latency_degrades(web: str) -> None:
    result = one(HttpProbe(Layer.HTTP, web + "/slow"), timeout=0.5)  # slow after 0.25 s
    assert result.status is Status.DEGRADED
    assert "slow: over 250 ms" in result.reason


def test_http_probe_refused_and_silent(silent: int) -> None:
    closed = free_port()
    refused, hung = run(
        [
            HttpProbe(Layer.HTTP, f"http://127.0.0.1:{closed}/"),
            HttpProbe(Layer.HTTP, f"http://127.0.0.1:{silent}/"),
        ],
        timeout=0.3,
    )
    assert refused.status is Status.UNHEALTHY
    assert "refused" in refused.reason.lower()
    assert hung.status is Status.UNHEALTHY
    assert "no answer within 0.3s" in hung.reason
    assert 0.25 < hung.latency < 1.0


def test_http_exchange_post_and_bodies(web: str) -> None:
    code, body = asyncio.run(
        http_exchange(web + "/echo", 1.0, method="POST", body=b'{"a":1}', want_body=True)
    )
    assert (code, body) == (200, b'{"a":1}')
    assert asyncio.run(http_exchange(web + "/chunked", 1.0, want_body=True)) == (
        200,
        b"hello chunked world",
    )


def test_tcp_probe(silent: int) -> None:
    up = one(TcpProbe(Layer.TCP, "127.0.0.1", silent))
    down = one(TcpProbe(Layer.TCP, "127.0.0.1", free_port()))
    assert up.status is Status.HEALTHY
    assert "connected to 127.0.0.1" in up.reason
    assert down.status is Status.UNHEALTHY
    assert "refused" in down.reason.lower()


@pytest.mark.parametrize(
    ("argv", "status", "reason_has"),
    [
        pytest.param(("true",), Status.HEALTHY, "true exit code 0", id="ok"),
        pytest.param(("false",), Status.UNHEALTHY, "false exit code 1", id="fails"),
        pytest.param(
            (sys.executable, "-c", "import sys; print('db down', file=sys.stderr); sys.exit(3)"),
            Status.UNHEALTHY,
            "exit code 3: db down",
            id="stderr-tail",
        ),
        pytest.param(("sleep", "5"), Status.UNHEALTHY, "timed out", id="hangs"),
        pytest.param(("/nonexistent/check",), Status.UNHEALTHY, "cannot run", id="missing"),
    ],
)
def test_command_probe(argv: tuple[str, ...], status: Status, reason_has: str) -> None:
    started = time.monotonic()
    result = one(CommandProbe(Layer.COMMAND, argv), timeout=0.5)
    assert result.status is status, result.reason
    assert reason_has in result.reason
    assert time.monotonic() - started < 3.0


def test_many_endpoints_run_concurrently_within_the_bound(silent: int) -> None:
    """50 silent endpoints with a 0.3 s timeout and 25 in flight: two waves, not fifty."""
    probes: list[Probe] = [
        HttpProbe(Layer.HTTP, f"http://127.0.0.1:{silent}/{i}") for i in range(50)
    ]
    started = time.monotonic()
    results = run(probes, timeout=0.3, concurrency=25)
    took = time.monotonic() - started
    assert len(results) == 50
    assert all(r.status is Status.UNHEALTHY for r in results)
    assert 0.55 < took < 2.0


def test_hxp_health_needs_no_prefect(tmp_path: Path) -> None:
    """`hxp health` runs the sweep without importing Prefect (it answers in well under 1 s)."""
    code = (
        "import sys, hxp_cli\n"
        f"rc = hxp_cli.main(['health', '-f', 'examples/demo/stack.yaml', '--state-dir', "
        f"{str(tmp_path)!r}, '--json'])\n"
        "sys.exit(10 + rc if 'prefect' in sys.modules else rc)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=False
    )
    assert out.returncode == 2, out.stderr  # nothing deployed: unhealthy, and no Prefect
    assert json.loads(out.stdout)["status"] == "unhealthy"
