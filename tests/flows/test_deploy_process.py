"""deploy-stack on the process backend: idempotence, fault injection with automatic rollback,
a killed orchestrator, and serialized concurrent applies. Real processes, real Prefect server."""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from hxp.backends.base import Remove, UnitRef
from hxp.backends.process import ProcessBackend
from hxp.errors import DeployError
from hxp.store import Store
from tests.support.orchestrator import hxp_process
from tests.support.stacks import web_stack

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("prefect_server")]


@pytest.fixture
def env(tmp_path: Path):  # type: ignore[no-untyped-def]
    path, ports = web_stack(tmp_path)
    state = tmp_path / "state"
    yield path, ports, state
    backend = ProcessBackend(state)
    for name in backend.observe("t"):
        backend.apply(Remove(UnitRef("t", name, name)))


def deploy(files: list[Path], state: Path, **kw: Any) -> dict[str, Any]:
    from flows.deploy import deploy_stack

    return deploy_stack([str(f) for f in files], state_dir=str(state), **kw)


def overlay(tmp: Path, name: str, text: str) -> Path:
    path = tmp / f"{name}.yaml"
    path.write_text(text)
    return path


def serving(port: int) -> bool:
    try:
        return httpx.get(f"http://127.0.0.1:{port}/", timeout=0.5).status_code == 200
    except httpx.HTTPError:
        return False


def assert_previous_back(state: Path, ports: dict[str, int], units: list[str]) -> None:
    seen = ProcessBackend(state).observe("t")
    store = Store(state)
    for unit in units:
        good = store.last_good("t", unit)
        assert good is not None
        assert seen[unit].running, seen[unit]
        assert seen[unit].config_hash == good.config_hash
        assert serving(ports[unit])


def test_apply_then_apply_again_changes_nothing(env) -> None:  # type: ignore[no-untyped-def]
    path, ports, state = env
    first = deploy([path], state)
    assert first["changed"] is True
    assert [a["kind"] for a in first["plan"]["actions"]] == ["create"] * 3
    assert first["plan"]["order"] == ["db", "cache", "api"]
    assert all(serving(p) for p in ports.values())
    second = deploy([path], state)
    assert second["changed"] is False
    assert {n["reason"] for n in second["plan"]["noops"]} == {"running, config hash unchanged"}
    store = Store(state)
    assert [d.status for d in store.deploys("t")] == ["succeeded", "succeeded"]
    assert {r.status for r in store.revisions("t")} == {"good"}


FAULTS = {
    "fails-to-start": "services:\n  api:\n    command: [/nonexistent/api-server]\n",
    "never-ready": (
        "services:\n  api:\n    env: {{VERSION: '2'}}\n    health:\n"
        "      http: {{url: 'http://127.0.0.1:{dead}/'}}\n      start_period: 0s\n"
    ),
    "crashes-after-2s": (
        'services:\n  api:\n    command: [{py}, -c, "import http.server as h, threading, os; '
        "s = h.HTTPServer(('127.0.0.1', {api}), h.SimpleHTTPRequestHandler); "
        'threading.Timer(2, lambda: os._exit(1)).start(); s.serve_forever()"]\n'
        "    health: {{min_ready: 3s}}\n"
    ),
}


@pytest.mark.parametrize("fault", sorted(FAULTS))
def test_failed_update_puts_the_previous_version_back(env, tmp_path: Path, fault: str) -> None:  # type: ignore[no-untyped-def]
    path, ports, state = env
    deploy([path], state)
    from tests.support.stacks import free_port

    bad = overlay(
        tmp_path, fault, FAULTS[fault].format(py=sys.executable, api=ports["api"], dead=free_port())
    )
    with pytest.raises(DeployError) as err:
        deploy([path, bad], state)
    message = str(err.value)
    assert "failed at api@local" in message
    assert "api: restored revision 1, healthy" in message
    assert_previous_back(state, ports, ["db", "cache", "api"])
    store = Store(state)
    last = store.deploys("t")[0]
    assert last.status == "failed"
    assert last.result is not None
    assert last.result["failed_unit"] == "api"
    assert [r.status for r in store.revisions("t", "api")] == ["good", "rolled-back"]
    # The stack is consistent: applying the good config again changes nothing.
    assert deploy([path], state)["changed"] is False


def test_a_restored_instance_takes_the_restart_counter_as_its_new_baseline(  # type: ignore[no-untyped-def]
    env, tmp_path: Path
) -> None:
    """The supervisor had counted api restarted once by its backend (baseline 1). The rollback
    starts the previous version afresh, which puts the backend's counter back to 0: that is
    the new baseline, or the restored api's next crash (counter at 1 again) would go unseen."""
    import dataclasses

    from hxp.lifecycle import CrashPolicy, supervise

    path, _ports, state = env
    deploy([path], state)
    store = Store(state)
    store.note_restarts("t", "api", 1)
    bad = overlay(tmp_path, "fails", FAULTS["fails-to-start"])
    with pytest.raises(DeployError, match="api: restored revision 1, healthy"):
        deploy([path, bad], state)

    seen = ProcessBackend(state).observe("t")["api"]
    record = store.lifecycle("t")["api"]
    assert seen.running
    assert record.restarts_seen == seen.restarts == 0
    # The restored api crashes once and its backend restarts it: a crash the supervisor sees.
    once = dataclasses.replace(seen, restarts=1)
    assert supervise(record, once, time.time(), CrashPolicy()).kind == "crashed"


def test_a_dependency_failing_mid_deploy_rolls_back_every_changed_unit(env, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    path, ports, state = env
    deploy([path], state)
    bad = overlay(
        tmp_path,
        "mid",
        "services:\n  db:\n    env: {VERSION: '2'}\n"
        "  cache:\n    command: [/nonexistent/cache]\n"
        "  api:\n    env: {VERSION: '2'}\n",
    )
    with pytest.raises(DeployError) as err:
        deploy([path, bad], state)
    assert "failed at cache@local" in str(err.value)
    assert "db: restored revision 1, healthy" in str(err.value)
    # api depends on cache: it was never touched.
    assert [r.status for r in Store(state).revisions("t", "api")] == ["good"]
    assert_previous_back(state, ports, ["db", "cache", "api"])


def test_first_deploy_failing_removes_what_it_created(env, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    path, _ports, state = env
    bad = overlay(tmp_path, "bad", "services:\n  api:\n    command: [/nonexistent/api]\n")
    with pytest.raises(DeployError, match="removed \\(created by this deploy\\)"):
        deploy([path, bad], state)
    assert ProcessBackend(state).observe("t") == {}


def test_an_unexpected_error_closes_the_deploy_record_failed(  # type: ignore[no-untyped-def]
    env, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An error no step expects, after the deploy record is begun, fails the run as before, but
    the record says `failed` with the error (not `running` until the next apply) and what the
    run changed is rolled back at once."""
    import flows.deploy

    path, ports, state = env
    deploy([path], state)

    def commit_fails(ctx: Any, outcome: Any) -> None:
        raise RuntimeError("the disk under the store is full")

    monkeypatch.setattr(flows.deploy, "commit_unit", commit_fails)
    v2 = overlay(tmp_path, "v2", "services:\n  api:\n    env: {VERSION: '2'}\n")
    with pytest.raises(RuntimeError, match="the disk under the store is full"):
        deploy([path, v2], state)

    store = Store(state)
    last = store.deploys("t")[0]
    assert last.status == "failed"
    assert last.result is not None
    assert last.result["reason"] == "RuntimeError: the disk under the store is full"
    assert last.result["rollback"] == ["api: restored revision 1, healthy"]
    assert store.unfinished_deploys("t") == []
    assert_previous_back(state, ports, ["db", "cache", "api"])
    monkeypatch.undo()
    again = deploy([path], state)
    assert again["changed"] is False
    assert [d.status for d in store.deploys("t")] == ["succeeded", "failed", "succeeded"]


hxp = hxp_process


def test_killed_orchestrator_is_reconciled_by_the_next_apply(env, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    path, ports, state = env
    deploy([path], state)
    good_hash = ProcessBackend(state).observe("t")["api"].config_hash
    # The new api serves, but on another port than its check: its gate waits a long time.
    from tests.support.stacks import free_port

    slow = overlay(
        tmp_path,
        "slow",
        f"services:\n  api:\n    env: {{VERSION: '2'}}\n    health:\n"
        f"      http: {{url: 'http://127.0.0.1:{free_port()}/'}}\n      start_period: 60s\n",
    )
    proc = hxp("apply", "-f", str(path), "-f", str(slow), state=state)
    deadline = time.monotonic() + 60
    while ProcessBackend(state).observe("t")["api"].config_hash == good_hash:
        assert proc.poll() is None, proc.stdout.read()  # type: ignore[union-attr]
        assert time.monotonic() < deadline, "the update never started"
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert Store(state).deploys("t")[0].status == "running"
    # The next apply of the same change: the interrupted run is closed, api is redone, fails
    # its gate (start_period cut short here) and the previous version comes back.
    cut = overlay(tmp_path, "cut", "services:\n  api:\n    health:\n      start_period: 0s\n")
    with pytest.raises(DeployError):
        deploy([path, slow, cut], state)
    statuses = [d.status for d in Store(state).deploys("t")]
    assert statuses[:3] == ["failed", "interrupted", "succeeded"]
    interrupted = Store(state).deploys("t")[1].result
    assert interrupted is not None
    assert "api: restored revision 1, healthy" in interrupted["rollback"]
    assert_previous_back(state, ports, ["db", "cache", "api"])


def test_two_concurrent_applies_are_serialized(env, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    path, _ports, state = env
    deploy([path], state)
    v2 = overlay(
        tmp_path, "v2", "services:\n  db:\n    env: {VERSION: '2'}\n    health: {min_ready: 4s}\n"
    )
    v3 = overlay(
        tmp_path, "v3", "services:\n  db:\n    env: {VERSION: '3'}\n    health: {min_ready: 4s}\n"
    )
    procs = [hxp("apply", "-f", str(path), "-f", str(v), state=state) for v in (v2, v3)]
    outputs = [p.communicate(timeout=240)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    runs = sorted(Store(state).deploys("t")[:2], key=lambda d: d.started_at)
    assert runs[0].finished_at is not None
    assert runs[0].finished_at <= runs[1].started_at, "the two deploys overlapped"
    assert any("waiting for the lock" in out for out in outputs)


def test_no_wait_fails_fast_when_locked(env, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from hxp.errors import LockedError
    from hxp.io.lock import stack_lock

    path, _, state = env
    with stack_lock(state, "t", "a test"):
        result: dict[str, Any] = {}

        def run() -> None:
            try:
                deploy([path], state, wait_for_lock=False)
            except LockedError as exc:
                result["error"] = str(exc)

        t = threading.Thread(target=run)
        t.start()
        t.join(60)
    assert "locked by a test" in result["error"]
