"""Dependency ordering of hxp's systemd units on real systemd (PID 1 in a container).

A dependency may run in either blue-green slot (`db` or `db-g`): the dependent's unit orders
itself After= both names, and has no Wants= on them, so systemd starts nothing hxp did not ask for.
"""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest

from hxp.backends import backend_for
from hxp.backends.base import Create, Remove, UnitRef
from hxp.units import expand_units, slot_instances
from tests.support.render_data import stack_from_data

pytestmark = pytest.mark.slow

HOST = "box"
STACK = "order"
TARGET = "hxp-order-test.target"
TARGET_PATH = f"/etc/systemd/system/{TARGET}"


def _stack_data(container: str) -> dict[str, Any]:
    sleeper = ["/bin/sleep", "infinity"]
    return {
        "version": 2,
        "stack": STACK,
        "hosts": {HOST: {"backend": "systemd", "runner": "docker-exec", "container": container}},
        "services": {
            "db": {"host": HOST, "command": sleeper},
            "app": {"host": HOST, "command": sleeper, "depends_on": ["db"]},
        },
    }


def _systemctl(container: str, *argv: str) -> str:
    done = subprocess.run(
        ["docker", "exec", container, "systemctl", *argv],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    return done.stdout.strip()


def _sh(container: str, script: str) -> None:
    subprocess.run(["docker", "exec", container, "sh", "-c", script], check=True, timeout=60)


def _show(container: str, prop: str, unit: str) -> str:
    return _systemctl(container, "show", "-p", prop, "--value", unit)


def test_a_dependency_in_slot_1_still_orders_the_dependent(
    systemd_container: str, tmp_path: Path
) -> None:
    stack = stack_from_data(_stack_data(systemd_container))
    backend = backend_for(HOST, stack.hosts[HOST], tmp_path)
    (app,) = [u for u in expand_units(stack) if u.unit == "app"]
    (db_0,) = slot_instances(stack, "db", 0)
    (db_1,) = slot_instances(stack, "db", 1)  # where a blue-green deploy moves it: `db-g`
    units = (db_0, db_1, app)
    names = {u.name: u.systemd_name for u in units}
    try:
        for unit in units:
            backend.apply(Create(unit, "h", 1))
        after = _show(systemd_container, "After", names["app"]).split()
        assert names["db"] in after
        assert names["db-g"] in after
        wants = _show(systemd_container, "Wants", names["app"]).split()
        assert names["db"] not in wants
        assert names["db-g"] not in wants

        # Starting the dependent alone starts neither slot of its dependency.
        _systemctl(systemd_container, "stop", *names.values())
        _systemctl(systemd_container, "start", names["app"])
        assert _show(systemd_container, "ActiveState", names["app"]) == "active"
        assert _show(systemd_container, "ActiveState", names["db"]) == "inactive"
        assert _show(systemd_container, "ActiveState", names["db-g"]) == "inactive"

        # In one transaction, as at boot (multi-user.target wants every unit), the slot-1
        # dependency starts first.
        _systemctl(systemd_container, "stop", names["app"])
        target = f"[Unit]\nWants={names['app']} {names['db-g']}\n"
        _sh(systemd_container, f"printf '{target}' > {TARGET_PATH}")
        _systemctl(systemd_container, "daemon-reload")
        _systemctl(systemd_container, "start", TARGET)
        started = {
            n: int(_show(systemd_container, "ExecMainStartTimestampMonotonic", names[n]))
            for n in ("app", "db-g")
        }
        assert 0 < started["db-g"] <= started["app"], started
    finally:
        _sh(systemd_container, f"rm -f {TARGET_PATH}")
        for unit in units:
            backend.apply(Remove(UnitRef.of(unit)))
