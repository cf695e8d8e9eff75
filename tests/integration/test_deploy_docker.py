"""deploy-stack on a docker host: apply, apply again (no changes), and a broken update that the
flow rolls back by itself. Real containers on a private engine, real Prefect test server."""

from __future__ import annotations

import json
import socket
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import docker
import httpx
import pytest

from hxp.backends.base import LABEL_STACK
from hxp.backends.docker import DockerBackend, previous_name
from hxp.errors import DeployError
from hxp.plan import ObservedUnit
from hxp.spec import HostSpec
from hxp.store import Store
from tests.support.crash_after_serving import crash_after_serving

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("prefect_server")]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def server(name: str, image: str, port: int, depends_on: str | None = None) -> str:
    needs = f"\n    depends_on: [{depends_on}]" if depends_on else ""
    return f"""
  {name}:
    host: box
    image: {image}
    command: [python3, -m, http.server, "{port}", --bind, 127.0.0.1]
    env: {{PYTHONUNBUFFERED: "1"}}{needs}
    stop_timeout: 5s
    health:
      http: {{url: "http://127.0.0.1:{port}/"}}
      interval: 300ms
      timeout: 2s
      retries: 3"""


@pytest.fixture
def stack_file(
    docker_engine: str, python_image: str, tmp_path: Path
) -> Iterator[tuple[Path, str, dict[str, int]]]:
    """A two-service stack on a docker host (file, name, ports); its containers are removed
    afterwards."""
    name = f"d{uuid.uuid4().hex[:8]}"
    ports = {"db": free_port(), "api": free_port()}
    path = tmp_path / "stack.yaml"
    path.write_text(
        f"stack: {name}\nhosts:\n  box: {{backend: docker}}\ndeploy: {{bake: 500ms}}\nservices:"
        + server("db", python_image, ports["db"])
        + server("api", python_image, ports["api"], depends_on="db")
        + "\n"
    )
    yield path, name, ports
    client = docker.DockerClient(base_url=docker_engine)
    for c in client.containers.list(all=True, filters={"label": f"{LABEL_STACK}={name}"}):
        c.remove(force=True)


def deploy(path: Path, state: Path, **kw: Any) -> dict[str, Any]:
    from flows.deploy import deploy_stack

    result: dict[str, Any] = deploy_stack(str(path), state_dir=str(state), **kw)
    return result


def healthy_units(backend: DockerBackend, stack: str, timeout: float = 30.0) -> dict[str, Any]:
    """The stack's instances once all of them run and pass their container healthcheck."""
    deadline = time.monotonic() + timeout
    seen: dict[str, ObservedUnit] = {}
    while time.monotonic() < deadline:
        seen = backend.observe(stack)
        if seen and all(u.running and u.healthy for u in seen.values()):
            return seen
        time.sleep(0.1)
    raise AssertionError(f"not all healthy: {seen}")


def test_deploy_is_idempotent_and_a_broken_update_rolls_back(
    stack_file: tuple[Path, str, dict[str, int]], docker_engine: str, tmp_path: Path
) -> None:
    path, stack, ports = stack_file
    state = tmp_path / "state"
    backend = DockerBackend("box", HostSpec(backend="docker"), state)

    first = deploy(path, state)
    assert first["changed"] is True
    assert [(a["instance"], a["kind"]) for a in first["plan"]["actions"]] == [
        ("db", "create"),
        ("api", "create"),
    ]
    before = healthy_units(backend, stack)
    assert set(before) == {"db", "api"}

    second = deploy(path, state)
    assert second["changed"] is False
    assert len(second["plan"]["noops"]) == 2

    broken = "services.api.command=[python3, -c, 'raise SystemExit(1)']"
    with pytest.raises(DeployError, match="api") as info:
        deploy(path, state, overrides=[broken])
    message = str(info.value)
    assert "failed at api@box" in message
    assert "api: restored revision 1, healthy" in message

    after = healthy_units(backend, stack)
    assert after["api"].config_hash == before["api"].config_hash
    assert after["db"].config_hash == before["db"].config_hash
    assert after["api"].revision == before["api"].revision
    good = Store(state).last_good(stack, "api")
    assert good is not None
    assert good.config_hash == after["api"].config_hash
    # The restored container is the old one, and nothing else is left behind.
    client = docker.DockerClient(base_url=docker_engine)
    names = {
        c.name
        for c in client.containers.list(all=True, filters={"label": f"{LABEL_STACK}={stack}"})
    }
    assert names == {f"hxp-{stack}-db", f"hxp-{stack}-api"}
    assert previous_name(stack, "api") not in names
    assert all(httpx.get(f"http://127.0.0.1:{p}/").status_code == 200 for p in ports.values())

    third = deploy(path, state)
    assert third["changed"] is False


def test_an_update_to_a_missing_image_fails_and_leaves_the_old_version_running(
    stack_file: tuple[Path, str, dict[str, int]], tmp_path: Path
) -> None:
    path, stack, ports = stack_file
    state = tmp_path / "state"
    backend = DockerBackend("box", HostSpec(backend="docker"), state)
    deploy(path, state)
    before = healthy_units(backend, stack)

    with pytest.raises(DeployError, match="image hxp-test/missing:1 not found") as info:
        deploy(path, state, overrides=["services.api.image=hxp-test/missing:1"])
    assert "no registry pull" in str(info.value)

    after = healthy_units(backend, stack)
    assert {n: u.config_hash for n, u in after.items()} == {
        n: u.config_hash for n, u in before.items()
    }
    assert httpx.get(f"http://127.0.0.1:{ports['api']}/").status_code == 200
    [failed, *_] = Store(state).deploys(stack)
    assert failed.status == "failed"


def test_a_revision_that_crashes_after_serving_fails_during_bake_and_rolls_back(
    docker_engine: str, python_image: str, tmp_path: Path
) -> None:
    """Default settings (no bake, no min_ready): the new container serves, passes its check,
    exits 1 two seconds later (Docker restarts it: the restart count says so); the deploy
    fails during its bake and the previous container is back and healthy."""
    name = f"d{uuid.uuid4().hex[:8]}"
    port = free_port()
    path = tmp_path / "stack.yaml"
    path.write_text(
        f"stack: {name}\nhosts:\n  box: {{backend: docker}}\nservices:"
        # A start period: on a loaded machine the container may take seconds to serve (and
        # the restored one too); the crash comes 2 s after the first answer whatever the load.
        + server("api", python_image, port).replace(
            "interval: 300ms", "interval: 1s\n      start_period: 30s"
        )
        + "\n"
    )
    crash = json.dumps(crash_after_serving("python3", port, 2.0))
    state = tmp_path / "state"
    backend = DockerBackend("box", HostSpec(backend="docker"), state)
    try:
        assert deploy(path, state)["changed"] is True
        before = healthy_units(backend, name)
        with pytest.raises(DeployError, match="failed during bake") as info:
            deploy(path, state, overrides=[f"services.api.command={crash}"])
        assert "api: restored revision 1, healthy" in str(info.value)
        record = Store(state).deploys(name)[0]
        assert record.status == "failed"
        assert record.result is not None
        assert record.result["phase"] == "bake"
        after = healthy_units(backend, name)
        assert after["api"].config_hash == before["api"].config_hash
        good = Store(state).last_good(name, "api")
        assert good is not None
        assert good.revision == 1
        assert httpx.get(f"http://127.0.0.1:{port}/").status_code == 200
    finally:
        client = docker.DockerClient(base_url=docker_engine)
        for c in client.containers.list(all=True, filters={"label": f"{LABEL_STACK}={name}"}):
            c.remove(force=True)
