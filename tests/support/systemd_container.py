"""A Debian root with systemd as PID 1, run as a container of the test's private Docker engine.

The root is built once with debootstrap (about 90 s) and cached under CACHE_DIR; a marker file
written last says the build finished, and the build happens in a temporary folder that is renamed
into place, so an interrupted build is never reused (TOOLING.md, "systemd for real").
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tarfile
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

SYSTEMD_IMAGE = "hxp-test/debian-systemd:12"
CACHE_DIR = Path("/var/cache/hxp-test/debian-systemd")
COMPLETE_MARKER = ".hxp-complete"
PACKAGES = "systemd,systemd-sysv,dbus,python3,procps"
SUITE = "bookworm"
LABEL = "hxp-test"


def _marker(packages: str) -> str:
    return f"{SUITE} {packages}\n"


def _complete(cache: Path, packages: str = PACKAGES) -> bool:
    """A finished build of the same suite and packages."""
    try:
        return (cache / COMPLETE_MARKER).read_text() == _marker(packages)
    except OSError:
        return False


def systemd_root_available() -> bool:
    """Whether a cached root exists or debootstrap can build one here."""
    return _complete(CACHE_DIR) or (shutil.which("debootstrap") is not None and os.geteuid() == 0)


def debian_systemd_root(cache: Path = CACHE_DIR, packages: str = PACKAGES) -> Path:
    """The cached Debian root with systemd, building it (about 90 s) if none is complete.
    `packages` (comma-separated, for debootstrap) may add to the default set."""
    if _complete(cache, packages):
        return cache
    cache.parent.mkdir(parents=True, exist_ok=True)
    build = Path(tempfile.mkdtemp(prefix=f".{cache.name}-build-", dir=cache.parent))
    try:
        root = build / "root"
        done = subprocess.run(
            ["debootstrap", "--variant=minbase", f"--include={packages}", SUITE, str(root)],
            capture_output=True,
            text=True,
            timeout=1800,
            check=False,
        )
        if done.returncode != 0:
            raise RuntimeError(
                f"debootstrap exited {done.returncode}: {(done.stdout + done.stderr)[-2000:]}"
            )
        # No getty on a container's console; no machine-id clash between containers.
        for unit in ("getty@tty1.service",):
            link = root / "etc/systemd/system/getty.target.wants" / unit
            link.unlink(missing_ok=True)
        (root / "etc/machine-id").write_text("")
        (root / COMPLETE_MARKER).write_text(_marker(packages))
        if cache.exists() and not _complete(cache, packages):  # an interrupted older layout
            shutil.rmtree(cache)
        try:
            root.rename(cache)
        except OSError:
            if not _complete(cache, packages):  # else another run finished first: use its build
                raise
    finally:
        shutil.rmtree(build, ignore_errors=True)
    return cache


def import_systemd_image(url: str, tag: str = SYSTEMD_IMAGE) -> str:
    """`docker import` the cached root into the engine at `url` (once per engine)."""
    import docker

    client = docker.DockerClient(base_url=url)
    try:
        client.images.get(tag)
        return tag
    except docker.errors.ImageNotFound:
        pass
    root = debian_systemd_root()
    repository, version = tag.split(":")
    with tempfile.TemporaryFile(dir="/var/tmp") as buf:
        with tarfile.open(fileobj=buf, mode="w") as tar:
            tar.add(root, arcname=".")
        buf.seek(0)
        client.api.import_image_from_data(buf, repository=repository, tag=version)
    return tag


def _exec(container: object, argv: list[str]) -> tuple[int, str]:
    code, out = container.exec_run(argv)  # type: ignore[attr-defined]
    return int(code), out.decode(errors="replace").strip()


@contextmanager
def run_systemd_container(url: str, image: str = SYSTEMD_IMAGE) -> Iterator[str]:
    """Run `image` with systemd as PID 1; yield the container's name once systemd is up."""
    import docker

    client = docker.DockerClient(base_url=url)
    name = f"hxp-systemd-{uuid.uuid4().hex[:8]}"
    container = client.containers.run(
        image,
        ["/sbin/init"],
        name=name,
        detach=True,
        network_mode="host",
        stop_signal="SIGRTMIN+3",
        tmpfs={"/run": "", "/run/lock": "", "/tmp": ""},
        volumes={"/sys/fs/cgroup": {"bind": "/sys/fs/cgroup", "mode": "ro"}},
        labels={LABEL: "systemd"},
        environment={"container": "docker"},
    )
    try:
        deadline = time.monotonic() + 60
        state = ""
        while time.monotonic() < deadline:
            container.reload()
            if container.status != "running":
                raise RuntimeError(f"systemd container exited: {container.logs()[-2000:]!r}")
            _, state = _exec(container, ["systemctl", "is-system-running"])
            if state in ("running", "degraded"):
                break
            time.sleep(0.2)
        else:
            raise RuntimeError(f"systemd did not finish booting (state {state!r})")
        yield name
    finally:
        try:
            container.stop(timeout=10)
        finally:
            container.remove(force=True)


def unit_files_left(container: str, stack: str) -> str:
    """The unit files hxp installed for `stack` still in `container` (`ls` output; empty when
    none is left). The `docker` CLI reaches the container through DOCKER_HOST."""
    left = subprocess.run(
        ["docker", "exec", container, "sh", "-c", f"ls /etc/systemd/system/hxp-{stack}-*"],
        capture_output=True,
        text=True,
        check=False,
    )
    return left.stdout
