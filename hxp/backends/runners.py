"""How a backend runs commands on a host: locally, over ssh, or by `docker exec` into a container.

Commands are argv lists end to end. ssh joins its arguments into one string for the remote
shell, so SshRunner quotes every element with shlex.quote; the others never use a shell.
Every call has a timeout; a timeout or a lost connection is a transient BackendError, a refused
host key or login over ssh a permanent one (SshFailure says which).
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shlex
import socket
import subprocess
import tempfile
import threading
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Protocol

from hxp.errors import BackendError
from hxp.spec import HostSpec

DEFAULT_TIMEOUT = 60.0
SSH_CONNECT_TIMEOUT = 10
# ssh exits 255 when it cannot connect or the connection drops (the remote command's own
# status otherwise).
SSH_CONNECTION_FAILED = 255
_DOCKER_UNREACHABLE = (
    "Cannot connect to the Docker daemon",
    "error during connect",
)
_DOCKER_CONTAINER_DOWN = ("is not running", "is restarting", "is paused")


@dataclass(frozen=True)
class RunResult:
    """What a command did: its exit status and its output."""

    returncode: int
    stdout: bytes
    stderr: bytes

    @property
    def text(self) -> str:
        return self.stdout.decode("utf-8", "replace")

    @property
    def error_text(self) -> str:
        return self.stderr.decode("utf-8", "replace").strip()


class Runner(Protocol):
    """Runs argv lists and moves small files on one host."""

    description: str

    def run(
        self,
        argv: list[str],
        input: bytes | None = None,
        check: bool = True,
        timeout: float | None = None,
    ) -> RunResult:
        """Run `argv` on the host; with `check`, a non-zero exit is a BackendError."""
        ...

    def write_file(self, path: str, content: str, mode: int) -> None:
        """Replace `path` atomically with `content` (UTF-8), with permission bits `mode`."""
        ...

    def read_file(self, path: str) -> str | None:
        """The text of `path`, or None when it does not exist."""
        ...


def _tail(text: str, limit: int = 500) -> str:
    return text if len(text) <= limit else "..." + text[-limit:]


def _failed(description: str, argv: list[str], result: RunResult) -> BackendError:
    shown = shlex.join(argv)
    return BackendError(
        f"{description}: `{_tail(shown, 200)}` exited {result.returncode}: "
        f"{_tail(result.error_text) or '(no output)'}"
    )


class CommandRunner:
    """Shared mechanics: run a local client program (the command itself, ssh, docker)."""

    description = "local"

    def __init__(self, timeout: float = DEFAULT_TIMEOUT) -> None:
        self.timeout = timeout

    def command(self, argv: list[str], interactive: bool) -> list[str]:
        """The local argv that runs `argv` on the host."""
        return list(argv)

    def connection_failed(self, result: RunResult) -> bool:
        """Whether a non-zero exit means the host was unreachable, not that the command failed."""
        return False

    def session(self) -> AbstractContextManager[object]:
        """Held while one command runs: how many may run at once on this host (no limit
        here)."""
        return nullcontext()

    def run(
        self,
        argv: list[str],
        input: bytes | None = None,
        check: bool = True,
        timeout: float | None = None,
    ) -> RunResult:
        if not argv or not all(isinstance(a, str) for a in argv):
            raise BackendError(f"{self.description}: a command must be a non-empty list of str")
        local = self.command(argv, interactive=input is not None)
        limit = self.timeout if timeout is None else timeout
        try:
            with self.session():
                proc = subprocess.run(
                    local,
                    input=input,
                    stdin=None if input is not None else subprocess.DEVNULL,
                    capture_output=True,
                    timeout=limit,
                    check=False,
                )
        except subprocess.TimeoutExpired:
            raise BackendError(
                f"{self.description}: `{_tail(shlex.join(argv), 200)}` timed out after {limit:g}s",
                transient=True,
            ) from None
        except FileNotFoundError as exc:
            raise BackendError(f"{self.description}: cannot run {local[0]!r}: {exc}") from None
        except OSError as exc:
            raise BackendError(f"{self.description}: cannot run {local[0]!r}: {exc}") from None
        result = RunResult(proc.returncode, proc.stdout, proc.stderr)
        if result.returncode != 0 and self.connection_failed(result):
            raise BackendError(
                f"{self.description}: connection failed: {_tail(result.error_text)}",
                transient=True,
            )
        if check and result.returncode != 0:
            raise _failed(self.description, argv, result)
        return result

    def write_file(self, path: str, content: str, mode: int) -> None:
        # A temporary file beside the target, then a rename: readers never see half a file.
        # One command (one SSH round trip, not three): the paths are arguments, never code.
        tmp = f"{path}.hxp-tmp"
        script = 'cat > "$1" && chmod "$2" -- "$1" && mv -f -- "$1" "$3"'
        self.run(["sh", "-c", script, "sh", tmp, f"{mode:o}", path], input=content.encode("utf-8"))

    def read_file(self, path: str) -> str | None:
        result = self.run(["cat", "--", path], check=False)
        if result.returncode == 0:
            return result.stdout.decode("utf-8", "replace")
        if b"No such file or directory" in result.stderr:
            return None
        raise _failed(self.description, ["cat", "--", path], result)


class LocalRunner(CommandRunner):
    """Commands on this machine; files written directly."""

    description = "local"

    def write_file(self, path: str, content: str, mode: int) -> None:
        target = Path(path)
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(content)
            os.chmod(tmp, mode)
            os.replace(tmp, target)
        except OSError as exc:
            Path(tmp).unlink(missing_ok=True)
            raise BackendError(f"local: cannot write {path}: {exc}") from None

    def read_file(self, path: str) -> str | None:
        try:
            return Path(path).read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise BackendError(f"local: cannot read {path}: {exc}") from None


class SshFailure(StrEnum):
    """Why ssh could not run a command (it exits 255 for all of them), and what it is worth."""

    HOST_KEY = "host-key"  # the key the host presents is not the one pinned: permanent
    AUTH = "auth"  # our key was refused: permanent
    CONFIG = "config"  # bad option, missing key file, unknown host name: permanent
    UNREACHABLE = "unreachable"  # refused, timed out, no route, dropped: transient

    @property
    def transient(self) -> bool:
        return self is SshFailure.UNREACHABLE


# ssh's own messages (OpenSSH 9.x), checked in order; anything else at exit 255 is taken for a
# lost connection (transient), as before.
_SSH_FAILURES = (
    (
        SshFailure.HOST_KEY,
        (
            "host key verification failed",
            "remote host identification has changed",
            "host key is known for",
            "host key for ",
        ),
    ),
    (SshFailure.AUTH, ("permission denied (", "too many authentication failures")),
    (
        SshFailure.CONFIG,
        (
            "bad configuration option",
            "could not resolve hostname",
            "no such identity",
            "load key",
            "command-line line",
            "bad port",
        ),
    ),
)


def classify_ssh_failure(stderr: str) -> SshFailure:
    """The kind of an ssh failure (exit 255), from ssh's message."""
    lowered = stderr.lower()
    for kind, markers in _SSH_FAILURES:
        if any(m in lowered for m in markers):
            return kind
    return SshFailure.UNREACHABLE


def control_dir_for(state_dir: str | Path) -> Path:
    """Where the ssh control sockets of a state dir live: STATE/ssh, or a short directory under
    /tmp named after it when that path is too long for a unix socket (108 bytes, and ssh adds a
    random suffix while it binds)."""
    preferred = Path(state_dir).resolve() / "ssh"
    if len(str(preferred)) <= _CONTROL_DIR_MAX:
        return preferred
    digest = hashlib.sha256(str(preferred).encode()).hexdigest()[:12]
    return Path(tempfile.gettempdir()) / f"hxp-ssh-{os.geteuid()}-{digest}"


# The socket's name is 14 characters, ssh binds a name 17 characters longer first.
_CONTROL_DIR_MAX = 104 - 1 - 14 - 17 - 1
_MASTER_LOCKS: dict[str, threading.Lock] = {}
_MASTER_LOCKS_GUARD = threading.Lock()
#: Commands run at once on one SSH host by one process: under OpenSSH's default MaxSessions
#: (10), leaving room for the master's own session and an operator's.
MAX_SESSIONS = 8
_SESSIONS: dict[str, threading.BoundedSemaphore] = {}


class SshRunner(CommandRunner):
    """Commands over ssh (BatchMode: never a password prompt); argv quoted for the remote shell.

    Host keys are pinned: with `known_hosts`, only that file is trusted, and an unknown or
    changed key is refused (StrictHostKeyChecking=yes) with a message naming the host. With
    `control_dir`, every command shares one multiplexed connection (a ControlMaster started on
    first use, kept `control_persist` seconds after the last one), so many commands open one
    TCP connection, not one each.
    """

    def __init__(
        self,
        address: str,
        user: str | None = None,
        port: int = 22,
        timeout: float = DEFAULT_TIMEOUT,
        *,
        identity_file: str | None = None,
        known_hosts: str | None = None,
        control_dir: str | Path | None = None,
        control_persist: int = 300,
    ) -> None:
        super().__init__(timeout)
        self.address = address
        self.user = user
        self.port = port
        self.identity_file = identity_file
        self.known_hosts = known_hosts
        self.control_persist = control_persist
        self.description = f"ssh {user + '@' if user else ''}{address}:{port}"
        self.control_path: Path | None = None
        if control_dir is not None:
            # The key and the pinned known_hosts are part of the name: a connection made under
            # one stack's pins is never reused by a runner with other pins.
            who = f"{user or ''}@{address}:{port}|{identity_file or ''}|{known_hosts or ''}"
            name = hashlib.sha256(who.encode()).hexdigest()[:10]
            self.control_path = Path(control_dir) / f"hxp-{name}"

    def options(self) -> list[str]:
        """The ssh options every invocation shares (connection, identity, pinned host keys)."""
        local = [
            "-o",
            "BatchMode=yes",
            "-o",
            f"ConnectTimeout={SSH_CONNECT_TIMEOUT}",
            "-o",
            "ServerAliveInterval=15",
            "-o",
            "ServerAliveCountMax=3",
            "-o",
            "StrictHostKeyChecking=yes",
        ]
        if self.known_hosts:
            local += [
                "-o",
                f"UserKnownHostsFile={self.known_hosts}",
                "-o",
                "GlobalKnownHostsFile=/dev/null",
            ]
        if self.identity_file:
            local += ["-o", f"IdentityFile={self.identity_file}", "-o", "IdentitiesOnly=yes"]
        local += ["-p", str(self.port)]
        if self.user:
            local += ["-l", self.user]
        return local

    def session(self) -> AbstractContextManager[object]:
        """One of MAX_SESSIONS slots for this host (per process): sshd refuses a multiplexed
        connection's 11th session by default (MaxSessions 10) and drops unauthenticated
        connections beyond 10 (MaxStartups 10:30:100), and a deploy of 30 units runs far more
        commands than that side by side."""
        key = str(self.control_path) if self.control_path is not None else self.description
        with _MASTER_LOCKS_GUARD:
            slots = _SESSIONS.setdefault(key, threading.BoundedSemaphore(MAX_SESSIONS))
        return slots

    def command(self, argv: list[str], interactive: bool) -> list[str]:
        local = ["ssh", *self.options()]
        if self.control_path is not None:
            self.ensure_master()
            local += ["-o", "ControlMaster=no", "-o", f"ControlPath={self.control_path}"]
        # ssh joins everything after the host with spaces into one remote shell command line.
        return [*local, "--", self.address, shlex.join(argv)]

    def connection_failed(self, result: RunResult) -> bool:
        if result.returncode != SSH_CONNECTION_FAILED:
            return False
        kind = classify_ssh_failure(result.error_text)
        if not kind.transient:
            raise self._refused(kind, result.error_text)
        return True

    def _refused(self, kind: SshFailure, stderr: str) -> BackendError:
        match kind:
            case SshFailure.HOST_KEY:
                pinned = self.known_hosts or "the user's known_hosts"
                why = (
                    f"host key verification failed for {self.address}: the key it presents "
                    f"is not the one pinned in {pinned}; refusing to connect (if the host was "
                    "reinstalled, replace its line there)"
                )
            case SshFailure.AUTH:
                key = self.identity_file or "the default keys"
                why = f"{self.address} refused our key ({key})"
            case SshFailure.CONFIG | SshFailure.UNREACHABLE:
                why = "ssh cannot connect as configured"
        return BackendError(f"{self.description}: {why}: {_tail(stderr, 300)}")

    # ---------------------------------------------------------------- multiplexing

    def master_alive(self) -> bool:
        """Whether a master listens on the control socket (a stale file does not count)."""
        if self.control_path is None:
            return False
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            try:
                s.connect(str(self.control_path))
            except OSError:
                return False
        return True

    def ensure_master(self) -> None:
        """Start the shared connection unless one is up: once per process and host, under a
        lock (threads here) and a file lock (other processes), so parallel commands never race
        to open connections of their own."""
        path = self.control_path
        if path is None or self.master_alive():
            return
        with _MASTER_LOCKS_GUARD:
            lock = _MASTER_LOCKS.setdefault(str(path), threading.Lock())
        with lock:
            path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            with open(f"{path}.lock", "a") as held:
                fcntl.flock(held, fcntl.LOCK_EX)
                if self.master_alive():
                    return
                path.unlink(missing_ok=True)
                argv = [
                    "ssh",
                    *self.options(),
                    "-o",
                    "ControlMaster=yes",
                    "-o",
                    f"ControlPath={path}",
                    "-o",
                    f"ControlPersist={self.control_persist}",
                    "-o",
                    "StreamLocalBindUnlink=yes",
                    "-N",
                    "-f",
                    "--",
                    self.address,
                ]
                result = self._client(argv, "start the shared connection")
                if result.returncode != 0:
                    kind = classify_ssh_failure(result.error_text)
                    if not kind.transient:
                        raise self._refused(kind, result.error_text)
                    raise BackendError(
                        f"{self.description}: connection failed: {_tail(result.error_text)}",
                        transient=True,
                    )

    def _client(self, argv: list[str], what: str) -> RunResult:
        # The master goes to the background with its output on /dev/null (ssh -f); a file, not
        # a pipe, takes what it says before that, so nothing waits on the lingering process.
        with tempfile.TemporaryFile() as err:
            try:
                proc = subprocess.run(
                    argv,
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.DEVNULL,
                    stderr=err,
                    timeout=SSH_CONNECT_TIMEOUT + 10,
                    check=False,
                )
            except subprocess.TimeoutExpired:
                raise BackendError(
                    f"{self.description}: {what}: timed out", transient=True
                ) from None
            except OSError as exc:
                raise BackendError(f"{self.description}: cannot run ssh: {exc}") from None
            err.seek(0)
            return RunResult(proc.returncode, b"", err.read())

    def forward_unix_socket(self, remote: str, local: str | Path) -> Path:
        """Make `local` a socket that reaches the host's unix socket `remote` through the shared
        connection (how the Docker backend talks to a remote engine with these ssh options)."""
        if self.control_path is None:
            raise BackendError(f"{self.description}: forwarding needs a control directory")
        self.ensure_master()
        argv = [
            "ssh",
            *self.options(),
            "-o",
            f"ControlPath={self.control_path}",
            "-O",
            "forward",
            "-L",
            f"{local}:{remote}",
            "--",
            self.address,
        ]
        result = self._client(argv, f"forward {remote}")
        if result.returncode != 0:
            raise BackendError(
                f"{self.description}: cannot forward {remote}: {_tail(result.error_text)}",
                transient=classify_ssh_failure(result.error_text).transient,
            )
        return Path(local)

    def close(self) -> None:
        """End the shared connection (if any)."""
        if self.control_path is None or not self.master_alive():
            return
        self._client(
            [
                "ssh",
                *self.options(),
                "-o",
                f"ControlPath={self.control_path}",
                "-O",
                "exit",
                "--",
                self.address,
            ],
            "close the shared connection",
        )


class DockerExecRunner(CommandRunner):
    """Commands inside a running container (`docker exec`, honouring DOCKER_HOST)."""

    def __init__(self, container: str, timeout: float = DEFAULT_TIMEOUT) -> None:
        super().__init__(timeout)
        self.container = container
        self.description = f"docker-exec {container}"

    def command(self, argv: list[str], interactive: bool) -> list[str]:
        # docker stops parsing its own options at the container name: argv passes through.
        return ["docker", "exec", *(["-i"] if interactive else []), self.container, *argv]

    def connection_failed(self, result: RunResult) -> bool:
        err = result.error_text
        if any(marker in err for marker in _DOCKER_UNREACHABLE):
            return True
        return err.startswith("Error response from daemon") and any(
            marker in err for marker in _DOCKER_CONTAINER_DOWN
        )


def runner_for(
    host: HostSpec, timeout: float = DEFAULT_TIMEOUT, state_dir: str | Path | None = None
) -> Runner:
    """The runner that reaches `host`; with `state_dir`, ssh connections are shared through
    control sockets there (control_dir_for)."""
    match host.runner:
        case "local":
            return LocalRunner(timeout)
        case "ssh":
            if host.address is None:
                raise BackendError("runner 'ssh' needs an address")
            return SshRunner(
                host.address,
                host.ssh_user,
                host.ssh_port,
                timeout,
                identity_file=host.ssh_key,
                known_hosts=host.known_hosts,
                control_dir=control_dir_for(state_dir) if state_dir is not None else None,
            )
        case "docker-exec":
            if host.container is None:
                raise BackendError("runner 'docker-exec' needs a container")
            return DockerExecRunner(host.container, timeout)
