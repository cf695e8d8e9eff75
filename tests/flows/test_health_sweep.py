"""`health-sweep` on the Prefect test server: artifacts, one event per change, gauges on a real
Pushgateway, state kept across runs; and failover behind real nginx under load."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from hxp.backends.base import Remove, Start, Stop, UnitRef
from hxp.backends.process import ProcessBackend
from hxp.config import load_config
from hxp.io.gateway import NginxGateway
from hxp.store import Store
from tests.integration.test_health_targets import listening, remove_all, start_all
from tests.support.loadgen import BackgroundLoad
from tests.support.stacks import free_port, free_range, sim_fleet, web_stack
from tests.support.waiting import wait_for

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("prefect_server")]


def sweep(path: Path, state: Path, **kwargs: Any) -> dict[str, Any]:
    from flows.health import run_health_sweep

    result: dict[str, Any] = run_health_sweep(str(path), state_dir=str(state), **kwargs)
    return result


def read_events(prefix: str, resource_prefix: str) -> list[Any]:
    from prefect.client.orchestration import get_client
    from prefect.events.filters import EventFilter, EventNameFilter, EventResourceFilter

    with get_client(sync_client=True) as client:
        page = client.read_events(
            EventFilter(
                event=EventNameFilter(prefix=[prefix]),
                resource=EventResourceFilter(id_prefix=[resource_prefix]),
            ),
            limit=50,
        )
    return sorted(page.events, key=lambda e: e.occurred)


def read_artifacts(key: str, limit: int = 1) -> list[Any]:
    """The artifacts (versions) of a key, newest first."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey
    from prefect.client.schemas.sorting import ArtifactSort

    with get_client(sync_client=True) as client:
        return client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key])),
            sort=ArtifactSort.CREATED_DESC,
            limit=limit,
        )


def read_artifact(key: str) -> Any:
    found = read_artifacts(key)
    return found[0] if found else None


@pytest.fixture
def pushgateway(tmp_path: Path) -> Iterator[str]:
    port = free_port()
    proc = subprocess.Popen(
        ["prometheus-pushgateway", f"--web.listen-address=127.0.0.1:{port}"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"

    def ready() -> bool:
        try:
            return httpx.get(url + "/-/ready", timeout=1).status_code == 200
        except httpx.TransportError:
            return False

    wait_for(ready, "the pushgateway")
    yield url
    proc.terminate()
    proc.wait(10)


def test_sweep_flow_reports_changes_once_and_pushes_gauges(
    tmp_path: Path, pushgateway: str
) -> None:
    path, ports = web_stack(tmp_path, "hf")
    stack = load_config([path], {}).stack
    state = tmp_path / "state"

    backend = start_all(stack, state)
    try:
        first = sweep(path, state, pushgateway_url=pushgateway)
        assert first["status"] == "healthy"
        assert first["transitions"] == []
        backend.apply(Stop(UnitRef("hf", "db", "db"), grace_seconds=2))
        damped = sweep(path, state, pushgateway_url=pushgateway)  # flap_threshold 2: not yet
        assert damped["units"]["db"]["status"] == "healthy"
        down = sweep(path, state, pushgateway_url=pushgateway)
        assert down["status"] == "unhealthy"
        assert [(t["unit"], t["event"]) for t in down["transitions"]] == [
            ("db", "hxp.health.unhealthy"),
            ("cache", "hxp.health.degraded"),
            ("api", "hxp.health.degraded"),
        ]
        again = sweep(path, state, pushgateway_url=pushgateway)
        assert again["status"] == "unhealthy"
        assert again["transitions"] == []  # the store remembers: no second event

        metrics = httpx.get(pushgateway + "/metrics", timeout=5).text
        assert (
            'hxp_unit_health{instance="",job="hxp-health",layer="composite",stack="hf",unit="db"} 0'
            in metrics
        )
        assert 'job="hxp-health",layer="backend",stack="hf",unit="db"} 0' in metrics
        assert 'job="hxp-health",layer="composite",stack="hf",unit="api"} 0.5' in metrics
        assert 'job="hxp-health",layer="http",stack="hf",unit="api"} 1' in metrics

        backend.apply(Start(UnitRef("hf", "db", "db")))
        wait_for(lambda: listening(ports["db"]), "db up")
        sweep(path, state, flap_threshold=1)
        events = wait_for(
            lambda: (
                found if len(found := read_events("hxp.health.", "hxp.unit.hf.")) >= 6 else None
            ),
            "the events",
        )
        got = [(e.event, e.resource.id) for e in events]
        assert got.count(("hxp.health.unhealthy", "hxp.unit.hf.db")) == 1
        assert got.count(("hxp.health.degraded", "hxp.unit.hf.api")) == 1
        assert got.count(("hxp.health.recovered", "hxp.unit.hf.db")) == 1
        assert len(got) == 6
        down_event = next(e for e in events if e.event == "hxp.health.unhealthy")
        assert down_event.payload["before"] == "healthy"
        assert "not running" in down_event.payload["reason"]

        table = read_artifact("health-hf")
        assert table is not None
        rows = json.loads(table.data) if isinstance(table.data, str) else table.data
        assert {r["unit"]: r["status"] for r in rows} == {
            "db": "healthy",
            "cache": "healthy",
            "api": "healthy",
        }
        summary = read_artifact("health-summary-hf")
        assert summary is not None
        assert "Health of stack `hf`: **healthy**" in summary.data
        assert "`db`: unhealthy → **healthy** (`hxp.health.recovered`)" in summary.data

        # Nothing changed: a new summary, but no new table (the last one still says it all)
        tables = len(read_artifacts("health-hf", limit=50))
        summaries = len(read_artifacts("health-summary-hf", limit=50))
        sweep(path, state, flap_threshold=1)
        assert len(read_artifacts("health-summary-hf", limit=50)) == summaries + 1
        assert len(read_artifacts("health-hf", limit=50)) == tables
        assert "The table artifact is unchanged since" in read_artifact("health-summary-hf").data
    finally:
        remove_all(backend, "hf")


# ---------------------------------------------------------------- failover behind nginx

REPLICAS = 3
REQUESTS = 12_000


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[tuple[Path, Path, str]]:
    base, gateway = free_range(2 * REPLICAS), free_port()
    path = sim_fleet(
        tmp_path / "fleet.yaml",
        "fo",
        base,
        gateway,
        replicas=REPLICAS,
        revision=None,
        stop_timeout="2s",
    )
    state = tmp_path / "state"
    yield path, state, f"http://127.0.0.1:{gateway}"
    stack = load_config([path], {}).stack
    assert stack.gateway is not None
    NginxGateway(state, "fo", stack.gateway).stop()
    backend = ProcessBackend(state)
    for name in backend.observe("fo"):
        pid = child_pid(state, name)
        if pid:
            os.kill(pid, signal.SIGCONT)
        backend.apply(Remove(UnitRef("fo", name, name)))


def child_pid(state: Path, instance: str) -> int | None:
    """The pid of an instance's process (not its supervisor's)."""
    record = json.loads(
        (ProcessBackend(state).root / "fo" / instance / "supervisor.json").read_text()
    )
    pid = record.get("child_pid")
    return int(pid) if pid else None


def test_failover_takes_a_hung_replica_out_and_back_under_load(fleet: Any) -> None:
    from flows.deploy import deploy_stack

    path, state, url = fleet
    deploy_stack([str(path)], state_dir=str(state))
    stack = load_config([path], {}).stack
    assert stack.gateway is not None
    gateway = NginxGateway(state, "fo", stack.gateway)
    ports = {f"chat-{i}": stack.models["chat"].port + i for i in range(REPLICAS)}
    assert sorted(gateway.live()["chat"]) == sorted(ports.values())

    load = BackgroundLoad(url, "chat", REQUESTS, concurrency=16).start()
    time.sleep(1.0)
    hung = child_pid(state, "chat-1")
    assert hung is not None
    os.kill(hung, signal.SIGSTOP)  # hung: accepts connections, answers nothing
    stopped_at = time.monotonic()
    try:
        out = sweep(path, state, flap_threshold=1)
        took = time.monotonic() - stopped_at
        assert out["instances"]["chat-1"] == "unhealthy"
        assert out["units"]["chat"]["status"] == "degraded"
        assert out["routes"][0]["removed"] == ["chat-1"]
        assert sorted(gateway.live()["chat"]) == [ports["chat-0"], ports["chat-2"]]
        assert Store(state).health_state("fo")[0]["chat-1"].ejected
        assert load._thread.is_alive(), "the load ended before the failover: raise REQUESTS"
        time.sleep(1.5)  # traffic flows around it
    finally:
        os.kill(hung, signal.SIGCONT)
    back = sweep(path, state, flap_threshold=1)
    assert back["routes"][0]["restored"] == ["chat-1"]
    assert sorted(gateway.live()["chat"]) == sorted(ports.values())
    assert back["units"]["chat"]["status"] == "healthy"
    result = load.join()
    print(
        f"\nfailover: chat-1 hung, out of the upstream {took:.2f}s later (one sweep), back "
        f"after SIGCONT; {result.sent} requests at {result.rate:.0f}/s, {result.failed} failed"
    )
    assert result.sent == REQUESTS
    assert result.failed == 0, result.errors
    assert result.served_by["chat"] == REQUESTS

    events = wait_for(
        lambda: (
            found
            if len(found := read_events("hxp.health.replica-", "hxp.unit.fo.chat")) >= 2
            else None
        ),
        "the replica events",
    )
    assert [(e.event, e.payload["instance"]) for e in events] == [
        ("hxp.health.replica-removed", "chat-1"),
        ("hxp.health.replica-restored", "chat-1"),
    ]

    # Every replica hung: the gateway keeps them all, and the sweep alerts instead.
    pids = [child_pid(state, name) for name in ports]
    for pid in pids:
        assert pid is not None
        os.kill(pid, signal.SIGSTOP)
    try:
        alert = sweep(path, state, flap_threshold=1)
    finally:
        for pid in pids:
            assert pid is not None
            os.kill(pid, signal.SIGCONT)
    assert alert["units"]["chat"]["status"] == "unhealthy"
    assert alert["routes"][0]["removed"] == []
    assert "keeps its last replica" in alert["routes"][0]["alert"]
    assert any(n.startswith("ALERT chat: every replica") for n in alert["notes"])
    assert sorted(gateway.live()["chat"]) == sorted(ports.values())
    last = wait_for(lambda: read_events("hxp.health.last-replica", "hxp.unit.fo.chat"), "alert")
    assert "every replica of chat" in last[0].payload["alert"]


def test_a_sweep_run_reads_no_result_storage_and_returns_read_only_maps(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A sweep runs every 30 s: starting its flow run asks the server nothing about result
    storage (Prefect would, three times per run, without the flow's own result settings), and
    its per-unit maps come back as read-only mappings Prefect does not walk item by item."""
    import pickle
    import socket
    from collections.abc import Mapping

    import prefect.results

    asked: list[str] = []

    def sync_read() -> None:
        asked.append("sync")
        return None

    async def async_read() -> None:
        asked.append("async")
        return None

    monkeypatch.setattr(prefect.results, "_read_server_default_result_storage_block_id", sync_read)
    monkeypatch.setattr(
        prefect.results, "_aread_server_default_result_storage_block_id", async_read
    )
    listeners = {name: socket.create_server(("127.0.0.1", 0)) for name in ("a", "b")}
    path = tmp_path / "stack.yaml"
    path.write_text(
        json.dumps(
            {
                "stack": "rs",
                "hosts": {"local": {"backend": "process"}},
                "services": {
                    name: {
                        "host": "local",
                        "command": ["sleep", "60"],
                        "ports": {"tcp": sock.getsockname()[1]},
                        "health": {"tcp": {"port": sock.getsockname()[1]}},
                    }
                    for name, sock in listeners.items()
                },
            }
        )
    )
    try:
        out = sweep(path, tmp_path / "state", observe=False)
    finally:
        for sock in listeners.values():
            sock.close()
    assert asked == []
    assert out["status"] == "healthy", out
    for key in ("units", "instances"):
        assert isinstance(out[key], Mapping)
        assert not isinstance(out[key], dict)
    assert sorted(out["instances"]) == ["a", "b"]
    assert out["instances"]["a"] == "healthy"
    assert out["units"].get("b")["status"] == "healthy"
    assert dict(pickle.loads(pickle.dumps(out["units"]))) == dict(out["units"])
