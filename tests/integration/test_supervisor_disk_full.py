"""A process-backend supervisor whose state directory's disk is full (found by the fault
campaign's state-disk-full fault): it cannot write supervisor.json, and it must still stop its
program when the backend stops it. It used to die of the failed write instead, leaving the
program running with nobody to stop it (holding its port: every later start of the unit
failed). Real processes on a real, small tmpfs (root)."""

from __future__ import annotations

import json
import os
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from hxp.backends.base import Create, Remove, Start, Stop, UnitRef
from hxp.backends.process import ProcessBackend
from hxp.config import load_config
from hxp.errors import BackendError
from hxp.io.chaos import fill, free, mount_small_fs, unmount
from hxp.units import expand_units
from tests.integration.test_process_backend import serving, wait_for
from tests.support.stacks import web_stack

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="mounts a tmpfs (root)")


@pytest.fixture
def small_state(tmp_path: Path) -> Iterator[Path]:
    state = tmp_path / "state"
    mount_small_fs(state, size_mib=8)
    try:
        yield state
    finally:
        free(state)
        unmount(state)


def test_a_supervisor_on_a_full_disk_keeps_supervising_and_stops_its_program(
    small_state: Path, tmp_path: Path
) -> None:
    path, ports = web_stack(tmp_path)
    stack = load_config([path], {}).stack
    backend = ProcessBackend(small_state)
    unit = next(u for u in expand_units(stack, {"db"}))
    backend.apply(Create(unit, "h", 1))
    try:
        wait_for(lambda: serving(ports["db"]))
        record = json.loads((backend.root / "t/db/supervisor.json").read_text())
        supervisor, first = record["pid"], record["child_pid"]
        fill(small_state)
        # the program crashes: every record of it (exited, backoff, running) fails to write
        os.kill(first, signal.SIGKILL)
        wait_for(lambda: serving(ports["db"]), timeout=15)  # restarted all the same
        assert _running(supervisor)
        children = _children(supervisor)
        assert len(children) == 1
        assert first not in children

        backend.apply(Remove(UnitRef.of(unit)))  # stopped, though nothing can be recorded

        assert not _running(supervisor)
        assert not any(_running(c) for c in children), "the program outlived its supervisor"
        assert not serving(ports["db"])
    finally:
        free(small_state)
        for name in backend.observe(stack.stack):
            backend.apply(Remove(UnitRef(stack.stack, name, name)))


def test_a_start_that_cannot_be_recorded_leaves_nothing_running(
    small_state: Path, tmp_path: Path
) -> None:
    """The backend knows a start only by the supervisor's record of its program: on a full
    disk the start fails, and neither the supervisor nor its program stays behind (one did,
    unseen, holding the port; the next start ran a second copy beside it)."""
    path, ports = web_stack(tmp_path)
    stack = load_config([path], {}).stack
    backend = ProcessBackend(small_state)
    unit = next(u for u in expand_units(stack, {"db"}))
    directory = backend.root / "t" / "db"
    try:
        backend.apply(Create(unit, "h", 1))
        wait_for(lambda: serving(ports["db"]))
        backend.apply(Remove(UnitRef.of(unit)))
        backend.apply(Create(unit, "h", 1))  # its files are written, then the disk fills
        backend.apply(Stop(UnitRef.of(unit)))
        fill(small_state)
        with pytest.raises(BackendError, match="did not start"):
            backend.apply(Start(UnitRef.of(unit)))
        wait_for(lambda: not _in(directory), timeout=10)
        assert not serving(ports["db"])
    finally:
        free(small_state)
        for name in backend.observe(stack.stack):
            backend.apply(Remove(UnitRef(stack.stack, name, name)))


def _in(directory: Path) -> list[int]:
    """Processes whose working directory is `directory` (the unit's supervisor runs there)."""
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if os.readlink(entry / "cwd") == str(directory):
                    out.append(int(entry.name))
            except OSError:
                continue
    return [p for p in out if _running(p)]


def _children(pid: int) -> list[int]:
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(stat[1]) == pid and stat[0] not in ("Z", "X"):
                out.append(int(entry.name))
    return out


def _running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")
