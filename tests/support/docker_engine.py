"""A private Docker engine for the test run, and images built locally with `docker import`.

No registry is reachable here: images are made from this machine's own files (busybox, and a
Python interpreter with its shared-library closure), as TOOLING.md describes.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tarfile
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

BUSYBOX_IMAGE = "hxp-test/busybox:1"
PYTHON_IMAGE = "hxp-test/python:3"


def dockerd_available() -> bool:
    return shutil.which("dockerd") is not None and os.geteuid() == 0


class PrivateDockerd:
    """A dockerd with its own data/exec roots and socket under `root`, started by this test
    run: only such an engine may be restarted (`restart`: SIGTERM, then started again with the
    same arguments), never one the run did not start."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.url = f"unix://{root / 'docker.sock'}"
        self.argv = [
            "dockerd",
            "--storage-driver=overlay2",
            "--iptables=false",
            "--bridge=none",
            f"--data-root={root / 'data'}",
            f"--exec-root={root / 'exec'}",
            f"--pidfile={root / 'docker.pid'}",
            f"--host={self.url}",
        ]
        self._proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        """Start the engine and wait until it answers (RuntimeError if it exits first)."""
        import docker

        self.root.mkdir(parents=True, exist_ok=True)
        with (self.root / "dockerd.log").open("ab") as log:
            self._proc = proc = subprocess.Popen(
                self.argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        deadline = time.monotonic() + 60
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"dockerd exited: see {self.root / 'dockerd.log'}")
            try:
                docker.DockerClient(base_url=self.url).ping()
                return
            except Exception:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)

    def stop(self) -> None:
        """SIGTERM the engine (it stops its containers) and wait for it to exit."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def restart(self, down_seconds: float = 0.0) -> None:
        """Stop the engine and start it again with the same arguments (after `down_seconds`)."""
        self.stop()
        time.sleep(down_seconds)
        self.start()

    def close(self) -> None:
        self.stop()
        for mount in (self.root / "exec" / "netns" / "default", self.root / "data"):
            subprocess.run(["umount", "-l", str(mount)], capture_output=True, check=False)


@contextmanager
def own_dockerd(root: Path) -> Iterator[PrivateDockerd]:
    """A PrivateDockerd under `root`, started for the block and stopped after it."""
    engine = PrivateDockerd(root)
    try:
        engine.start()
        yield engine
    finally:
        engine.close()


@contextmanager
def private_dockerd(root: Path) -> Iterator[str]:
    """Start dockerd with its own data/exec roots and socket; yield its DOCKER_HOST."""
    with own_dockerd(root) as engine:
        yield engine.url


def _import(url: str, folder: Path, tag: str) -> None:
    import docker

    client = docker.DockerClient(base_url=url)
    with tempfile.TemporaryFile() as buf:
        with tarfile.open(fileobj=buf, mode="w") as tar:
            tar.add(folder, arcname=".")
        buf.seek(0)
        client.api.import_image_from_data(
            buf.read(), repository=tag.split(":")[0], tag=tag.split(":")[1]
        )


def build_busybox_image(url: str, tag: str = BUSYBOX_IMAGE) -> str:
    """A 2 MB image: static busybox plus its applet links."""
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / "bin").mkdir()
        (root / "tmp").mkdir(mode=0o1777)
        shutil.copy2("/bin/busybox", root / "bin" / "busybox")
        applets = subprocess.run(
            ["/bin/busybox", "--list"], capture_output=True, text=True, check=True
        ).stdout.split()
        for applet in applets:
            link = root / "bin" / applet
            if not link.exists():
                link.symlink_to("busybox")
        _import(url, root, tag)
    return tag


def _ldd(path: str) -> set[str]:
    out = subprocess.run(["ldd", path], capture_output=True, text=True, check=False).stdout
    libs = set()
    for line in out.splitlines():
        parts = line.split("=>")
        target = (parts[1] if len(parts) > 1 else parts[0]).strip().split(" ")[0]
        if target.startswith("/"):
            libs.add(target)
    return libs


def build_python_image(url: str, tag: str = PYTHON_IMAGE) -> str:
    """Debian's python3 with its standard library and shared-library closure, plus busybox."""
    python = os.path.realpath(shutil.which("python3.11") or "/usr/bin/python3.11")
    if not python.startswith("/usr/"):
        python = "/usr/bin/python3.11"
    stdlib = "/usr/lib/python3.11"
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        files = {python} | _ldd(python)
        for so in Path(stdlib, "lib-dynload").glob("*.so"):
            files |= _ldd(str(so))
        files.add("/lib64/ld-linux-x86-64.so.2")
        for f in files:
            dest = root / f.lstrip("/")
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(f, dest)
        shutil.copytree(
            stdlib,
            root / stdlib.lstrip("/"),
            symlinks=True,
            ignore=shutil.ignore_patterns("test", "__pycache__", "idlelib", "tkinter"),
        )
        (root / "usr/bin/python3").symlink_to("python3.11") if not (
            root / "usr/bin/python3"
        ).exists() else None
        (root / "bin").mkdir(exist_ok=True)
        shutil.copy2("/bin/busybox", root / "bin" / "busybox")
        for applet in ("sh", "cat", "ls", "sleep", "wget", "nc", "echo", "true", "false"):
            link = root / "bin" / applet
            if not link.exists():
                link.symlink_to("busybox")
        (root / "tmp").mkdir(mode=0o1777, exist_ok=True)
        _import(url, root, tag)
    return tag


CHAOS_IMAGE = "hxp-test/chaos-python:3"


def build_chaos_image(url: str, tag: str = CHAOS_IMAGE) -> str:
    """PYTHON_IMAGE plus hxp.io.chaos_unit (and the two package files it imports) under
    hxp.chaos.CHAOS_PYTHONPATH: the fault campaign's unit program on the docker backend. Built
    with the legacy builder FROM the local Python image (built first if missing)."""
    import io

    import docker

    from hxp.chaos import CHAOS_PYTHONPATH

    client = docker.DockerClient(base_url=url)
    try:
        client.images.get(PYTHON_IMAGE)
    except docker.errors.ImageNotFound:
        build_python_image(url)
    src = Path(__file__).resolve().parents[2] / "hxp"
    files = {
        "hxp/__init__.py": src / "__init__.py",
        "hxp/io/__init__.py": src / "io" / "__init__.py",
        "hxp/io/chaos_unit.py": src / "io" / "chaos_unit.py",
    }
    dockerfile = f"FROM {PYTHON_IMAGE}\nCOPY hxp {CHAOS_PYTHONPATH}/hxp\n"
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in [("Dockerfile", dockerfile.encode())] + [
            (arc, path.read_bytes()) for arc, path in files.items()
        ]:
            info = tarfile.TarInfo(name)
            info.size, info.mode = len(data), 0o644
            tar.addfile(info, io.BytesIO(data))
    buf.seek(0)
    client.images.build(fileobj=buf, custom_context=True, tag=tag, rm=True, pull=False)
    return tag
