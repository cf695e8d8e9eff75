"""A three-host stack on the fleet lab, deployed through one Prefect server: a Docker host and a
systemd host driven over SSH (by a worker on the orchestrator's machine), and an agent host whose
worker lives inside its namespace. apply, apply again (nothing changes), a change, and a failed
change rolled back; units are reached by their hosts' addresses (the readiness gates probe
them there) and `hxp status` shows each unit with its host's address."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from hxp.store import Store
from tests.support.docker_engine import BUSYBOX_IMAGE, build_busybox_image
from tests.support.fleet_lab import FleetLab, LabState, lab_available
from tests.support.workers import start_worker, stop_worker

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("prefect_server")]

ROOT = Path(__file__).resolve().parents[2]
WEB, API = 18080, 18081  # ports inside the lab hosts' own namespaces


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[FleetLab, LabState]]:
    why = lab_available()
    if why is not None:
        pytest.skip(why)
    made = FleetLab("three", tmp_path_factory.mktemp("lab"))
    state = made.up([("dock", "docker"), ("sysd", "systemd"), ("agent", "agent")])
    try:
        build_busybox_image(f"unix://{state.host('dock').docker_socket}")
        yield made, state
    finally:
        made.down()


def stack_file(state: LabState, path: Path, version: str, web_command: list[str]) -> Path:
    data = {
        "stack": "three",
        "hosts": {
            "dock": state.ssh_host_entry("dock", work_pool="hxl-three-here"),
            "sysd": state.ssh_host_entry("sysd", work_pool="hxl-three-here"),
            "agent": {
                "backend": "process",
                "address": state.host("agent").address,
                "work_pool": "hxl-three-agent",
            },
        },
        "services": {
            "web": {
                "host": "dock",
                "image": BUSYBOX_IMAGE,
                "command": web_command,
                "ports": {"http": WEB},
                "env": {"V": version},
                "stop_timeout": "1s",
                # declared on loopback: "on the unit's host"; probed at the host's address
                "health": {"tcp": {"port": WEB}, "interval": "300ms", "start_period": "5s"},
            },
            "svc": {
                "host": "sysd",
                "command": ["/bin/sleep", "3600"],
                "user": "root",
                "env": {"V": version},
                "stop_timeout": "1s",
            },
            "api": {
                "host": "agent",
                "command": [sys.executable, "-m", "http.server", str(API), "--bind", "0.0.0.0"],
                "ports": {"http": API},
                "env": {"V": version},
                "health": {
                    "http": {"url": f"http://127.0.0.1:{API}/"},
                    "interval": "300ms",
                    "start_period": "5s",
                },
            },
        },
    }
    path.write_text(yaml.safe_dump(data))
    return path


def serves(address: str, port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(2)
        return s.connect_ex((address, port)) == 0


def hxp(*args: str, state: Path) -> subprocess.CompletedProcess[str]:
    from prefect.settings import PREFECT_API_URL

    env = {**os.environ, "PREFECT_API_URL": str(PREFECT_API_URL.value())}
    env["HXP_STATE_DIR"] = str(state)
    return subprocess.run(
        [sys.executable, "-m", "hxp_cli", *args],
        cwd=ROOT,
        env=env,
        text=True,
        capture_output=True,
        timeout=300,
        check=False,
    )


def test_apply_noop_change_and_failed_change_on_three_hosts(
    lab: tuple[FleetLab, LabState], prefect_server: str, tmp_path: Path
) -> None:
    from prefect import get_client
    from prefect.client.schemas.actions import WorkPoolCreate

    from flows.deploy import deploy_stack
    from hxp.errors import HxpError

    made, state = lab
    here_state, agent_state = tmp_path / "here", tmp_path / "agent"
    with get_client(sync_client=True) as client:
        for pool in ("hxl-three-here", "hxl-three-agent"):
            client.create_work_pool(WorkPoolCreate(name=pool, type="process"), overwrite=True)
    logs = tmp_path / "here-worker.log", tmp_path / "agent-worker.log"
    here = start_worker(prefect_server, "hxl-three-here", here_state, logs[0])
    made.start_agent(state, "agent", prefect_server, "hxl-three-agent", agent_state, logs[1])
    addr = {h: state.host(h).address for h in ("dock", "sysd", "agent")}
    httpd = ["httpd", "-f", "-p", str(WEB)]
    v1 = stack_file(state, tmp_path / "v1.yaml", "1", httpd)
    v2 = stack_file(state, tmp_path / "v2.yaml", "2", httpd)
    bad = stack_file(state, tmp_path / "bad.yaml", "3", ["/bin/false"])

    def deploy(path: Path) -> dict[str, Any]:
        try:
            return deploy_stack([str(path)], dispatch=True)
        except BaseException:
            for log in logs:
                print(log.read_text(errors="replace")[-4000:])
            raise

    def changed(result: dict[str, Any]) -> list[bool]:
        """Whether each host's part (dock, sysd: the worker here; api: the agent's) changed
        anything, from the store of the worker that ran it (a part's result stays there)."""
        assert sorted(p["host"] for p in result["dispatched"]) == ["agent", "dock", "sysd"]
        newest = [*Store(here_state).deploys("three", 2), *Store(agent_state).deploys("three", 1)]
        assert [d.status for d in newest] == ["succeeded"] * 3
        return [bool((d.result or {}).get("changes")) for d in newest]

    try:
        assert changed(deploy(v1)) == [True, True, True]
        assert serves(addr["dock"], WEB)
        assert serves(addr["agent"], API)  # reached at the agent host's address from here
        assert changed(deploy(v1)) == [False, False, False]
        assert changed(deploy(v2)) == [True, True, True]

        with pytest.raises(HxpError, match="multi-host deploy failed on dock"):
            deploy_stack([str(bad)], units=["web"], dispatch=True)
        (failed,) = Store(here_state).deploys("three", 1)
        assert failed.status != "succeeded"
        assert serves(addr["dock"], WEB)  # the previous version is back and serving
        assert changed(deploy(v2)) == [False, False, False]

        status = hxp("status", "-f", str(v2), "--json", state=here_state)
        rows = {r["instance"]: r for r in json.loads(status.stdout)}
        assert rows["web"]["endpoint"] == f"{addr['dock']}:{WEB}"
        assert rows["svc"]["endpoint"] == addr["sysd"]
        assert rows["api"]["endpoint"] == f"{addr['agent']}:{API}"
        assert (rows["web"]["state"], rows["web"]["config"]) == ("running", "current")
        assert (rows["svc"]["state"], rows["svc"]["config"]) == ("running", "current")
        text = hxp("status", "-f", str(v2), state=here_state).stdout
        assert f"{addr['dock']}:{WEB}" in text
    finally:
        stop_worker(here)
        for part in (here_state, agent_state):
            subprocess.run(
                [sys.executable, "-m", "hxp_cli", "down", "-f", str(v2)],
                cwd=ROOT,
                env={**os.environ, "HXP_STATE_DIR": str(part), "PREFECT_API_URL": prefect_server},
                capture_output=True,
                timeout=300,
                check=False,
            )
