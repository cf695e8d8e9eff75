"""Run the stack's nginx gateway: write its config, check it with `nginx -t`, reload gracefully.

Everything lives under STATE/gateway/<stack>/ (config, pid, logs, temp dirs). A reload starts
new workers with the new upstreams while the old workers finish the requests they hold, so
switching replicas loses no request.

Routes change only through `NginxGateway.add`, `remove` and `swap` (or `apply` for the whole
map): each reads the upstream map, edits it and writes it back under a lock held across
threads (deploy and lifecycle workers) and processes (the health sweep's failover), so two
edits at once cannot drop each other's route.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path

from hxp.backends.supervisor import alive, start_ticks
from hxp.errors import BackendError
from hxp.gateway import Server, as_server, render_gateway, server_port
from hxp.spec import GatewaySpec

NGINX_TIMEOUT = 30


def nginx_binary() -> str:
    found = shutil.which("nginx") or (
        "/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None
    )
    if found is None:
        raise BackendError("nginx is not installed (scripts/install-system-deps.sh)")
    return found


# One lock per gateway directory for the threads of this process; the file lock beside it
# serializes against other processes (flock is per open file, so it would also serialize
# threads, but a thread lock keeps them from spinning on the file).
_THREAD_LOCKS: dict[Path, threading.Lock] = {}
_THREAD_LOCKS_GUARD = threading.Lock()


def _thread_lock(prefix: Path) -> threading.Lock:
    with _THREAD_LOCKS_GUARD:
        return _THREAD_LOCKS.setdefault(prefix.resolve(), threading.Lock())


def _write_atomically(path: Path, text: str) -> None:
    """Write to a temporary file of its own beside `path`, then rename it over `path`."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f"{path.name}.", suffix=".new")
    try:
        with os.fdopen(fd, "w") as out:
            out.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class NginxGateway:
    """The gateway of one stack on this machine."""

    def __init__(self, state_dir: str | Path, stack: str, spec: GatewaySpec) -> None:
        self.stack = stack
        self.spec = spec
        self.prefix = Path(state_dir) / "gateway" / stack
        self.conf = self.prefix / "nginx.conf"
        self.upstreams_file = self.prefix / "upstreams.json"
        self.lock_file = self.prefix / "gateway.lock"

    # ------------------------------------------------------------ state

    def servers(self) -> dict[str, list[Server]]:
        """The upstream servers (`address:port`) per routed unit, as last applied (a map
        written before addresses held bare ports: those are on this machine)."""
        try:
            data: dict[str, list[str | int]] = json.loads(self.upstreams_file.read_text())
        except (OSError, ValueError):
            return {}
        return {unit: [as_server(s) for s in servers] for unit, servers in data.items()}

    def live(self) -> dict[str, list[int]]:
        """The ports of `servers()` per routed unit (enough where every unit is on one
        machine; `servers()` says which host each is on)."""
        return {unit: [server_port(s) for s in ss] for unit, ss in self.servers().items()}

    def _pid(self) -> int | None:
        try:
            record = json.loads((self.prefix / "master.json").read_text())
        except (OSError, ValueError):
            return None
        pid = record.get("pid")
        return pid if isinstance(pid, int) and alive(pid, record.get("ticks")) else None

    @property
    def running(self) -> bool:
        return self._pid() is not None

    # ------------------------------------------------------------ actions

    def _nginx(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [nginx_binary(), "-p", str(self.prefix), "-c", str(self.conf), *args],
            capture_output=True,
            text=True,
            timeout=NGINX_TIMEOUT,
            check=False,
        )

    @contextmanager
    def _locked(self) -> Iterator[None]:
        """Hold this gateway's lock: no other thread or process edits its routes meanwhile."""
        self.prefix.mkdir(parents=True, exist_ok=True)
        with _thread_lock(self.prefix), open(self.lock_file, "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def apply(self, live: Mapping[str, Sequence[Server | int]]) -> None:
        """Point every route at the `live` servers (the whole map; `address:port`, a bare port
        is one on this machine): write, `nginx -t`, then start or reload."""
        with self._locked():
            self._write({u: [as_server(s) for s in ss] for u, ss in live.items()})

    def add(self, unit: str, *servers: Server | int) -> list[Server]:
        """Put `servers` behind the unit's route (those already there stay); the unit's
        servers. A server is `address:port` (hxp.endpoints.server); a bare port is local."""
        return self._change(unit, add=servers, remove=())

    def remove(self, unit: str, *servers: Server | int) -> list[Server]:
        """Take `servers` out of the unit's route; the unit's servers."""
        return self._change(unit, add=(), remove=servers)

    def swap(self, unit: str, old: Server | int | None, new: Server | int | None) -> list[Server]:
        """Replace server `old` by `new` in the unit's route in one write (either may be
        None); the unit's servers."""
        return self._change(
            unit, add=() if new is None else (new,), remove=() if old is None else (old,)
        )

    def _change(
        self, unit: str, add: Iterable[Server | int], remove: Iterable[Server | int]
    ) -> list[Server]:
        """Read the live map, edit the unit's servers, write it back: all under the lock.
        Nothing is written when the servers stay the same."""
        drop = {as_server(s) for s in remove}
        with self._locked():
            before = self.servers().get(unit, [])
            servers = [s for s in before if s not in drop]
            servers += [s for s in dict.fromkeys(map(as_server, add)) if s not in servers]
            if servers != before:
                self._set_upstream(unit, servers)
            return servers

    def _set_upstream(self, unit: str, servers: Sequence[Server]) -> None:
        """Write the unit's servers into the live map (the caller holds the lock)."""
        live = self.servers()
        live[unit] = list(servers)
        self._write(live)

    def _write(self, live: Mapping[str, Sequence[Server]]) -> None:
        """Render, `nginx -t` a temporary copy of this write's own, then start or reload (the
        caller holds the lock)."""
        for sub in ("logs", "tmp"):
            (self.prefix / sub).mkdir(parents=True, exist_ok=True)
        text = render_gateway(self.stack, self.spec, live, str(self.prefix))
        previous = self.conf.read_text() if self.conf.exists() else None
        fd, name = tempfile.mkstemp(dir=self.prefix, prefix="nginx.conf.", suffix=".new")
        tmp = Path(name)
        try:
            with os.fdopen(fd, "w") as out:
                out.write(text)
            check = subprocess.run(
                [nginx_binary(), "-t", "-p", str(self.prefix), "-c", str(tmp)],
                capture_output=True,
                text=True,
                timeout=NGINX_TIMEOUT,
                check=False,
            )
            if check.returncode != 0:
                raise BackendError(f"gateway config rejected by nginx -t: {check.stderr.strip()}")
            tmp.replace(self.conf)
        finally:
            tmp.unlink(missing_ok=True)
        pid = self._pid()
        if pid is None:
            self._start()
        elif previous != text:
            before = set(self._workers(pid))  # before the signal: new workers can be quick
            os.kill(pid, signal.SIGHUP)  # graceful reload: old workers finish their requests
            self._wait_reloaded(pid, before)
        _write_atomically(self.upstreams_file, json.dumps({k: list(v) for k, v in live.items()}))

    def clear(self) -> None:
        """After `stop`: remove what a stopped gateway leaves (pid file, temporary config
        files and directories, the upstream map), so the next start begins with no routes."""
        with self._locked():
            (self.prefix / "nginx.pid").unlink(missing_ok=True)
            for leftover in self.prefix.glob("*.new"):
                leftover.unlink(missing_ok=True)
            shutil.rmtree(self.prefix / "tmp", ignore_errors=True)
            self.upstreams_file.unlink(missing_ok=True)

    def _start(self) -> None:
        out = self._nginx()  # daemonizes; the master writes its pid file
        if out.returncode != 0:
            raise BackendError(f"gateway did not start: {out.stderr.strip()}")
        pidfile = self.prefix / "nginx.pid"
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                pid = int(pidfile.read_text().strip())
            except (OSError, ValueError):
                time.sleep(0.02)
                continue
            (self.prefix / "master.json").write_text(
                json.dumps({"pid": pid, "ticks": start_ticks(pid)})
            )
            return
        raise BackendError("gateway started but wrote no pid file")

    def _wait_reloaded(self, pid: int, before: set[int]) -> None:
        """nginx answers a reload asynchronously; wait until the new workers are up and the
        old ones no longer accept connections (they finish the requests they hold, but until
        they close their listening sockets, ~0.1 s here, a new request may still reach a
        server the reload took out of the route)."""
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            now = set(self._workers(pid))
            if now - before and not self._still_listening(before & now):
                return
            time.sleep(0.02)

    @staticmethod
    def _still_listening(workers: set[int]) -> bool:
        """Whether any of `workers` still holds a listening TCP socket (from /proc)."""
        if not workers:
            return False
        listening: set[str] = set()
        for table in ("/proc/net/tcp", "/proc/net/tcp6"):
            try:
                lines = Path(table).read_text().splitlines()[1:]
            except OSError:
                continue
            for line in lines:
                fields = line.split()
                if len(fields) > 9 and fields[3] == "0A":  # TCP_LISTEN
                    listening.add(f"socket:[{fields[9]}]")
        for worker in workers:
            try:
                fds = list(Path(f"/proc/{worker}/fd").iterdir())
            except OSError:
                continue
            for fd in fds:
                try:
                    if os.readlink(fd) in listening:
                        return True
                except OSError:
                    continue
        return False

    @staticmethod
    def _workers(pid: int) -> list[int]:
        """The master's child processes (from /proc; a worker's parent is the master)."""
        out = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat[stat.rindex(")") + 2 :].split()[1]) == pid:
                out.append(int(entry.name))
        return out

    def stop(self) -> bool:
        pid = self._pid()
        if pid is None:
            return False
        os.kill(pid, signal.SIGQUIT)  # graceful shutdown
        deadline = time.monotonic() + 10
        ticks = start_ticks(pid)
        while alive(pid, ticks) and time.monotonic() < deadline:
            time.sleep(0.05)
        if alive(pid, ticks):
            os.kill(pid, signal.SIGKILL)
        (self.prefix / "master.json").unlink(missing_ok=True)
        return True
