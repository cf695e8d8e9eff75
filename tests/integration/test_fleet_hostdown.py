"""Host failure on the fleet lab: a model host whose link goes down inside its namespace.

Two lab hosts, m1 and m2, each run two `hxp-vllm-sim` replicas (started by the process backend
from inside the host's namespace, as the agent on that host would: tests/support/lab_units.py).
The gateway runs here (nginx on loopback) and routes `chat` to all four: m1's replicas are the
unit `chat`, m2's the unit `chatb` (a unit lives on one host today), which the test puts
behind chat's route too, so that a sweep taking m1 out leaves replicas that serve.

- The sweep: when m1's link goes down (`ip link set eth0 down` inside m1) the next sweep
  reports m1 `unreachable` (a host-level state, its sshd silent and every probe failing) and
  takes its replicas out of the gateway in that one sweep, however high the flap threshold;
  link back up, the next sweep puts them back. No sweep waits long on the dead link.
- A deploy that must reach m1 while it is down exits 1 naming m1 and why, before it changed
  anything anywhere: the plans of the other hosts are the same afterwards, the store has no
  deploy record.
- The drill: the same under continuous load through the gateway, sweeping every
  SWEEP_INTERVAL: m1's replicas are out within one interval, and no request started after
  that fails (those in flight on the dead host are counted and reported apart).
"""

from __future__ import annotations

import http.client
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from hxp.config import load_config
from hxp.health import HostState, SweepSettings
from hxp.io.gateway import NginxGateway
from hxp.io.sweep import sweep_stack
from hxp.store import Store
from tests.support.fleet_lab import FleetLab, LabState, lab_available
from tests.support.lab_units import start_host_units
from tests.support.loadgen import served
from tests.support.stacks import SHORT_BAKE, SIM_ARGS

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
SIM_PORT = 18300  # inside each lab host's own namespace
HOST_TIMEOUT = 1.0
PROBE_TIMEOUT = "500ms"
SWEEP_INTERVAL = 2.0
# A sweep against a dead link: the connect (HOST_TIMEOUT) and the probes (each under its own
# timeout, all at once), with room for a loaded 2-core machine.
SWEEP_BOUND = 5.0
# flap_threshold high on purpose: an unreachable host must not wait for it
SETTINGS = SweepSettings(flap_threshold=3, host_timeout=HOST_TIMEOUT, synthetic_window=0)


def model(name: str, host: str) -> list[str]:
    return [
        f"  {name}:",
        f"    host: {host}",
        "    engine: simulator",
        f"    python: {sys.executable}",
        "    model: hxp-sim/chat",
        "    served_name: chat",
        "    replicas: 2",
        f"    port: {SIM_PORT}",
        f"    simulator_args: {json.dumps(list(SIM_ARGS))}",
        "    health:",
        f'      http: {{url: "http://127.0.0.1:{SIM_PORT}/health"}}',
        "      interval: 500ms",
        f"      timeout: {PROBE_TIMEOUT}",
        "      retries: 3",
    ]


def stack_file(path: Path, state: LabState, gateway_port: int, version: str = "1") -> Path:
    lines = [
        "stack: drill",
        "hosts:",
        "  gw: {backend: process}",
        f"  m1: {{backend: process, address: {state.host('m1').address}}}",
        f"  m2: {{backend: process, address: {state.host('m2').address}}}",
        f"deploy: {{bake: {SHORT_BAKE}}}",
        "models:",
        *model("chat", "m1"),
        *model("chatb", "m2"),
        "services:",
        "  tag:",
        "    host: m2",
        f"    command: [/bin/sleep, '{3600 + int(version)}']",
        "gateway:",
        "  host: gw",
        f"  routes: {{chat: {gateway_port}}}",
    ]
    path.write_text("\n".join(lines) + "\n")
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def link(lab: FleetLab, host: str, up: bool) -> None:
    subprocess.run(
        ["ip", "-n", lab.namespace(host), "link", "set", "eth0", "up" if up else "down"],
        check=True,
    )


def healthy(address: str, port: int) -> bool:
    try:
        conn = http.client.HTTPConnection(address, port, timeout=1)
        conn.request("GET", "/health")
        return conn.getresponse().status == 200
    except OSError:
        return False


@dataclass
class Fleet:
    lab: FleetLab
    state: LabState
    path: Path
    stack: Any
    state_dir: Path
    gateway: NginxGateway
    gateway_port: int
    servers: dict[str, list[str]]  # host -> its replicas as gateway servers


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    why = lab_available()
    if why is not None:
        pytest.skip(why)
    if not Path("/usr/sbin/nginx").exists():
        pytest.skip("nginx is not installed (scripts/install-system-deps.sh)")
    tmp = tmp_path_factory.mktemp("hostdown")
    made = FleetLab("hd", tmp / "lab")
    state = made.up([("m1", "plain"), ("m2", "plain")])
    state_dir = tmp / "state"
    gateway_port = free_port()
    path = stack_file(tmp / "drill.yaml", state, gateway_port)
    stack = load_config([path], {}).stack
    assert stack.gateway is not None
    gateway = NginxGateway(state_dir, "drill", stack.gateway)
    try:
        for host in ("m1", "m2"):
            start_host_units(state, host, path, state_dir)
        servers = {
            h: [f"{state.host(h).address}:{SIM_PORT + i}" for i in range(2)] for h in ("m1", "m2")
        }
        deadline = time.monotonic() + 60
        for server in servers["m1"] + servers["m2"]:
            address, port = server.split(":")
            while not healthy(address, int(port)):
                assert time.monotonic() < deadline, f"{server} did not become healthy"
                time.sleep(0.2)
        gateway.apply({"chat": servers["m1"] + servers["m2"]})
        yield Fleet(made, state, path, stack, state_dir, gateway, gateway_port, servers)
    finally:
        gateway.stop()
        made.down()


@pytest.fixture
def clean(fleet: Fleet) -> Iterator[Fleet]:
    """Each test starts with both links up, every replica routed and no health history."""
    for host in ("m1", "m2"):
        link(fleet.lab, host, True)
    fleet.gateway.apply({"chat": fleet.servers["m1"] + fleet.servers["m2"]})
    Store(fleet.state_dir).save_health("drill", [], [])
    yield fleet
    link(fleet.lab, "m1", True)


def routed(fleet: Fleet) -> set[str]:
    return set(fleet.gateway.servers().get("chat", []))


def sweep(fleet: Fleet) -> Any:
    return sweep_stack(fleet.stack, fleet.state_dir, SETTINGS)


def test_an_unreachable_host_leaves_the_gateway_in_one_sweep_and_returns_in_one(
    clean: Fleet,
) -> None:
    fleet = clean
    m1, m2 = set(fleet.servers["m1"]), set(fleet.servers["m2"])
    first = sweep(fleet)
    assert [(h.host, h.state) for h in first.hosts] == [
        ("m1", HostState.REACHABLE),
        ("m2", HostState.REACHABLE),
    ]
    assert first.status.value == "healthy", first.to_dict()
    assert routed(fleet) == m1 | m2

    link(fleet.lab, "m1", False)
    down = sweep(fleet)
    assert down.seconds < SWEEP_BOUND, down.seconds
    hosts = down.to_dict()["hosts"]
    assert hosts["m1"]["state"] == "unreachable"
    # no answer, or no route once the bridge's neighbour entry for m1 has failed
    assert re.match(
        rf"(no answer within {HOST_TIMEOUT:g}s|no route to host) \(ssh port 22\)",
        hosts["m1"]["reason"],
    ), hosts["m1"]
    assert hosts["m2"]["state"] == "reachable"
    # one host-level verdict, and its replicas out of the gateway in this one sweep
    assert [h.instances for h in down.unreachable] == [("chat-0", "chat-1")]
    units = {u.unit: u for u in down.units}
    assert units["chat"].status.value == "unhealthy"
    assert all("host m1" in r.reason and "unreachable" in r.reason for r in units["chat"].replicas)
    assert units["chatb"].status.value == "healthy"
    assert routed(fleet) == m2
    assert [sorted(r.removed) for r in down.routes] == [["chat-0", "chat-1"]]
    assert any(n.startswith("host m1 (198.18.0.") for n in down.notes)

    link(fleet.lab, "m1", True)
    back = sweep(fleet)
    assert back.unreachable == []
    assert routed(fleet) == m1 | m2  # in the next sweep, no manual step
    assert {u.unit: u.status.value for u in back.units}["chat"] == "healthy"


def plan_json(fleet: Fleet, path: Path) -> dict[str, Any]:
    env = {**os.environ, "HXP_STATE_DIR": str(fleet.state_dir)}
    done = subprocess.run(
        [sys.executable, "-m", "hxp_cli", "plan", "-f", str(path), "--json"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    result: dict[str, Any] = json.loads(done.stdout)
    return result


def not_on(plan: dict[str, Any], host: str) -> list[Any]:
    return [a for a in plan["actions"] if a.get("host") != host]


def test_a_deploy_that_touches_the_dead_host_changes_nothing_anywhere(
    clean: Fleet, prefect_server: str, tmp_path: Path
) -> None:
    fleet = clean
    changed = stack_file(tmp_path / "v2.yaml", fleet.state, fleet.gateway_port, version="2")
    before = plan_json(fleet, changed)
    assert not_on(before, "m1"), "the change must touch another host too"
    deploys_before = Store(fleet.state_dir).deploys("drill", 10)
    link(fleet.lab, "m1", False)
    started = time.monotonic()
    env = {
        **os.environ,
        "HXP_STATE_DIR": str(fleet.state_dir),
        "PREFECT_API_URL": prefect_server,
    }
    done = subprocess.run(
        [sys.executable, "-m", "hxp_cli", "apply", "-f", str(changed)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 1, done.stdout + done.stderr
    address = fleet.state.host("m1").address
    assert re.search(
        rf"error: host m1 \({re.escape(address)}\) unreachable: "
        r"(no answer within 2s|no route to host) \(ssh port 22\)",
        done.stderr,
    ), done.stderr
    assert "Traceback" not in done.stderr
    link(fleet.lab, "m1", True)
    print(f"\ndeploy refused in {time.monotonic() - started:.1f}s (CLI start included)")
    after = plan_json(fleet, changed)
    assert not_on(after, "m1") == not_on(before, "m1")  # nothing changed on the other hosts
    assert after == before
    # no half record: the deploy never began one
    assert Store(fleet.state_dir).deploys("drill", 10) == deploys_before
    assert fleet.servers["m2"][0].startswith(fleet.state.host("m2").address)


@dataclass
class Request:
    started: float
    ended: float
    ok: bool
    error: str = ""


def load(port: int, stop: threading.Event, out: list[Request]) -> None:
    """One client: completions through the gateway, one after another, until `stop`."""
    body = json.dumps({"model": "chat", "prompt": "hi", "max_tokens": 2})
    while not stop.is_set():
        started = time.monotonic()
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=3)
            conn.request("POST", "/v1/completions", body, {"Content-Type": "application/json"})
            response = conn.getresponse()
            response.read()
            conn.close()
            ok, error = response.status == 200, f"HTTP {response.status}"
        except OSError as exc:
            ok, error = False, repr(exc)
        out.append(Request(started, time.monotonic(), ok, "" if ok else error))


def test_host_failure_drill_under_load(clean: Fleet) -> None:
    fleet = clean
    m1, m2 = set(fleet.servers["m1"]), set(fleet.servers["m2"])
    stop = threading.Event()
    requests: list[Request] = []
    sweeps: list[tuple[float, float]] = []

    def sweeper() -> None:
        while not stop.is_set():
            began = time.monotonic()
            sweep(fleet)
            sweeps.append((began, time.monotonic()))
            stop.wait(max(0.0, SWEEP_INTERVAL - (time.monotonic() - began)))

    clients = [
        threading.Thread(target=load, args=(fleet.gateway_port, stop, requests)) for _ in range(8)
    ]
    loop = threading.Thread(target=sweeper)
    for t in [*clients, loop]:
        t.start()
    try:
        time.sleep(SWEEP_INTERVAL * 1.5)
        link(fleet.lab, "m1", False)
        dead_at = time.monotonic()
        while routed(fleet) != m2:
            assert time.monotonic() - dead_at < SWEEP_INTERVAL + SWEEP_BOUND, routed(fleet)
            time.sleep(0.02)
        out_at = time.monotonic()  # the gateway has reloaded without m1
        time.sleep(SWEEP_INTERVAL * 1.5)
        link(fleet.lab, "m1", True)
        up_at = time.monotonic()
        while routed(fleet) != m1 | m2:
            assert time.monotonic() - up_at < SWEEP_INTERVAL + SWEEP_BOUND, routed(fleet)
            time.sleep(0.02)
        back_at = time.monotonic()
        m1_served_at_return = successes(fleet, "m1")
        time.sleep(SWEEP_INTERVAL)
        m1_served_after = successes(fleet, "m1")
    finally:
        stop.set()
        for t in [*clients, loop]:
            t.join(timeout=30)
    done = list(requests)
    after = [r for r in done if r.started >= out_at]
    before = [r for r in done if r.started < out_at and r.ended > dead_at]
    in_flight_lost = [r for r in before if not r.ok]
    failed_after = [r for r in after if not r.ok]
    print(
        f"\nhost failure drill: {len(done)} requests; m1 out of the gateway "
        f"{out_at - dead_at:.2f}s after its link went down (sweep interval {SWEEP_INTERVAL:g}s), "
        f"back {back_at - up_at:.2f}s after it came up; requests in flight or started on the "
        f"dead host before it was out: {len(in_flight_lost)} failed of {len(before)}; "
        f"started after it was out: {len(failed_after)} failed of {len(after)}"
    )
    assert len(after) > 100
    assert failed_after == [], failed_after[:5]
    assert out_at - dead_at <= SWEEP_INTERVAL + SWEEP_BOUND
    assert m1_served_after > m1_served_at_return  # m1's replicas serve again


def successes(fleet: Fleet, host: str) -> float:
    """Completions the host's replicas answered (their vllm:request_success_total)."""
    return sum(served(s.split(":")[0], int(s.split(":")[1])) for s in fleet.servers[host])


SCRAPE = 0.5  # seconds: scrape and rule evaluation interval
DOWN_FOR = 1.0  # the alerts' `for`
GROUP_WAIT = 0.5


def monitoring_files(fleet: Fleet, folder: Path, hook_url: str) -> dict[str, int]:
    """The drill stack with Prometheus and Alertmanager on this machine (the gateway's host),
    rendered by hxp.monitoring into `folder`; their ports."""
    from hxp.monitoring import config_files
    from tests.support.metrics_env import free_port as port

    ports = {"prometheus": port(), "alertmanager": port()}
    text = fleet.path.read_text() + "\n".join(
        [
            "monitoring:",
            "  prometheus:",
            "    host: gw",
            f"    port: {ports['prometheus']}",
            f"    scrape_interval: {int(SCRAPE * 1000)}ms",
            f"    evaluation_interval: {int(SCRAPE * 1000)}ms",
            "  alertmanager:",
            "    host: gw",
            f"    port: {ports['alertmanager']}",
            f"    group_wait: {int(GROUP_WAIT * 1000)}ms",
            "    group_interval: 1s",
            "    repeat_interval: 1h",
            f'    receivers: [{{name: hook, type: webhook, url: "{hook_url}"}}]',
            f"  alerts: {{down_for: {int(DOWN_FOR * 1000)}ms, saturation_for: 1s, window: 1m}}",
            "",
        ]
    )
    monitored = folder / "monitored.yaml"
    monitored.write_text(text)
    stack = load_config([monitored], {}).stack
    for f in config_files(stack, str(folder / "secrets")):
        target = folder / f.path
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(f.content)
    return ports


def test_host_down_alert_fires_and_inhibits_the_unit_alerts_of_that_host(
    clean: Fleet, tmp_path: Path
) -> None:
    from tests.support.metrics_env import binary, managed_process
    from tests.support.monitoring import webhook_receiver

    fleet = clean
    with webhook_receiver() as hook:
        ports = monitoring_files(fleet, tmp_path, hook.url)
        prom = f"http://127.0.0.1:{ports['prometheus']}"
        am = f"http://127.0.0.1:{ports['alertmanager']}"
        prometheus = [
            binary("prometheus"),
            f"--config.file={tmp_path / 'prometheus' / 'prometheus.yml'}",
            f"--web.listen-address=127.0.0.1:{ports['prometheus']}",
            f"--storage.tsdb.path={tmp_path / 'tsdb'}",
        ]
        alertmanager = [
            binary("prometheus-alertmanager"),
            f"--config.file={tmp_path / 'alertmanager' / 'alertmanager.yml'}",
            f"--storage.path={tmp_path / 'am'}",
            f"--web.listen-address=127.0.0.1:{ports['alertmanager']}",
            "--cluster.listen-address=",
        ]
        with (
            managed_process(alertmanager, f"{am}/-/ready", tmp_path / "alertmanager.log"),
            managed_process(prometheus, f"{prom}/-/ready", tmp_path / "prometheus.log"),
        ):

            def targets_up() -> int:
                conn = http.client.HTTPConnection("127.0.0.1", ports["prometheus"], timeout=2)
                conn.request("GET", "/api/v1/targets")
                active = json.loads(conn.getresponse().read())["data"]["activeTargets"]
                return sum(1 for t in active if t["health"] == "up" and t["labels"]["host"] == "m1")

            deadline = time.monotonic() + 30
            while targets_up() < 2:
                assert time.monotonic() < deadline, "m1's targets never came up"
                time.sleep(0.2)
            link(fleet.lab, "m1", False)
            dead_at = time.monotonic()
            while not hook.has("HxpHostDown", "firing", host="m1", stack="drill"):
                assert time.monotonic() - dead_at < 30, hook.alerts()
                time.sleep(0.1)
            fired = time.monotonic() - dead_at

            def alerts() -> list[dict[str, Any]]:
                conn = http.client.HTTPConnection("127.0.0.1", ports["alertmanager"], timeout=2)
                conn.request("GET", "/api/v2/alerts")
                found: list[dict[str, Any]] = json.loads(conn.getresponse().read())
                return found

            deadline = time.monotonic() + 15
            while True:
                unit_down = [
                    a
                    for a in alerts()
                    if a["labels"]["alertname"] == "HxpUnitDown" and a["labels"]["host"] == "m1"
                ]
                if len(unit_down) == 2:
                    break
                assert time.monotonic() < deadline, alerts()
                time.sleep(0.2)
            # the unit alerts of the dead host are held back while HxpHostDown fires
            assert all(a["status"]["state"] == "suppressed" for a in unit_down), unit_down
            assert all(a["status"]["inhibitedBy"] for a in unit_down), unit_down
            assert not hook.has("HxpUnitDown", "firing", host="m1")
            assert not hook.has("HxpHostDown", "firing", host="m2")
            link(fleet.lab, "m1", True)
            back_at = time.monotonic()
            while not hook.has("HxpHostDown", "resolved", host="m1"):
                assert time.monotonic() - back_at < 30, hook.alerts()
                time.sleep(0.1)
    # Prometheus needs up == 0 from a scrape (at most one interval, plus a scrape timeout),
    # a rule evaluation, `for`, another evaluation, then Alertmanager's group_wait.
    bound = 2 * SCRAPE + SCRAPE + DOWN_FOR + GROUP_WAIT
    print(f"\nHxpHostDown at the webhook {fired:.2f}s after m1's link went down "
          f"(two scrape intervals + for + group_wait = {bound:.1f}s)")  # fmt: skip
    assert fired < bound + 4.0  # slack for a loaded 2-core machine
