"""How a backend runs commands on a host: locally, over ssh, or by `docker exec` into a container.

Commands are argv lists end to end. ssh joins its arguments into one string for the remote
shell, so SshRunner quotes every element with shlex.quote; the others never use a shell.
Every call has a timeout; a timeout or a lost connection is a transient BackendError.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import tempfile
from dataclasses import dataclass
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
        tmp = f"{path}.hxp-tmp"
        self.run(["tee", "--", tmp], input=content.encode("utf-8"))
        self.run(["chmod", f"{mode:o}", "--", tmp])
        self.run(["mv", "-f", "--", tmp, path])

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


class SshRunner(CommandRunner):
    """Commands over ssh (BatchMode: never a password prompt); argv quoted for the remote shell."""

    def __init__(
        self,
        address: str,
        user: str | None = None,
        port: int = 22,
        timeout: float = DEFAULT_TIMEOUT,
    ) -> None:
        super().__init__(timeout)
        self.address = address
        self.user = user
        self.port = port
        self.description = f"ssh {user + '@' if user else ''}{address}:{port}"

    def command(self, argv: list[str], interactive: bool) -> list[str]:
        local = [
            "ssh",
            "-o",
            "BatchMode=yes",
            "-o",
            f"ConnectTimeout={SSH_CONNECT_TIMEOUT}",
            "-o",
            "ServerAliveInterval=15",
            "-p",
            str(self.port),
        ]
        if self.user:
            local += ["-l", self.user]
        # ssh joins everything after the host with spaces into one remote shell command line.
        return [*local, "--", self.address, shlex.join(argv)]

    def connection_failed(self, result: RunResult) -> bool:
        return result.returncode == SSH_CONNECTION_FAILED


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


def runner_for(host: HostSpec, timeout: float = DEFAULT_TIMEOUT) -> Runner:
    """The runner that reaches `host`."""
    match host.runner:
        case "local":
            return LocalRunner(timeout)
        case "ssh":
            if host.address is None:
                raise BackendError("runner 'ssh' needs an address")
            return SshRunner(host.address, host.ssh_user, host.ssh_port, timeout)
        case "docker-exec":
            if host.container is None:
                raise BackendError("runner 'docker-exec' needs a container")
            return DockerExecRunner(host.container, timeout)
