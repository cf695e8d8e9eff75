"""A tiny per-instance supervisor for the process backend.

`python -I -S .../supervisor.py [--detach] DIR` reads DIR/spec.json (and DIR/secrets.env, the
`secret_env` values, when there is one), runs the program with its log
in DIR/output.log, restarts it per its restart policy with exponential backoff, and on SIGTERM
stops it (SIGTERM, then SIGKILL after the grace period). It records its own and the child's
pid with their kernel start times in DIR/supervisor.json, so a restarted orchestrator can
re-adopt it and never signals a recycled pid, and the byte offset in output.log where the
current run (the latest start, a restart after a crash included) began (`log_offset`), and
where its first run began (`start_log_offset`: each start by the backend is a new supervisor).

Every start of a unit waits for its supervisor first. The process backend forks supervisors
from one warm `--serve` launcher per orchestrator process (`serve`), and starts a fresh
`--detach DIR` interpreter only when that fails; both run without `site` (-S) and import only
what starting the child needs (no pathlib, no typing at run time).
"""

from __future__ import annotations

import contextlib  # already loaded by subprocess
import json
import os
import signal
import subprocess
import sys
import time

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

SAFE_ENV = ("PATH", "HOME", "LANG", "LC_ALL", "TZ", "TMPDIR", "USER")
MAX_BACKOFF = 30.0
SECRETS_FILE = "secrets.env"
PRIVATE = 0o600


def start_ticks(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (/proc/PID/stat field 22)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2 :].split()
    if fields[0] == "Z":  # a zombie is not running
        return None
    return int(fields[19])


def alive(pid: int | None, ticks: int | None) -> bool:
    """True only if `pid` runs and is the same process that was recorded (same start time)."""
    return pid is not None and ticks is not None and start_ticks(pid) == ticks


def terminate(
    pid: int,
    ticks: int | None,
    grace: float,
    group: bool = False,
    kill_group: bool | None = None,
    poll: float = 0.05,
) -> None:
    """SIGTERM `pid` (its process group with `group`), wait up to `grace` seconds while it is
    still the recorded process (same start time: never a recycled pid), then SIGKILL it (the
    group with `kill_group`, which defaults to `group`)."""
    if not alive(pid, ticks):
        return
    (os.killpg if group else os.kill)(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while alive(pid, ticks) and time.monotonic() < deadline:
        time.sleep(poll)
    if alive(pid, ticks):
        (os.killpg if (group if kill_group is None else kill_group) else os.kill)(
            pid, signal.SIGKILL
        )


def current_umask() -> int:
    """This process's umask, read without setting it (os.umask would, for every thread)."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    raise OSError("no Umask line in /proc/self/status")


def _write_private(path: str | os.PathLike[str], text: str) -> None:
    """Replace `path` atomically with a file only its owner can read (mode 0600 from the start)."""
    tmp = os.fspath(path) + ".tmp"
    with contextlib.suppress(FileNotFoundError):
        os.unlink(tmp)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, PRIVATE)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


def write_json(path: str | os.PathLike[str], data: dict[str, Any]) -> None:
    _write_private(path, json.dumps(data, sort_keys=True))


def write_env_file(path: str | os.PathLike[str], values: dict[str, str]) -> None:
    """`KEY=value` lines, mode 0600; a value with a newline or NUL cannot be written."""
    for key, value in values.items():
        if "\n" in value or "\r" in value or "\0" in value:
            raise ValueError(f"the value of {key} contains a newline or NUL")
    _write_private(path, "".join(f"{k}={v}\n" for k, v in sorted(values.items())))


def read_env_file(path: str | os.PathLike[str]) -> dict[str, str]:
    """The values write_env_file wrote; an absent file is no values."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        return {}
    out: dict[str, str] = {}
    for line in text.split("\n"):  # not splitlines(): a value may hold U+2028 and the like
        key, sep, value = line.partition("=")
        if sep:
            out[key] = value
    return out


class Supervisor:
    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self.dir = os.fspath(directory)
        with open(self._path("spec.json")) as f:
            self.spec = json.load(f)
        self.child: subprocess.Popen[bytes] | None = None
        self.stopping = False
        self.restarts = 0
        self.state: dict[str, Any] = {
            "pid": os.getpid(),
            "ticks": start_ticks(os.getpid()),
            "config_hash": self.spec["config_hash"],
            "revision": self.spec["revision"],
            "started_at": time.time(),
        }

    def _path(self, name: str) -> str:
        return os.path.join(self.dir, name)

    def record(self, **changes: Any) -> bool:
        """Keep `changes` and write the whole state to supervisor.json. A write that fails (a
        full disk) is skipped, not raised: the supervisor must go on supervising, and above
        all stop its child when told to (dying here left the child running with nobody to
        stop it, holding its port); the next record writes the whole state again."""
        self.state.update(changes)
        path = self._path("supervisor.json")
        try:
            write_json(path, self.state)
        except OSError as exc:
            with contextlib.suppress(OSError):
                os.unlink(path + ".tmp")
            with contextlib.suppress(OSError, ValueError):
                sys.stderr.write(f"hxp supervisor: cannot record its state: {exc}\n")
                sys.stderr.flush()
            return False
        return True

    def env(self) -> dict[str, str]:
        base = {k: os.environ[k] for k in SAFE_ENV if k in os.environ}
        # The orchestrator's own bin directory comes first: `python3` is the interpreter hxp
        # runs in (hxp-vllm-sim and hxp exporter are importable there).
        own_bin = os.path.dirname(sys.executable)
        base["PATH"] = os.pathsep.join([own_bin, base.get("PATH", os.defpath)])
        return {**base, **self.spec["env"], **read_env_file(self._path(SECRETS_FILE))}

    def spawn(self) -> bool:
        log = open(self._path("output.log"), "ab")  # noqa: SIM115 - handed to the child
        # Where this run's output starts, recorded before the program can write: the backend
        # quotes only what follows (a failure summary must not quote an earlier run).
        offset = log.seek(0, os.SEEK_END)
        # ... and where the first run of this supervisor (one per start by the backend) began.
        self.record(log_offset=offset, start_log_offset=self.state.get("start_log_offset", offset))
        try:
            self.child = subprocess.Popen(
                self.spec["argv"],
                env=self.env(),
                cwd=self.spec.get("cwd") or self.dir,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        except OSError as exc:
            log.write(f"hxp: cannot start {self.spec['argv'][0]!r}: {exc.strerror}\n".encode())
            log.close()
            self.record(
                state="exec-failed",
                error=f"cannot start: {exc.strerror}",
                child_pid=None,
            )
            return False
        log.close()
        recorded = self.record(
            state="running",
            child_pid=self.child.pid,
            child_ticks=start_ticks(self.child.pid),
            child_started_at=time.time(),
            restarts=self.restarts,
        )
        if not recorded and self.restarts == 0:
            # The backend knows a start by this record alone (it waits for child_pid): a start
            # it cannot see must not stay, or a later start would run a second copy beside it.
            self.stop_child()
            return False
        return True

    def on_term(self, signum: int, frame: object) -> None:
        self.stopping = True

    def stop_child(self) -> None:
        child = self.child
        if child is None or child.poll() is not None:
            return
        child.terminate()
        try:
            child.wait(timeout=float(self.spec.get("stop_timeout", 10)))
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()

    def should_restart(self, code: int) -> bool:
        policy = self.spec.get("restart", "on-failure")
        return policy == "always" or (policy == "on-failure" and code != 0)

    def run(self) -> int:
        signal.signal(signal.SIGTERM, self.on_term)
        signal.signal(signal.SIGINT, self.on_term)
        if not self.spawn():
            return 1
        backoff = 0.5  # doubled before use: the first restart waits 1 s
        while True:
            assert self.child is not None
            while not self.stopping and self.child.poll() is None:
                time.sleep(0.05)
            if self.stopping:
                self.record(state="stopping")
                self.stop_child()
                self.record(state="stopped", child_pid=None, exit_code=self.child.returncode)
                return 0
            code = self.child.returncode
            ran_for = time.time() - float(self.state.get("child_started_at", time.time()))
            self.record(state="exited", exit_code=code, child_pid=None)
            if not self.should_restart(code):
                return 0
            backoff = 1.0 if ran_for > 60 else min(backoff * 2, MAX_BACKOFF)
            self.record(state="backoff", next_start=time.time() + backoff)
            deadline = time.time() + backoff
            while time.time() < deadline and not self.stopping:
                time.sleep(0.05)
            if self.stopping:
                self.record(state="stopped")
                return 0
            self.restarts += 1
            if not self.spawn():
                return 1


def _forked_supervisor(request: dict[str, Any]) -> None:
    """In a child of `serve`: become a detached supervisor, as `--detach DIR` would be (own
    session, stdio on /dev/null and DIR/supervisor.log, the requester's cwd, umask and
    environment). Never returns."""
    code = 1
    try:
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)  # it waits for its own child
        os.setsid()
        null = os.open(os.devnull, os.O_RDWR)
        log = os.open(
            os.path.join(request["dir"], "supervisor.log"),
            os.O_WRONLY | os.O_CREAT | os.O_APPEND,
            0o666,
        )
        for fd, target in ((null, 0), (null, 1), (log, 2)):
            os.dup2(fd, target)
        os.close(null)
        os.close(log)
        os.chdir(request["cwd"])
        os.umask(request["umask"])
        os.environ.clear()
        os.environ.update(request["env"])
        code = Supervisor(request["dir"]).run()
    except BaseException:
        import traceback

        traceback.print_exc()
    finally:
        with contextlib.suppress(Exception):
            sys.stderr.flush()
        os._exit(code)


def serve() -> int:
    """`--serve`: the process backend's launcher. Each request (a JSON line on stdin: dir, cwd,
    umask, env) forks this already started interpreter into a supervisor and answers its pid; no
    interpreter start-up or imports per unit start. Ends with its stdin (its orchestrator)."""
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # supervisors that end are reaped at once
    for line in sys.stdin.buffer:
        try:
            request = json.loads(line)
            pid = os.fork()
        except (ValueError, OSError) as exc:
            sys.stdout.write(f"0 {exc}\n")
            sys.stdout.flush()
            continue
        if pid == 0:
            _forked_supervisor(request)
        sys.stdout.write(f"{pid}\n")
        sys.stdout.flush()
    return 0


def main(argv: list[str]) -> int:
    if argv == ["--serve"]:
        return serve()
    detach = bool(argv) and argv[0] == "--detach"
    args = argv[1:] if detach else argv
    if len(args) != 1:
        print("usage: python -I -S supervisor.py [--detach] DIR | --serve", file=sys.stderr)
        return 2
    if detach:
        if os.fork() > 0:
            return 0  # the caller reaps us at once; the supervisor is nobody's zombie
        os.setsid()  # its own process group: the backend's last resort is killpg(its pid)
    return Supervisor(args[0]).run()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
