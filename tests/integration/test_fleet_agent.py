"""An agent host of the fleet lab: a Prefect process worker living inside the host's network
namespace takes the host's part of a `dispatch: true` deploy, so the process backend runs the
unit on that host (its loopback, its address), not on the orchestrator's machine."""

from __future__ import annotations

import socket
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from hxp.backends.runners import SshRunner
from tests.support.fleet_lab import FleetLab, LabState, lab_available

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("prefect_server")]

STACK = """\
stack: agentdemo
hosts:
  a: {{backend: process, work_pool: {pool}, address: {address}}}
deploy: {{bake: 500ms}}
services:
  web:
    host: a
    # Listens on every interface of its host: the orchestrator reaches it at the host's address
    # (hxp.endpoints.reach_health), as would a gateway on another host.
    command: [{py}, -m, http.server, "{port}", --bind, 0.0.0.0]
    ports: {{http: {port}}}
    health: {{http: {{url: "http://127.0.0.1:{port}/"}}, interval: 500ms, retries: 3}}
"""


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[FleetLab, LabState]]:
    why = lab_available()
    if why is not None:
        pytest.skip(why)
    made = FleetLab("agent", tmp_path_factory.mktemp("lab"))
    state = made.up([("a", "agent")])
    try:
        yield made, state
    finally:
        made.down()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def serves_here(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(1)
        return s.connect_ex(("127.0.0.1", port)) == 0


def test_the_worker_on_the_agent_host_runs_its_units_there(
    lab: tuple[FleetLab, LabState], prefect_server: str, tmp_path: Path
) -> None:
    from prefect import get_client
    from prefect.client.schemas.actions import WorkPoolCreate

    from flows.deploy import deploy_stack

    made, state = lab
    host = state.host("a")
    pool = "hxl-agent-a"
    port = free_port()
    path = tmp_path / "stack.yaml"
    path.write_text(STACK.format(pool=pool, address=host.address, py=sys.executable, port=port))
    with get_client(sync_client=True) as client:
        client.create_work_pool(WorkPoolCreate(name=pool, type="process"), overwrite=True)
    log = tmp_path / "worker.log"
    made.start_agent(state, "a", prefect_server, pool, tmp_path / "agent-state", log)
    try:
        result = deploy_stack([str(path)], dispatch=True)
    except BaseException:
        print(log.read_text(errors="replace")[-3000:])
        raise
    assert [(p["host"], sorted(p["units"])) for p in result["dispatched"]] == [("a", ["web"])]
    # The unit runs on the agent host: reachable over SSH there, not on this machine's loopback.
    runner = SshRunner(
        host.address, "root", identity_file=state.client_key, known_hosts=state.known_hosts
    )
    probe = (
        f"import urllib.request; print(urllib.request.urlopen('http://127.0.0.1:{port}/').status)"
    )
    assert runner.run([sys.executable, "-c", probe]).text.strip() == "200"
    assert not serves_here(port)
    # The agent host's own store recorded the deploy.
    from hxp.store import Store

    assert Store(tmp_path / "agent-state").deploys("agentdemo")[0].status == "succeeded"
