"""Fixtures that start real components: a private Docker engine and locally built images."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.docker_engine import (
    build_busybox_image,
    build_chaos_image,
    build_python_image,
    dockerd_available,
    private_dockerd,
)


@pytest.fixture(scope="session")
def docker_engine() -> Iterator[str]:
    """DOCKER_HOST of a dockerd started for this test session (skips where none can run)."""
    if not dockerd_available():
        pytest.skip("dockerd is not installed or not root (scripts/install-system-deps.sh)")
    root = Path(tempfile.mkdtemp(prefix="hxp-dockerd-", dir="/tmp"))
    with private_dockerd(root) as url:
        previous = os.environ.get("DOCKER_HOST")
        os.environ["DOCKER_HOST"] = url
        try:
            yield url
        finally:
            if previous is None:
                os.environ.pop("DOCKER_HOST", None)
            else:
                os.environ["DOCKER_HOST"] = previous
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def busybox_image(docker_engine: str) -> str:
    return build_busybox_image(docker_engine)


@pytest.fixture(scope="session")
def python_image(docker_engine: str) -> str:
    return build_python_image(docker_engine)


@pytest.fixture(scope="session")
def chaos_image(docker_engine: str, python_image: str) -> str:
    """The Python image plus hxp.io.chaos_unit: the fault campaign's unit program."""
    return build_chaos_image(docker_engine)


@pytest.fixture(scope="session")
def systemd_container(docker_engine: str) -> Iterator[str]:
    """Name of a running container with systemd as PID 1, in the session's Docker engine.

    The `docker` CLI (and so DockerExecRunner) reaches it through DOCKER_HOST, which
    `docker_engine` sets. The first run builds a Debian root with debootstrap (about 90 s).
    """
    from tests.support.systemd_container import (
        import_systemd_image,
        run_systemd_container,
        systemd_root_available,
    )

    if not systemd_root_available():
        pytest.skip("debootstrap is not installed or not root (scripts/install-system-deps.sh)")
    image = import_systemd_image(docker_engine)
    with run_systemd_container(docker_engine, image) as name:
        yield name
