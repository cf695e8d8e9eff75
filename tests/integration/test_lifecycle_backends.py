"""The lifecycle flows (start-stack, stop-stack, restart-stack --rolling, supervise-stack) on the
real Docker backend (containers on the session's private dockerd) and the real systemd backend
(units under systemd as PID 1 in a container, driven through `docker exec`), with a real Prefect
server.

Each backend gets one small stack, deployed once per module: `api` depends on `db`, and `web`
has two replicas behind the stack's nginx gateway.

What is and is not supported here:
- The gateway itself runs only on a local *process* host (the stack validator insists), and its
  upstreams are always `127.0.0.1:PORT`. A unit on a docker or systemd host can be routed only
  when that host shares the gateway machine's loopback: a local Docker engine with host
  networking, or (as here) a systemd container on the host network. A remote docker/systemd
  host (runner ssh) cannot be put behind the gateway today.
- A rolling restart of `web` surges: each replica's new instance starts in its second
  blue-green slot (`web-N-g`, port + replicas) beside the old one, takes the traffic, and the
  old instance is drained and removed. A unit that is not routed has no second slot: it rolls
  in place, one replica at a time.
- Crash recovery: a kill -9 of the main process, then supervisor passes; on both backends.
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from hxp.backends import backend_for
from hxp.backends.base import Backend
from hxp.backends.systemd import BACKUP_ROOT, UNIT_DIR
from hxp.config import load_config
from hxp.io.gateway import NginxGateway
from hxp.lifecycle import State
from hxp.spec import Stack
from hxp.store import Store
from hxp.units import all_slots
from tests.support.stacks import free_port, free_range
from tests.support.waiting import wait_for

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("prefect_server")]

HOST = "box"


@dataclass
class Deployed:
    """One deployed lifecycle stack on one backend."""

    kind: str
    path: Path
    state: Path
    stack: Stack
    ports: dict[str, int]  # db, api, web (first replica, slot 0), gateway

    @property
    def name(self) -> str:
        return self.stack.stack

    @property
    def files(self) -> list[str]:
        return [str(self.path)]

    def backend(self) -> Backend:
        return backend_for(HOST, self.stack.hosts[HOST], self.state)

    def observe(self) -> dict[str, Any]:
        return self.backend().observe(self.name)

    def states(self) -> dict[str, State]:
        return {n: r.state for n, r in Store(self.state).lifecycle(self.name).items()}

    def gateway(self) -> NginxGateway:
        assert self.stack.gateway is not None
        return NginxGateway(self.state, self.name, self.stack.gateway)


def service(port: int, image: str | None, **extra: Any) -> dict[str, Any]:
    data: dict[str, Any] = {
        "host": HOST,
        "command": ["python3", "-m", "http.server", "{port.http}", "--bind", "127.0.0.1"],
        "ports": {"http": port},
        "env": {"PYTHONUNBUFFERED": "1"},
        "stop_timeout": "5s",
        "health": {
            "http": {"url": f"http://127.0.0.1:{port}/"},
            "interval": "300ms",
            "timeout": "2s",
            "retries": 3,
            "start_period": "10s",
        },
        **extra,
    }
    if image is not None:
        data["image"] = image
    return data


def stack_data(
    name: str, host: dict[str, Any], image: str | None
) -> tuple[dict[str, Any], dict[str, int]]:
    web = free_range(4)  # 2 replicas x 2 blue-green slots
    ports = {"db": free_port(), "api": free_port(), "web": web, "gateway": free_port()}
    data = {
        "version": 2,
        "stack": name,
        "hosts": {"local": {"backend": "process"}, HOST: host},
        "deploy": {"bake": "500ms"},
        "services": {
            # db is not restarted by its backend: after a crash only the supervisor starts it.
            "db": service(ports["db"], image, restart="no"),
            "api": service(ports["api"], image, depends_on=["db"]),
            "web": service(ports["web"], image, replicas=2),
        },
        "gateway": {"host": "local", "routes": {"web": ports["gateway"]}, "drain_timeout": "5s"},
    }
    return data, ports


def deploy_lifecycle_stack(
    tmp: Path, kind: str, host: dict[str, Any], image: str | None
) -> Deployed:
    from flows.deploy import deploy_stack

    name = f"lc{kind[0]}{uuid.uuid4().hex[:6]}"
    data, ports = stack_data(name, host, image)
    path = tmp / "stack.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    deployed = Deployed(kind, path, tmp / "state", load_config([path], {}).stack, ports)
    result = deploy_stack([str(path)], state_dir=str(deployed.state))
    assert result["changed"] is True
    return deployed


def remove_lifecycle_stack(deployed: Deployed) -> None:
    """Everything the stack left: the gateway, and its instances, killed at once (not under
    test here; the backends' Remove is covered by the deploy tests)."""
    deployed.gateway().stop()
    if deployed.kind == "docker":
        import docker

        from hxp.backends.base import LABEL_STACK

        found = docker.from_env().containers.list(
            all=True, filters={"label": f"{LABEL_STACK}={deployed.name}"}
        )
        for container in found:
            container.remove(force=True)
        return
    prefix = f"hxp-{deployed.name}-"
    in_systemd(
        deployed,
        "sh",
        "-c",
        f"cd {UNIT_DIR} && systemctl disable --now {prefix}*.service; "
        f"rm -f {prefix}*.service; rm -rf {BACKUP_ROOT}/{deployed.name}; "
        f"systemctl daemon-reload; systemctl reset-failed '{prefix}*'",
        check=False,
    )
    assert deployed.observe() == {}


@pytest.fixture(scope="module")
def docker_deployed(
    prefect_server: str, docker_engine: str, python_image: str, tmp_path_factory: Any
) -> Iterator[Deployed]:
    deployed = deploy_lifecycle_stack(
        tmp_path_factory.mktemp("lc-docker"), "docker", {"backend": "docker"}, python_image
    )
    try:
        yield deployed
    finally:
        remove_lifecycle_stack(deployed)


@pytest.fixture(scope="module")
def systemd_deployed(
    prefect_server: str, systemd_container: str, tmp_path_factory: Any
) -> Iterator[Deployed]:
    host = {"backend": "systemd", "runner": "docker-exec", "container": systemd_container}
    deployed = deploy_lifecycle_stack(tmp_path_factory.mktemp("lc-systemd"), "systemd", host, None)
    try:
        yield deployed
    finally:
        remove_lifecycle_stack(deployed)


@pytest.fixture(params=["docker", "systemd"])
def deployed(request: pytest.FixtureRequest) -> Deployed:
    found: Deployed = request.getfixturevalue(f"{request.param}_deployed")
    return found


# --------------------------------------------------------------------------- helpers


def ok(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def serving(port: int) -> bool:
    return ok(f"http://127.0.0.1:{port}/")


def transitions(deployed: Deployed, since_id: int = 0) -> list[str]:
    """Lifecycle transition messages (`inst: a -> b (reason)`), oldest first."""
    return [
        e["message"]
        for e in Store(deployed.state).events(deployed.name)
        if e["kind"] == "lifecycle" and e["id"] > since_id
    ]


def last_event_id(deployed: Deployed) -> int:
    events = Store(deployed.state).events(deployed.name)
    return int(events[-1]["id"]) if events else 0


def answers_readiness(deployed: Deployed) -> dict[str, bool]:
    """Every instance the backend runs, against its own readiness check (its health URL)."""
    running = {n for n, o in deployed.observe().items() if o.running}
    out = {}
    for unit in deployed.stack.units():
        for inst in all_slots(deployed.stack, unit):
            if inst.name in running:
                assert inst.health is not None
                assert inst.health.http is not None
                out[inst.name] = ok(inst.health.http.url)
    return out


def main_pid(deployed: Deployed, instance: str) -> int:
    """The instance's main process: the container's init (host pid) on docker, the unit's
    MainPID (in the systemd container's pid namespace) on systemd."""
    if deployed.kind == "docker":
        import docker

        from hxp.backends.docker import container_name

        found = docker.from_env().containers.get(container_name(deployed.name, instance))
        return int(found.attrs["State"]["Pid"])
    unit = f"hxp-{deployed.name}-{instance}.service"
    pid = in_systemd(deployed, "systemctl", "show", "-p", "MainPID", "--value", unit)
    return int(pid.strip())


def in_systemd(deployed: Deployed, *argv: str, check: bool = True) -> str:
    container = deployed.stack.hosts[HOST].container
    assert container is not None
    done = subprocess.run(
        ["docker", "exec", container, *argv], capture_output=True, text=True, check=check
    )
    return done.stdout


def kill_9(deployed: Deployed, instance: str) -> int:
    """SIGKILL the instance's main process, as a crash or the OOM killer would; its pid."""
    pid = main_pid(deployed, instance)
    assert pid > 0
    if deployed.kind == "docker":
        os.kill(pid, signal.SIGKILL)
    else:
        in_systemd(deployed, "kill", "-9", str(pid))
    return pid


class GatewayLoad:
    """Sequential GETs through the gateway on a thread, counting what failed."""

    def __init__(self, port: int) -> None:
        self.url = f"http://127.0.0.1:{port}/"
        self.stop = threading.Event()
        self.ok = 0
        self.errors: list[str] = []
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with httpx.Client(timeout=10) as client:
            while not self.stop.is_set():
                try:
                    status = client.get(self.url).status_code
                except httpx.HTTPError as exc:
                    self.errors.append(f"{type(exc).__name__}: {exc}")
                    continue
                if status == 200:
                    self.ok += 1
                else:
                    self.errors.append(f"HTTP {status}")
                self.stop.wait(0.01)  # leave the 2 CPUs to the roll itself

    def __enter__(self) -> GatewayLoad:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self._thread.join(60)
        assert not self._thread.is_alive()


# --------------------------------------------------------------------------- tests


def test_stop_goes_dependents_first_and_start_dependencies_first(deployed: Deployed) -> None:
    from flows.lifecycle import start_stack, stop_stack

    mark = last_event_id(deployed)
    stopped = stop_stack(deployed.files, state_dir=str(deployed.state))
    assert stopped["ok"], stopped
    assert stopped["gateway_stopped"] is True
    states = deployed.states()
    assert set(states.values()) == {State.STOPPED}, states
    assert {"db", "api"} <= set(states)
    # The backend agrees: every instance still exists, none runs.
    seen = deployed.observe()
    assert {n for n, o in seen.items() if o.exists} == set(states)
    assert not [n for n, o in seen.items() if o.running], seen
    assert not serving(deployed.ports["db"])
    assert not serving(deployed.ports["api"])
    assert not deployed.gateway().running
    # Reverse dependency order: api went through draining, stopping, stopped before db moved.
    moves = [m for m in transitions(deployed, mark) if m.endswith("(stop requested)")]
    api = [i for i, m in enumerate(moves) if m.startswith("api:")]
    db = [i for i, m in enumerate(moves) if m.startswith("db:")]
    assert len(api) == len(db) == 3, moves
    assert max(api) < min(db), moves

    mark = last_event_id(deployed)
    started = start_stack(deployed.files, state_dir=str(deployed.state))
    assert started["ok"], started
    states = deployed.states()
    assert set(states.values()) == {State.RUNNING}, states
    seen = deployed.observe()
    assert all(seen[n].running for n in states), seen
    # Dependency order: db was ready before api was even asked to start.
    moves = transitions(deployed, mark)
    db_ready = moves.index("db: starting -> running (ready)")
    api_start = next(i for i, m in enumerate(moves) if m.startswith("api: stopped -> starting"))
    assert db_ready < api_start, moves
    readiness = answers_readiness(deployed)
    assert all(readiness.values()), readiness
    assert {n.removesuffix("-g") for n in readiness} == {"db", "api", "web-0", "web-1"}
    # The gateway is back, routing to the running replicas.
    assert deployed.gateway().running
    assert serving(deployed.ports["gateway"])


def test_rolling_restart_of_replicas_behind_the_gateway(deployed: Deployed) -> None:
    from flows.lifecycle import restart_stack

    before = {n: o for n, o in deployed.observe().items() if n.startswith("web-") and o.running}
    assert len(before) == 2, before
    others = {n: o for n, o in deployed.observe().items() if not n.startswith("web-")}
    with GatewayLoad(deployed.ports["gateway"]) as load:
        wait_for(lambda: load.ok > 0, "a first request through the gateway")
        result = restart_stack(
            deployed.files, units=["web"], state_dir=str(deployed.state), rolling=True
        )
        served_during = load.ok
    assert result["ok"], result
    web = result["units"]["web"]
    assert (web["surged"], web["in_place"], web["failures"]) == (2, 0, 0), web
    assert load.errors == [], load.errors[:5]
    assert served_during > 0

    after = {n: o for n, o in deployed.observe().items() if n.startswith("web-")}
    # Each replica moved to its other blue-green slot; the old instances are gone.
    flipped = {n.removesuffix("-g") if n.endswith("-g") else f"{n}-g" for n in before}
    assert set(after) == flipped, after
    assert all(o.running for o in after.values()), after
    states = deployed.states()
    assert {n: states[n] for n in after} == dict.fromkeys(after, State.RUNNING)
    assert not set(before) & set(states)  # the replaced instances' records are forgotten
    slots = all_slots(deployed.stack, "web")
    ports = sorted(dict(i.ports)["http"] for i in slots if i.name in after)
    assert deployed.gateway().live()["web"] == ports
    assert serving(deployed.ports["gateway"])
    # The other units were left alone.
    now = deployed.observe()
    assert {n: (now[n].running, now[n].restarts) for n in others} == {
        n: (o.running, o.restarts) for n, o in others.items()
    }

    # Again in place (surge never: how a unit that is not routed rolls): the same instances,
    # each stopped and started while the other one serves.
    pids = {n: main_pid(deployed, n) for n in after}
    mark = last_event_id(deployed)
    with GatewayLoad(deployed.ports["gateway"]) as load:
        wait_for(lambda: load.ok > 0, "a first request through the gateway")
        result = restart_stack(
            deployed.files,
            units=["web"],
            state_dir=str(deployed.state),
            rolling=True,
            surge="never",
        )
    assert result["ok"], result
    web = result["units"]["web"]
    assert (web["surged"], web["in_place"], web["failures"]) == (0, 2, 0), web
    assert load.errors == [], load.errors[:5]
    rolled = {n: o for n, o in deployed.observe().items() if n.startswith("web-")}
    assert set(rolled) == set(after)
    assert all(o.running for o in rolled.values()), rolled
    assert all(main_pid(deployed, n) not in (0, pids[n]) for n in rolled)
    moves = [m for m in transitions(deployed, mark) if m.endswith("(rolling restart)")]
    for name in rolled:  # one replica at a time: each went all the way round on its own
        assert [m.split(": ")[1] for m in moves if m.startswith(f"{name}:")] == [
            "running -> draining (rolling restart)",
            "draining -> stopping (rolling restart)",
            "stopping -> stopped (rolling restart)",
            "stopped -> starting (rolling restart)",
        ], moves
    assert deployed.gateway().live()["web"] == ports
    assert set(deployed.states().values()) == {State.RUNNING}

    # What runs is what the stack file says: a deploy finds nothing to change.
    from flows.deploy import deploy_stack

    assert deploy_stack(deployed.files, state_dir=str(deployed.state))["changed"] is False


def test_a_killed_unit_is_restarted_by_the_supervisor(deployed: Deployed) -> None:
    """kill -9 of an instance's main process: `db` (restart "no") is restarted by the next
    supervisor pass; `api` (restart on-failure) is restarted by its backend (Docker's restart
    policy, systemd's Restart=) and the supervisor only counts the crash.

    No supervisor pass runs first: the restart-counter baseline a crash is counted against is
    the one hxp took when it last started the instance itself (deploy, start, restart)."""
    from flows.lifecycle import restart_stack, supervise_stack

    d = deployed
    files, state = d.files, str(d.state)
    db_pid = kill_9(d, "db")
    wait_for(lambda: not d.observe()["db"].running, "db to be seen down")
    assert d.observe()["db"].exists
    result = supervise_stack(files, state_dir=state)
    assert result["crashed"] == ["db"]
    assert result["restarted"] == ["db"]
    assert result["states"]["db"] == "running"
    assert d.observe()["db"].running
    assert serving(d.ports["db"])
    assert main_pid(d, "db") not in (0, db_pid)
    moves = transitions(d)[-3:]
    assert moves[0].startswith("db: running -> failed (crashed")
    assert moves[1:] == [
        "db: failed -> starting (supervisor restart)",
        "db: starting -> running (restarted by the supervisor)",
    ]

    restarts = d.observe()["api"].restarts or 0
    kill_9(d, "api")
    wait_for(
        lambda: (seen := d.observe()["api"]).running and (seen.restarts or 0) > restarts,
        f"the {d.kind} backend to restart api",
    )
    counted = supervise_stack(files, state_dir=state)
    assert counted["crashed"] == ["api"]
    assert counted["restarted"] == []  # its backend did it: the supervisor only counts it
    assert counted["states"]["api"] == "running"
    assert len(Store(d.state).lifecycle(d.name)["api"].crashes) == 1
    wait_for(lambda: serving(d.ports["api"]), "api to serve again")

    # hxp restarts api itself (stop, then start): that resets the backend's restart counter
    # (Docker's RestartCount, systemd's NRestarts). The next crash its backend restarts must
    # still be counted, before any supervisor pass has looked at the new counter.
    restarted = restart_stack(files, units=["api"], state_dir=state)
    assert restarted["ok"], restarted
    assert d.observe()["api"].restarts == 0
    kill_9(d, "api")
    wait_for(
        lambda: (seen := d.observe()["api"]).running and (seen.restarts or 0) > 0,
        f"the {d.kind} backend to restart api again",
    )
    again = supervise_stack(files, state_dir=state)
    assert again["crashed"] == ["api"]
    assert again["restarted"] == []
    wait_for(lambda: serving(d.ports["api"]), "api to serve again")
