"""The warm runner (hxp_cli.runner) as a user meets it: `hxp server start` starts it, and flow
commands run there with the caller's cwd, environment, umask, stdio and exit code; killing or
interrupting the caller ends the command; a runner of other code steps aside; `hxp server stop`
ends it. The installed `hxp` script, no Prefect variable, a fresh HOME and state directory."""

from __future__ import annotations

import json
import os
import signal
import socket
import struct
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from hxp.backends.supervisor import alive
from tests.support.stacks import SHORT_BAKE, free_port
from tests.support.user import HXP, User
from tests.support.waiting import wait_for

pytestmark = pytest.mark.slow

SERVER = """
import socket, sys
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.0.1", int(sys.argv[1])))
s.listen()
while True:
    s.accept()[0].close()
"""


def _stack(folder: Path, name: str, body: str, port: int) -> Path:
    """One process unit `u` (its command `body`, a shell line) with a TCP check on `port`."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "srv.py").write_text(SERVER)
    stack = folder / "stack.yaml"
    stack.write_text(
        json.dumps(
            {
                "stack": name,
                "deploy": {"bake": SHORT_BAKE},
                "hosts": {"local": {"backend": "process"}},
                "services": {
                    "u": {
                        "host": "local",
                        "command": ["sh", "-c", body],
                        "ports": {"tcp": port},
                        "health": {
                            "tcp": {"port": port},
                            "interval": "200ms",
                            "start_period": "20s",
                            "retries": 3,
                        },
                    }
                },
            }
        )
    )
    return stack


class Runner:
    def __init__(self, user: User, state: Path) -> None:
        self.user = user
        self.state = state

    @property
    def log(self) -> str:
        path = self.state / "prefect" / "runner.log"
        return path.read_text() if path.exists() else ""

    def record(self) -> dict[str, int] | None:
        try:
            data: dict[str, int] = json.loads((self.state / "prefect" / "runner.json").read_text())
        except (OSError, ValueError):
            return None
        return data if alive(data["pid"], data["ticks"]) else None

    def listening(self) -> dict[str, int]:
        return wait_for(
            lambda: self.record() if "listening" in self.log else None,
            "the warm runner to listen",
            120,
        )

    def runs(self) -> list[int]:
        return [
            int(line.split()[1].rstrip(":"))
            for line in self.log.splitlines()
            if line.startswith("run ")
        ]


@pytest.fixture(scope="module")
def runner(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Runner]:
    tmp = tmp_path_factory.mktemp("warm")
    home = tmp / "home"
    home.mkdir()
    user = User(home, tmp / "state")
    started = user.hxp("server", "start")
    assert started.returncode == 0, started.stderr
    found = Runner(user, tmp / "state")
    found.listening()
    yield found
    user.hxp("server", "stop")


def _popen(user: User, *args: str, cwd: Path, **kw: object) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [str(HXP), *args],
        env=user.env,
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **kw,  # type: ignore[call-overload]
    )


def test_a_flow_command_runs_in_the_runner_as_the_caller(runner: Runner, tmp_path: Path) -> None:
    port = free_port()
    marker = tmp_path / "marker"
    folder = tmp_path / "project"
    folder.mkdir()
    # the unit writes the TZ it was given and a file under the umask it inherited: both come
    # from the caller's process through the runner's command and the process backend
    body = f'echo "$TZ" > {marker}; exec python3 {folder}/srv.py {port}'
    _stack(folder, "warm1", body, port)
    env = {**runner.user.env, "TZ": "UTC+7"}
    before = len(runner.runs())
    applied = subprocess.run(
        [str(HXP), "apply", "-f", "stack.yaml"],  # relative: the runner takes the caller's cwd
        env=env,
        cwd=folder,
        capture_output=True,
        text=True,
        timeout=180,
        preexec_fn=lambda: os.umask(0o077),
        check=False,
    )
    assert applied.returncode == 0, applied.stdout + applied.stderr
    assert "Deploy #1 of stack warm1 succeeded." in applied.stdout  # its stdout reached us
    assert "Prefect API: http" in applied.stderr  # and its stderr
    assert len(runner.runs()) == before + 1, runner.log  # it ran in the runner
    assert marker.read_text().strip() == "UTC+7"
    assert marker.stat().st_mode & 0o077 == 0, oct(marker.stat().st_mode)

    # a failed deploy's exit code comes back too (and the previous revision stays)
    (folder / "stack.yaml").write_text(
        (folder / "stack.yaml").read_text().replace("exec python3", "exit 3; exec python3")
    )
    failed = subprocess.run(
        [str(HXP), "apply", "-f", "stack.yaml"],
        env=env,
        cwd=folder,
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert failed.returncode == 1, failed.stdout + failed.stderr
    assert "error" in failed.stderr.lower()
    assert len(runner.runs()) == before + 2, runner.log
    runner.user.hxp("down", "-f", str(folder / "stack.yaml"))


def _wait_gone(pid: int, seconds: float = 20.0) -> None:
    def gone() -> bool:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        with open(f"/proc/{pid}/stat") as stat:  # a zombie of the runner's keeper counts
            return stat.read().rsplit(")", 1)[1].split()[0] == "Z"

    wait_for(gone, f"process {pid} to end", seconds)


@pytest.mark.parametrize("how", ["SIGKILL", "SIGINT"])
def test_the_command_ends_with_its_caller(runner: Runner, tmp_path: Path, how: str) -> None:
    port = free_port()
    folder = tmp_path / "never"
    _stack(folder, f"warm-{how.lower()}", "exec sleep 600", port)  # never ready
    before = len(runner.runs())
    # ^C as at a terminal: a test run started in the background (CI) inherits it ignored
    restore = lambda: signal.signal(signal.SIGINT, signal.SIG_DFL)  # noqa: E731
    caller = _popen(runner.user, "apply", "-f", "stack.yaml", cwd=folder, preexec_fn=restore)
    try:
        runs = wait_for(lambda: runner.runs()[before:], "the apply to start in the runner", 60)
        command = runs[0]
        time.sleep(1.0)
        caller.send_signal(getattr(signal, how))
        # Prefect acts on ^C once the task it waits for ends (the never-ready unit's start
        # period), in its own process or not: the same wait as without a runner
        code = caller.wait(timeout=120)
        if how == "SIGINT":
            assert code == 130, caller.stderr.read() if caller.stderr else ""
        else:
            assert code == -signal.SIGKILL
        _wait_gone(command)
    finally:
        caller.kill()
        caller.communicate()
    runner.user.hxp("down", "-f", str(folder / "stack.yaml"))


def test_a_runner_of_other_code_steps_aside(runner: Runner, tmp_path: Path) -> None:
    old = runner.listening()
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.connect(str(runner.state / "prefect" / "runner.sock"))
        socket.send_fds(sock, [b"F"], [0, 1, 2])
        request = {"argv": ["apply"], "cwd": "/", "umask": 0o22, "env": {}, "fingerprint": "x"}
        raw = json.dumps(request).encode()
        sock.sendall(struct.pack("!I", len(raw)) + raw)
        size = struct.unpack("!I", sock.recv(4))[0]
        answer = json.loads(sock.recv(size))
    assert answer == {"stale": True}
    wait_for(lambda: not alive(old["pid"], old["ticks"]), "the stale runner to exit", 30)

    # the next flow command runs in its own process and starts a fresh runner
    port = free_port()
    folder = tmp_path / "after"
    _stack(folder, "warm-after", f"exec python3 {folder}/srv.py {port}", port)
    applied = runner.user.hxp("apply", "-f", str(folder / "stack.yaml"))
    assert applied.returncode == 0, applied.stdout + applied.stderr
    new = runner.listening()
    assert new["pid"] != old["pid"]
    runner.user.hxp("down", "-f", str(folder / "stack.yaml"))


def test_server_stop_ends_the_runner(tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir()
    user = User(home, tmp_path / "state")
    assert user.hxp("server", "start").returncode == 0
    found = Runner(user, tmp_path / "state").listening()
    status = user.hxp("server", "status")
    assert f"warm runner: pid {found['pid']}" in status.stdout
    assert user.hxp("server", "stop").returncode == 0
    wait_for(lambda: not alive(found["pid"], found["ticks"]), "the runner to exit", 30)
