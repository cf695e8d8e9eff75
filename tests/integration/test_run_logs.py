"""Failure logs quote the current run only, on every backend (issue 19, item 2).

Each backend runs the same crash-looping program for real (local processes, a private Docker
engine, systemd in a container): every run prints `rev=<revision> run=<unique id> ...` lines,
then exits 5 and is restarted by the target's own restart policy. Whatever `logs` returns must
hold no line of an earlier revision (what the failure summary of revision N quotes), and, while
no restart happens during the call, the lines of one run only: the latest one, since the
supervisor, Docker or systemd restarted it. `logs(since="start")` holds every run since the
backend started the revision (the crashes before the latest restart), and still nothing older.
"""

from __future__ import annotations

import re
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from hxp.backends import backend_for
from hxp.backends.base import Backend, Create, Remove, Restore, UnitRef, Update, observe_one
from hxp.plan import ObservedUnit
from hxp.units import UnitInstance, expand_units
from tests.support.render_data import stack_from_data

LINE = re.compile(r"rev=(\d+) run=([0-9a-f-]{36}) (start|crash)$")
# One run: a unique id, a first line, a pause, a last line and exit code 5.
PROGRAM = (
    'id=$(cat /proc/sys/kernel/random/uuid); echo "rev=$REV run=$id start"; '
    'sleep {pause}; echo "rev=$REV run=$id crash"; exit 5'
)


def crashing_unit(stack: str, host: dict[str, Any], revision: int, pause: float) -> UnitInstance:
    service: dict[str, Any] = {
        "host": "box",
        "command": ["sh", "-c", PROGRAM.format(pause=pause)],
        "env": {"REV": str(revision)},
        "restart": "on-failure",
        "stop_timeout": "2s",
    }
    if host["backend"] == "docker":
        service["image"] = host.pop("image")
    data = {"stack": stack, "hosts": {"box": host}, "services": {"job": service}}
    (unit,) = expand_units(stack_from_data(data))
    return unit


@dataclass
class Watch:
    """What the logs showed while an instance of one revision crash-looped."""

    runs: list[str] = field(default_factory=list)  # run ids, in the order first seen alone
    lines: list[str] = field(default_factory=list)  # every program line seen
    since_start: list[str] = field(default_factory=list)  # the last logs(since="start")


def watch(
    backend: Backend, unit: UnitInstance, runs: int, forbidden: set[str], timeout: float = 40.0
) -> Watch:
    """Sample `logs` until `runs` different runs were each seen alone; check every sample."""
    ref = UnitRef.of(unit)
    revision = dict(unit.host_env)["REV"]
    seen = Watch()
    deadline = time.monotonic() + timeout
    while len(seen.runs) < runs:
        assert time.monotonic() < deadline, f"saw runs {seen.runs} only: {seen.lines[-6:]}"
        before = observe_one(backend, unit)
        lines = backend.logs(ref, 50)
        after = observe_one(backend, unit)
        ours = [m for m in map(LINE.search, lines) if m is not None]
        seen.lines.extend(m.group(0) for m in ours)
        # What the failure summary of this revision would quote: nothing older.
        assert all(m.group(1) == revision for m in ours), lines
        assert not forbidden & {m.group(2) for m in ours}, lines
        ids = {m.group(2) for m in ours}
        # Every run since the backend started this revision: still none of an earlier one.
        seen.since_start = backend.logs(ref, 200, since="start")
        started = [m for m in map(LINE.search, seen.since_start) if m is not None]
        assert all(m.group(1) == revision for m in started), seen.since_start
        assert not forbidden & {m.group(2) for m in started}, seen.since_start
        if _same_run(before, after):
            assert len(ids) <= 1, f"more than one run quoted: {lines}"
            if ids and (not seen.runs or seen.runs[-1] not in ids):
                seen.runs.extend(ids)
        time.sleep(0.05)
    return seen


def _same_run(before: ObservedUnit | None, after: ObservedUnit | None) -> bool:
    """No restart happened between the two observations."""
    return (
        before is not None
        and after is not None
        and before.restarts == after.restarts
        and before.running == after.running
    )


def check_backend(backend: Backend, stack: str, host: dict[str, Any]) -> None:
    """Revision 1 crash-loops, revision 2 replaces it and crash-loops, revision 1 comes back."""
    v1 = crashing_unit(stack, dict(host), 1, 0.3)
    v2 = crashing_unit(stack, dict(host), 2, 0.6)
    ref = UnitRef.of(v1)
    backend.apply(Create(v1, "h1", 1))
    first = watch(backend, v1, 2, set())
    backend.apply(Update(v2, "h2", 2))
    second = watch(backend, v2, 3, set(first.runs))
    # A run is quoted whole: its first line, and once it crashed its last line too.
    assert any(line.endswith(" crash") for line in second.lines), second.lines
    for run in second.runs:
        assert any(line.endswith(f"run={run} start") for line in second.lines), run
    # since="start" keeps the crashes before the latest restart: every run of revision 2.
    for run in second.runs[:-1]:
        assert f"rev=2 run={run} crash" in second.since_start, second.since_start
    backend.apply(Restore(ref))
    # The restored revision 1 starts new runs; its runs from before the update are not quoted.
    watch(backend, v1, 1, set(first.runs) | set(second.runs))
    backend.apply(Remove(ref))
    assert backend.logs(ref) == []


def test_process_backend_quotes_the_current_run_only(tmp_path: Path) -> None:
    host = {"backend": "process"}
    backend = backend_for("box", stack_from_data(_hosted(host)).hosts["box"], tmp_path)
    check_backend(backend, "runs", host)


@pytest.mark.slow
def test_docker_backend_quotes_the_current_run_only(
    docker_engine: str, busybox_image: str, tmp_path: Path
) -> None:
    stack = f"t{uuid.uuid4().hex[:8]}"
    host = {"backend": "docker", "image": busybox_image}
    backend = backend_for("box", stack_from_data(_hosted(host)).hosts["box"], tmp_path)
    try:
        check_backend(backend, stack, host)
    finally:
        for name in backend.observe(stack):
            backend.apply(Remove(UnitRef(stack, name, name)))


@pytest.mark.slow
def test_systemd_backend_quotes_the_current_run_only(
    systemd_container: str, tmp_path: Path
) -> None:
    host = {"backend": "systemd", "runner": "docker-exec", "container": systemd_container}
    backend = backend_for("box", stack_from_data(_hosted(host)).hosts["box"], tmp_path)
    try:
        check_backend(backend, "runs", host)
    finally:
        for name in backend.observe("runs"):
            backend.apply(Remove(UnitRef("runs", name, name)))


def _hosted(host: dict[str, Any]) -> dict[str, Any]:
    """A minimal stack around `host`, to build its backend the way the deploy does."""
    spec = {k: v for k, v in host.items() if k != "image"}
    job: dict[str, Any] = {"host": "box", "command": ["true"]}
    if "image" in host:
        job["image"] = host["image"]
    return {"stack": "runs", "hosts": {"box": spec}, "services": {"job": job}}
