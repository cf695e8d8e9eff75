"""Health sweeps against real targets: supervised processes (dependencies, flapping, the CLI),
the vLLM double in its failure modes, a Docker container's HEALTHCHECK, a systemd unit."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from hxp.backends.base import Create, Remove, Start, Stop, UnitRef
from hxp.backends.process import ProcessBackend
from hxp.config import load_config, unit_config_hash
from hxp.health import Layer, LayerResult, Status, SweepReport, SweepSettings
from hxp.io.sweep import sweep_stack
from hxp.spec import Stack
from hxp.store import Store
from hxp.units import expand_units
from tests.support.render_data import stack_from_data
from tests.support.stacks import free_port, web_stack
from tests.support.waiting import wait_for

pytestmark = pytest.mark.slow


def listening(port: int) -> bool:
    import socket

    with socket.socket() as s:
        s.settimeout(0.2)
        return s.connect_ex(("127.0.0.1", port)) == 0


def start_all(stack: Stack, state: Path, skip: tuple[str, ...] = ()) -> ProcessBackend:
    """Create every instance on the process backend and wait for its ports (but `skip`'s)."""
    backend = ProcessBackend(state)
    for unit in expand_units(stack):
        backend.apply(Create(unit, unit_config_hash(stack, unit.unit), 1))
    for unit in expand_units(stack):
        for _, port in unit.ports if unit.name not in skip else ():
            wait_for(lambda p=port: listening(p), f"{unit.name} on port {port}")  # type: ignore[misc]
    return backend


def remove_all(backend: ProcessBackend, stack: str) -> None:
    for name in backend.observe(stack):
        backend.apply(Remove(UnitRef(stack, name, name)))


def layer(report: SweepReport, instance: str, which: Layer) -> LayerResult:
    for inst in report.instances:
        if inst.instance == instance:
            return next(r for r in inst.layers if r.layer is which)
    raise AssertionError(f"no instance {instance}")


def health(port: int) -> int | None:
    try:
        return httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code
    except httpx.TransportError:
        return None


def statuses(report: SweepReport) -> dict[str, Status]:
    return {u.unit: u.status for u in report.units}


# ---------------------------------------------------------------- supervised processes


@pytest.fixture
def web(tmp_path: Path) -> Iterator[tuple[Path, Stack, Path, ProcessBackend]]:
    path, _ = web_stack(tmp_path, "hw")
    stack = load_config([path], {}).stack
    state = tmp_path / "state"
    backend = start_all(stack, state)
    yield path, stack, state, backend
    remove_all(backend, "hw")


def test_processes_dependencies_flapping_and_transitions(web: Any) -> None:
    _, stack, state, backend = web
    settings = SweepSettings(flap_threshold=2)
    first = sweep_stack(stack, state, settings)
    assert statuses(first) == {"db": Status.HEALTHY, "cache": Status.HEALTHY, "api": Status.HEALTHY}
    assert layer(first, "db", Layer.BACKEND).reason.startswith("running")
    assert layer(first, "db", Layer.HTTP).status is Status.HEALTHY
    assert layer(first, "cache", Layer.TCP).status is Status.HEALTHY
    assert first.transitions == []

    backend.apply(Stop(UnitRef("hw", "db", "db"), grace_seconds=2))
    once = sweep_stack(stack, state, settings)  # one bad result: damped
    assert statuses(once)["db"] is Status.HEALTHY
    assert "still healthy (unhealthy 1/2 before it changes)" in once.units[0].reason
    assert once.transitions == []
    twice = sweep_stack(stack, state, settings)
    assert statuses(twice) == {
        "db": Status.UNHEALTHY,
        "cache": Status.DEGRADED,
        "api": Status.DEGRADED,
    }
    api = next(u for u in twice.units if u.unit == "api")
    assert api.reason == "dependency db (via cache) is unhealthy"
    assert [(t.unit, t.event) for t in twice.transitions] == [
        ("db", "hxp.health.unhealthy"),
        ("cache", "hxp.health.degraded"),
        ("api", "hxp.health.degraded"),
    ]
    assert "not running" in layer(twice, "db", Layer.BACKEND).reason

    backend.apply(Start(UnitRef("hw", "db", "db")))
    port = dict(stack.services["db"].ports)["http"]
    wait_for(lambda: listening(port), "db back")
    sweep_stack(stack, state, settings)
    back = sweep_stack(stack, state, settings)
    assert set(statuses(back).values()) == {Status.HEALTHY}
    assert {t.event for t in back.transitions} == {"hxp.health.recovered"}
    stored = [(e["unit"], e["message"]) for e in Store(state).events("hw") if e["kind"] == "health"]
    assert [u for u, _ in stored] == ["db", "cache", "api", "db", "cache", "api"]
    assert stored[0][1].startswith("healthy -> unhealthy: backend: not running (stopped")
    assert stored[3][1].startswith("unhealthy -> healthy: ")


def test_cli_exit_codes_table_and_json(web: Any, capsys: pytest.CaptureFixture[str]) -> None:
    from hxp_cli import main

    path, _, state, backend = web
    args = ["health", "-f", str(path), "--state-dir", str(state)]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "stack hw: healthy" in out
    assert "backend ✓ http ✓" in out
    backend.apply(Stop(UnitRef("hw", "db", "db"), grace_seconds=2))
    assert main([*args, "--flap-threshold", "1"]) == 2
    out = capsys.readouterr().out
    assert "unhealthy" in out
    assert "degraded" in out
    assert main([*args, "--json"]) == 2
    data = json.loads(capsys.readouterr().out)
    assert data["units"]["cache"] == {"status": "degraded", "reason": "dependency db is unhealthy"}
    # endpoints only: db's process is down, so is its HTTP check
    assert main([*args, "--no-observe", "--flap-threshold", "1"]) == 2
    assert main([*args, "--flap-threshold", "0"]) == 2  # bad input
    assert "flap_threshold" in capsys.readouterr().err


# ---------------------------------------------------------------- the vLLM double


MODES = {
    "good": [],
    "never": ["--never-ready"],
    "failing": ["--fail-health-after", "1"],
    "erroring": ["--error-rate", "1.0"],
    "busy": ["--max-concurrency", "1", "--tokens-per-second", "5"],
}


@pytest.fixture
def sims(tmp_path: Path) -> Iterator[tuple[Stack, Path, dict[str, int]]]:
    ports = {name: free_port() for name in [*MODES, "crashing"]}
    models = {
        name: {
            "host": "local",
            "engine": "simulator",
            "python": sys.executable,
            "model": f"hxp-sim/{name}",
            "served_name": name,
            "port": ports[name],
            "stop_timeout": "2s",
            "simulator_args": args,
        }
        for name, args in MODES.items()
    }
    models["crashing"] = {
        **models["good"],
        "model": "hxp-sim/crashing",
        "served_name": "crashing",
        "port": ports["crashing"],
        "simulator_args": ["--crash-after", "2"],
        "restart": "no",
    }
    stack = stack_from_data(
        {"stack": "sims", "hosts": {"local": {"backend": "process"}}, "models": models}
    )
    state = tmp_path / "state"
    backend = start_all(stack, state, skip=("crashing",))
    yield stack, state, ports
    remove_all(backend, "sims")


def test_simulator_failure_modes(sims: Any) -> None:
    stack, state, ports = sims
    settings = SweepSettings(flap_threshold=1, waiting_degraded=2)
    report = sweep_stack(stack, state, settings)
    got = statuses(report)
    assert got["good"] is Status.HEALTHY
    for which in (Layer.LIVENESS, Layer.READINESS, Layer.SATURATION, Layer.SYNTHETIC):
        assert layer(report, "good", which).status is Status.HEALTHY, which
    assert "one-token completion" in layer(report, "good", Layer.SYNTHETIC).reason
    # --never-ready: /health 503 while the API answers
    assert got["never"] is Status.UNHEALTHY
    assert "status 503" in layer(report, "never", Layer.LIVENESS).reason
    assert layer(report, "never", Layer.READINESS).status is Status.HEALTHY
    # --error-rate 1: everything answers but completions fail
    assert got["erroring"] is Status.UNHEALTHY
    assert "status 500" in layer(report, "erroring", Layer.SYNTHETIC).reason
    assert layer(report, "erroring", Layer.LIVENESS).status is Status.HEALTHY

    # real traffic replaces the synthetic completion
    body = {"model": "good", "prompt": "hi", "max_tokens": 2}
    for _ in range(3):
        httpx.post(f"http://127.0.0.1:{ports['good']}/v1/completions", json=body, timeout=5)
    # a queue on the busy one: 1 running, 4 waiting
    load = [
        subprocess.Popen(
            [
                "curl", "-s", "-o", "/dev/null", "-H", "Content-Type: application/json",
                "-d", json.dumps({"model": "busy", "prompt": "x", "max_tokens": 40}),
                f"http://127.0.0.1:{ports['busy']}/v1/completions",
            ]
        )
        for _ in range(5)
    ]  # fmt: skip
    try:
        backend = ProcessBackend(state)
        wait_for(lambda: not backend.observe("sims")["crashing"].running, "crashing to crash")
        wait_for(lambda: health(ports["failing"]) == 503, "failing to fail /health")
        time.sleep(1.0)  # the queue on `busy` builds up
        later = sweep_stack(stack, state, settings)
    finally:
        for proc in load:
            proc.kill()
            proc.wait()
    synthetic = layer(later, "good", Layer.SYNTHETIC)
    assert synthetic.status is Status.HEALTHY
    assert "skipped: 3 real request(s) succeeded" in synthetic.reason
    got = statuses(later)
    assert got["failing"] is Status.UNHEALTHY
    assert "status 503" in layer(later, "failing", Layer.LIVENESS).reason
    assert got["crashing"] is Status.UNHEALTHY
    assert "not running" in layer(later, "crashing", Layer.BACKEND).reason
    assert got["busy"] is Status.DEGRADED, layer(later, "busy", Layer.SYNTHETIC)
    assert "requests waiting (>= 2)" in layer(later, "busy", Layer.SATURATION).reason
    assert later.status is Status.UNHEALTHY


def test_a_hung_model_server_times_out_on_every_layer(sims: Any) -> None:
    """SIGSTOP: the kernel still accepts connections, nothing answers."""
    import os
    import signal

    stack, state, _ = sims
    backend = ProcessBackend(state)
    child = json.loads((backend.root / "sims" / "good" / "supervisor.json").read_text())
    os.kill(child["child_pid"], signal.SIGSTOP)
    try:
        started = time.monotonic()
        report = sweep_stack(
            stack.model_copy(update={"models": {"good": stack.models["good"]}}),
            state,
            SweepSettings(flap_threshold=1),
        )
        took = time.monotonic() - started
    finally:
        os.kill(child["child_pid"], signal.SIGCONT)
    assert statuses(report) == {"good": Status.UNHEALTHY}
    assert "no answer within 2s" in layer(report, "good", Layer.LIVENESS).reason
    assert "no answer" in layer(report, "good", Layer.READINESS).reason
    assert layer(report, "good", Layer.SYNTHETIC).reason == "skipped: the model is not ready"
    assert layer(report, "good", Layer.BACKEND).status is Status.HEALTHY  # alive, but hung
    assert took < 4.0  # one timeout, not one per layer


# ---------------------------------------------------------------- Docker HEALTHCHECK


def test_docker_container_healthcheck(
    docker_engine: str, python_image: str, tmp_path: Path
) -> None:
    from hxp.backends.docker import DockerBackend

    name = f"h{uuid.uuid4().hex[:8]}"
    port = free_port()
    # serves for 4 s, then stops answering but keeps running: only HEALTHCHECK can tell
    flip = (
        "import http.server, threading, time; "
        f"s = http.server.HTTPServer(('127.0.0.1', {port}), http.server.BaseHTTPRequestHandler); "
        "threading.Thread(target=s.serve_forever, daemon=True).start(); time.sleep(4); "
        "s.shutdown(); s.server_close(); time.sleep(600)"
    )
    check = f"import socket; socket.create_connection(('127.0.0.1', {port}), 1).close()"
    stack = stack_from_data(
        {
            "stack": name,
            "hosts": {"box": {"backend": "docker"}},
            "services": {
                "worker": {
                    "host": "box",
                    "image": python_image,
                    "command": ["python3", "-c", flip],
                    "stop_timeout": "1s",
                    "health": {
                        "command": ["python3", "-c", check],
                        "interval": "300ms",
                        "timeout": "2s",
                        "retries": 1,
                    },
                }
            },
        }
    )
    backend = DockerBackend("box", stack.hosts["box"], tmp_path)
    (unit,) = expand_units(stack)
    backend.apply(Create(unit, unit_config_hash(stack, "worker"), 1))
    settings = SweepSettings(flap_threshold=1)
    try:
        wait_for(
            lambda: backend.observe(name)["worker"].healthy is True,
            f"container healthy: {backend.observe(name)['worker']}",
        )
        up = sweep_stack(stack, tmp_path, settings)
        assert statuses(up) == {"worker": Status.HEALTHY}
        assert layer(up, "worker", Layer.BACKEND).reason == "running, health healthy"
        assert [r.layer for r in up.instances[0].layers] == [Layer.BACKEND]  # no host command
        wait_for(lambda: backend.observe(name)["worker"].healthy is False, "container unhealthy")
        down = sweep_stack(stack, tmp_path, settings)
        assert statuses(down) == {"worker": Status.UNHEALTHY}
        assert "health unhealthy" in layer(down, "worker", Layer.BACKEND).reason
    finally:
        backend.apply(Remove(UnitRef(name, "worker", "worker")))


# ---------------------------------------------------------------- systemd


def test_systemd_unit_state_and_remote_command(systemd_container: str, tmp_path: Path) -> None:
    from hxp.backends.systemd import SystemdBackend

    port = free_port()
    name = f"s{uuid.uuid4().hex[:6]}"
    stack = stack_from_data(
        {
            "stack": name,
            "hosts": {
                "box": {
                    "backend": "systemd",
                    "runner": "docker-exec",
                    "container": systemd_container,
                }
            },
            "services": {
                "web": {
                    "host": "box",
                    "command": ["python3", "-m", "http.server", str(port), "--bind", "127.0.0.1"],
                    "ports": {"http": port},
                    "health": {
                        "http": {"url": f"http://127.0.0.1:{port}/"},
                        "command": ["test", "-d", "/run/systemd/system"],  # runs in the box
                        "timeout": "2s",
                    },
                }
            },
        }
    )
    backend = SystemdBackend("box", stack.hosts["box"], tmp_path)
    (unit,) = expand_units(stack)
    backend.apply(Create(unit, unit_config_hash(stack, "web"), 1))
    settings = SweepSettings(flap_threshold=1)
    try:
        wait_for(lambda: listening(port), "the unit serving")
        up = sweep_stack(stack, tmp_path, settings)
        assert statuses(up) == {"web": Status.HEALTHY}
        assert layer(up, "web", Layer.BACKEND).reason.startswith("active/running")
        assert layer(up, "web", Layer.COMMAND).reason.startswith("test exit code 0")
        assert layer(up, "web", Layer.HTTP).status is Status.HEALTHY
        backend.apply(Stop(UnitRef(name, "web", "web"), grace_seconds=5))
        down = sweep_stack(stack, tmp_path, settings)
        assert statuses(down) == {"web": Status.UNHEALTHY}
        assert "inactive/dead" in layer(down, "web", Layer.BACKEND).reason
    finally:
        backend.apply(Remove(UnitRef(name, "web", "web")))
