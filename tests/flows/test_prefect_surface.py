"""The Prefect product surface end to end: `prefect deploy --all` from prefect.yaml against a
Prefect server, a process worker, the CI release event fired the three ways CI fires it, the
health automation starting the recovery deployment, and a two-host deploy dispatched to two
workers (one work pool per host)."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest

from hxp.backends.base import Remove, UnitRef
from hxp.backends.process import ProcessBackend
from hxp.store import Store
from tests.support.stacks import free_port, web_stack
from tests.support.workers import prefect_cli, start_worker, stop_worker, wait_for

pytestmark = [pytest.mark.slow]
RUN_TIMEOUT = 60.0


def _remove_all(state: Path, stack: str) -> None:
    backend = ProcessBackend(state)
    for name in backend.observe(stack):
        backend.apply(Remove(UnitRef(stack, name, name)))


def _deployment(name: str) -> Any:
    from prefect import get_client

    with get_client(sync_client=True) as client:
        return client.read_deployment_by_name(name)


def _runs(deployment_id: uuid.UUID) -> list[Any]:
    from prefect import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId

    with get_client(sync_client=True) as client:
        return list(
            client.read_flow_runs(
                deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment_id]))
            )
        )


def _finished_run(deployment_id: uuid.UUID, known: set[uuid.UUID], log: Path) -> Any:
    """The next run of a deployment (one not in `known`) once it is final."""

    def final() -> Any:
        for run in _runs(deployment_id):
            if run.id not in known and run.state is not None and run.state.is_final():
                return run
        return None

    run = wait_for("a flow run of the deployment to finish", final, RUN_TIMEOUT, log)
    known.add(run.id)
    return run


@pytest.fixture(scope="module")
def deployed(prefect_server: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """prefect.yaml deployed with the CLI, and one worker on the pool `hxp-local`."""
    from prefect import get_client
    from prefect.client.schemas.actions import WorkPoolCreate

    tmp = tmp_path_factory.mktemp("surface")
    state = tmp / "state"
    log = tmp / "worker.log"
    with get_client(sync_client=True) as client:
        client.create_work_pool(WorkPoolCreate(name="hxp-local", type="process"), overwrite=True)
    started = time.monotonic()
    prefect_cli(prefect_server, "deploy", "--all")
    deploy_seconds = time.monotonic() - started
    # This worker runs deploys and lifecycle actions; the scheduled sweeps sit on the
    # `frequent` queue, which it leaves alone.
    worker = start_worker(prefect_server, "hxp-local", state, log, queue="default")
    try:
        yield {
            "api": prefect_server,
            "tmp": tmp,
            "state": state,
            "log": log,
            "deploy": deploy_seconds,
        }
    finally:
        stop_worker(worker)
        with get_client(sync_client=True) as client:
            for automation in client.read_automations():
                if automation.name.split("__")[0] in {"ci-release", "recover", "reconcile"}:
                    client.delete_automation(automation.id)
        for stack in ("ci", "demo"):
            _remove_all(state, stack)


def test_prefect_deploy_all_registers_every_deployment(deployed: Any) -> None:
    out = prefect_cli(deployed["api"], "deployment", "ls")
    for name in [
        "deploy-stack/apply",
        "deploy-service/apply",
        "deploy-service/model",
        "deploy-service/ci-release",
        "deploy-monitoring/apply",
        "rollback/manual",
        "finish-interrupted/reconcile",
        "health-sweep/every-30s",
        "aggregate-metrics/every-15s",
        "restart-stack/rolling",
        "restart-service/recover",
    ]:
        assert name in out
    sweep = _deployment("health-sweep/every-30s")
    assert [s.schedule.interval.total_seconds() for s in sweep.schedules] == [30.0]
    assert sweep.work_queue_name == "frequent"
    apply = _deployment("deploy-stack/apply")
    assert apply.global_concurrency_limit.limit == 1
    assert apply.concurrency_options.collision_strategy == "ENQUEUE"
    assert sweep.concurrency_options.collision_strategy == "CANCEL_NEW"


def test_ci_release_event_deploys_the_unit_three_ways(deployed: Any) -> None:
    """`prefect event emit`, `POST /api/events`, `prefect deployment run`: each makes one
    deploy-service run with the release's parameters, and each completes."""
    path, ports = web_stack(deployed["tmp"], "ci")
    files = [str(path)]
    release = _deployment("deploy-service/ci-release")
    known = {r.id for r in _runs(release.id)}

    prefect_cli(
        deployed["api"],
        "event",
        "emit",
        "hxp.ci.release",
        "--resource",
        json.dumps({"prefect.resource.id": "hxp.unit.db"}),
        "--payload",
        json.dumps({"version": "1.0.1", "stack_files": files}),
    )
    run = _finished_run(release.id, known, deployed["log"])
    assert run.state.is_completed(), run.state
    assert run.parameters["service"] == "db"
    assert run.parameters["version"] == "1.0.1"
    assert run.parameters["image"] is None
    assert run.parameters["stack_files"] == files

    event = {
        "id": str(uuid.uuid4()),
        "occurred": datetime.now(UTC).isoformat(),
        "event": "hxp.ci.release",
        "resource": {"prefect.resource.id": "hxp.unit.db"},
        "payload": {"version": "1.0.2", "stack_files": files},
    }
    response = httpx.post(f"{deployed['api']}/events", json=[event], timeout=10)
    assert response.status_code == 204, response.text
    run = _finished_run(release.id, known, deployed["log"])
    assert run.state.is_completed(), run.state
    assert (run.parameters["service"], run.parameters["version"]) == ("db", "1.0.2")

    prefect_cli(
        deployed["api"],
        "deployment",
        "run",
        "deploy-service/ci-release",
        "--param",
        "service=db",
        "--param",
        "version=1.0.3",
        "--param",
        f"stack_files={json.dumps(files)}",
    )
    run = _finished_run(release.id, known, deployed["log"])
    assert run.state.is_completed(), run.state
    assert run.parameters["version"] == "1.0.3"

    # Three releases, three revisions of db, the last one running with its version.
    revisions = Store(deployed["state"]).revisions("ci", "db")
    assert [r.status for r in revisions][-3:] == ["good", "good", "good"], revisions
    seen = ProcessBackend(deployed["state"]).observe("ci")["db"]
    assert seen.running
    assert httpx.get(f"http://127.0.0.1:{ports['db']}/", timeout=2).status_code == 200


def test_unhealthy_event_runs_the_recovery_deployment(deployed: Any) -> None:
    """The sweep's `hxp.health.unhealthy` for unit db of stack demo restarts db on the worker."""
    from prefect import get_client
    from prefect.client.schemas.actions import DeploymentUpdate
    from prefect.events import emit_event

    from flows.deploy import deploy_service
    from flows.health import resource

    path, _ = web_stack(deployed["tmp"], "demo")
    deploy_service([str(path)], "db", state_dir=str(deployed["state"]))
    recover = _deployment("restart-service/recover")
    # One recovery deployment per stack: point this one at the test's stack file.
    with get_client(sync_client=True) as client:
        client.update_deployment(
            recover.id,
            DeploymentUpdate(parameters={**recover.parameters, "stack_files": [str(path)]}),
        )
    known = {r.id for r in _runs(recover.id)}
    emitted = emit_event(
        event="hxp.health.unhealthy",
        resource=resource("demo", "db"),
        payload={"before": "healthy", "after": "unhealthy", "reason": "http: refused"},
    )
    assert emitted is not None
    run = _finished_run(recover.id, known, deployed["log"])
    assert run.parameters["service"] == "db"
    assert run.state.is_completed(), run.state
    assert ProcessBackend(deployed["state"]).observe("demo")["db"].running


TWO_HOSTS = """\
stack: pair
hosts:
  a: {{backend: process, work_pool: hxp-host-a}}
  b: {{backend: process, work_pool: hxp-host-b}}
deploy: {{bake: 500ms}}
services:
  db:
    host: a
    command: [{py}, -m, http.server, "{db}", --bind, 127.0.0.1]
    ports: {{http: {db}}}
    health: {{http: {{url: "http://127.0.0.1:{db}/"}}, interval: 500ms, retries: 3}}
  api:
    host: b
    depends_on: [db]
    command: [{py}, -m, http.server, "{api}", --bind, 127.0.0.1]
    ports: {{http: {api}}}
    health: {{http: {{url: "http://127.0.0.1:{api}/"}}, interval: 500ms, retries: 3}}
"""


def test_two_hosts_each_deployed_by_its_own_worker(prefect_server: str, tmp_path: Path) -> None:
    """deploy-stack with dispatch: db goes to host a's worker, then api to host b's."""
    import sys

    from prefect import get_client
    from prefect.client.schemas.actions import WorkPoolCreate

    from flows.deploy import deploy_stack

    ports = {"db": free_port(), "api": free_port()}
    path = tmp_path / "pair.yaml"
    path.write_text(TWO_HOSTS.format(py=sys.executable, **ports))
    states = {h: tmp_path / f"state-{h}" for h in "ab"}
    logs = {h: tmp_path / f"worker-{h}.log" for h in "ab"}
    with get_client(sync_client=True) as client:
        for h in "ab":
            client.create_work_pool(
                WorkPoolCreate(name=f"hxp-host-{h}", type="process"), overwrite=True
            )
    workers = {h: start_worker(prefect_server, f"hxp-host-{h}", states[h], logs[h]) for h in "ab"}
    try:
        result = deploy_stack([str(path)], dispatch=True)
    except BaseException:
        for h in "ab":
            print(logs[h].read_text(errors="replace")[-3000:])
        raise
    finally:
        for proc in workers.values():
            stop_worker(proc)
    try:
        assert [(p["host"], sorted(p["units"])) for p in result["dispatched"]] == [
            ("a", ["db"]),
            ("b", ["api"]),
        ]
        # Each host's store and processes hold only its own units.
        assert sorted(ProcessBackend(states["a"]).observe("pair")) == ["db"]
        assert sorted(ProcessBackend(states["b"]).observe("pair")) == ["api"]
        assert Store(states["a"]).deploys("pair")[0].status == "succeeded"
        assert Store(states["b"]).deploys("pair")[0].status == "succeeded"
        for port in ports.values():
            assert httpx.get(f"http://127.0.0.1:{port}/", timeout=2).status_code == 200
    finally:
        for state in states.values():
            _remove_all(state, "pair")


def test_a_host_whose_worker_is_gone_fails_the_dispatch_before_anything_changes(
    prefect_server: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Host b's pool has no worker: the deploy names b and its pool, and host a (whose worker
    runs) deployed nothing; without the check the run waited for ever for b's part."""
    import sys

    from prefect import get_client
    from prefect.client.schemas.actions import WorkPoolCreate

    import flows.deploy
    from flows.deploy import deploy_stack, pool_workers
    from hxp.endpoints import worker_absence
    from hxp.errors import HostUnreachableError

    monkeypatch.setattr(flows.deploy, "WORKER_WAIT", 3.0)
    ports = {"db": free_port(), "api": free_port()}
    path = tmp_path / "pair.yaml"
    # a pool no worker ever polled (hxp-host-b's worker of the test before may still count
    # as online for three heartbeat intervals after it stopped)
    pool_b = f"hxp-host-b-{uuid.uuid4().hex[:8]}"
    path.write_text(TWO_HOSTS.format(py=sys.executable, **ports).replace("hxp-host-b", pool_b))
    state_a = tmp_path / "state-a"
    with get_client(sync_client=True) as client:
        for name in ("hxp-host-a", pool_b):
            client.create_work_pool(WorkPoolCreate(name=name, type="process"), overwrite=True)
    worker = start_worker(prefect_server, "hxp-host-a", state_a, tmp_path / "worker-a.log")
    try:
        wait_for(
            "worker a online",
            lambda: worker_absence("hxp-host-a", pool_workers("hxp-host-a"), time.time()) is None,
            180,
            tmp_path / "worker-a.log",
        )
        started = time.monotonic()
        with pytest.raises(HostUnreachableError) as failed:
            deploy_stack([str(path)], dispatch=True)
        assert time.monotonic() - started < 90  # not the endless wait of before
    finally:
        stop_worker(worker)
    assert failed.value.host == "b"
    assert pool_b in str(failed.value)
    assert "host b (agent) unreachable: no worker" in str(failed.value)
    assert ProcessBackend(state_a).observe("pair") == {}
    assert Store(state_a).deploys("pair") == []


def _online_workers(
    api: str, tmp_path: Path, pools: dict[str, str], env: dict[str, str] | None = None
) -> dict[str, Any]:
    """Fresh process work pools, one worker each (its own state dir and log under tmp_path),
    returned once every one is online."""
    from prefect import get_client
    from prefect.client.schemas.actions import WorkPoolCreate

    from flows.deploy import pool_workers
    from hxp.endpoints import worker_absence

    with get_client(sync_client=True) as client:
        for pool in pools.values():
            client.create_work_pool(WorkPoolCreate(name=pool, type="process"), overwrite=True)
    workers = {
        h: start_worker(api, pool, tmp_path / f"state-{h}", tmp_path / f"worker-{h}.log", env=env)
        for h, pool in pools.items()
    }
    try:
        for h, pool in pools.items():
            wait_for(
                f"worker {h} online",
                lambda pool=pool: worker_absence(pool, pool_workers(pool), time.time()) is None,
                180,
                tmp_path / f"worker-{h}.log",
            )
    except BaseException:
        for proc in workers.values():
            stop_worker(proc)
        raise
    return workers


def _part_states(pool: str) -> list[Any]:
    """The state types of the host-part flow runs of work pool `pool`."""
    return [r.state.type for r in _runs(_deployment(f"deploy-stack/host-{pool}").id) if r.state]


def test_a_part_no_worker_picks_up_is_cancelled_and_fails_the_dispatch(
    prefect_server: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Host b's worker stopped a moment ago: Prefect still counts it online, so the preflight
    passes, but nobody polls b's pool. b's part is cancelled after PICKUP_WAIT and the deploy
    fails naming b and its pool (it used to wait for ever: CI hung there once)."""
    import sys

    from prefect.client.schemas.objects import StateType

    import flows.deploy
    from flows.deploy import deploy_stack, pool_workers
    from hxp.endpoints import worker_absence
    from hxp.errors import DeployError

    monkeypatch.setattr(flows.deploy, "PICKUP_WAIT", 3.0)
    tag = uuid.uuid4().hex[:8]
    pools = {h: f"hxp-host-{h}-{tag}" for h in "ab"}
    ports = {"db": free_port(), "api": free_port()}
    path = tmp_path / "pair.yaml"
    text = TWO_HOSTS.format(py=sys.executable, **ports)
    path.write_text(text.replace("hxp-host-a", pools["a"]).replace("hxp-host-b", pools["b"]))
    states = {h: tmp_path / f"state-{h}" for h in "ab"}
    workers = _online_workers(prefect_server, tmp_path, pools)
    try:
        stop_worker(workers["b"])
        # the premise: the stopped worker still counts as online
        assert worker_absence(pools["b"], pool_workers(pools["b"]), time.time()) is None
        started = time.monotonic()
        with pytest.raises(DeployError) as failed:
            deploy_stack([str(path)], dispatch=True)
        assert time.monotonic() - started < 90
    finally:
        for proc in workers.values():
            stop_worker(proc)
    message = str(failed.value)
    assert "failed on b: host b (agent) unreachable" in message
    assert f"no worker of work pool {pools['b']} picked up its part in 3s" in message
    assert "cancelled; nothing ran there" in message
    assert _part_states(pools["b"]) == [StateType.CANCELLED]
    assert ProcessBackend(states["b"]).observe("pair") == {}
    for state in states.values():
        _remove_all(state, "pair")


def test_a_part_whose_host_dies_while_it_runs_is_crashed_and_fails_the_dispatch(
    prefect_server: str, tmp_path: Path
) -> None:
    """Host b dies while its part runs (its worker and the part's process SIGKILLed, as when
    the machine goes): once b's worker has missed three heartbeats the part is marked crashed
    and the deploy fails naming b (it used to wait for ever: nothing marks such a run crashed)."""
    import sys

    import yaml
    from prefect.client.schemas.objects import StateType
    from prefect.exceptions import ObjectNotFound

    from flows.deploy import deploy_stack
    from hxp.errors import DeployError

    tag = uuid.uuid4().hex[:8]
    pools = {h: f"hxp-host-{h}-{tag}" for h in "ab"}
    text = TWO_HOSTS.format(py=sys.executable, db=free_port(), api=free_port())
    spec = yaml.safe_load(text.replace("hxp-host-a", pools["a"]).replace("hxp-host-b", pools["b"]))
    spec["stack"] = "gone"
    api = spec["services"]["api"]  # on b: runs, never ready (the gate waits its start_period)
    api["command"] = [sys.executable, "-c", "import time; time.sleep(600)"]
    api["health"].update(interval="1s", start_period="300s")
    path = tmp_path / "gone.yaml"
    path.write_text(yaml.safe_dump(spec))
    # a heartbeat every 2 s: b's worker counts as gone 6 s after it dies (30 s and 90 s by
    # default)
    beat = {"PREFECT_WORKER_HEARTBEAT_SECONDS": "2"}
    workers = _online_workers(prefect_server, tmp_path, pools, env=beat)

    def b_part_runs() -> bool:
        try:
            return StateType.RUNNING in _part_states(pools["b"])
        except ObjectNotFound:  # the part's deployment is made by the deploy
            return False

    def kill_b_when_its_part_runs() -> None:
        wait_for("b's part running", b_part_runs, 180, tmp_path / "worker-b.log")
        time.sleep(1.0)
        os.killpg(workers["b"].pid, signal.SIGKILL)  # the worker and the part's process

    try:
        killer = threading.Thread(target=kill_b_when_its_part_runs, daemon=True)
        killer.start()
        with pytest.raises(DeployError) as failed:
            deploy_stack([str(path)], dispatch=True)
        killer.join(5)
        assert workers["b"].poll() is not None, "b's worker was not killed before the failure"
    finally:
        for proc in workers.values():
            stop_worker(proc)
    message = str(failed.value)
    assert "multi-host deploy failed on b: " in message, message
    # hxp marks the part crashed once b's worker missed three heartbeats; when the part's run
    # was already marked crashed otherwise (seen once in a full run of this file), its state says so
    assert (
        f"host b (agent) unreachable: no worker of work pool {pools['b']} is online (last heartbeat"
        in message
        and "while its part ran" in message
    ) or "ended Crashed (its process died: check host b and its worker" in message, message
    assert _part_states(pools["b"]) == [StateType.CRASHED]
    for h in "ab":
        _remove_all(tmp_path / f"state-{h}", "gone")


def test_reconcile_flow_closes_a_deploy_whose_process_died(
    prefect_server: str, tmp_path: Path
) -> None:
    """What the automation on a failed/crashed deploy run starts: the interrupted deploy is
    closed (its changes rolled back), and a second run finds nothing to do."""
    from flows.deploy import finish_interrupted

    path, _ = web_stack(tmp_path, "gone")
    state = tmp_path / "state"
    deploy_id = Store(state).begin_deploy("gone", "deploy", "abc", None, "ci", None)
    result = finish_interrupted([str(path)], state_dir=str(state))
    assert Store(state).deploys("gone")[0].id == deploy_id
    assert Store(state).deploys("gone")[0].status == "interrupted"
    assert result["stack"] == "gone"
    assert finish_interrupted([str(path)], state_dir=str(state))["rolled_back"] == []
