"""The docker backend against a real (private) Docker engine and a locally imported image."""

from __future__ import annotations

import socket
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import docker
import httpx
import pytest

from hxp.backends.base import (
    LABEL_STACK,
    Commit,
    Create,
    Remove,
    Restore,
    Start,
    Stop,
    UnitRef,
    Update,
)
from hxp.backends.docker import DockerBackend, container_name, previous_name
from hxp.config import build_config, parse_document, unit_config_hash
from hxp.errors import BackendError
from hxp.plan import ObservedUnit
from hxp.spec import Stack
from hxp.units import UnitInstance, expand_units

pytestmark = pytest.mark.slow

UID = 10123


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def make_stack(name: str, image: str, port: int, extra: str = "", check: str = "http") -> Stack:
    probe = (
        f'http: {{url: "http://127.0.0.1:{port}/"}}'
        if check == "http"
        else f"tcp: {{port: {port}}}"
    )
    text = f"""
stack: {name}
hosts:
  box: {{backend: docker}}
services:
  web:
    host: box
    image: {image}
    command: [python3, -m, http.server, "{port}", --bind, 127.0.0.1]
    env: {{PYTHONUNBUFFERED: "1"{extra}}}
    uid: {UID}
    stop_timeout: 5s
    health:
      {probe}
      interval: 300ms
      timeout: 2s
      retries: 3
"""
    return build_config([parse_document(text, "stack.yaml")]).stack


def web(stack: Stack) -> UnitInstance:
    [unit] = expand_units(stack, {"web"})
    return unit


def wait_for(
    check: Callable[[], ObservedUnit | None], what: str, timeout: float = 30.0
) -> ObservedUnit:
    deadline = time.monotonic() + timeout
    last: ObservedUnit | None = None
    while time.monotonic() < deadline:
        last = check()
        if last is not None:
            return last
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def healthy(backend: DockerBackend, stack: str, config_hash: str) -> ObservedUnit:
    def check() -> ObservedUnit | None:
        seen = backend.observe(stack).get("web")
        ok = seen is not None and seen.healthy is True and seen.config_hash == config_hash
        return seen if ok else None

    return wait_for(check, f"web healthy with config {config_hash[:12]}")


@pytest.fixture
def stack_name(docker_engine: str) -> Iterator[str]:
    """A fresh stack name; every container labelled with it is removed afterwards."""
    name = f"t{uuid.uuid4().hex[:8]}"
    yield name
    client = docker.DockerClient(base_url=docker_engine)
    for container in client.containers.list(all=True, filters={"label": f"{LABEL_STACK}={name}"}):
        container.remove(force=True)


@pytest.fixture
def backend(docker_engine: str, tmp_path: Path) -> DockerBackend:
    stack = Stack.model_validate({"stack": "x", "hosts": {"box": {"backend": "docker"}}})
    return DockerBackend("box", stack.hosts["box"], tmp_path)


def containers(docker_engine: str, stack: str) -> dict[str, Any]:
    client = docker.DockerClient(base_url=docker_engine)
    found = client.containers.list(all=True, filters={"label": f"{LABEL_STACK}={stack}"})
    return {c.name: c for c in found}


def test_create_update_restore_commit_remove(
    backend: DockerBackend, docker_engine: str, python_image: str, stack_name: str
) -> None:
    port = free_port()
    v1 = make_stack(stack_name, python_image, port)
    v2 = make_stack(stack_name, python_image, port, extra=", VERSION: two")
    h1, h2 = unit_config_hash(v1, "web"), unit_config_hash(v2, "web")
    assert h1 != h2
    ref = UnitRef.of(web(v1))
    current, kept = container_name(stack_name, "web"), previous_name(stack_name, "web")

    assert backend.observe(stack_name) == {}

    backend.apply(Create(web(v1), h1, 1))
    seen = healthy(backend, stack_name, h1)
    assert (seen.running, seen.revision, seen.host) == (True, 1, "box")
    assert "health healthy" in seen.detail
    assert httpx.get(f"http://127.0.0.1:{port}/").status_code == 200

    backend.apply(Update(web(v2), h2, 2))
    assert set(containers(docker_engine, stack_name)) == {current, kept}
    kept_attrs = containers(docker_engine, stack_name)[kept].attrs
    assert kept_attrs["State"]["Status"] == "exited"
    # Kept stopped even if the engine restarts: no restart policy until it is restored.
    assert kept_attrs["HostConfig"]["RestartPolicy"]["Name"] == "no"
    seen = healthy(backend, stack_name, h2)
    assert seen.revision == 2
    assert set(backend.observe(stack_name)) == {"web"}  # the kept version is no instance

    # A retried update must not replace the kept old version with the new one.
    backend.apply(Update(web(v2), h2, 2))
    kept_labels = containers(docker_engine, stack_name)[kept].labels
    assert kept_labels["hxp.config-hash"] == h1

    backend.apply(Restore(ref))
    seen = healthy(backend, stack_name, h1)
    assert seen.revision == 1
    assert set(containers(docker_engine, stack_name)) == {current}
    assert containers(docker_engine, stack_name)[current].attrs["HostConfig"]["RestartPolicy"] == {
        "Name": "on-failure",
        "MaximumRetryCount": 5,
    }
    with pytest.raises(BackendError, match="no previous version"):
        backend.apply(Restore(ref))

    backend.apply(Update(web(v2), h2, 3))
    healthy(backend, stack_name, h2)
    backend.apply(Commit(ref))
    assert set(containers(docker_engine, stack_name)) == {current}

    backend.apply(Stop(ref, grace_seconds=5))
    seen = backend.observe(stack_name)["web"]
    assert not seen.running
    assert seen.healthy is False
    assert "exited" in seen.detail
    assert (
        containers(docker_engine, stack_name)[current].attrs["HostConfig"]["RestartPolicy"]["Name"]
        == "no"
    )
    backend.apply(Start(ref))
    healthy(backend, stack_name, h2)

    backend.apply(Remove(ref))
    assert containers(docker_engine, stack_name) == {}
    assert backend.observe(stack_name) == {}
    backend.apply(Remove(ref))  # removing what is gone is fine


def test_containers_run_unprivileged(
    backend: DockerBackend, docker_engine: str, python_image: str, stack_name: str
) -> None:
    stack = make_stack(stack_name, python_image, free_port())
    backend.apply(Create(web(stack), "h", 1))
    container = containers(docker_engine, stack_name)[container_name(stack_name, "web")]
    host_config = container.attrs["HostConfig"]
    assert host_config["CapDrop"] == ["ALL"]
    assert host_config["SecurityOpt"] == ["no-new-privileges:true"]
    assert host_config["Init"] is True
    assert host_config["NetworkMode"] == "host"
    assert container.attrs["Config"]["User"] == f"{UID}:{UID}"
    # The server itself, seen from the host: the child of the container's init.
    init = container.attrs["State"]["Pid"]
    [child] = Path(f"/proc/{init}/task/{init}/children").read_text().split()
    status = dict(
        line.split(":", 1) for line in Path(f"/proc/{child}/status").read_text().splitlines()
    )
    assert status["Uid"].split() == [str(UID)] * 4
    assert int(status["CapEff"], 16) == 0
    assert int(status["CapPrm"], 16) == 0
    assert status["NoNewPrivs"].strip() == "1"


def test_a_tcp_healthcheck_works_with_busybox_nc(
    backend: DockerBackend, python_image: str, stack_name: str
) -> None:
    stack = make_stack(stack_name, python_image, free_port(), check="tcp")
    backend.apply(Create(web(stack), "h", 1))
    assert healthy(backend, stack_name, "h").running


def test_logs_return_the_servers_output(
    backend: DockerBackend, python_image: str, stack_name: str
) -> None:
    port = free_port()
    stack = make_stack(stack_name, python_image, port)
    backend.apply(Create(web(stack), "h", 1))
    healthy(backend, stack_name, "h")
    httpx.get(f"http://127.0.0.1:{port}/hello-from-the-test")
    ref = UnitRef.of(web(stack))

    def logged() -> ObservedUnit | None:
        text = "\n".join(backend.logs(ref, 50))
        return backend.observe(stack_name)["web"] if "hello-from-the-test" in text else None

    wait_for(logged, "the request in the log")
    assert any(f"Serving HTTP on 127.0.0.1 port {port}" in line for line in backend.logs(ref))
    assert len(backend.logs(ref, 2)) == 2
    assert backend.logs(UnitRef(stack_name, "nope", "nope")) == []


def test_a_missing_image_is_a_permanent_error(backend: DockerBackend, stack_name: str) -> None:
    stack = make_stack(stack_name, "hxp-test/missing:1", free_port())
    with pytest.raises(
        BackendError, match=r"image hxp-test/missing:1 not found on host 'box'"
    ) as e:
        backend.apply(Create(web(stack), "h", 1))
    assert not e.value.transient
    assert "no registry pull" in str(e.value)
    assert backend.observe(stack_name) == {}


def test_a_missing_executable_shows_in_detail_and_logs(
    backend: DockerBackend, python_image: str, stack_name: str
) -> None:
    # docker-init starts fine and then fails to exec the program: the container exits 127.
    stack = make_stack(stack_name, python_image, free_port())
    unit = web(stack)
    broken = UnitInstance(**{**unit.__dict__, "container_args": ("/no/such/program",)})
    backend.apply(Create(broken, "h", 1))

    def exited() -> ObservedUnit | None:
        seen = backend.observe(stack_name)["web"]
        return seen if not seen.running and "exit code 127" in seen.detail else None

    wait_for(exited, "the container to exit 127")
    assert any("/no/such/program" in line for line in backend.logs(UnitRef.of(unit)))


def test_a_failed_update_keeps_the_old_version_restorable(
    backend: DockerBackend, python_image: str, stack_name: str
) -> None:
    port = free_port()
    v1 = make_stack(stack_name, python_image, port)
    backend.apply(Create(web(v1), "h1", 1))
    healthy(backend, stack_name, "h1")
    v2 = make_stack(stack_name, "hxp-test/missing:1", port)
    with pytest.raises(BackendError, match="not found"):
        backend.apply(Update(web(v2), "h2", 2))
    # The image check comes before anything is stopped.
    assert backend.observe(stack_name)["web"].running
    crash = UnitInstance(
        **{**web(v1).__dict__, "container_args": ("python3", "-c", "raise SystemExit(3)")}
    )
    backend.apply(Update(crash, "h3", 3))

    def exited() -> ObservedUnit | None:
        seen = backend.observe(stack_name)["web"]
        return seen if "exit code 3" in seen.detail else None

    wait_for(exited, "the broken version to exit")
    backend.apply(Restore(UnitRef.of(web(v1))))
    assert healthy(backend, stack_name, "h1").revision == 1


def test_a_name_owned_by_another_instance_is_left_alone(
    backend: DockerBackend, python_image: str, stack_name: str
) -> None:
    # Instance "web-prev" would be called like the kept previous version of "web".
    stack = make_stack(stack_name, python_image, free_port())
    backend.apply(Create(web(stack), "h1", 1))
    backend.apply(Update(web(stack), "h2", 2))
    other = UnitRef(stack_name, "web-prev", "web-prev")
    with pytest.raises(BackendError, match="belongs to"):
        backend.apply(Remove(other))
    assert backend.observe(stack_name)["web"].config_hash == "h2"


def test_observe_skips_a_container_removed_between_listing_and_inspecting(
    docker_engine: str, busybox_image: str, tmp_path: Path
) -> None:
    """A deploy in another process may remove a container (a kept previous version) after the
    engine listed it and before observe inspected it. That container is gone, not an error:
    the docker fault campaign's `--replay 19:90` (kill-during-apply) failed with `Docker on
    host 'local': No such container: ...` while it watched a deploy. The removal is made real
    on the engine at exactly that moment."""
    from hxp.backends.base import LABEL_INSTANCE
    from hxp.spec import HostSpec

    name = f"race{uuid.uuid4().hex[:6]}"
    client = docker.DockerClient(base_url=docker_engine)
    labels = {LABEL_STACK: name, LABEL_INSTANCE: "web"}
    client.containers.create(
        busybox_image, ["sleep", "60"], name=container_name(name, "web"), labels=labels
    )
    kept = client.containers.create(
        busybox_image, ["true"], name=previous_name(name, "web"), labels=labels
    )
    backend = DockerBackend("box", HostSpec(backend="docker"), tmp_path)
    try:
        assert set(backend.observe(name)) == {"web"}
        api = backend._docker.api
        inspect = api.inspect_container

        def removed_first(container: Any) -> Any:
            if container in (kept.id, kept.name):
                client.containers.get(kept.id).remove(force=True)
            return inspect(container)

        api.inspect_container = removed_first
        seen = backend.observe(name)
        assert set(seen) == {"web"}
        assert seen["web"].exists
        assert [c.id for c in client.containers.list(all=True, filters={"id": kept.id})] == []
    finally:
        for c in client.containers.list(all=True, filters={"label": f"{LABEL_STACK}={name}"}):
            c.remove(force=True)
