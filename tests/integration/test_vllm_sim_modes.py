"""The vLLM development double as a process: start-up delay, failure modes, SIGTERM drain, load."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import httpx
import pytest

pytestmark = pytest.mark.slow


@dataclass
class SimProcess:
    proc: subprocess.Popen[str]
    port: int
    log: list[str] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


def wait_for(predicate: Callable[[], bool], timeout: float = 10.0) -> float:
    """Poll until true; the seconds it took."""
    start = time.monotonic()
    while not predicate():
        assert time.monotonic() - start < timeout, "condition not met in time"
        time.sleep(0.02)
    return time.monotonic() - start


def health(url: str) -> int | None:
    """Status of /health, None when nothing answers."""
    try:
        return httpx.get(url + "/health", timeout=1).status_code
    except httpx.TransportError:
        return None


@contextmanager
def sim_process(*args: str) -> Iterator[SimProcess]:
    """`python -m hxp.sim.vllm` on a port the OS picks; its stderr collected in `log`."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "hxp.sim.vllm", "--port", "0", *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    assert proc.stderr is not None
    log: list[str] = []
    bound = threading.Event()
    port: list[int] = []

    def drain() -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            log.append(line.rstrip())
            match = re.search(r"bound 127\.0\.0\.1:(\d+)", line)
            if match:
                port.append(int(match.group(1)))
                bound.set()

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    try:
        assert bound.wait(15), f"the simulator did not bind: {log}"
        yield SimProcess(proc, port[0], log)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)
        reader.join(5)


def test_startup_delay_refuses_connections_until_loaded() -> None:
    with sim_process("--startup-delay", "1.5") as sim:
        assert health(sim.url) is None, "vLLM does not accept connections while loading"
        took = wait_for(lambda: health(sim.url) == 200)
        assert took > 1.0
        assert any("DEVELOPMENT DOUBLE" in line for line in sim.log)


def test_crash_after_exits_with_code_1() -> None:
    with sim_process("--crash-after", "1") as sim:
        wait_for(lambda: health(sim.url) == 200)
        assert sim.proc.wait(10) == 1
        assert health(sim.url) is None


def test_fail_health_after_turns_health_to_503() -> None:
    with sim_process("--fail-health-after", "1") as sim:
        wait_for(lambda: health(sim.url) == 200)
        wait_for(lambda: health(sim.url) == 503)
        assert sim.proc.poll() is None
        assert httpx.get(sim.url + "/v1/models").status_code == 200


def test_never_ready_listens_but_health_stays_503() -> None:
    with sim_process("--never-ready") as sim:
        wait_for(lambda: health(sim.url) is not None)
        time.sleep(0.5)
        assert health(sim.url) == 503
        assert httpx.get(sim.url + "/version").status_code == 200


def _stream(url: str, out: list[dict[str, object]], errors: list[Exception]) -> None:
    """A streamed completion; its SSE events (parsed) in `out`, a transport error in `errors`."""
    request = {"prompt": "cut me", "max_tokens": 200, "ignore_eos": True, "stream": True}
    try:
        with httpx.stream("POST", url + "/v1/completions", json=request, timeout=30) as reply:
            assert reply.status_code == 200
            for line in reply.iter_lines():
                if line.startswith("data: {"):
                    out.append(json.loads(line.removeprefix("data: ")))
    except httpx.TransportError as exc:
        errors.append(exc)


def test_sigterm_aborts_streams_in_flight_as_vllm_does() -> None:
    """vLLM >= 0.18 with its default --shutdown-timeout 0 (v1/engine/core.py
    `_handle_shutdown`): every stream in flight ends at once with finish_reason "abort", well
    short of its tokens; the server still listens meanwhile and rejects a new request the same
    way (`_reject_add_in_shutdown`); then it exits 0."""
    with sim_process("--tokens-per-second", "20", "--latency-ms", "10") as sim:
        wait_for(lambda: health(sim.url) == 200)
        events: list[list[dict[str, object]]] = [[], [], []]
        errors: list[Exception] = []
        workers = [threading.Thread(target=_stream, args=(sim.url, e, errors)) for e in events]
        for w in workers:
            w.start()
        wait_for(lambda: all(events))
        sim.proc.send_signal(signal.SIGTERM)
        for w in workers:
            w.join(30)
        assert not errors
        for stream in events:
            last = stream[-1]["choices"][0]  # type: ignore[index]
            assert last["finish_reason"] == "abort"
            assert len(stream) < 50  # cut: 200 tokens would take 10 s
        assert sim.proc.wait(10) == 0
        assert any("aborting 3 request(s)" in line for line in sim.log)


def test_sigterm_before_018_cuts_streams_and_stops_listening() -> None:
    """Before vLLM 0.18 the engine stops before the HTTP server: streams in flight are cut."""
    with sim_process("--tokens-per-second", "20", "--version", "0.17.1") as sim:
        wait_for(lambda: health(sim.url) == 200)
        events: list[dict[str, object]] = []
        errors: list[Exception] = []
        worker = threading.Thread(target=_stream, args=(sim.url, events, errors))
        worker.start()
        wait_for(lambda: bool(events))
        sim.proc.send_signal(signal.SIGTERM)
        worker.join(30)
        assert errors, "the stream is cut"
        assert all(e["choices"][0]["finish_reason"] is None for e in events)  # type: ignore[index]
        assert sim.proc.wait(10) == 0


def test_sigterm_with_a_shutdown_timeout_lets_in_flight_requests_finish() -> None:
    with sim_process("--tokens-per-second", "20", "--latency-ms", "10",
                     "--shutdown-timeout", "30") as sim:  # fmt: skip
        wait_for(lambda: health(sim.url) == 200)
        result: list[httpx.Response] = []
        request = {"prompt": "drain me", "max_tokens": 30, "ignore_eos": True}  # ~1.5 s
        worker = threading.Thread(
            target=lambda: result.append(
                httpx.post(sim.url + "/v1/completions", json=request, timeout=30)
            )
        )
        worker.start()
        time.sleep(0.4)
        sim.proc.send_signal(signal.SIGTERM)
        time.sleep(0.2)
        late = httpx.post(sim.url + "/v1/completions", json=request, timeout=5)  # still listens
        assert late.json()["choices"][0]["finish_reason"] == "abort"  # ... and rejects it
        worker.join(30)
        assert result
        assert result[0].status_code == 200
        assert result[0].json()["usage"]["completion_tokens"] == 30
        assert sim.proc.wait(10) == 0
        assert any("draining 1 in-flight" in line for line in sim.log)


def test_stall_after_keeps_health_200_while_no_token_moves() -> None:
    with sim_process("--tokens-per-second", "50", "--stall-after", "1") as sim:
        wait_for(lambda: health(sim.url) == 200)
        events: list[dict[str, object]] = []
        errors: list[Exception] = []
        worker = threading.Thread(target=_stream, args=(sim.url, events, errors), daemon=True)
        worker.start()
        wait_for(lambda: bool(events))
        time.sleep(1.5)
        seen = len(events)
        time.sleep(1.0)
        assert len(events) == seen  # no progress
        assert health(sim.url) == 200
        page = httpx.get(sim.url + "/metrics").text
        assert re.search(r"^vllm:num_requests_running\{[^}]*\} 1\.0$", page, re.M)
        sim.proc.send_signal(signal.SIGTERM)
        assert sim.proc.wait(10) == 0


def test_sigterm_cuts_requests_past_the_shutdown_timeout() -> None:
    with sim_process("--tokens-per-second", "5", "--shutdown-timeout", "0.3") as sim:
        wait_for(lambda: health(sim.url) == 200)
        errors: list[Exception] = []

        def call() -> None:
            try:
                httpx.post(sim.url + "/v1/completions", json={"prompt": "x", "ignore_eos": True},
                           timeout=30)  # fmt: skip
            except httpx.TransportError as exc:
                errors.append(exc)

        worker = threading.Thread(target=call)
        worker.start()
        time.sleep(0.3)
        started = time.monotonic()
        sim.proc.send_signal(signal.SIGTERM)
        assert sim.proc.wait(10) == 0
        assert time.monotonic() - started < 2
        worker.join(10)
        assert errors, "a request past the timeout is cut"


def test_sigterm_during_startup_exits_0() -> None:
    with sim_process("--startup-delay", "30") as sim:
        time.sleep(0.3)
        sim.proc.send_signal(signal.SIGTERM)
        assert sim.proc.wait(5) == 0


def test_console_help_says_development_double() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "hxp.sim.vllm", "--help"], capture_output=True, text=True, check=True
    ).stdout
    assert "DEVELOPMENT DOUBLE" in out


async def _load(port: int, total: int, concurrency: int) -> tuple[int, dict[int, int], float]:
    """`total` completions over `concurrency` keep-alive connections (raw sockets)."""
    body = json.dumps({"prompt": "load test prompt", "max_tokens": 16}).encode()
    request = (
        b"POST /v1/completions HTTP/1.1\r\nhost: sim\r\ncontent-type: application/json\r\n"
        b"content-length: %d\r\n\r\n%s" % (len(body), body)
    )
    statuses: dict[int, int] = {}
    remaining = [total]

    async def worker() -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            while remaining[0] > 0:
                remaining[0] -= 1
                writer.write(request)
                head = await reader.readuntil(b"\r\n\r\n")
                status = int(head.split(b" ", 2)[1])
                length = int(re.search(rb"content-length: (\d+)", head).group(1))  # type: ignore[union-attr]
                payload = await reader.readexactly(length)
                if status == 200 and json.loads(payload)["usage"]["completion_tokens"] != 16:
                    status = -1
                statuses[status] = statuses.get(status, 0) + 1
        finally:
            writer.close()

    start = time.monotonic()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return total, statuses, time.monotonic() - start


def test_load_2000_requests_at_concurrency_100_all_succeed() -> None:
    with sim_process("--latency-ms", "5", "--tokens-per-second", "1000") as sim:
        wait_for(lambda: health(sim.url) == 200)
        total, statuses, seconds = asyncio.run(_load(sim.port, 2000, 100))
        metrics = httpx.get(sim.url + "/metrics").text
    assert statuses == {200: total}
    print(f"\nhxp-vllm-sim load: {total} completions, concurrency 100, {seconds:.2f} s, "
          f"{total / seconds:.0f} req/s (5 ms prefill + 15 x 1 ms decode each)")  # fmt: skip
    done = re.search(r'vllm:request_success_total\{[^}]*finished_reason="length"[^}]*\} (\S+)',
                     metrics)  # fmt: skip
    assert done is not None
    assert float(done.group(1)) == total
