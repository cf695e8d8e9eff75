"""The process backend against real local processes: create, observe, update, restore, remove."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import httpx
import pytest

from hxp.backends.base import Commit, Create, Remove, Restore, Start, Stop, UnitRef, Update
from hxp.backends.process import ProcessBackend
from hxp.backends.supervisor import alive, start_ticks
from hxp.config import load_config
from hxp.errors import BackendError
from hxp.units import expand_units
from tests.support.stacks import web_stack


def wait_for(predicate, timeout: float = 10.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.05)


@pytest.fixture
def setup(tmp_path: Path):  # type: ignore[no-untyped-def]
    path, ports = web_stack(tmp_path)
    stack = load_config([path], {}).stack
    backend = ProcessBackend(tmp_path / "state")
    yield stack, backend, ports
    for name in backend.observe(stack.stack):
        backend.apply(Remove(UnitRef(stack.stack, name, name)))


def db(stack, overrides=()):  # type: ignore[no-untyped-def]
    return next(u for u in expand_units(stack, {"db"}))


def serving(port: int) -> bool:
    try:
        return httpx.get(f"http://127.0.0.1:{port}/", timeout=0.5).status_code == 200
    except httpx.HTTPError:
        return False


def test_create_observe_update_restore_commit_remove(setup, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    stack, backend, ports = setup
    unit = db(stack)
    ref = UnitRef.of(unit)
    assert backend.observe(stack.stack) == {}
    backend.apply(Create(unit, "hash-1", 1))
    wait_for(lambda: serving(ports["db"]))
    seen = backend.observe(stack.stack)["db"]
    assert (seen.running, seen.config_hash, seen.revision) == (True, "hash-1", 1)

    backend.apply(Update(unit, "hash-2", 2))
    wait_for(lambda: serving(ports["db"]))
    assert backend.observe(stack.stack)["db"].config_hash == "hash-2"
    assert (tmp_path / "state/process/t/db/previous/spec.json").exists()
    # A retried update keeps the real previous version.
    backend.apply(Update(unit, "hash-2", 2))
    backend.apply(Restore(ref))
    wait_for(lambda: serving(ports["db"]))
    seen = backend.observe(stack.stack)["db"]
    assert (seen.config_hash, seen.revision, seen.running) == ("hash-1", 1, True)

    backend.apply(Update(unit, "hash-3", 3))
    backend.apply(Commit(ref))
    assert not (tmp_path / "state/process/t/db/previous").exists()
    with pytest.raises(BackendError, match="no previous version"):
        backend.apply(Restore(ref))

    backend.apply(Stop(ref, 5))
    assert not backend.observe(stack.stack)["db"].running
    assert not serving(ports["db"])
    backend.apply(Start(ref))
    wait_for(lambda: serving(ports["db"]))
    backend.apply(Remove(ref))
    assert backend.observe(stack.stack) == {}
    assert not serving(ports["db"])


def test_logs_hold_the_programs_output(setup) -> None:  # type: ignore[no-untyped-def]
    stack, backend, ports = setup
    unit = db(stack)
    backend.apply(Create(unit, "h", 1))
    wait_for(lambda: serving(ports["db"]))
    httpx.get(f"http://127.0.0.1:{ports['db']}/nope")
    wait_for(lambda: any("GET /nope" in line for line in backend.logs(UnitRef.of(unit))))


def test_missing_program_is_a_permanent_error(setup, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    _stack, backend, _ = setup
    path, _ = web_stack(tmp_path, "u")
    bad = load_config([path], {}, ["services.db.command=[/nonexistent/prog]"]).stack
    with pytest.raises(BackendError, match="cannot start") as err:
        backend.apply(Create(db(bad), "h", 1))
    assert not err.value.transient


def test_a_crashed_program_is_restarted_by_its_supervisor(setup) -> None:  # type: ignore[no-untyped-def]
    stack, backend, ports = setup
    unit = db(stack)
    backend.apply(Create(unit, "h", 1))
    wait_for(lambda: serving(ports["db"]))
    import json

    sup = json.loads((backend.root / "t/db/supervisor.json").read_text())
    os.kill(sup["child_pid"], signal.SIGKILL)
    wait_for(lambda: backend.observe("t")["db"].detail.startswith("running, restarts 1"))
    wait_for(lambda: serving(ports["db"]))


def test_a_restarted_orchestrator_readopts_and_never_signals_a_recycled_pid(
    setup, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    stack, backend, ports = setup
    unit = db(stack)
    backend.apply(Create(unit, "h", 1))
    wait_for(lambda: serving(ports["db"]))
    # A new backend object (a new orchestrator process) sees the running unit.
    again = ProcessBackend(tmp_path / "state")
    assert again.observe("t")["db"].running
    # A pidfile naming a live pid with a different start time is not "ours".
    me = os.getpid()
    assert alive(me, start_ticks(me))
    assert not alive(me, (start_ticks(me) or 0) + 1)


def _supervisor_pid(backend: ProcessBackend) -> int:
    pid: int = json.loads((backend.root / "t/db/supervisor.json").read_text())["pid"]
    return pid


def test_supervisors_come_from_the_launcher_in_their_own_session(
    setup, monkeypatch, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    stack, backend, ports = setup
    unit = db(stack)
    monkeypatch.chdir(tmp_path)  # the launcher may have started in another directory
    monkeypatch.setenv("TZ", "UTC+3")  # one of the variables a supervisor passes on
    backend.apply(Create(unit, "h", 1))
    wait_for(lambda: serving(ports["db"]))
    pid = _supervisor_pid(backend)
    assert os.getpgid(pid) == pid  # its own group: the last resort killpg(pid) reaches it
    assert os.getsid(pid) == pid
    child = json.loads((backend.root / "t/db/supervisor.json").read_text())["child_pid"]
    assert b"TZ=UTC+3" in Path(f"/proc/{child}/environ").read_bytes().split(b"\0")
    assert Path(f"/proc/{pid}/cwd").resolve() == tmp_path.resolve()
    backend.apply(Stop(UnitRef.of(unit), 5))
    assert not alive(pid, start_ticks(pid))
    assert not serving(ports["db"])


def test_a_unit_still_starts_when_the_launcher_is_gone_or_refuses(setup) -> None:  # type: ignore[no-untyped-def]
    from hxp.backends import process

    stack, backend, ports = setup
    unit = db(stack)
    ref = UnitRef.of(unit)
    backend.apply(Create(unit, "h", 1))
    wait_for(lambda: serving(ports["db"]))
    backend.apply(Stop(ref, 5))
    # The launcher's server ended (killed from outside): the next start brings up another.
    server = process.LAUNCHER._server
    assert server is not None
    server.kill()
    server.wait()
    backend.apply(Start(ref))
    wait_for(lambda: serving(ports["db"]))
    backend.apply(Stop(ref, 5))
    # A launcher that cannot answer: a fresh `--detach` supervisor, in its own session too.
    real = process.LAUNCHER.launch
    process.LAUNCHER.launch = lambda directory: False  # type: ignore[method-assign]
    try:
        backend.apply(Start(ref))
    finally:
        process.LAUNCHER.launch = real  # type: ignore[method-assign]
    wait_for(lambda: serving(ports["db"]))
    pid = _supervisor_pid(backend)
    assert os.getpgid(pid) == pid
