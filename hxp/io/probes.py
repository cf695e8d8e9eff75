"""Health probes: HTTP, TCP and command checks, each with its own timeout."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable

import httpx

from hxp.health import ProbeResult, ReadinessGate, Verdict
from hxp.spec import HealthSpec, HttpCheck, TcpCheck
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


async def probe_model_api(port: int, served_name: str, timeout: float) -> ProbeResult:
    """A model is ready when `/v1/models` lists its served name and a one-token completion
    succeeds (vLLM's /health alone only says the engine is alive)."""
    base = f"http://127.0.0.1:{port}"
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


def _running_requests(text: str) -> float:
    """vllm:num_requests_running + vllm:num_requests_waiting from a /metrics page."""
    from prometheus_client.parser import text_string_to_metric_families

    total = 0.0
    for family in text_string_to_metric_families(text):
        if family.name in ("vllm:num_requests_running", "vllm:num_requests_waiting"):
            total += sum(sample.value for sample in family.samples)
    return total


SERVICE_DRAIN_GRACE = 1.0


async def wait_drained(unit: UnitInstance, timeout: float) -> str:
    """Wait until an instance taken out of the gateway has finished its requests.

    Models report `vllm:num_requests_running`/`_waiting` on /metrics: wait for 0 (or the
    cap). Other services give no such signal: they get a short grace period.
    """
    start = time.monotonic()
    if unit.kind != "model":
        await asyncio.sleep(min(SERVICE_DRAIN_GRACE, timeout))
        return f"grace {min(SERVICE_DRAIN_GRACE, timeout):.1f}s (no drain metric for a service)"
    port = dict(unit.ports).get("http", unit.ports[0][1])
    async with httpx.AsyncClient(timeout=2.0) as client:
        while (elapsed := time.monotonic() - start) < timeout:
            try:
                page = await client.get(f"http://127.0.0.1:{port}/metrics")
                busy = _running_requests(page.text) if page.is_success else 0.0
            except httpx.HTTPError:
                return f"gone after {elapsed:.1f}s"
            if busy == 0:
                return f"drained in {elapsed:.1f}s"
            await asyncio.sleep(0.1)
    return f"still busy after the {timeout:.0f}s drain cap; stopping it anyway"
