"""Secrets on the systemd backend against real systemd: the value travels on stdin into a
root-only 0600 EnvironmentFile and reaches the service byte for byte, quotes, `$` and all."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest

from hxp.backends import backend_for
from hxp.backends.base import Create, Remove, UnitRef, Update
from hxp.backends.systemd import SystemdBackend
from hxp.units import expand_units
from tests.support.render_data import stack_from_data
from tests.support.secret_stack import checker
from tests.support.stacks import free_port

pytestmark = pytest.mark.slow

TRICKY = "hf_\"q\" $HOME ${X} `id` \\back\\ %n #not-a-comment 'single'"


def in_container(container: str, *argv: str) -> str:
    out = subprocess.run(
        ["docker", "exec", container, *argv], capture_output=True, text=True, check=False
    )
    return out.stdout


def test_an_awkward_secret_reaches_the_service_verbatim(
    systemd_container: str, tmp_path: Path
) -> None:
    port = free_port()
    data = {
        "stack": "sek",
        "hosts": {
            "box": {"backend": "systemd", "runner": "docker-exec", "container": systemd_container}
        },
        "services": {
            "api": {
                "host": "box",
                "command": checker(port, TRICKY, python="python3"),
                "ports": {"http": port},
                "secret_env": {"HF_TOKEN": "hf-token"},
            }
        },
    }
    (unit,) = expand_units(stack_from_data(data))
    backend = backend_for("box", stack_from_data(data).hosts["box"], tmp_path)
    assert isinstance(backend, SystemdBackend)
    backend.apply(Create(unit, "h1", 1, {"HF_TOKEN": TRICKY}))
    deadline = time.monotonic() + 20
    while not ((seen := backend.observe("sek").get("api")) and seen.running):
        assert time.monotonic() < deadline, "never running"
        time.sleep(0.2)
    time.sleep(1.0)  # the checker exits at once on a wrong value: still running means it matched
    assert backend.observe("sek")["api"].running, backend.logs(UnitRef.of(unit))
    env_file = "/etc/hxp/sek/api.env"
    assert in_container(systemd_container, "stat", "-c", "%a %U", env_file).strip() == "600 root"
    assert in_container(systemd_container, "stat", "-c", "%a %U", "/etc/hxp/sek").strip() == (
        "700 root"
    )
    unit_file = in_container(systemd_container, "cat", "/etc/systemd/system/hxp-sek-api.service")
    assert "hf_" not in unit_file
    shown = in_container(systemd_container, "systemctl", "show", "hxp-sek-api.service")
    assert "hf_" not in shown

    backend.apply(Update(unit, "h2", 2, {"HF_TOKEN": "wrong"}))  # the checker refuses it
    deadline = time.monotonic() + 20
    while (seen := backend.observe("sek").get("api")) and seen.running:
        assert time.monotonic() < deadline, "a wrong token was accepted"
        time.sleep(0.2)
    backend.apply(Remove(UnitRef.of(unit)))
    assert in_container(systemd_container, "ls", "/etc/hxp/sek") == ""
