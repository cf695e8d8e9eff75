"""Health probes: HTTP, TCP and command checks, each with its own timeout."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable

import httpx

from hxp.health import ProbeResult, ReadinessGate, Verdict
from hxp.spec import HealthSpec, HttpCheck, TcpCheck


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


async def probe_command(argv: list[str], timeout: float) -> ProbeResult:
    name = f"command {argv[0]}"
    start = time.monotonic()
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


async def probe(health: HealthSpec) -> ProbeResult:
    """Run every check the spec declares; the first failure is the result."""
    results: list[ProbeResult] = []
    if health.http is not None:
        results.append(await probe_http(health.http, health.timeout))
    if health.tcp is not None:
        results.append(await probe_tcp(health.tcp, health.timeout))
    if health.command is not None:
        results.append(await probe_command(list(health.command), health.timeout))
    failed = [r for r in results if not r.ok]
    if failed:
        return failed[0]
    return ProbeResult(
        True, ", ".join(r.check for r in results), "ok", sum(r.latency for r in results)
    )


FIRST_PAUSE = 0.05


async def _stay_ready(
    health: HealthSpec, gate: ReadinessGate, is_running: Callable[[], bool]
) -> ReadinessGate:
    """Keep checking for `min_ready` after the first success; any failure fails the gate."""
    ready_at = time.monotonic()
    while (up := time.monotonic() - ready_at) < health.min_ready:
        await asyncio.sleep(min(health.interval, max(health.min_ready - up, 0.05), 0.5))
        if not is_running():
            gate.give_up(f"ready, then stopped running after {time.monotonic() - ready_at:.1f}s")
            return gate
        result = await probe(health)
        if not result.ok:
            gate.give_up(
                f"ready, then failed after {time.monotonic() - ready_at:.1f}s: {result.reason}"
            )
            return gate
    return gate


async def wait_ready(health: HealthSpec, is_running: Callable[[], bool]) -> ReadinessGate:
    """Probe until the gate says ready or failed (or its deadline passes)."""
    gate = ReadinessGate(health)
    start = time.monotonic()
    pause = FIRST_PAUSE
    while True:
        result = await probe(health)
        elapsed = time.monotonic() - start
        verdict = gate.observe(result, elapsed, running=is_running())
        if verdict is Verdict.READY and health.min_ready > 0:
            return await _stay_ready(health, gate, is_running)
        if verdict is not Verdict.PENDING:
            return gate
        if elapsed > gate.deadline:
            gate.give_up(f"not ready after {elapsed:.0f}s: {result.reason}")
            return gate
        # Poll quickly at first (most units are ready within a second), then at `interval`.
        await asyncio.sleep(min(pause, health.interval))
        pause *= 2
