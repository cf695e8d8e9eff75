"""Real components for the metrics tests: vLLM simulators on chosen ports, a Pushgateway, a
Prometheus, `hxp exporter`; all on 127.0.0.1 with ports the OS hands out."""

from __future__ import annotations

import asyncio
import shutil
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.support.loadgen import run_load

ROOT = Path(__file__).parents[2]


# Ports this process has handed out: a port is free again once its probe socket closes, so a
# later free_port() could return one of a run free_ports() gave (a clash a stack then refuses).
_GIVEN: set[int] = set()


def _unused_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def free_port() -> int:
    """A free loopback port that this process has not handed out before."""
    for _ in range(200):
        port = _unused_port()
        if port not in _GIVEN:
            _GIVEN.add(port)
            return port
    raise RuntimeError("no free port")


def free_ports(n: int) -> int:
    """The first of `n` consecutive free ports (a model's replicas take port, port+1, ...),
    none handed out before by this process."""
    for _ in range(200):
        base = _unused_port()
        if _GIVEN & set(range(base, base + n)):
            continue
        if base + n > 65535:
            continue
        try:
            held = []
            for p in range(base, base + n):
                s = socket.socket()
                held.append(s)
                s.bind(("127.0.0.1", p))
        except OSError:
            continue
        finally:
            for s in held:
                s.close()
        _GIVEN.update(range(base, base + n))
        return base
    raise RuntimeError("no run of free ports")


def wait_until(predicate: Callable[[], bool], timeout: float = 20.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what or predicate}")
        time.sleep(0.05)


def answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


@contextmanager
def simulator(port: int, served: str = "chat", *args: str) -> Iterator[subprocess.Popen[bytes]]:
    """`python -m hxp.sim.vllm` on `port`, ready (/health 200)."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "hxp.sim.vllm", "--port", str(port), "--served-model-name",
         served, "--latency-ms", "10", "--tokens-per-second", "400", *args],
        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        wait_until(lambda: answers(f"http://127.0.0.1:{port}/health"), what=f"simulator {port}")
        yield proc
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)


def load(port: int, n: int, model: str = "chat") -> None:
    """`n` completions against the simulator on `port`, all answered."""
    result = asyncio.run(run_load(f"http://127.0.0.1:{port}", model, n, concurrency=8))
    assert result.ok == n, result.errors


def _binary(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.skip(f"{name} is not installed (scripts/install-system-deps.sh)")
    return path


@contextmanager
def _process(argv: list[str], ready: str, log: Path) -> Iterator[subprocess.Popen[bytes]]:
    with log.open("wb") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT)
    try:
        wait_until(lambda: answers(ready) or proc.poll() is not None, what=ready)
        if proc.poll() is not None:
            raise AssertionError(f"{argv[0]} exited: {log.read_text()[-2000:]}")
        yield proc
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)


@contextmanager
def pushgateway(tmp: Path) -> Iterator[str]:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    argv = [_binary("prometheus-pushgateway"), f"--web.listen-address=127.0.0.1:{port}"]
    with _process(argv, f"{url}/-/ready", tmp / "pushgateway.log"):
        yield url


@contextmanager
def exporter(state: Path) -> Iterator[str]:
    port = free_port()
    argv = [sys.executable, "-m", "hxp_cli", "exporter", "--port", str(port), "--state-dir",
            str(state)]  # fmt: skip
    with _process(argv, f"http://127.0.0.1:{port}/metrics", state.parent / "exporter.log"):
        yield f"127.0.0.1:{port}"


@contextmanager
def prometheus(tmp: Path, exporter_target: str, pushgateway_target: str) -> Iterator[str]:
    """Prometheus scraping the exporter and the Pushgateway (honor_labels) every second."""
    port = free_port()
    config = tmp / "prometheus.yml"
    config.write_text(
        textwrap.dedent(f"""\
        global:
          scrape_interval: 1s
          evaluation_interval: 1s
        scrape_configs:
          - job_name: hxp-exporter
            static_configs: [{{targets: ["{exporter_target}"]}}]
          - job_name: pushgateway
            honor_labels: true
            static_configs: [{{targets: ["{pushgateway_target}"]}}]
        """)
    )
    data = Path(tempfile.mkdtemp(prefix="prom-", dir=tmp))
    argv = [_binary("prometheus"), f"--config.file={config}",
            f"--web.listen-address=127.0.0.1:{port}", f"--storage.tsdb.path={data}"]  # fmt: skip
    with _process(argv, f"http://127.0.0.1:{port}/-/ready", tmp / "prometheus.log"):
        yield f"http://127.0.0.1:{port}"


def query(prom: str, expr: str) -> list[dict[str, Any]]:
    response = httpx.get(f"{prom}/api/v1/query", params={"query": expr}, timeout=5)
    response.raise_for_status()
    body = response.json()
    assert body["status"] == "success", body
    result: list[dict[str, Any]] = body["data"]["result"]
    return result


def wait_for_series(
    prom: str, expr: str, timeout: float = 30.0, count: int = 1
) -> list[dict[str, Any]]:
    """The query's result once it has `count` series (Prometheus scrapes every second)."""
    found: list[dict[str, Any]] = []

    def ready() -> bool:
        nonlocal found
        found = query(prom, expr)
        return len(found) >= count

    wait_until(ready, timeout, what=expr)
    return found


__all__ = [
    "answers",
    "exporter",
    "free_port",
    "free_ports",
    "load",
    "prometheus",
    "pushgateway",
    "query",
    "simulator",
    "wait_for_series",
    "wait_until",
]


# For other test modules: an installed binary (else a skip), and a process run until ready.
binary = _binary
managed_process = _process
