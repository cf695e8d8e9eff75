"""The stack lock across machines: a Prefect global concurrency limit named after the stack.

Two orchestrators with state directories of their own (so their file locks never meet, as on
two machines) share only the Prefect server; their deploys of one stack must not interleave.
"""

from __future__ import annotations

import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from hxp.errors import LockedError
from hxp.io.fleet_lock import FIRST_TRY, limit_name, prefect_stack_lock
from hxp.store import Store
from tests.support.orchestrator import hxp_process

pytestmark = pytest.mark.usefixtures("prefect_server")


def test_a_held_stack_lock_refuses_or_waits_and_says_who_holds_it() -> None:
    from prefect.client.orchestration import get_client

    said: list[str] = []
    got: list[float] = []
    with prefect_stack_lock("lk", "deploy flow run brave-owl"):
        with get_client(sync_client=True) as client:
            limit = client.read_global_concurrency_limit_by_name(limit_name("lk"))
        assert (limit.limit, limit.active, limit.active_slots) == (1, True, 1)
        with (
            pytest.raises(LockedError, match=r"locked by deploy flow run brave-owl \(on "),
            prefect_stack_lock("lk", "second", wait=False),
        ):
            pass

        def waiter() -> None:
            with prefect_stack_lock("lk", "third", on_wait=said.append):
                got.append(time.monotonic())

        thread = threading.Thread(target=waiter)
        thread.start()
        time.sleep(FIRST_TRY + 2.5)  # past its first try: it has said whom it waits for
        assert not got  # still waiting
        released = time.monotonic()
    thread.join(timeout=60)
    assert got
    assert got[0] >= released
    assert said == ["waiting for the lock of stack 'lk', held by " + said[0].split("by ", 1)[1]]
    assert "deploy flow run brave-owl" in said[0]


def _stack(tmp: Path) -> Path:
    path = tmp / "twin.yaml"
    services = "".join(
        f"  s{i}:\n    host: local\n    command: [{sys.executable}, -c, "
        f"'import time; time.sleep(600)']\n    env: {{V: '1'}}\n"
        for i in range(3)
    )
    path.write_text(
        textwrap.dedent("""\
        stack: twin
        hosts:
          local: {backend: process}
        services:
        """)
        + services
    )
    return path


@pytest.mark.slow
def test_two_orchestrators_deploying_one_stack_through_one_server_are_serialized(
    tmp_path: Path,
) -> None:
    path = _stack(tmp_path)
    states = [tmp_path / "machine-a", tmp_path / "machine-b"]
    runs = [hxp_process("apply", "-f", str(path), state=s) for s in states]
    outputs = [r.communicate(timeout=300)[0] for r in runs]
    try:
        assert [r.returncode for r in runs] == [0, 0], outputs
        windows = []
        for state in states:
            store = Store(state)
            (record,) = store.deploys("twin")
            assert record.status == "succeeded"
            assert record.finished_at is not None
            times = [e["at"] for e in store.events("twin", record.id)]
            assert times, "the deploy recorded no unit action"
            windows.append((min(times), max(times), record.started_at, record.finished_at))
        first, second = sorted(windows)
        # every unit action of one orchestrator before every one of the other
        assert first[1] < second[0], windows
        assert first[3] <= second[2] + 0.5, windows  # the second began once the first ended
        assert any("waiting for the lock of stack 'twin'" in out for out in outputs), outputs
        # the lock's short tries are not errors to the operator (QuietLockWaits)
        assert not any("failed to process item" in out for out in outputs), outputs
    finally:
        for state in states:
            down = hxp_process("down", "-f", str(path), state=state)
            down.communicate(timeout=120)


def test_a_holder_killed_on_this_machine_frees_the_lock_for_the_next_run(
    prefect_server: str, tmp_path: Path
) -> None:
    """SIGKILL leaves the slot's lease behind (a server without the repossessor keeps it for
    good): the next run sees its recorded holder is dead on this machine and frees it."""
    import os
    import signal
    import subprocess

    ready = tmp_path / "held"
    code = textwrap.dedent(
        f"""
        import pathlib, time
        from hxp.io.fleet_lock import prefect_stack_lock
        with prefect_stack_lock("dead", "the killed run"):
            pathlib.Path({str(ready)!r}).write_text("x")
            time.sleep(600)
        """
    )
    env = {**os.environ, "PREFECT_API_URL": prefect_server}
    proc = subprocess.Popen([sys.executable, "-c", code], env=env, cwd=Path(__file__).parents[2])
    try:
        deadline = time.monotonic() + 120
        while not ready.exists():
            assert proc.poll() is None, "the holder exited before it held the lock"
            assert time.monotonic() < deadline, "the holder never took the lock"
            time.sleep(0.1)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    said: list[str] = []
    started = time.monotonic()
    with prefect_stack_lock("dead", "next", timeout=60, on_wait=said.append):
        took = time.monotonic() - started
    assert took < FIRST_TRY + 20, took  # not the lease's expiry, not forever
    assert said == ["the lock of stack 'dead' was held by a run that died: freed"]


def test_quiet_lock_waits_drops_only_the_timed_out_slot_tries() -> None:
    import logging
    from concurrent.futures import Future

    from hxp.io.fleet_lock import QuietLockWaits

    timed_out: Future[None] = Future()
    timed_out.set_exception(TimeoutError())
    refused: Future[None] = Future()
    refused.set_exception(RuntimeError("server said 500"))

    def record(service: str, item: object) -> logging.LogRecord:
        return logging.LogRecord(
            "prefect._internal.concurrency",
            logging.ERROR,
            __file__,
            1,
            "Service %r failed to process item %r",
            (service, item),
            None,
        )

    quiet = QuietLockWaits()
    name = QuietLockWaits.SERVICE
    assert not quiet.filter(record(name, (1, "concurrency", 3.0, timed_out)))
    assert quiet.filter(record(name, (1, "concurrency", 3.0, refused)))
    assert quiet.filter(record("EventsWorker", (1, timed_out)))
