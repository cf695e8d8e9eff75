"""Lifecycle flows with real processes, a real nginx and a real Prefect server: ordered start and
stop, a rolling restart under load with no failed request (and a negative control that fails),
a roll stopped by a replica that fails its gate, crash recovery and crash-loop detection, an
orchestrator killed between lifecycle steps, and a config reload without a restart."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import textwrap
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any, Literal

import httpx
import pytest

from hxp.backends.base import Remove, UnitRef
from hxp.backends.process import ProcessBackend
from hxp.config import load_config
from hxp.errors import LifecycleError
from hxp.io.gateway import NginxGateway
from hxp.lifecycle import State
from hxp.store import Store
from tests.support.orchestrator import hxp_process
from tests.support.stacks import free_port, free_range, sim_fleet, web_stack

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("prefect_server")]
PY = sys.executable
REQUESTS = 10_000
Surge = Literal["auto", "never"]


def files(*paths: Path) -> list[str]:
    return [str(p) for p in paths]


def deploy(paths: list[Path], state: Path) -> dict[str, Any]:
    from flows.deploy import deploy_stack

    return deploy_stack(files(*paths), state_dir=str(state))


def states(state: Path, stack: str) -> dict[str, State]:
    return {n: r.state for n, r in Store(state).lifecycle(stack).items()}


def transitions(state: Path, stack: str) -> list[tuple[str, float]]:
    return [(e["message"], e["at"]) for e in Store(state).events(stack) if e["kind"] == "lifecycle"]


def child_pid(state: Path, stack: str, instance: str) -> int:
    sup = json.loads((state / "process" / stack / instance / "supervisor.json").read_text())
    return int(sup["child_pid"])


def serving(port: int) -> bool:
    try:
        return httpx.get(f"http://127.0.0.1:{port}/", timeout=0.5).status_code == 200
    except httpx.HTTPError:
        return False


def remove_all(state: Path, stack: str, gateway: Any = None) -> None:
    if gateway is not None:
        NginxGateway(state, stack, gateway).stop()
    backend = ProcessBackend(state)
    for name in backend.observe(stack):
        backend.apply(Remove(UnitRef(stack, name, name)))


def prefect_events(prefix: str, since: float) -> list[dict[str, Any]]:
    """Events the Prefect server recorded whose name starts with `prefix`."""
    from datetime import UTC, datetime

    from prefect.settings import PREFECT_API_URL

    body = {
        "filter": {
            "event": {"prefix": [prefix]},
            "occurred": {"since": datetime.fromtimestamp(since - 5, UTC).isoformat()},
        },
        "limit": 50,
    }
    got = httpx.post(f"{PREFECT_API_URL.value()}/events/filter", json=body, timeout=10)
    got.raise_for_status()
    events: list[dict[str, Any]] = got.json()["events"]
    return events


def wait_for_events(
    prefix: str, since: float, want: int, timeout: float = 20
) -> list[dict[str, Any]]:
    deadline = time.monotonic() + timeout
    while True:
        found = prefect_events(prefix, since)
        if len(found) >= want or time.monotonic() > deadline:
            return found
        time.sleep(0.5)


# --------------------------------------------------------------------------- start and stop


@pytest.fixture
def web(tmp_path: Path):  # type: ignore[no-untyped-def]
    path, ports = web_stack(tmp_path)
    state = tmp_path / "state"
    yield path, ports, state
    remove_all(state, "t")


def test_stop_goes_dependents_first_start_dependencies_first(web) -> None:  # type: ignore[no-untyped-def]
    from flows.lifecycle import restart_stack, start_stack, stop_stack

    path, ports, state = web
    since = time.time()
    deploy([path], state)
    assert states(state, "t") == dict.fromkeys(("api", "cache", "db"), State.RUNNING)

    stopped = stop_stack(files(path), state_dir=str(state))
    assert stopped["ok"]
    assert states(state, "t") == dict.fromkeys(("api", "cache", "db"), State.STOPPED)
    order = [m.split(":")[0] for m, _ in transitions(state, "t") if m.endswith("(stop requested)")]
    # draining, stopping, stopped: each unit after every unit that depends on it
    assert order == ["api"] * 3 + ["cache"] * 3 + ["db"] * 3
    assert not any(serving(p) for p in ports.values())
    for unit in ports:  # what a stopped unit owned is gone: no pid kept, no temporary file
        sup = json.loads((state / "process" / "t" / unit / "supervisor.json").read_text())
        assert (sup["state"], sup["pid"], sup["child_pid"]) == ("stopped", None, None)
        assert not list((state / "process" / "t" / unit).glob("*.tmp"))
    # Stopping again changes nothing.
    again = stop_stack(files(path), state_dir=str(state))
    assert {i for u in again["units"].values() for i in u["instances"].values()} == {
        "already stopped"
    }

    started = start_stack(files(path), state_dir=str(state))
    assert started["ok"]
    assert all(serving(p) for p in ports.values())
    ready = [
        m.split(":")[0] for m, _ in transitions(state, "t") if m.endswith("-> running (ready)")
    ]
    assert ready == ["db", "cache", "api"]

    before = {u: child_pid(state, "t", u) for u in ports}
    restart_stack(files(path), units=["cache"], state_dir=str(state))
    after = {u: child_pid(state, "t", u) for u in ports}
    assert after["cache"] != before["cache"]
    assert (after["db"], after["api"]) == (before["db"], before["api"])

    stop_stack(files(path), units=["db"], state_dir=str(state))  # only the named unit
    assert states(state, "t") == {"db": State.STOPPED, "cache": State.RUNNING, "api": State.RUNNING}
    start_stack(files(path), units=["api"], state_dir=str(state))  # brings db back: api needs it
    assert states(state, "t")["db"] is State.RUNNING

    # Every transition is also a Prefect event named after the state it enters.
    assert len(wait_for_events("hxp.lifecycle.stopped", since, 4)) >= 4
    assert len(wait_for_events("hxp.lifecycle.running", since, 6)) >= 6
    draining = wait_for_events("hxp.lifecycle.draining", since, 4)
    assert {e["resource"]["prefect.resource.name"] for e in draining} == {"api", "cache", "db"}
    assert {e["payload"]["from"] for e in draining} == {"running"}
    assert {e["resource"]["hxp.stack"] for e in draining} == {"t"}


def test_the_cli_runs_the_lifecycle_flows(web) -> None:  # type: ignore[no-untyped-def]
    path, ports, state = web
    deploy([path], state)

    def run(*args: str) -> str:
        proc = hxp(*args, state=state)
        out, _ = proc.communicate(timeout=180)
        assert proc.returncode == 0, out
        return out

    out = run("stop", "api", "-f", str(path))
    assert "Stop of stack t succeeded." in out
    assert "api: stopped" in out
    assert not serving(ports["api"])
    out = run("restart", "--rolling", "-f", str(path))
    assert "Rolling restart of stack t succeeded." in out
    assert all(serving(p) for p in ports.values())  # api came back: a restart starts it too
    out = run("states", "-f", str(path))
    assert "api" in out
    assert "running" in out
    assert "latest transitions:" in out
    bad = hxp("start", "nope", "-f", str(path), state=state)
    text, _ = bad.communicate(timeout=120)
    assert bad.returncode == 2, text
    assert "unknown unit 'nope'" in text


def test_each_unit_starts_the_moment_its_own_dependencies_are_ready(tmp_path: Path) -> None:
    """slow takes 3 s to listen; a -> b are fast: b must not wait for slow's level."""
    from flows.lifecycle import start_stack, stop_stack

    ports = {u: free_port() for u in ("slow", "a", "b")}
    server = (
        "import http.server, sys, time; time.sleep(float(sys.argv[2])); "
        "http.server.HTTPServer(('127.0.0.1', int(sys.argv[1])), "
        "http.server.SimpleHTTPRequestHandler).serve_forever()"
    )
    units = {"slow": ("3", []), "a": ("0", []), "b": ("0", ["a"])}
    text = "stack: dag\nhosts:\n  local: {backend: process}\ndeploy: {bake: 500ms}\nservices:\n"
    for unit, (delay, deps) in units.items():
        text += textwrap.indent(
            textwrap.dedent(
                f"""\
                {unit}:
                  host: local
                  command: [{PY}, -c, "{server}", "{ports[unit]}", "{delay}"]
                  ports: {{http: {ports[unit]}}}
                  depends_on: {json.dumps(deps)}
                  health:
                    tcp: {{port: {ports[unit]}}}
                    interval: 100ms
                    start_period: 20s
                """
            ),
            "  ",
        )
    path = tmp_path / "dag.yaml"
    path.write_text(text)
    state = tmp_path / "state"
    try:
        deploy([path], state)
        stop_stack(files(path), state_dir=str(state))
        since = time.time()
        start_stack(files(path), state_dir=str(state))
        at = {
            m.split(":")[0]: t
            for m, t in transitions(state, "dag")
            if t >= since and "-> running" in m
        }
        assert at["b"] < at["slow"] - 1.0, at  # level by level, b would start after slow
    finally:
        remove_all(state, "dag")


# --------------------------------------------------------------------------- crashes


def service_stack(tmp: Path, name: str, command: str, restart: str) -> tuple[Path, int]:
    port = free_port()
    path = tmp / f"{name}.yaml"
    path.write_text(
        textwrap.dedent(
            f"""\
            stack: {name}
            hosts:
              local: {{backend: process}}
            deploy: {{bake: 500ms}}
            services:
              svc:
                host: local
                command: [{PY}, -c, "{command}", "{port}"]
                ports: {{http: {port}}}
                restart: "{restart}"
                stop_timeout: 2s
            """
        )
    )
    return path, port


SERVE = (
    "import http.server, sys; http.server.HTTPServer(('127.0.0.1', int(sys.argv[1])), "
    "http.server.SimpleHTTPRequestHandler).serve_forever()"
)
CRASH_EVERY_SECOND = "import time; time.sleep(1); raise SystemExit(3)"


def test_a_killed_unit_is_restarted_by_the_next_supervisor_pass(tmp_path: Path) -> None:
    from flows.lifecycle import supervise_stack

    path, port = service_stack(tmp_path, "sup", SERVE, "no")  # its backend will not restart it
    state = tmp_path / "state"
    try:
        deploy([path], state)
        assert supervise_stack(files(path), state_dir=str(state))["restarted"] == []
        pid = child_pid(state, "sup", "svc")
        os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while ProcessBackend(state).observe("sup")["svc"].running:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        result = supervise_stack(files(path), state_dir=str(state))
        assert result["crashed"] == ["svc"]
        assert result["restarted"] == ["svc"]
        assert states(state, "sup") == {"svc": State.RUNNING}
        assert serving(port)
        assert child_pid(state, "sup", "svc") != pid
        moves = [m for m, _ in transitions(state, "sup")][-3:]
        assert moves[0].startswith("svc: running -> failed (crashed")
        assert moves[1:] == [
            "svc: failed -> starting (supervisor restart)",
            "svc: starting -> running (restarted by the supervisor)",
        ]
    finally:
        remove_all(state, "sup")


@pytest.mark.parametrize("restart", ["on-failure", "no"])
def test_a_unit_crashing_every_second_ends_failed_with_an_alert(
    tmp_path: Path, restart: str
) -> None:
    from flows.lifecycle import supervise_stack
    from hxp.io.telemetry import store_registry

    name = f"loop-{restart}"
    path, _ = service_stack(tmp_path, name, CRASH_EVERY_SECOND, restart)
    state = tmp_path / "state"
    since = time.time()
    try:
        deploy([path], state)
        deadline = time.monotonic() + 60
        passes = 0
        while (
            states(state, name).get("svc") is not State.FAILED
            or not Store(state).lifecycle(name)["svc"].held
        ):
            assert time.monotonic() < deadline, transitions(state, name)
            supervise_stack(
                files(path), state_dir=str(state), max_crashes=3, crash_window=60, backoff=0.2
            )
            passes += 1
            time.sleep(0.3)
        record = Store(state).lifecycle(name)["svc"]
        assert record.held
        assert len(record.crashes) == 3
        assert "crash loop: 3 crashes within 60s (limit 3)" in record.reason
        # Given up: stopped for good, the backend's own restarts included.
        time.sleep(2.5)
        assert not ProcessBackend(state).observe(name)["svc"].running
        alerts = [e["message"] for e in Store(state).events(name) if e["kind"] == "alert"]
        assert len(alerts) == 1
        assert "crash loop" in alerts[0]
        # Another pass leaves it alone: only an operator's start lifts the hold.
        again = supervise_stack(files(path), state_dir=str(state), max_crashes=3)
        assert again["restarted"] == []
        assert again["states"] == {"svc": "failed"}
        found = wait_for_events("hxp.supervisor.crash-loop", since, 1)
        mine = [e for e in found if e["resource"]["hxp.stack"] == name]
        assert [e["resource"]["prefect.resource.name"] for e in mine] == ["svc"]
        text = store_registry(state, [name]).get_sample_value(
            "hxp_errors_total", {"stack": name, "where": "lifecycle", "error_class": "permanent"}
        )
        assert text is not None
        assert text >= 3
        print(f"\ncrash loop detected after {passes} passes ({restart})")
    finally:
        remove_all(state, name)


# --------------------------------------------------------------------------- a killed orchestrator


def fleet_stack(
    tmp: Path, name: str, replicas: int, tokens_per_second: int = 2000, startup: float = 0
) -> tuple[Path, int, int]:
    base = free_range(2 * replicas + 1)
    gateway = base + 2 * replicas
    args = ("--latency-ms", "2", "--tokens-per-second", str(tokens_per_second))
    path = sim_fleet(
        tmp / f"{name}.yaml",
        name,
        base,
        gateway,
        replicas=replicas,
        simulator_args=(*args, "--startup-delay", str(startup)),
        stop_timeout="3s",
        drain_timeout="60s",
    )
    return path, base, gateway


hxp = hxp_process


def test_an_orchestrator_killed_mid_drain_is_reconciled_by_the_next_run(tmp_path: Path) -> None:
    from flows.lifecycle import start_stack

    path, base, gateway_port = fleet_stack(tmp_path, "orc", 1, tokens_per_second=20)
    state = tmp_path / "state"
    stack = load_config([path], {}).stack
    try:
        deploy([path], state)
        # One long streamed request keeps the replica busy: the stop waits in `draining`. It
        # must ignore EOS: the double (like a model) ends a completion at its own natural length,
        # 8-64 tokens here, unless told not to; without it the request ended within 3 s at 20
        # tokens/s, before the stop looked (CI failed so twice). Its own first token proves it
        # is in the batch.
        streaming = threading.Event()
        outcome: list[str] = []

        def long_request() -> None:
            try:
                with httpx.stream(
                    "POST",
                    f"http://127.0.0.1:{base}/v1/completions",
                    json={
                        "model": "chat",
                        "prompt": "x",
                        "max_tokens": 1500,
                        "ignore_eos": True,  # else it ends at its 'natural' 8-64 tokens
                        "stream": True,
                    },
                    timeout=120,
                ) as answer:
                    for line in answer.iter_lines():
                        if line.startswith("data: {"):
                            streaming.set()
                outcome.append(f"ended with status {answer.status_code}")
            except httpx.HTTPError as exc:
                outcome.append(f"{type(exc).__name__}: {exc}")

        long = threading.Thread(target=long_request, daemon=True)
        long.start()
        assert streaming.wait(30), f"the long request never streamed a token: {outcome}"
        proc = hxp("stop", "-f", str(path), state=state)
        deadline = time.monotonic() + 60
        while states(state, "orc").get("chat") is not State.DRAINING:
            assert proc.poll() is None, (outcome, proc.stdout.read() if proc.stdout else "")
            assert time.monotonic() < deadline, "the stop never reached draining"
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        # Reality: still running, but out of the gateway; the store says draining.
        assert ProcessBackend(state).observe("orc")["chat"].running
        assert stack.gateway is not None
        assert NginxGateway(state, "orc", stack.gateway).live()["chat"] == []

        result = start_stack(files(path), state_dir=str(state))
        assert any("interrupted drain" in line for line in result["reconciled"])
        assert states(state, "orc") == {"chat": State.RUNNING}
        assert NginxGateway(state, "orc", stack.gateway).live()["chat"] == [base]
        done = httpx.post(
            f"http://127.0.0.1:{gateway_port}/v1/completions",
            json={"model": "chat", "prompt": "x", "max_tokens": 2},
            timeout=10,
        )
        assert done.status_code == 200
        last = [m for m, _ in transitions(state, "orc")][-1]
        assert last.startswith("chat: draining -> running (reconciled: an interrupted drain")
    finally:
        remove_all(state, "orc", stack.gateway)


# --------------------------------------------------------------------------- rolling under load


class LoadUntil:
    """One-token completions through the gateway at fixed concurrency, until stopped and at
    least `minimum` sent. Raw asyncio sockets (a new connection per request, as the gateway
    closes each): several times the rate httpx reaches here, so a short roll sees many."""

    def __init__(self, url: str, minimum: int, concurrency: int = 48) -> None:
        parts = httpx.URL(url)
        self.host, self.port = parts.host, parts.port or 80
        self.minimum, self.concurrency = minimum, concurrency
        self.stop = threading.Event()
        self.sent = self.ok = self.failed = 0
        self.errors: Counter[str] = Counter()
        self.seconds = 0.0
        self._thread = threading.Thread(target=lambda: asyncio.run(self._run()), daemon=True)

    def _request(self) -> bytes:
        body = json.dumps({"model": "chat", "prompt": "hello", "max_tokens": 2}).encode()
        head = (
            f"POST /v1/completions HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
            "Connection: close\r\n\r\n"
        )
        return head.encode() + body

    async def _one(self, request: bytes) -> str | None:
        """None when the completion came back whole with status 200, else what went wrong."""
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(self.host, self.port), 30
            )
        except (OSError, TimeoutError) as exc:
            return type(exc).__name__
        try:
            writer.write(request)
            await writer.drain()
            data = await asyncio.wait_for(reader.read(), 30)
        except (OSError, TimeoutError) as exc:
            return type(exc).__name__
        finally:
            writer.close()
        head, _, body = data.partition(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        status = lines[0].split(b" ", 2)[1:2] if lines and lines[0] else []
        if status != [b"200"]:
            return f"HTTP {status[0].decode() if status else 'no status'}"
        length = [ln.split(b":", 1)[1] for ln in lines if ln.lower().startswith(b"content-length")]
        if length and len(body) != int(length[0]):
            return "truncated body"
        if b'"choices"' not in body:
            return "no completion in the body"
        if b'"finish_reason":"abort"' in body:  # vLLM >= 0.18 answers an aborted request so
            return "finish_reason abort"
        return None

    async def _run(self) -> None:
        request = self._request()
        start = time.monotonic()

        async def worker() -> None:
            while not (self.stop.is_set() and self.sent >= self.minimum):
                self.sent += 1
                error = await self._one(request)
                if error is None:
                    self.ok += 1
                else:
                    self.failed += 1
                    self.errors[error] += 1

        await asyncio.gather(*(worker() for _ in range(self.concurrency)))
        self.seconds = time.monotonic() - start

    def start(self) -> LoadUntil:
        self._thread.start()
        return self

    def finish(self) -> LoadUntil:
        self.stop.set()
        self._thread.join(300)
        assert not self._thread.is_alive(), "the load generator did not finish"
        return self


def _fleet(tmp_path: Path, startup: float):  # type: ignore[no-untyped-def]
    path, _base, gateway_port = fleet_stack(tmp_path, "roll", 3, startup=startup)
    state = tmp_path / "state"
    deploy([path], state)
    stack = load_config([path], {}).stack
    yield path, state, f"http://127.0.0.1:{gateway_port}", stack
    remove_all(state, "roll", stack.gateway)


#: Replicas of `long_fleet` take this long to load, as vLLM does: the roll then lasts long
#: enough for the load generator to send more than REQUESTS requests while it runs.
STARTUP = 4.0


@pytest.fixture
def fleet(tmp_path: Path):  # type: ignore[no-untyped-def]
    yield from _fleet(tmp_path, 0)


@pytest.fixture
def long_fleet(tmp_path: Path):  # type: ignore[no-untyped-def]
    yield from _fleet(tmp_path, STARTUP)


def pids(state: Path) -> dict[str, int]:
    return {n: child_pid(state, "roll", n) for n in ProcessBackend(state).observe("roll")}


@pytest.mark.parametrize("surge", ["auto", "never"])
def test_rolling_restart_under_load_fails_no_request(long_fleet, surge: Surge) -> None:  # type: ignore[no-untyped-def]
    from flows.lifecycle import restart_stack

    path, state, url, stack = long_fleet
    before = pids(state)
    load = LoadUntil(url, REQUESTS).start()
    time.sleep(1.0)
    at_start = load.sent
    result = restart_stack(files(path), state_dir=str(state), rolling=True, surge=surge)
    during = load.sent - at_start
    load.finish()
    print(
        f"\nrolling restart (surge={surge}): {load.sent} requests "
        f"at {load.sent / load.seconds:.0f}/s"
        f", {during} during the roll ({result['units']['chat']['seconds']:.1f}s), "
        f"{load.failed} failed"
    )
    assert during >= REQUESTS, f"only {during} requests while the roll ran"
    assert load.failed == 0, load.errors
    chat = result["units"]["chat"]
    assert chat["failures"] == 0
    if surge == "auto":  # the simulator needs no GPU: every replica surges into its other slot
        assert chat["surged"] == 3
        assert sorted(pids(state)) == ["chat-0-g", "chat-1-g", "chat-2-g"]
    else:
        assert chat["in_place"] == 3
        after = pids(state)
        assert sorted(after) == sorted(before)
        assert all(after[n] != before[n] for n in before)
    assert states(state, "roll") == {n: State.RUNNING for n in pids(state)}
    gateway = NginxGateway(state, "roll", stack.gateway)
    assert len(gateway.live()["chat"]) == 3


def test_negative_control_a_restart_without_rolling_drops_requests(fleet) -> None:  # type: ignore[no-untyped-def]
    from flows.lifecycle import restart_stack

    path, state, url, _ = fleet
    load = LoadUntil(url, 3000).start()
    time.sleep(1.0)
    restart_stack(files(path), state_dir=str(state), rolling=False)
    load.finish()
    print(f"\nstop + start under load: {load.failed} of {load.sent} failed {dict(load.errors)}")
    assert load.failed > 0


@pytest.mark.parametrize("surge", ["auto", "never"])
def test_a_replica_failing_its_gate_stops_the_roll_and_is_restored(  # type: ignore[no-untyped-def]
    fleet, tmp_path: Path, surge: Surge
) -> None:
    from flows.lifecycle import reload_stack

    path, state, url, _ = fleet
    good = {n: o.config_hash for n, o in ProcessBackend(state).observe("roll").items()}
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "models:\n  chat:\n    revision: r9\n    simulator_args: [--never-ready]\n"
        "    health: {start_period: 2s}\n"
    )
    load = LoadUntil(url, 2000).start()
    time.sleep(0.5)
    with pytest.raises(LifecycleError, match="rolling update failed"):
        reload_stack(files(path, bad), state_dir=str(state), surge=surge)
    load.finish()
    assert load.failed == 0, load.errors
    now = {n: o.config_hash for n, o in ProcessBackend(state).observe("roll").items()}
    assert now == good  # the failed replica is back on its version; the others were never touched
    assert set(states(state, "roll").values()) == {State.RUNNING}
    last = Store(state).deploys("roll")[0]
    assert (last.kind, last.status) == ("reload", "failed")
    assert "roll stopped after 1 failed replica(s)" in (last.result or {}).get("reason", "")


# --------------------------------------------------------------------------- hot reload

CONFIGURED = (
    "import http.server, signal, sys; path, port = sys.argv[1], int(sys.argv[2]); "
    "conf = [open(path).read()]; "
    "signal.signal(signal.SIGHUP, lambda *a: conf.__setitem__(0, open(path).read())); "
    "H = type('H', (http.server.BaseHTTPRequestHandler,), {'do_GET': lambda s: "
    "(s.send_response(200), s.end_headers(), s.wfile.write(conf[0].encode())), "
    "'log_message': lambda *a: None}); "
    "http.server.HTTPServer(('127.0.0.1', port), H).serve_forever()"
)


def test_a_config_file_change_is_reloaded_without_a_restart(tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    from flows.lifecycle import reload_stack
    from hxp_cli import main

    port, conf = free_port(), tmp_path / "etc" / "web.conf"
    path = tmp_path / "web.yaml"

    def write(content: str, env: str = "1") -> None:
        path.write_text(
            textwrap.dedent(
                f"""\
                stack: hot
                hosts:
                  local: {{backend: process}}
                deploy: {{bake: 500ms}}
                services:
                  web:
                    host: local
                    command: [{PY}, -c, "{CONFIGURED}", "{conf}", "{port}"]
                    ports: {{http: {port}}}
                    env: {{V: "{env}"}}
                    config_files:
                      - path: {conf}
                        content: "{content}"
                    reload: {{signal: HUP}}
                    health:
                      http: {{url: "http://127.0.0.1:{port}/"}}
                      interval: 200ms
                      start_period: 5s
                """
            )
        )

    def body() -> str:
        return httpx.get(f"http://127.0.0.1:{port}/", timeout=2).text

    state = tmp_path / "state"
    try:
        write("version one")
        deploy([path], state)
        assert body() == "version one"
        pid = child_pid(state, "hot", "web")

        write("version two")
        result = reload_stack(files(path), state_dir=str(state))
        assert result["reloaded"] == ["web"]
        assert result["rolled"] == []
        assert body() == "version two"
        assert child_pid(state, "hot", "web") == pid  # same process: reloaded, not restarted
        from flows.deploy import deploy_stack

        assert deploy_stack(files(path), state_dir=str(state))["changed"] is False

        # The overwritten config file was kept; `hxp config restore` brings it back.
        from hxp.io.backups import list_backups

        kept = [b for b in list_backups(state, "hot") if b.path == str(conf)]
        assert kept
        assert kept[0].stored.read_text() == "version one"
        monkeypatch.setenv("HXP_STATE_DIR", str(state))
        assert main(["config", "restore", "-f", str(path), kept[0].id]) == 0
        assert conf.read_text() == "version one"

        write("version three", env="2")  # env cannot be reloaded: the rolling path restarts it
        watch = hxp("config", "watch", "--once", "-f", str(path), state=state)
        out, _ = watch.communicate(timeout=180)
        assert watch.returncode == 0, out
        assert "roll    web" in out  # the plan, shown before it is applied
        assert "reloaded: nothing; rolled: web" in out
        assert body() == "version three"
        assert child_pid(state, "hot", "web") != pid
    finally:
        remove_all(state, "hot")


def test_a_deploy_taking_the_lock_before_a_reload_leaves_the_reload_alone(  # type: ignore[no-untyped-def]
    web, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The reload asks for the stack's lock; before it gets it, a deploy of the stack (another
    orchestrator process) takes the lock and runs to the end. That deploy must find no
    `running` reload record to close as interrupted (the reload plans and begins its record
    only once it holds the lock), and the reload still applies its change afterwards."""
    from contextlib import contextmanager

    import flows.lifecycle
    from flows.lifecycle import reload_stack

    path, ports, state = web
    deploy([path], state)
    v2 = tmp_path / "v2.yaml"
    v2.write_text("services:\n  api:\n    env: {VERSION: '2'}\n")
    real_lock = flows.lifecycle.stack_lock
    gap: dict[str, Any] = {}

    @contextmanager
    def lock_after_a_deploy(state_dir: Any, stack: str, holder: str, **kw: Any):  # type: ignore[no-untyped-def]
        if holder.startswith("reload") and not gap:
            apply = hxp("apply", "-f", str(path), state=state)
            gap["output"] = apply.communicate(timeout=180)[0]
            gap["rc"] = apply.returncode
            gap["history"] = [(d.kind, d.status) for d in Store(state).deploys("t")]
        with real_lock(state_dir, stack, holder, **kw):
            yield

    monkeypatch.setattr(flows.lifecycle, "stack_lock", lock_after_a_deploy)
    result = reload_stack(files(path, v2), state_dir=str(state))

    assert gap["rc"] == 0, gap["output"]
    # What the deploy in the gap saw and left: its own record and the first deploy's.
    assert gap["history"] == [("deploy", "succeeded"), ("deploy", "succeeded")]
    assert result["rolled"] == ["api"]
    history = [(d.kind, d.status) for d in Store(state).deploys("t")]
    assert history == [("reload", "succeeded"), ("deploy", "succeeded"), ("deploy", "succeeded")]
    assert ProcessBackend(state).observe("t")["api"].running
    assert serving(ports["api"])
