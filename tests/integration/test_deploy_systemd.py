"""The systemd backend against real systemd (PID 1 in a container), through `docker exec`."""

from __future__ import annotations

import socket
import subprocess
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from hxp.backends import backend_for
from hxp.backends.base import Commit, Create, Remove, Restore, UnitRef, Update
from hxp.backends.systemd import BACKUP_ROOT, UNIT_DIR, SystemdBackend, parse_markers
from hxp.errors import DeployError
from hxp.spec import Stack
from hxp.units import UnitInstance, expand_units
from tests.support.crash_after_serving import crash_after_serving
from tests.support.render_data import stack_from_data
from tests.support.waiting import wait_for

pytestmark = pytest.mark.slow

HOST = "box"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def stack_data(
    container: str, port: int, stack: str, greeting: str, command: list[str] | None = None
) -> dict[str, Any]:
    return {
        "version": 2,
        "stack": stack,
        "hosts": {HOST: {"backend": "systemd", "runner": "docker-exec", "container": container}},
        "deploy": {"bake": "500ms"},
        "services": {
            "web": {
                "host": HOST,
                "command": command
                or ["python3", "-m", "http.server", str(port), "--bind", "127.0.0.1"],
                "env": {"GREETING": greeting, "PYTHONUNBUFFERED": "1"},
                "ports": {"http": port},
                "health": {
                    "http": {"url": f"http://127.0.0.1:{port}/"},
                    "interval": "500ms",
                    "timeout": "1s",
                    "retries": 3,
                    "start_period": "2s",
                },
            }
        },
    }


def web(stack: Stack) -> UnitInstance:
    (unit,) = expand_units(stack)
    return unit


def serves(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=1) as r:
            return bool(r.status == 200)
    except OSError:
        return False


def in_container(container: str, *argv: str) -> str:
    out = subprocess.run(
        ["docker", "exec", container, *argv], capture_output=True, text=True, check=False
    )
    return out.stdout


def exists(container: str, path: str) -> bool:
    probe = ["docker", "exec", container, "test", "-e", path]
    return subprocess.run(probe, capture_output=True, check=False).returncode == 0


def running_with(backend: SystemdBackend, stack: str, config_hash: str) -> Callable[[], bool]:
    def check() -> bool:
        seen = backend.observe(stack).get("web")
        return seen is not None and seen.running and seen.config_hash == config_hash

    return check


def test_backend_lifecycle(systemd_container: str, tmp_path: Path) -> None:
    port = free_port()
    name = "life"
    v1 = stack_from_data(stack_data(systemd_container, port, name, "one"))
    v2 = stack_from_data(stack_data(systemd_container, port, name, "two"))
    backend = backend_for(HOST, v1.hosts[HOST], tmp_path)
    assert isinstance(backend, SystemdBackend)
    ref = UnitRef.of(web(v1))
    unit_file = f"{UNIT_DIR}/hxp-{name}-web.service"
    previous = f"{BACKUP_ROOT}/{name}/web/previous.service"

    assert backend.observe(name) == {}

    backend.apply(Create(web(v1), "hash-1", 1))
    wait_for(running_with(backend, name, "hash-1"), "version 1 running")
    seen = backend.observe(name)["web"]
    assert (seen.config_hash, seen.revision, seen.host, seen.healthy) == ("hash-1", 1, HOST, True)
    assert seen.detail.startswith("active/running")
    wait_for(lambda: serves(port), "version 1 serving")

    # The hardened unit really runs as the unit's system user, not as root.
    pid = in_container(
        systemd_container,
        "systemctl",
        "show",
        "-p",
        "MainPID",
        "--value",
        f"hxp-{name}-web.service",
    ).strip()
    assert pid not in ("", "0")
    assert in_container(systemd_container, "ps", "-o", "user=", "-p", pid).strip() == "hxp"
    hardening = in_container(
        systemd_container,
        "systemctl",
        "show",
        "-p",
        "User,NoNewPrivileges,ProtectSystem,PrivateDevices,CapabilityBoundingSet",
        f"hxp-{name}-web.service",
    ).split()
    assert sorted(hardening) == [
        "CapabilityBoundingSet=",
        "NoNewPrivileges=yes",
        "PrivateDevices=yes",
        "ProtectSystem=strict",
        "User=hxp",
    ]
    assert "GREETING=one" in in_container(
        systemd_container, "systemctl", "show", "-p", "Environment", f"hxp-{name}-web.service"
    )
    wait_for(lambda: any("GET / " in line for line in backend.logs(ref, 20)), "request in journal")

    # Update keeps the replaced file; a retried update with the same hash keeps it too.
    backend.apply(Update(web(v2), "hash-2", 2))
    wait_for(running_with(backend, name, "hash-2"), "version 2 running")
    backend.apply(Update(web(v2), "hash-2", 2))
    kept = in_container(systemd_container, "cat", previous)
    assert parse_markers(kept.splitlines()).config_hash == "hash-1"
    assert "GREETING=two" in in_container(
        systemd_container, "systemctl", "show", "-p", "Environment", f"hxp-{name}-web.service"
    )
    mode = in_container(systemd_container, "stat", "-c", "%a %U", f"{BACKUP_ROOT}/{name}/web")
    assert mode.strip() == "700 root"

    backend.apply(Restore(ref))
    wait_for(running_with(backend, name, "hash-1"), "version 1 restored")
    assert backend.observe(name)["web"].revision == 1
    assert not exists(systemd_container, previous)
    wait_for(lambda: serves(port), "restored version serving")

    backend.apply(Update(web(v2), "hash-2", 2))
    wait_for(running_with(backend, name, "hash-2"), "version 2 running again")
    backend.apply(Commit(ref))
    assert in_container(systemd_container, "ls", f"{BACKUP_ROOT}/{name}/web") == ""

    backend.apply(Remove(ref))
    assert backend.observe(name) == {}
    assert not exists(systemd_container, unit_file)
    assert not exists(systemd_container, f"{BACKUP_ROOT}/{name}/web")
    listed = in_container(
        systemd_container, "systemctl", "list-units", "--all", "--no-legend", f"hxp-{name}-*"
    )
    assert listed.strip() == ""
    wait_for(lambda: not serves(port), "the server gone")


def test_deploy_flow_check_apply_rollback(
    systemd_container: str, prefect_server: str, tmp_path: Path
) -> None:
    from flows.deploy import deploy_stack

    port = free_port()
    name = "flow"
    stack_file = tmp_path / "stack.yaml"
    state = tmp_path / "state"

    def write(greeting: str, command: list[str] | None = None) -> str:
        data = stack_data(systemd_container, port, name, greeting, command)
        stack_file.write_text(yaml.safe_dump(data, sort_keys=False))
        return str(stack_file)

    v1 = stack_from_data(stack_data(systemd_container, port, name, "one"))
    backend = backend_for(HOST, v1.hosts[HOST], state)
    try:
        first = deploy_stack(write("one"), state_dir=str(state))
        assert first["changed"] is True
        seen = backend.observe(name)["web"]
        assert seen.running
        assert seen.revision == 1
        good_hash = seen.config_hash
        assert serves(port)

        second = deploy_stack(write("one"), state_dir=str(state))
        assert second["changed"] is False

        # A version that exits at once: the deploy fails and the previous version runs again.
        broken = ["python3", "-c", "import sys; sys.exit(1)"]
        with pytest.raises(DeployError) as failed:
            deploy_stack(write("two", broken), state_dir=str(state))
        summary = str(failed.value)
        assert "web@box" in summary
        assert "web: restored revision 1, healthy" in summary
        after = backend.observe(name)["web"]
        assert after.running
        assert after.config_hash == good_hash
        assert after.revision == 1
        assert serves(port)
        assert in_container(systemd_container, "ls", f"{BACKUP_ROOT}/{name}/web").strip() == ""
    finally:
        backend.apply(Remove(UnitRef(name, "web", "web")))


def test_a_revision_that_crashes_after_serving_fails_during_bake_and_rolls_back(
    systemd_container: str, prefect_server: str, tmp_path: Path
) -> None:
    """Default settings (no bake, no min_ready): the new unit serves, passes its check, exits 1
    two seconds later (systemd restarts it: NRestarts says so); the deploy fails during its
    bake and the previous version runs and serves again."""
    from flows.deploy import deploy_stack
    from hxp.store import Store

    port = free_port()
    name = "bake"
    stack_file = tmp_path / "stack.yaml"
    state = tmp_path / "state"

    def write(command: list[str] | None = None) -> str:
        data = stack_data(systemd_container, port, name, "one", command)
        del data["deploy"]  # the default bake window
        data["services"]["web"]["health"]["interval"] = "1s"
        data["services"]["web"]["health"]["start_period"] = "30s"  # a loaded machine is slow
        stack_file.write_text(yaml.safe_dump(data, sort_keys=False))
        return str(stack_file)

    v1 = stack_from_data(stack_data(systemd_container, port, name, "one"))
    backend = backend_for(HOST, v1.hosts[HOST], state)
    try:
        assert deploy_stack(write(), state_dir=str(state))["changed"] is True
        good_hash = backend.observe(name)["web"].config_hash
        with pytest.raises(DeployError, match="failed during bake") as failed:
            deploy_stack(write(crash_after_serving("python3", port, 2.0)), state_dir=str(state))
        assert "web: restored revision 1, healthy" in str(failed.value)
        record = Store(state).deploys(name)[0]
        assert record.status == "failed"
        assert record.result is not None
        assert record.result["phase"] == "bake"
        after = backend.observe(name)["web"]
        assert after.running
        assert after.config_hash == good_hash
        assert after.revision == 1
        assert serves(port)
    finally:
        backend.apply(Remove(UnitRef(name, "web", "web")))
