"""The embedded default backend: supervised local processes under a state directory.

Each instance lives in STATE/process/<stack>/<instance>/ (mode 0700): spec.json (argv, env,
cwd, config hash, revision; mode 0600), secrets.env (the values of `secret_env`, mode 0600,
only when the unit has secrets: never in spec.json, argv or a log), output.log (every run's
output, appended), supervisor.json (pids with kernel start times, and where the current run's
output starts in output.log), and previous/ (the version an update replaced, until it is
committed or restored).
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

from hxp.backends.base import (
    BackendAction,
    Commit,
    Create,
    LogScope,
    Reload,
    Remove,
    Restore,
    Start,
    Stop,
    UnitRef,
    Update,
)
from hxp.backends.supervisor import (
    SECRETS_FILE,
    alive,
    current_umask,
    terminate,
    write_env_file,
    write_json,
)
from hxp.errors import BackendError
from hxp.io.backups import write_with_backup
from hxp.plan import ObservedUnit
from hxp.spec import ServiceSpec
from hxp.units import UnitInstance

START_CONFIRM_SECONDS = 5.0
SUPERVISOR = str(Path(__file__).with_name("supervisor.py"))
# By path, isolated (-I) and without site (-S): `-m hxp.backends.supervisor` would import the
# package and pydantic first (0.3 s per start), and site the venv's .pth files; the
# supervisor needs the stdlib only.
SUPERVISOR_ARGV = (sys.executable, "-I", "-S", SUPERVISOR)
RELOAD_COMMAND_TIMEOUT = 30.0


class Launcher:
    """Starts supervisors as forks of one warm `supervisor.py --serve` per orchestrator process
    (started on first use, it ends with its stdin when this process does): a unit's start no
    longer waits for a fresh interpreter and its imports (30 ms idle, 50-100 ms on a busy
    2-CPU machine, on every hop of a dependency chain). Each request carries this process's
    cwd, umask and environment, as a launched supervisor would inherit them. When the server
    cannot answer, `launch` says so and the caller starts `--detach DIR` as before."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._server: subprocess.Popen[bytes] | None = None
        self._inherited: list[subprocess.Popen[bytes]] = []

    def after_fork_in_child(self) -> None:
        """A forked copy of this process starts its own server when it needs one; the parent's
        is kept referenced, never closed or flushed from here."""
        if self._server is not None:
            self._inherited.append(self._server)
        self._server = None
        self._lock = threading.Lock()

    def launch(self, directory: Path) -> bool:
        request = {
            "dir": str(directory.resolve()),
            "cwd": os.getcwd(),
            "umask": current_umask(),
            "env": dict(os.environ),
        }
        data = (json.dumps(request) + "\n").encode()
        with self._lock:
            try:
                server = self._running_server()
                if server.stdin is None or server.stdout is None:
                    raise OSError("the supervisor launcher has no pipes")
                server.stdin.write(data)
                server.stdin.flush()
                answer = self._read_line(server.stdout.fileno())
                if int(answer.split()[0]) > 0:
                    return True
            except (OSError, ValueError, IndexError):
                pass
            self._close()
            return False

    def _running_server(self) -> subprocess.Popen[bytes]:
        if self._server is not None:
            if self._server.poll() is None:
                return self._server
            self._close()
        self._server = subprocess.Popen(
            [*SUPERVISOR_ARGV, "--serve"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
            close_fds=True,
        )
        return self._server

    @staticmethod
    def _read_line(fd: int) -> str:
        """One answer line, unbuffered (nothing may stay behind in a buffer for the next)."""
        deadline = time.monotonic() + START_CONFIRM_SECONDS
        out = b""
        while not out.endswith(b"\n"):
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                raise OSError("the supervisor launcher did not answer in time")
            chunk = os.read(fd, 64)
            if not chunk:
                raise OSError("the supervisor launcher has ended")
            out += chunk
        return out.decode()

    def _close(self) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        with contextlib.suppress(OSError):
            if server.stdin is not None:
                server.stdin.close()
        try:
            server.wait(timeout=1.0)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        if server.stdout is not None:
            server.stdout.close()


LAUNCHER = Launcher()
atexit.register(LAUNCHER._close)
os.register_at_fork(after_in_child=LAUNCHER.after_fork_in_child)


class ProcessBackend:
    """Local processes, each under its own small supervisor."""

    kind: ClassVar[str] = "process"

    def __init__(self, state_dir: str | Path) -> None:
        self.root = Path(state_dir) / "process"

    # ---------------------------------------------------------------- paths and records

    def _dir(self, ref: UnitRef) -> Path:
        return self.root / ref.stack / ref.instance

    @staticmethod
    def _read(path: Path) -> dict[str, Any] | None:
        try:
            data: dict[str, Any] = json.loads(path.read_text())
        except (OSError, ValueError):
            return None
        return data

    def _supervisor(self, directory: Path) -> dict[str, Any] | None:
        return self._read(directory / "supervisor.json")

    def _running(self, directory: Path) -> bool:
        sup = self._supervisor(directory)
        if sup is None or not alive(sup.get("pid"), sup.get("ticks")):
            return False
        return sup.get("state") == "running" and alive(sup.get("child_pid"), sup.get("child_ticks"))

    # ---------------------------------------------------------------- the Backend interface

    def observe(self, stack: str) -> dict[str, ObservedUnit]:
        out: dict[str, ObservedUnit] = {}
        base = self.root / stack
        if not base.is_dir():
            return out
        for directory in sorted(p for p in base.iterdir() if p.is_dir()):
            seen = self._observe_dir(directory)
            if seen is not None:
                out[directory.name] = seen
        return out

    def observe_instance(self, ref: UnitRef) -> ObservedUnit | None:
        """One instance only (readiness gates ask many times a second)."""
        directory = self._dir(ref)
        return self._observe_dir(directory) if directory.is_dir() else None

    def _observe_dir(self, directory: Path) -> ObservedUnit | None:
        spec = self._read(directory / "spec.json")
        if spec is None:
            return None
        running = self._running(directory)
        sup = self._supervisor(directory) or {}
        state = sup.get("state", "never started")
        detail = f"{state}, restarts {sup.get('restarts', 0)}"
        if sup.get("exit_code") is not None:
            detail += f", last exit code {sup['exit_code']}"
        return ObservedUnit(
            name=directory.name,
            exists=True,
            running=running,
            healthy=running,
            config_hash=spec.get("config_hash"),
            revision=spec.get("revision"),
            detail=detail,
            restarts=int(sup.get("restarts", 0)),
        )

    def apply(self, action: BackendAction) -> None:
        match action:
            case Create(unit=unit, config_hash=h, revision=rev, secrets=secrets):
                ref = UnitRef.of(unit)
                self._stop(ref, unit.spec.stop_timeout)
                self._ports_free(unit)
                self._write_spec(ref, unit, h, rev, secrets)
                self._start(ref)
            case Update(unit=unit, config_hash=h, revision=rev, secrets=secrets):
                ref = UnitRef.of(unit)
                directory = self._dir(ref)
                current = self._read(directory / "spec.json")
                self._stop(ref, unit.spec.stop_timeout)
                # A retried update must not keep the new version as "previous".
                self._ports_free(unit)
                if current is not None and current.get("config_hash") != h:
                    self._keep_previous(directory)
                self._write_spec(ref, unit, h, rev, secrets)
                self._start(ref)
            case Start(ref=ref):
                self._start(ref)
            case Stop(ref=ref, grace_seconds=grace):
                self._stop(ref, grace)
            case Remove(ref=ref):
                self._stop(ref, self._grace(ref))
                shutil.rmtree(self._dir(ref), ignore_errors=True)
            case Restore(ref=ref):
                directory = self._dir(ref)
                previous = directory / "previous"
                if not (previous / "spec.json").exists():
                    raise BackendError("no previous version kept to restore", unit=str(ref))
                self._stop(ref, self._grace(ref))
                (directory / SECRETS_FILE).unlink(missing_ok=True)
                for name in ("spec.json", SECRETS_FILE):
                    if (previous / name).exists():
                        (previous / name).replace(directory / name)
                shutil.rmtree(previous, ignore_errors=True)
                (directory / "supervisor.json").unlink(missing_ok=True)
                self._start(ref)
            case Commit(ref=ref):
                shutil.rmtree(self._dir(ref) / "previous", ignore_errors=True)

    def logs(self, ref: UnitRef, lines: int = 50, since: LogScope = "run") -> list[str]:
        """output.log from the offset the supervisor recorded when it last started the program
        (after a crash too), or when it started it first (since="start": a supervisor per
        start by the backend). An instance with no recorded start (never started, or by a
        supervisor that kept no offset) has no lines."""
        if lines <= 0:
            return []
        directory = self._dir(ref)
        key = "start_log_offset" if since == "start" else "log_offset"
        offset = (self._supervisor(directory) or {}).get(key)
        if not isinstance(offset, int) or offset < 0:
            return []
        try:
            with (directory / "output.log").open("rb") as f:
                # A log cut shorter since (truncated in place) holds only this run's lines.
                f.seek(offset if offset <= os.fstat(f.fileno()).st_size else 0)
                tail = deque(f, maxlen=lines)
        except OSError:
            return []
        return [line.decode("utf-8", "replace").rstrip("\n") for line in tail]

    # ---------------------------------------------------------------- mechanics

    def _grace(self, ref: UnitRef) -> float:
        spec = self._read(self._dir(ref) / "spec.json") or {}
        return float(spec.get("stop_timeout", 10.0))

    @staticmethod
    def _ports_free(unit: UnitInstance) -> None:
        """A port something else listens on would make the new process fail (permanent)."""
        for name, port in unit.ports:
            with socket.socket() as s:
                s.settimeout(0.2)
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    raise BackendError(
                        f"port {port} ({name}) is already in use by another process",
                        unit=f"{unit.stack}/{unit.name}",
                    )

    def _write_spec(
        self,
        ref: UnitRef,
        unit: UnitInstance,
        config_hash: str,
        rev: int,
        secrets: Mapping[str, str],
    ) -> None:
        directory = self._dir(ref)
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        directory.chmod(0o700)
        missing = sorted(set(unit.spec.secret_env) - set(secrets))
        if missing:
            raise BackendError(
                f"secret_env {missing} has no value (the deploy resolves it from its Secret "
                "block); refusing to start without it",
                unit=str(ref),
            )
        if unit.spec.secret_env:
            values = {k: secrets[k] for k in unit.spec.secret_env}
            try:
                write_env_file(directory / SECRETS_FILE, values)
            except ValueError as exc:
                raise BackendError(str(exc), unit=str(ref)) from None
        else:
            (directory / SECRETS_FILE).unlink(missing_ok=True)
        write_json(
            directory / "spec.json",
            {
                "stack": ref.stack,
                "unit": ref.unit,
                "instance": ref.instance,
                "argv": list(unit.argv),
                "env": dict(unit.host_env),
                "cwd": unit.spec.workdir,
                "restart": unit.spec.restart,
                "stop_timeout": unit.spec.stop_timeout,
                "config_hash": config_hash,
                "revision": rev,
            },
        )
        self._write_config_files(ref, unit)
        (directory / "supervisor.json").unlink(missing_ok=True)

    def _write_config_files(self, ref: UnitRef, unit: UnitInstance) -> list[str]:
        """A service's config_files, each old version backed up; returns the changed paths."""
        if not isinstance(unit.spec, ServiceSpec):
            return []
        changed = []
        for f in unit.spec.config_files:
            try:
                if write_with_backup(
                    self.root.parent, ref.stack, f.path, f.content, f.mode, f"config of {ref}"
                ):
                    changed.append(f.path)
            except OSError as exc:
                raise BackendError(
                    f"cannot write {f.path}: {exc.strerror}", unit=str(ref)
                ) from None
        return changed

    def reload(self, action: Reload) -> None:
        """New config files and marker, then the unit's reload signal or command."""
        unit = action.unit
        ref = UnitRef.of(unit)
        directory = self._dir(ref)
        spec = unit.spec
        if not isinstance(spec, ServiceSpec) or spec.reload is None:
            raise BackendError("declares no reload signal or command", unit=str(ref))
        sup = self._supervisor(directory)
        if sup is None or not self._running(directory):
            raise BackendError("is not running: nothing to reload", unit=str(ref))
        current = self._read(directory / "spec.json")
        if current is None:
            raise BackendError("not created", unit=str(ref))
        self._write_config_files(ref, unit)
        write_json(
            directory / "spec.json",
            {**current, "config_hash": action.config_hash, "revision": action.revision},
        )
        if spec.reload.signal is not None:
            child, ticks = sup.get("child_pid"), sup.get("child_ticks")
            if not isinstance(child, int) or not alive(child, ticks):
                raise BackendError("exited before it could be signalled", unit=str(ref))
            os.kill(child, getattr(signal, f"SIG{spec.reload.signal}"))
            return
        assert spec.reload.command is not None
        env = {k: os.environ[k] for k in ("PATH", "HOME", "LANG") if k in os.environ}
        env.update(dict(unit.host_env))
        env["HXP_PID"] = str(sup.get("child_pid"))
        try:
            done = subprocess.run(
                list(spec.reload.command),
                env=env,
                cwd=current.get("cwd") or str(directory),
                capture_output=True,
                text=True,
                timeout=RELOAD_COMMAND_TIMEOUT,
                check=False,
            )
        except subprocess.TimeoutExpired:
            raise BackendError(
                f"reload command timed out after {RELOAD_COMMAND_TIMEOUT:.0f}s",
                transient=True,
                unit=str(ref),
            ) from None
        except OSError as exc:
            raise BackendError(
                f"cannot run the reload command: {exc.strerror}", unit=str(ref)
            ) from None
        if done.returncode != 0:
            tail = (done.stderr.strip().splitlines() or [""])[-1]
            raise BackendError(
                f"reload command exited with code {done.returncode} {tail}".strip(), unit=str(ref)
            )

    @staticmethod
    def _keep_previous(directory: Path) -> None:
        previous = directory / "previous"
        shutil.rmtree(previous, ignore_errors=True)
        previous.mkdir(mode=0o700)
        for name in ("spec.json", SECRETS_FILE):
            if (directory / name).exists():
                shutil.copy2(directory / name, previous / name)

    def _start(self, ref: UnitRef) -> None:
        directory = self._dir(ref)
        if not (directory / "spec.json").exists():
            raise BackendError("not created", unit=str(ref))
        if self._running(directory):
            return
        # A supervisor still alive (in backoff, or stopping) would fight a new one: end it.
        self._stop(ref, self._grace(ref))
        (directory / "supervisor.json").unlink(missing_ok=True)
        if not LAUNCHER.launch(directory):
            with (directory / "supervisor.log").open("ab") as errors:
                launcher = subprocess.Popen(
                    [*SUPERVISOR_ARGV, "--detach", str(directory)],
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.DEVNULL,
                    stderr=errors,
                    start_new_session=True,
                    close_fds=True,
                )
                launcher.wait(timeout=START_CONFIRM_SECONDS)
        deadline = time.monotonic() + START_CONFIRM_SECONDS
        while time.monotonic() < deadline:
            sup = self._supervisor(directory)
            if sup is not None and sup.get("state") == "exec-failed":
                raise BackendError(str(sup.get("error")), unit=str(ref))
            if sup is not None and sup.get("child_pid"):
                return
            time.sleep(0.02)
        raise BackendError("supervisor did not start in time", transient=True, unit=str(ref))

    def _stop(self, ref: UnitRef, grace: float) -> None:
        directory = self._dir(ref)
        sup = self._supervisor(directory)
        if sup is None:
            return
        pid, ticks = sup.get("pid"), sup.get("ticks")
        child, child_ticks = sup.get("child_pid"), sup.get("child_ticks")
        if pid is not None:  # the supervisor stops its child; its whole group if it hangs
            terminate(pid, ticks, grace + 5.0, kill_group=True, poll=0.02)
        # A supervisor killed from outside may leave its child behind: never a recycled pid.
        if child is not None:
            terminate(child, child_ticks, grace, poll=0.02)
        state = self._supervisor(directory) or sup
        # What the unit owned goes with it: no pid stays recorded, no temporary file is left.
        state.update(state="stopped", child_pid=None, child_ticks=None, pid=None, ticks=None)
        with contextlib.suppress(OSError):  # a full disk: it is stopped all the same (no pid alive)
            write_json(directory / "supervisor.json", state)
        for leftover in directory.glob("*.tmp"):
            leftover.unlink(missing_ok=True)
