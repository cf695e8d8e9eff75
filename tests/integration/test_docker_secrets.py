"""Secrets on the docker backend, against the private Docker engine: the value is in the
container's environment (Docker's model: `docker inspect` shows it) and nowhere else."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import docker
import pytest

from hxp.backends.base import LABEL_STACK, Create, Remove, UnitRef
from hxp.backends.docker import DockerBackend, container_name
from hxp.spec import Stack
from hxp.units import expand_units
from tests.support.render_data import stack_from_data
from tests.support.secret_stack import TOKEN, checker
from tests.support.stacks import free_port

pytestmark = pytest.mark.slow


@pytest.fixture
def stack_name(docker_engine: str) -> Iterator[str]:
    name = f"s{uuid.uuid4().hex[:8]}"
    yield name
    client = docker.DockerClient(base_url=docker_engine)
    for container in client.containers.list(all=True, filters={"label": f"{LABEL_STACK}={name}"}):
        container.remove(force=True)


def test_the_secret_reaches_the_container_and_only_its_environment(
    docker_engine: str, python_image: str, stack_name: str, tmp_path: Path
) -> None:
    port = free_port()
    stack: Stack = stack_from_data(
        {
            "stack": stack_name,
            "hosts": {"box": {"backend": "docker"}},
            "services": {
                "api": {
                    "host": "box",
                    "image": python_image,
                    "command": checker(port, python="python3"),
                    "secret_env": {"HF_TOKEN": "hf-token"},
                    "health": {"tcp": {"port": port}, "interval": "300ms"},
                }
            },
        }
    )
    (unit,) = expand_units(stack)
    backend = DockerBackend("box", stack.hosts["box"], tmp_path)
    backend.apply(Create(unit, "h", 1, {"HF_TOKEN": TOKEN}))
    deadline = time.monotonic() + 30
    while not (seen := backend.observe(stack_name).get("api")) or seen.healthy is not True:
        assert seen is None or seen.running, seen.detail  # it exits when the token is wrong
        assert time.monotonic() < deadline, "never healthy"
        time.sleep(0.2)
    client = docker.DockerClient(base_url=docker_engine)
    attrs = client.containers.get(container_name(stack_name, "api")).attrs
    assert f"HF_TOKEN={TOKEN}" in attrs["Config"]["Env"]
    rest = {**attrs["Config"], "Env": None}
    assert TOKEN not in json.dumps(rest)  # not in labels, command, entrypoint, healthcheck
    assert TOKEN not in "\n".join(backend.logs(UnitRef.of(unit)))
    backend.apply(Remove(UnitRef.of(unit)))
