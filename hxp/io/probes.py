"""Health probes: HTTP, TCP and command checks, each with its own timeout."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import ssl
import time
from collections.abc import Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass
from urllib.parse import urlsplit

import httpx

from hxp import promtext
from hxp.endpoints import LOOPBACK, base_url
from hxp.health import (
    CommandProbe,
    HttpProbe,
    InstanceChecks,
    Layer,
    LayerResult,
    ModelProbe,
    ProbeResult,
    ReadinessGate,
    Status,
    SweepSettings,
    TcpProbe,
    Verdict,
    command_result,
    failed,
    http_result,
    parse_progress_metrics,
    parse_vllm_metrics,
    progress_result,
    readiness_result,
    saturation_result,
    synthetic_result,
    synthetic_skip,
    synthetic_unanswered,
    tcp_result,
)
from hxp.metric_names import REQUEST_SUCCESS, RUNNING, WAITING
from hxp.spec import HealthSpec, HostSpec, HttpCheck, TcpCheck
from hxp.units import UnitInstance


async def probe_http(check: HttpCheck, timeout: float) -> ProbeResult:
    name = f"http {check.url}"
    start = time.monotonic()
    try:
        async with httpx.AsyncClient(timeout=timeout, follow_redirects=False) as client:
            response = await client.get(check.url)
    except httpx.HTTPError as exc:
        reason = type(exc).__name__ + (f": {exc}" if str(exc) else "")
        return ProbeResult(False, name, reason, time.monotonic() - start)
    latency = time.monotonic() - start
    if response.status_code != check.expect_status:
        return ProbeResult(
            False, name, f"status {response.status_code}, expected {check.expect_status}", latency
        )
    if check.body_contains is not None and check.body_contains not in response.text:
        return ProbeResult(False, name, f"body lacks {check.body_contains!r}", latency)
    return ProbeResult(True, name, f"status {response.status_code}", latency)


async def probe_tcp(check: TcpCheck, timeout: float) -> ProbeResult:
    name = f"tcp {check.host}:{check.port}"
    start = time.monotonic()
    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection(check.host, check.port), timeout)
    except (OSError, TimeoutError) as exc:
        reason = "timed out" if isinstance(exc, TimeoutError) else (exc.strerror or str(exc))
        return ProbeResult(False, name, reason, time.monotonic() - start)
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()
    return ProbeResult(True, name, "connected", time.monotonic() - start)


async def probe_command(
    argv: list[str], timeout: float, host: HostSpec | None = None
) -> ProbeResult:
    """The command on the unit's host: here for a local runner, else through the host's runner
    (ssh, docker exec) in a thread."""
    name = f"command {argv[0]}"
    start = time.monotonic()
    if host is not None and host.runner != "local":
        from hxp.backends.runners import runner_for
        from hxp.errors import BackendError

        try:
            ran = await asyncio.to_thread(runner_for(host).run, argv, check=False, timeout=timeout)
        except BackendError as exc:
            return ProbeResult(False, name, str(exc), time.monotonic() - start)
        latency = time.monotonic() - start
        if ran.returncode != 0:
            tail = ran.error_text.strip().splitlines()[-1:] or [""]
            return ProbeResult(
                False, name, f"exit code {ran.returncode} {tail[0]}".strip(), latency
            )
        return ProbeResult(True, name, "exit code 0", latency)
    try:
        proc = await asyncio.create_subprocess_exec(
            *argv, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE
        )
    except OSError as exc:
        return ProbeResult(False, name, f"cannot run: {exc.strerror}", time.monotonic() - start)
    try:
        _, err = await asyncio.wait_for(proc.communicate(), timeout)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        return ProbeResult(False, name, "timed out", time.monotonic() - start)
    latency = time.monotonic() - start
    if proc.returncode != 0:
        tail = err.decode(errors="replace").strip().splitlines()[-1:] or [""]
        return ProbeResult(False, name, f"exit code {proc.returncode} {tail[0]}".strip(), latency)
    return ProbeResult(True, name, "exit code 0", latency)


async def probe(health: HealthSpec, host: HostSpec | None = None) -> ProbeResult:
    """Run every check the spec declares (HTTP and TCP as written: hxp.endpoints.reach_health
    points them at the host; the command on `host` through its runner); the first failure is
    the result."""
    results: list[ProbeResult] = []
    if health.http is not None:
        results.append(await probe_http(health.http, health.timeout))
    if health.tcp is not None:
        results.append(await probe_tcp(health.tcp, health.timeout))
    if health.command is not None:
        results.append(await probe_command(list(health.command), health.timeout, host))
    failed = [r for r in results if not r.ok]
    if failed:
        return failed[0]
    return ProbeResult(
        True, ", ".join(r.check for r in results), "ok", sum(r.latency for r in results)
    )


FIRST_PAUSE = 0.05


async def _stay_ready(
    health: HealthSpec,
    gate: ReadinessGate,
    is_running: Callable[[], bool],
    host: HostSpec | None = None,
) -> ReadinessGate:
    """Keep checking for `min_ready` after the first success; any failure fails the gate."""
    ready_at = time.monotonic()
    while (up := time.monotonic() - ready_at) < health.min_ready:
        await asyncio.sleep(min(health.interval, max(health.min_ready - up, 0.05), 0.5))
        if not is_running():
            gate.give_up(f"ready, then stopped running after {time.monotonic() - ready_at:.1f}s")
            return gate
        result = await probe(health, host)
        if not result.ok:
            gate.give_up(
                f"ready, then failed after {time.monotonic() - ready_at:.1f}s: {result.reason}"
            )
            return gate
    return gate


async def wait_ready(
    health: HealthSpec, is_running: Callable[[], bool], host: HostSpec | None = None
) -> ReadinessGate:
    """Probe until the gate says ready or failed (or its deadline passes); `command` checks
    run on `host` (through its runner), HTTP and TCP ones where `health` says."""
    gate = ReadinessGate(health)
    start = time.monotonic()
    pause = FIRST_PAUSE
    while True:
        result = await probe(health, host)
        elapsed = time.monotonic() - start
        verdict = gate.observe(result, elapsed, running=is_running())
        if verdict is Verdict.READY and health.min_ready > 0:
            return await _stay_ready(health, gate, is_running, host)
        if verdict is not Verdict.PENDING:
            return gate
        if elapsed > gate.deadline:
            gate.give_up(f"not ready after {elapsed:.0f}s: {result.reason}")
            return gate
        # Poll quickly at first (most units are ready within a second), then at `interval`.
        await asyncio.sleep(min(pause, health.interval))
        pause *= 2


async def probe_model_api(base: str, served_name: str, timeout: float) -> ProbeResult:
    """A model (at `base`, `http://address:port`: hxp.endpoints.base_url) is ready when
    `/v1/models` lists its served name and a one-token completion succeeds (vLLM's /health
    alone only says the engine is alive)."""
    start = time.monotonic()
    try:
        async with httpx.AsyncClient(timeout=timeout) as client:
            models = await client.get(f"{base}/v1/models")
            names = (
                [m.get("id") for m in models.json().get("data", [])] if models.is_success else []
            )
            if served_name not in names:
                return ProbeResult(
                    False,
                    f"models {base}",
                    f"/v1/models lists {names}, not {served_name!r}",
                    time.monotonic() - start,
                )
            done = await client.post(
                f"{base}/v1/completions",
                json={"model": served_name, "prompt": "ping", "max_tokens": 1},
            )
    except (httpx.HTTPError, ValueError) as exc:
        return ProbeResult(
            False, f"models {base}", f"{type(exc).__name__}: {exc}", time.monotonic() - start
        )
    if not done.is_success:
        return ProbeResult(
            False, f"completion {base}", f"status {done.status_code}", time.monotonic() - start
        )
    return ProbeResult(
        True, f"completion {base}", "one-token completion ok", time.monotonic() - start
    )


def _running_requests(text: str) -> float | None:
    """vllm:num_requests_running + vllm:num_requests_waiting from a /metrics page; None when
    the page has neither (vLLM with --disable-log-stats, or no metrics page at all): unknown,
    never "drained"."""
    values = promtext.sample_values(text, (RUNNING, WAITING))
    if RUNNING not in values:
        return None
    return sum(v for name in (RUNNING, WAITING) for v in values.get(name, ()))


SERVICE_DRAIN_GRACE = 1.0


class DrainResult(str):
    """How a drain ended, in words (a str, as before), plus `cut`: requests still running when
    the cap was reached (they are cut by the stop), None when unknown or not applicable."""

    cut: int | None

    def __new__(cls, text: str, cut: int | None = None) -> DrainResult:
        made = super().__new__(cls, text)
        made.cut = cut
        return made


async def wait_drained(unit: UnitInstance, timeout: float) -> str:
    """Wait until an instance taken out of the gateway has finished its requests.

    Models report `vllm:num_requests_running`/`_waiting` on /metrics: wait for 0 (or the
    cap; then the result says how many requests are left to be cut). A model whose page lacks
    them (--disable-log-stats) gives no signal: it is waited for the whole cap, and the result
    says so. Other services give no such signal: they get a short grace period.
    """
    start = time.monotonic()
    if unit.kind != "model":
        await asyncio.sleep(min(SERVICE_DRAIN_GRACE, timeout))
        return f"grace {min(SERVICE_DRAIN_GRACE, timeout):.1f}s (no drain metric for a service)"
    metrics = f"{base_url(unit)}/metrics"  # on the unit's host
    busy: float | None = None
    async with httpx.AsyncClient(timeout=2.0) as client:
        while (elapsed := time.monotonic() - start) < timeout:
            try:
                page = await client.get(metrics)
                busy = _running_requests(page.text) if page.is_success else None
            except httpx.HTTPError:
                return DrainResult(f"gone after {elapsed:.1f}s", 0)
            if busy == 0:
                return DrainResult(f"drained in {elapsed:.1f}s", 0)
            await asyncio.sleep(0.1)
    if busy is None:
        return DrainResult(
            f"no {RUNNING} on its /metrics (--disable-log-stats?): in-flight requests unknown, "
            f"waited the whole {timeout:.0f}s drain cap"
        )
    return DrainResult(
        f"{busy:.0f} request(s) still in flight after the {timeout:.0f}s drain cap: "
        "cut by the stop",
        int(busy),
    )


# ================================================================ health sweeps
# A sweep checks hundreds of endpoints: raw asyncio sockets, not httpx (TOOLING.md: ~6x
# faster for 1,000 loopback GETs). Every network call runs under its own timeout; a semaphore
# bounds how many are in flight. What an answer means is decided in hxp.health.

MAX_BODY = 4 * 1024 * 1024
MAX_HEADER_LINES = 200
USER_AGENT = "hxp-health"
_PROBE_ERRORS = (OSError, TimeoutError, ValueError, EOFError)


def parse_status_line(line: bytes) -> int:
    """The status code of `HTTP/1.1 200 OK`; ValueError for anything else."""
    parts = line.split(None, 2)
    if len(parts) < 2 or not parts[0].startswith(b"HTTP/") or not parts[1].isdigit():
        raise ValueError(f"not an HTTP status line: {line[:80]!r}")
    code = int(parts[1])
    if not 100 <= code <= 599:
        raise ValueError(f"status {code} out of range")
    return code


def parse_header_line(line: bytes) -> tuple[str, str]:
    """`Name: value` -> (name in lower case, value)."""
    name, sep, value = line.decode("latin-1").partition(":")
    if not sep or not name.strip():
        raise ValueError(f"malformed header line: {line[:80]!r}")
    return name.strip().lower(), value.strip()


async def _read_headers(reader: asyncio.StreamReader) -> dict[str, str]:
    headers: dict[str, str] = {}
    for _ in range(MAX_HEADER_LINES):
        line = await reader.readline()
        if line in (b"\r\n", b"\n", b""):
            return headers
        name, value = parse_header_line(line)
        headers[name] = value
    raise ValueError(f"more than {MAX_HEADER_LINES} header lines")


async def _read_chunked(reader: asyncio.StreamReader) -> bytes:
    out = bytearray()
    while True:
        size_line = await reader.readline()
        try:
            size = int(size_line.split(b";", 1)[0].strip(), 16)
        except ValueError:
            raise ValueError(f"bad chunk size line {size_line[:40]!r}") from None
        if size == 0:
            await _read_headers(reader)  # trailers
            return bytes(out)
        if len(out) + size > MAX_BODY:
            raise ValueError(f"body over {MAX_BODY} bytes")
        out += await reader.readexactly(size)
        await reader.readexactly(2)


async def _read_body(reader: asyncio.StreamReader, headers: Mapping[str, str]) -> bytes:
    if "chunked" in headers.get("transfer-encoding", "").lower():
        return await _read_chunked(reader)
    if "content-length" in headers:
        length = int(headers["content-length"])
        if not 0 <= length <= MAX_BODY:
            raise ValueError(f"content-length {length} out of range")
        return await reader.readexactly(length)
    out = bytearray()
    while chunk := await reader.read(65536):  # until the server closes
        out += chunk
        if len(out) > MAX_BODY:
            raise ValueError(f"body over {MAX_BODY} bytes")
    return bytes(out)


async def http_exchange(
    url: str,
    timeout: float,
    *,
    method: str = "GET",
    body: bytes | None = None,
    want_body: bool = False,
) -> tuple[int, bytes]:
    """One HTTP/1.1 request on a fresh connection: (status, body). Without `want_body` it
    stops at the status line. Raises OSError, TimeoutError (the whole exchange over
    `timeout`), EOFError or ValueError (a garbled answer)."""
    parts = urlsplit(url)
    tls = parts.scheme == "https"
    host = parts.hostname or LOOPBACK
    port = parts.port or (443 if tls else 80)
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    head = (
        f"{method} {target} HTTP/1.1\r\nHost: {parts.netloc}\r\nUser-Agent: {USER_AGENT}\r\n"
        "Accept: */*\r\nConnection: close\r\n"
    )
    if body is not None:
        head += f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
    async with asyncio.timeout(timeout):
        reader, writer = await asyncio.open_connection(
            host, port, ssl=ssl.create_default_context() if tls else None
        )
        try:
            writer.write(head.encode("latin-1") + b"\r\n" + (body or b""))
            code = parse_status_line(await reader.readline())
            if not want_body:
                return code, b""
            headers = await _read_headers(reader)
            return code, await _read_body(reader, headers)
        finally:
            writer.close()


def _why(exc: BaseException, timeout: float) -> str:
    if isinstance(exc, TimeoutError):
        return f"no answer within {timeout:g}s"
    if isinstance(exc, OSError):
        if exc.errno:  # asyncio words a refusal "Connect call failed (...)"
            return os.strerror(exc.errno)
        return exc.strerror or str(exc) or type(exc).__name__
    if isinstance(exc, EOFError):
        return "connection closed before a complete answer"
    return str(exc) or type(exc).__name__


async def check_http(
    instance: str,
    probe: HttpProbe,
    timeout: float,
    settings: SweepSettings,
    limit: asyncio.Semaphore,
) -> LayerResult:
    async with limit:
        start = time.monotonic()
        try:
            code, body = await http_exchange(
                probe.url, timeout, want_body=probe.body_contains is not None
            )
        except _PROBE_ERRORS as exc:
            return failed(
                instance,
                probe.layer,
                f"{probe.url}: {_why(exc, timeout)}",
                time.monotonic() - start,
                time.time(),
            )
        latency = time.monotonic() - start
    return http_result(instance, probe, code, body, latency, timeout, settings, time.time())


async def check_tcp(
    instance: str,
    probe: TcpProbe,
    timeout: float,
    settings: SweepSettings,
    limit: asyncio.Semaphore,
) -> LayerResult:
    async with limit:
        start = time.monotonic()
        try:
            async with asyncio.timeout(timeout):
                _, writer = await asyncio.open_connection(probe.host, probe.port)
            writer.close()
        except (OSError, TimeoutError) as exc:
            where = f"{probe.host}:{probe.port}"
            return failed(
                instance,
                probe.layer,
                f"{where}: {_why(exc, timeout)}",
                time.monotonic() - start,
                time.time(),
            )
        latency = time.monotonic() - start
    return tcp_result(instance, probe, latency, timeout, settings, time.time())


async def check_command(
    instance: str,
    probe: CommandProbe,
    host: HostSpec,
    timeout: float,
    settings: SweepSettings,
    limit: asyncio.Semaphore,
) -> LayerResult:
    """The health command on the unit's host: here for local hosts, else through the host's
    runner (ssh, docker exec) in a thread."""
    async with limit:
        start = time.monotonic()
        if host.runner == "local":
            result = await probe_command(list(probe.argv), timeout)
            latency = time.monotonic() - start
            if result.ok:
                return command_result(
                    instance, probe, 0, "", latency, timeout, settings, time.time()
                )
            if result.reason.startswith("exit code "):
                code, _, tail = result.reason.removeprefix("exit code ").partition(" ")
                return command_result(
                    instance, probe, int(code), tail, latency, timeout, settings, time.time()
                )
            return failed(
                instance, probe.layer, f"{probe.argv[0]}: {result.reason}", latency, time.time()
            )
        from hxp.backends.runners import runner_for
        from hxp.errors import BackendError

        try:
            ran = await asyncio.to_thread(
                runner_for(host).run, list(probe.argv), check=False, timeout=timeout
            )
        except BackendError as exc:
            return failed(instance, probe.layer, str(exc), time.monotonic() - start, time.time())
        latency = time.monotonic() - start
    last = ran.error_text.splitlines()[-1:] or [""]
    return command_result(
        instance, probe, ran.returncode, last[0], latency, timeout, settings, time.time()
    )


@dataclass(frozen=True)
class _NoAnswer:
    why: str
    timed_out: bool


async def _get(
    url: str, timeout: float, limit: asyncio.Semaphore, body: bytes | None = None
) -> tuple[int, bytes, float] | _NoAnswer:
    """(status, body, latency), or why there was no answer."""
    async with limit:
        start = time.monotonic()
        try:
            code, data = await http_exchange(
                url, timeout, method="GET" if body is None else "POST", body=body, want_body=True
            )
        except _PROBE_ERRORS as exc:
            return _NoAnswer(_why(exc, timeout), isinstance(exc, TimeoutError))
        return code, data, time.monotonic() - start


async def check_model(
    instance: str,
    probe: ModelProbe,
    timeout: float,
    previous: Mapping[str, float],
    settings: SweepSettings,
    limit: asyncio.Semaphore,
) -> list[LayerResult]:
    """Readiness (/v1/models), saturation (/metrics), then the synthetic one-token completion
    (skipped when real requests succeeded within the window, or when the model is not ready)."""
    base = probe.base_url
    models, metrics = await asyncio.gather(
        _get(f"{base}/v1/models", timeout, limit), _get(f"{base}/metrics", timeout, limit)
    )
    now = time.time()
    if isinstance(models, _NoAnswer):
        ready = failed(instance, Layer.READINESS, f"/v1/models: {models.why}", timeout, now)
    else:
        ready = readiness_result(instance, models[0], models[1], probe.served_name, models[2], now)
    values: dict[str, float] = {}
    reading: dict[str, float] | None = None  # the progress layer's; None: no page
    if isinstance(metrics, _NoAnswer):
        saturation = LayerResult(
            instance, Layer.SATURATION, Status.UNKNOWN, f"/metrics: {metrics.why}", timeout, now
        )
    elif metrics[0] != 200:
        saturation = LayerResult(
            instance,
            Layer.SATURATION,
            Status.UNKNOWN,
            f"/metrics: status {metrics[0]}",
            metrics[2],
            now,
        )
    else:
        page = metrics[1].decode("utf-8", "replace")
        values = parse_vllm_metrics(page)
        reading = parse_progress_metrics(page)
        saturation = saturation_result(instance, values, settings, metrics[2], now)
    if reading is not None:
        progress = progress_result(
            instance, reading, previous, probe.stall_window, saturation.latency, now
        )
    else:
        progress = LayerResult(
            instance, Layer.PROGRESS, Status.UNKNOWN, saturation.reason, saturation.latency, now
        )
    total = values.get(REQUEST_SUCCESS)
    if ready.status is not Status.HEALTHY:
        synthetic = LayerResult(
            instance, Layer.SYNTHETIC, Status.UNKNOWN, "skipped: the model is not ready", 0.0, now
        )
        return [ready, saturation, progress, synthetic]
    skip = synthetic_skip(previous, total, now, settings.synthetic_window)
    if skip is not None:
        assert total is not None
        synthetic = LayerResult(
            instance,
            Layer.SYNTHETIC,
            Status.HEALTHY,
            skip,
            0.0,
            now,
            (("success_at", now), ("success_total", total)),
        )
        return [ready, saturation, progress, synthetic]
    request = {"model": probe.served_name, "prompt": "ping", "max_tokens": 1, "temperature": 0}
    done = await _get(f"{base}/v1/completions", timeout, limit, json.dumps(request).encode())
    now = time.time()
    if isinstance(done, _NoAnswer):
        waiting = values.get(WAITING)
        synthetic = synthetic_unanswered(instance, done.why, done.timed_out, waiting, timeout, now)
    else:
        synthetic = synthetic_result(instance, done[0], done[1], done[2], timeout, settings, now)
    if total is not None:
        # Our own completion counts as a success too: it must not pass for real traffic.
        own = 1.0 if synthetic.status is not Status.UNHEALTHY else 0.0
        synthetic = LayerResult(
            synthetic.instance,
            synthetic.layer,
            synthetic.status,
            synthetic.reason,
            synthetic.latency,
            synthetic.at,
            (("success_at", now), ("success_total", total + own)),
        )
    return [ready, saturation, progress, synthetic]


async def run_checks(
    checks: Sequence[InstanceChecks],
    hosts: Mapping[str, HostSpec],
    previous: Mapping[str, Mapping[str, float]],
    settings: SweepSettings,
) -> list[LayerResult]:
    """Every probe of every instance, concurrently (at most `settings.concurrency` network
    calls in flight), each under its instance's timeout."""
    limit = asyncio.Semaphore(settings.concurrency)
    single: list[Coroutine[None, None, LayerResult]] = []
    several: list[Coroutine[None, None, list[LayerResult]]] = []
    for c in checks:
        for probe in c.probes:
            match probe:
                case HttpProbe():
                    single.append(check_http(c.instance, probe, c.timeout, settings, limit))
                case TcpProbe():
                    single.append(check_tcp(c.instance, probe, c.timeout, settings, limit))
                case CommandProbe():
                    single.append(
                        check_command(c.instance, probe, hosts[c.host], c.timeout, settings, limit)
                    )
                case ModelProbe():
                    several.append(
                        check_model(
                            c.instance,
                            probe,
                            c.timeout,
                            previous.get(c.instance, {}),
                            settings,
                            limit,
                        )
                    )
    ones, lists = await asyncio.gather(asyncio.gather(*single), asyncio.gather(*several))
    return [*ones, *(r for group in lists for r in group)]
