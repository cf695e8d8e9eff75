"""`hxp chaos --backend docker|systemd` as an operator runs it: the installed `hxp` script on a
stack file of a docker (or systemd) host, against the test's Prefect server and a fresh state
directory; the Docker engine is the session's private one (DOCKER_HOST, as an operator would
export it). Two seeded runs each: exit 0, the results table and JSON, nothing left behind."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path
from typing import Any

import docker
import pytest
import yaml

from hxp.backends.base import LABEL_STACK
from hxp.chaos import generated_stack
from tests.support.stacks import free_range
from tests.support.systemd_container import unit_files_left

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("prefect_server")]

HXP = Path(sys.executable).parent / "hxp"


def run_chaos(tmp_path: Path, backend: str, stack: dict[str, Any]) -> dict[str, Any]:
    from prefect.settings import PREFECT_API_URL

    seed = random.randrange(1, 10**6)
    path = tmp_path / "stack.yaml"
    path.write_text(yaml.safe_dump(stack, sort_keys=False))
    out = tmp_path / "results.json"
    environ = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "HXP_"))}
    environ["PREFECT_API_URL"] = str(PREFECT_API_URL.value())  # the server the operator uses
    args = [str(HXP), "chaos", "-f", str(path), "--runs", "2", "--seed", str(seed)]
    args += ["--backend", backend, "--out", str(out), "--state-dir", str(tmp_path / "state")]
    done = subprocess.run(
        args, env=environ, capture_output=True, text=True, timeout=600, check=False
    )
    print(done.stdout)
    assert done.returncode == 0, f"seed {seed}\n{done.stdout}\n{done.stderr[-3000:]}"
    assert f"chaos: seed {seed}, 2 run(s), {backend}" in done.stdout
    assert "Traceback" not in done.stdout + done.stderr
    if backend == "docker":  # the operator's own daemon: never restarted, and it says so
        assert "docker-restart not injected: the Docker daemon is not one" in done.stdout
    data: dict[str, Any] = json.loads(out.read_text())
    assert [r["consistent"] for r in data["runs"]] == [True, True], data
    return data


def test_hxp_chaos_on_a_docker_host_from_the_cli(
    docker_engine: str, chaos_image: str, tmp_path: Path
) -> None:
    base = free_range(3)
    name = f"clid{random.randrange(10**6)}"
    stack = generated_stack(name, range(base, base + 3), "python3", "docker", image=chaos_image)
    run_chaos(tmp_path, "docker", stack)
    client = docker.DockerClient(base_url=docker_engine)
    assert client.containers.list(all=True, filters={"label": f"{LABEL_STACK}={name}"}) == []


def test_hxp_chaos_on_a_systemd_host_from_the_cli(systemd_container: str, tmp_path: Path) -> None:
    base = free_range(3)
    name = f"clis{random.randrange(10**6)}"
    host = {"runner": "docker-exec", "container": systemd_container}
    stack = generated_stack(name, range(base, base + 3), "python3", "systemd", host=host)
    run_chaos(tmp_path, "systemd", stack)
    assert unit_files_left(systemd_container, name) == ""
