"""The warm runner: CLI commands that run flows, without importing Prefect per command.

Importing Prefect and the flows costs a cold `hxp apply` 2-4 s on a 2-CPU machine before any
flow runs (docs/benchmarks.md, `cli`). `hxp server start` (and the first command that starts
the local server) therefore also starts a runner (`ENTRY`, with `--state-dir DIR`): one process
per state directory that has Prefect and the flows imported, listening on
`DIR/prefect/runner.sock` (mode 0600, and only the same user is served).

A command that runs a flow (`use_prefect`) hands its whole invocation to it when one runs: its
argv, cwd, umask, environment and its stdin, stdout and stderr (the descriptors themselves,
passed over the socket). The runner forks a keeper per request; the keeper forks the command's
process, which takes over those descriptors, cwd, umask and environment, reads Prefect's
settings again from that environment (so `$PREFECT_API_URL` and profiles resolve exactly as in
the caller) and runs `hxp` there, in its own process group. The caller waits for its exit
status and forwards SIGINT/SIGTERM/SIGHUP/SIGQUIT to it; if the caller dies (even by SIGKILL)
the keeper sees its socket close and SIGKILLs the command, so killing `hxp apply` still kills
the orchestrator as it would without a runner.

A runner serves only the code it imported: each request carries a fingerprint of the installed
sources (and the interpreter); a runner with another one answers `stale` and exits, and the
command runs in its own process, which starts a fresh runner for the next one. It also exits
when the local server it belongs to is gone. `HXP_WARM_RUNNER=0` turns delegation off.
"""

from __future__ import annotations

import contextlib
import json
import os
import selectors
import signal
import socket
import struct
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hxp.backends.supervisor import current_umask, start_ticks
from hxp.io.prefect_server import runner_record_path, runner_status

SOCKET = "runner.sock"
#: how long a caller waits for the runner to take its command (it never runs it twice)
ANSWER_TIMEOUT = 60.0
#: how often an idle runner checks that its server still runs
IDLE_CHECK_S = 5.0
#: the packages whose sources a runner has imported (the fingerprint covers them)
PACKAGES = ("hxp", "hxp_cli", "flows", "tasks", "blocks")
SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT)

#: the runner's process: the CLI's main is handed in (this module never imports the package)
ENTRY = (
    "import sys; from hxp_cli import main as hxp; from hxp_cli.runner import main; "
    "sys.exit(main(sys.argv[1:], hxp))"
)

#: True inside a command the runner runs (notices were already printed by the caller)
INSIDE = False


class Delegated(BaseException):
    """The command ran in the warm runner; main returns its exit code."""

    def __init__(self, code: int) -> None:
        super().__init__(code)
        self.code = code


def socket_path(state_dir: Path) -> Path:
    return state_dir / "prefect" / SOCKET


def fingerprint() -> str:
    """The interpreter and the size and mtime of every source file the runner would import
    (a few hundred stat calls, ~2 ms): an upgrade or an edit makes a runner stale."""
    root = Path(__file__).resolve().parent.parent
    parts = [sys.executable, os.environ.get("PYTHONPATH", "")]
    for package in PACKAGES:
        base = root / package
        if not base.is_dir():
            continue
        for directory, _dirs, names in os.walk(base):
            for name in sorted(names):
                if name.endswith(".py"):
                    info = os.stat(os.path.join(directory, name))
                    parts.append(f"{directory}/{name}:{info.st_size}:{info.st_mtime_ns}")
    import hashlib

    return hashlib.sha256("\n".join(sorted(parts)).encode()).hexdigest()[:16]


def start_runner(state_dir: Path) -> int:
    """Start the state directory's runner in the background (it imports Prefect and the flows
    there, then listens); its pid. Commands run in their own process until it listens."""
    home = state_dir / "prefect"
    home.mkdir(parents=True, exist_ok=True)
    with (home / "runner.log").open("ab") as log:
        proc = subprocess.Popen(
            # not `-m hxp_cli.runner`: that would run a second copy of this module as
            # __main__, beside the one hxp_cli imports (and INSIDE set on the wrong one)
            [sys.executable, "-c", ENTRY, "--state-dir", str(state_dir)],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    return proc.pid


def ensure_runner(state_dir: Path) -> None:
    """Start the runner unless one runs (or is starting) for this state directory."""
    if os.environ.get("HXP_WARM_RUNNER") == "0" or runner_status(state_dir) is not None:
        return
    start_runner(state_dir)


# --- the caller's side -------------------------------------------------------------------


def _send_message(sock: socket.socket, data: dict[str, Any]) -> None:
    raw = json.dumps(data).encode()
    sock.sendall(struct.pack("!I", len(raw)) + raw)


def _recv_exact(sock: socket.socket, size: int) -> bytes:
    chunks = []
    while size:
        chunk = sock.recv(size)
        if not chunk:
            raise ConnectionError("the other side closed the connection")
        chunks.append(chunk)
        size -= len(chunk)
    return b"".join(chunks)


def _recv_message(sock: socket.socket) -> dict[str, Any]:
    (size,) = struct.unpack("!I", _recv_exact(sock, 4))
    message: dict[str, Any] = json.loads(_recv_exact(sock, size))
    return message


def delegate(state_dir: Path, argv: list[str]) -> int | None:
    """Run `hxp ARGV` in the state directory's warm runner; its exit code, or None when no
    runner can take it (none runs, it is still starting, or it runs other code)."""
    if INSIDE or os.environ.get("HXP_WARM_RUNNER") == "0":
        return None
    if runner_status(state_dir) is None:
        return None
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.settimeout(2.0)
        sock.connect(str(socket_path(state_dir)))
        socket.send_fds(sock, [b"F"], [0, 1, 2])
        _send_message(
            sock,
            {
                "argv": argv,
                "cwd": os.getcwd(),
                "umask": current_umask(),
                "env": dict(os.environ),
                "fingerprint": fingerprint(),
                # a caller started with ^C ignored (a background job of a script) runs so
                "sigint_ignored": signal.getsignal(signal.SIGINT) is signal.SIG_IGN,
            },
        )
    except OSError:  # not listening (yet): nothing was sent, run it here
        sock.close()
        return None
    try:
        # The request is out: from here on it must never run twice, so no fallback (a loaded
        # machine can take seconds to fork; a runner that takes a minute is stuck).
        sock.settimeout(ANSWER_TIMEOUT)
        answer = _recv_message(sock)
    except (OSError, ValueError, ConnectionError):
        sock.close()
        print(
            f"error: the warm runner of {state_dir} did not take the command (see "
            f"{state_dir / 'prefect' / 'runner.log'}); run it with HXP_WARM_RUNNER=0, or "
            "restart the runner: hxp server stop && hxp server start",
            file=sys.stderr,
        )
        return 1
    if "pid" not in answer:  # stale, or a command of the runner's own: it did not run
        sock.close()
        return None
    return _wait(sock, int(answer["pid"]), signal.getsignal(signal.SIGINT) is signal.SIG_IGN)


def _wait(sock: socket.socket, pid: int, sigint_ignored: bool) -> int:
    """Wait for the command's exit status, forwarding signals to it (not ^C where this
    process ignores it)."""

    def forward(signum: int, _frame: Any) -> None:
        try:
            if signum == signal.SIGINT:  # as a terminal's ^C reaches the whole process group
                os.killpg(pid, signum)
            else:
                os.kill(pid, signum)
        except ProcessLookupError:
            pass

    forwarded = [s for s in SIGNALS if not (s == signal.SIGINT and sigint_ignored)]
    previous = {sig: signal.signal(sig, forward) for sig in forwarded}
    try:
        sock.settimeout(None)
        while True:
            try:
                answer = _recv_message(sock)
            except InterruptedError:
                continue
            except (OSError, ValueError, ConnectionError):
                print("error: the warm runner lost the command (runner.log)", file=sys.stderr)
                return 1
            if "exit" in answer:
                return int(answer["exit"])
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        sock.close()


# --- the runner's side -------------------------------------------------------------------


@dataclass
class Job:
    """A command to run in this (forked) process."""

    argv: list[str]
    cwd: str
    umask: int
    env: dict[str, str]
    fds: list[int]
    sigint_ignored: bool = False


def _preload() -> None:
    """What a flow command imports, imported once here (each fork shares it)."""
    import prefect.main  # noqa: F401  (also configures Prefect's logging, once)

    import flows.autoscale
    import flows.chaos
    import flows.deploy
    import flows.down
    import flows.lifecycle
    import flows.monitoring  # noqa: F401


def serve(state_dir: Path) -> Job | None:
    """Listen until the server is gone or the code changed; None in the runner when it ends,
    a Job in a forked command process."""
    from hxp.io.prefect_server import server_status

    _preload()
    mine = fingerprint()
    path = socket_path(state_dir)
    path.unlink(missing_ok=True)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)
    try:
        listener.bind(str(path))
    finally:
        os.umask(old)
    listener.listen(64)
    listener.settimeout(IDLE_CHECK_S)
    record = {"pid": os.getpid(), "ticks": start_ticks(os.getpid()), "socket": str(path)}
    record["fingerprint"] = mine
    tmp = runner_record_path(state_dir).with_suffix(".tmp")
    tmp.write_text(json.dumps(record))
    tmp.replace(runner_record_path(state_dir))

    def stop(_signum: int, _frame: Any) -> None:
        raise SystemExit(0)  # out of accept() at once; the finally below cleans up

    signal.signal(signal.SIGTERM, stop)
    print(f"runner {os.getpid()} listening on {path}", flush=True)
    try:
        while True:
            _reap()
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                if server_status(state_dir) is None:
                    print("the local Prefect server is gone; exiting", flush=True)
                    return None
                continue
            except InterruptedError:
                continue
            peer, uid, _ = struct.unpack(
                "3i", conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12)
            )
            if uid != os.getuid() or _descends_from(peer, os.getpid()):
                # another user, or a command this runner runs asking it again: refused
                # before any fork (the caller runs it itself)
                with contextlib.suppress(OSError):
                    _send_message(conn, {"refused": "not this user's, or one of its own"})
                conn.close()
                continue
            sys.stdout.flush()
            sys.stderr.flush()
            if os.fork() == 0:
                listener.close()
                return _keeper(conn, mine)
            conn.close()
    finally:
        if os.getpid() == record["pid"]:
            listener.close()
            if runner_status(state_dir) == record:
                runner_record_path(state_dir).unlink(missing_ok=True)
                path.unlink(missing_ok=True)


def _descends_from(pid: int, ancestor: int) -> bool:
    """Whether process `pid` is `ancestor` or one of its descendants (from /proc)."""
    for _ in range(64):
        if pid == ancestor:
            return True
        if pid <= 1:
            return False
        try:
            with open(f"/proc/{pid}/stat") as stat:
                pid = int(stat.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            return False
    return False


def _reap() -> None:
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def _keeper(conn: socket.socket, mine: str) -> Job | None:
    """In a fork of the runner: receive one request, fork its command, report its exit status
    (or kill it when the caller is gone). Returns the Job only in the command's process."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    code = 1
    try:
        conn.settimeout(10.0)
        _, fds, _, _ = socket.recv_fds(conn, 1, 3)
        request = _recv_message(conn)
        if len(fds) != 3:
            raise ValueError(f"expected 3 descriptors, got {len(fds)}")
        if request.get("fingerprint") != mine:
            _send_message(conn, {"stale": True})
            print("a caller runs other code: this runner is stale; exiting", flush=True)
            os.kill(os.getppid(), signal.SIGTERM)
            os._exit(0)
        job = Job(
            request["argv"],
            request["cwd"],
            request["umask"],
            request["env"],
            fds,
            bool(request.get("sigint_ignored")),
        )
        pid = os.fork()
        if pid == 0:
            conn.close()
            os.setpgid(0, 0)
            return job
        for fd in fds:
            os.close(fd)
        print(f"run {pid}: hxp {' '.join(job.argv)}", flush=True)
        _send_message(conn, {"pid": pid})
        code = _watch(conn, pid)
        _send_message(conn, {"exit": code})
    except Exception as exc:  # the caller sees its connection close and says so
        print(f"request failed: {type(exc).__name__}: {exc}", flush=True)
    os._exit(0)


def _watch(conn: socket.socket, pid: int) -> int:
    """The command's exit code; SIGKILL it if the caller's connection closes first."""
    pidfd = os.pidfd_open(pid)
    conn.settimeout(None)
    with selectors.DefaultSelector() as selector:
        selector.register(pidfd, selectors.EVENT_READ, "exited")
        selector.register(conn, selectors.EVENT_READ, "caller")
        while True:
            for key, _ in selector.select():
                if key.data == "caller" and not conn.recv(1):
                    print(f"run {pid}: the caller is gone; killing it", flush=True)
                    os.kill(pid, signal.SIGKILL)
                    selector.unregister(conn)
                elif key.data == "exited":
                    _, status = os.waitpid(pid, 0)
                    os.close(pidfd)
                    code = os.waitstatus_to_exitcode(status)
                    return code if code >= 0 else 128 - code


#: the runner's own environment, as it was when it configured Prefect's logging
RUNNER_ENV: dict[str, str] = dict(os.environ)


def _logging_settings(env: dict[str, str]) -> dict[str, str]:
    return {k: v for k, v in env.items() if k.startswith("PREFECT_LOGGING_")}


def run_job(job: Job, command: Callable[[list[str]], int]) -> int:
    """In the command's process: become the caller's command and run it."""
    global INSIDE
    INSIDE = True
    for fd, target in zip(job.fds, (0, 1, 2), strict=True):
        os.dup2(fd, target)
        os.close(fd)
    sys.stdout.reconfigure(line_buffering=os.isatty(1))  # type: ignore[union-attr]
    # ^C as the caller would have it, not as the runner was started (a runner started from a
    # background job inherits SIGINT ignored)
    signal.signal(
        signal.SIGINT, signal.SIG_IGN if job.sigint_ignored else signal.default_int_handler
    )
    os.chdir(job.cwd)
    os.umask(job.umask)
    os.environ.clear()
    os.environ.update(job.env)
    sys.argv = ["hxp", *job.argv]
    from prefect.context import refresh_global_settings_context

    refresh_global_settings_context()  # the caller's environment and profile, not the runner's
    if _logging_settings(job.env) != _logging_settings(RUNNER_ENV):
        from prefect.logging.configuration import setup_logging

        setup_logging(incremental=False)  # e.g. PREFECT_LOGGING_LEVEL set by the caller
    return command(job.argv)


def main(argv: list[str], command: Callable[[list[str]], int]) -> int:
    """The runner process (ENTRY): `command` is hxp's main, run for each job in a fork."""
    import argparse

    parser = argparse.ArgumentParser(prog="hxp-warm-runner")
    parser.add_argument("--state-dir", required=True)
    args = parser.parse_args(argv)
    job = serve(Path(args.state_dir))
    if job is None:
        return 0
    return run_job(job, command)
