"""Run the stack's nginx gateway: write its config, check it with `nginx -t`, reload gracefully.

On this machine (a gateway host without a runner that goes elsewhere) everything lives under
STATE/gateway/<stack>/ (config, pid, logs, temp dirs). On a host reached over SSH, nginx runs
there, its files under `gateway.directory` on that host (default
/var/lib/hxp-gateway/<stack>), and every step (write the config, `nginx -t`, start, the
graceful reload and the wait for its new workers, stop) is a command through that host's
runner. The upstream map of a remote gateway lives on its host too (`upstreams.json` beside
the config), written with the config in one command under a lock there, and only if the map is
still the one the edit read (else the edit reads it again and retries): the deploy parts of a
fleet run on several machines (agents), and each edits that one map. A copy of the map and of
the config nginx runs stays here, under STATE/gateway/<stack>/. A reload
starts new workers with the new upstreams while the old workers finish the requests they hold,
so switching replicas loses no request.

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
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import TypeVar

from hxp.backends.runners import Runner, RunResult, runner_for
from hxp.backends.supervisor import alive, start_ticks
from hxp.errors import BackendError
from hxp.gateway import Server, as_server, render_gateway, server_port
from hxp.spec import GatewaySpec, Stack

NGINX_TIMEOUT = 30
_T = TypeVar("_T")


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


#: Where nginx's files live on a gateway host reached over SSH (`gateway.directory` unset).
REMOTE_ROOT = "/var/lib/hxp-gateway"
#: How long a reload may take to show new workers (as on this machine).
RELOAD_WAIT = 5.0

# The commands run on a remote gateway host: POSIX sh scripts taking their paths as arguments
# ("$1"...), never as code. Each is one round trip over the host's multiplexed connection.
_FIND_NGINX = "command -v nginx || { [ -x /usr/sbin/nginx ] && echo /usr/sbin/nginx; } || true"
# $1 nginx, $2 prefix, $3 the new config (stdin), $4 the config nginx runs, $5 the map the
# edit read ("-": no check), $6 the new map. Under the gateway's lock on that host: exit
# MAP_CHANGED when the map is no longer $5 (another machine edited it meanwhile); else `nginx
# -t` the config, install it and the map, and print whether the config changed.
_INSTALL = (
    'mkdir -p -- "$2/logs" "$2/tmp" || exit 3\n'
    'exec 9>>"$2/gateway.lock" && flock 9 || exit 3\n'
    'if [ "$5" != "-" ]; then have=$(cat -- "$2/upstreams.json" 2>/dev/null); '
    '[ "$have" = "$5" ] || exit 75; fi\n'
    'cat > "$3" || exit 3\n'
    'if "$1" -t -q -p "$2/" -c "$3"; then :; else rc=$?; rm -f -- "$3"; exit $rc; fi\n'
    'if cmp -s -- "$3" "$4"; then rm -f -- "$3"; echo same; else mv -f -- "$3" "$4"; '
    "echo changed; fi\n"
    'printf %s "$6" > "$2/upstreams.json.new" && mv -f -- "$2/upstreams.json.new" '
    '"$2/upstreams.json"'
)
#: _INSTALL's exit when the remote map changed since it was read (EX_TEMPFAIL).
MAP_CHANGED = 75
#: How often an edit of a remote gateway's map is read again and retried when another machine
#: edited the map between its read and its write.
MAP_TRIES = 20
# $1 prefix: the remote map (nothing when there is none)
_READ_MAP = 'cat -- "$1/upstreams.json" 2>/dev/null; exit 0'
# $1 prefix: the pid in nginx.pid and that process's command line (empty when none runs)
_MASTER = (
    'read -r pid < "$1/nginx.pid" 2>/dev/null || exit 0\n'
    'case "$pid" in *[!0-9]*|"") exit 0;; esac\n'
    'echo "$pid"; tr "\\0" " " < "/proc/$pid/cmdline" 2>/dev/null; echo'
)
# $1 nginx, $2 prefix, $3 config: start (nginx daemonizes) and wait for its pid file
_START = (
    '"$1" -p "$2/" -c "$3" || exit $?\n'
    "i=0\n"
    'while [ ! -s "$2/nginx.pid" ] && [ $i -lt 200 ]; do sleep 0.05; i=$((i+1)); done\n'
    'cat "$2/nginx.pid"'
)
# The children of master $m, from /proc with shell builtins only (no fork per process).
_KIDS = (
    'kids() { out=" "; for f in /proc/[0-9]*/stat; do '
    'read -r l 2>/dev/null < "$f" || continue; r=${l##*") "}; set -- $r; '
    'if [ "$2" = "$m" ]; then p=${f#/proc/}; out="$out${p%/stat} "; fi; done; }\n'
)
# $1 master pid, $2 tenths of seconds to wait: graceful reload, then wait for a new worker
_RELOAD = (
    "m=$1; n=$2\n" + _KIDS + "kids; before=$out\n"
    'kill -HUP "$m" || exit 3\n'
    "i=0\n"
    'while [ $i -lt $((n * 5)) ]; do kids; for k in $out; do case "$before" in *" $k "*) ;; '
    "*) exit 0;; esac; done; sleep 0.02; i=$((i+1)); done\n"
    "exit 0"
)
# $1 master pid: graceful shutdown, SIGKILL after 10 s
_STOP = (
    'kill -QUIT "$1" 2>/dev/null || exit 0\n'
    "i=0\n"
    'while [ -e "/proc/$1" ] && [ $i -lt 200 ]; do sleep 0.05; i=$((i+1)); done\n'
    '[ -e "/proc/$1" ] && kill -KILL "$1" 2>/dev/null; exit 0'
)
# $1 prefix: what a stopped gateway leaves
_CLEAR = 'rm -f -- "$1/nginx.pid" "$1"/nginx.conf.*.new "$1/upstreams.json"; rm -rf -- "$1/tmp"'


def _parse_map(text: str) -> dict[str, list[Server]]:
    """An upstream map as written (`{unit: [server, ...]}`); nothing for an empty or broken
    one."""
    try:
        data = json.loads(text) if text.strip() else {}
    except ValueError:
        return {}
    if not isinstance(data, dict):
        return {}
    return {str(u): [as_server(s) for s in ss] for u, ss in data.items() if isinstance(ss, list)}


def _map_text(live: Mapping[str, Sequence[Server]]) -> str:
    return json.dumps({k: list(v) for k, v in sorted(live.items())})


def is_master(cmdline: str, prefix: str) -> bool:
    """Whether a process's command line (NULs as spaces) is the nginx master of `prefix`
    (nginx names its master `nginx: master process <argv>`)."""
    return cmdline.startswith("nginx: master process") and f" -p {prefix}/ " in f"{cmdline} "


class NginxGateway:
    """The gateway of one stack: on this machine, or (with `runner`) on the host that runner
    reaches, named `host` in messages."""

    def __init__(
        self,
        state_dir: str | Path,
        stack: str,
        spec: GatewaySpec,
        runner: Runner | None = None,
        *,
        host: str | None = None,
        names: Mapping[str, str] | None = None,
    ) -> None:
        self.stack = stack
        self.spec = spec
        # routed unit -> the unit declared on several hosts it is a part of (one route)
        self.names = dict(names or {})
        self.prefix = Path(state_dir) / "gateway" / stack
        self.conf = self.prefix / "nginx.conf"  # remote: a copy of the config nginx runs
        self.upstreams_file = self.prefix / "upstreams.json"
        self.lock_file = self.prefix / "gateway.lock"
        self.runner = runner
        self.host = host or spec.host
        # nginx's own files: here, or on the remote host
        self.nginx_prefix = (
            str(self.prefix)
            if runner is None
            else (spec.directory or f"{REMOTE_ROOT}/{stack}").rstrip("/")
        )
        self._remote_nginx: str | None = None

    @property
    def where(self) -> str:
        """The gateway's host in words, for messages."""
        if self.runner is None:
            return "this machine"
        return f"host {self.host} ({self.runner.description})"

    # ------------------------------------------------------------ state

    def servers(self) -> dict[str, list[Server]]:
        """The upstream servers (`address:port`) per routed unit, as last applied (a map
        written before addresses held bare ports: those are on this machine). A remote
        gateway's map is read on its host (the copy here when the host does not answer)."""
        if self.runner is not None:
            with suppress(BackendError):
                return self._read_map()[1]
        return _parse_map(self._local_map())

    def _local_map(self) -> str:
        try:
            return self.upstreams_file.read_text()
        except OSError:
            return ""

    def _read_map(self) -> tuple[str | None, dict[str, list[Server]]]:
        """The map an edit starts from, and the text a remote write must still find there
        (None on this machine, where the lock here is enough). A remote host with no map yet
        (a gateway written before the map lived there) starts from the copy here."""
        if self.runner is None:
            return None, _parse_map(self._local_map())
        there = self._remote(["sh", "-c", _READ_MAP, "sh", self.nginx_prefix]).text
        return there, _parse_map(there or self._local_map())

    def live(self) -> dict[str, list[int]]:
        """The ports of `servers()` per routed unit (enough where every unit is on one
        machine; `servers()` says which host each is on)."""
        return {unit: [server_port(s) for s in ss] for unit, ss in self.servers().items()}

    def master_pid(self) -> int | None:
        """The pid of the running nginx master (None when none runs)."""
        if self.runner is not None:
            return self._remote_pid()
        try:
            record = json.loads((self.prefix / "master.json").read_text())
        except (OSError, ValueError):
            return None
        pid = record.get("pid")
        return pid if isinstance(pid, int) and alive(pid, record.get("ticks")) else None

    def _remote_pid(self) -> int | None:
        """The remote master's pid: the one in its pid file, if that process is the nginx
        master of this prefix (a stale pid file, or a pid reused since, does not count)."""
        assert self.runner is not None
        out = self._remote(["sh", "-c", _MASTER, "sh", self.nginx_prefix]).text.split("\n", 1)
        if len(out) < 2 or not out[0].strip().isdigit():
            return None
        return int(out[0]) if is_master(out[1].strip(), self.nginx_prefix) else None

    @property
    def running(self) -> bool:
        return self.master_pid() is not None

    # ------------------------------------------------------------ actions

    def _remote(self, argv: list[str], input: bytes | None = None, check: bool = True) -> RunResult:
        """Run `argv` on the gateway's host."""
        assert self.runner is not None
        return self.runner.run(argv, input=input, check=check, timeout=NGINX_TIMEOUT)

    def _nginx_there(self) -> str:
        """nginx on the remote host (its path), or a BackendError naming the host."""
        if self._remote_nginx is None:
            found = self._remote(["sh", "-c", _FIND_NGINX]).text.strip()
            if not found:
                raise BackendError(
                    f"gateway on {self.where}: nginx is not installed there "
                    "(install Debian's nginx on that host, e.g. apt-get install nginx)"
                )
            self._remote_nginx = found
        return self._remote_nginx

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

    def apply(
        self,
        live: Mapping[str, Sequence[Server | int]],
        keep: Callable[[str, Server], bool] | None = None,
    ) -> dict[str, list[Server]]:
        """Point every route at the `live` servers (the whole map; `address:port`, a bare port
        is one on this machine): write, `nginx -t`, then start or reload. `keep(unit, server)`:
        a server the map has now that stays too (one on a host this process cannot observe).
        The map written."""

        keeps: Callable[[str, Server], bool] = keep or (lambda _unit, _server: False)

        def attempt(
            expected: str | None, now: dict[str, list[Server]]
        ) -> dict[str, list[Server]] | None:
            new = {u: [as_server(s) for s in ss] for u, ss in live.items()}
            for unit, servers in now.items():
                kept = [s for s in servers if keeps(unit, s)]
                if kept:
                    new[unit] = list(dict.fromkeys([*kept, *new.get(unit, [])]))
            return new if self._write(new, expected) else None

        return self._until_written(attempt)

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
        adds = list(dict.fromkeys(map(as_server, add)))

        def attempt(expected: str | None, live: dict[str, list[Server]]) -> list[Server] | None:
            before = live.get(unit, [])
            servers = [s for s in before if s not in drop]
            servers += [s for s in adds if s not in servers]
            if servers == before or self._set_upstream(unit, servers, live, expected):
                return servers
            return None

        return self._until_written(attempt)

    def _until_written(
        self, attempt: Callable[[str | None, dict[str, list[Server]]], _T | None]
    ) -> _T:
        """Under the lock: read the map and make `attempt` of it (the map's text as read, for
        a remote write to check, and the map), until an attempt is not None: a remote map
        another machine changed between the read and the write is read again, MAP_TRIES
        times at most."""
        with self._locked():
            for _ in range(MAP_TRIES):
                done = attempt(*self._read_map())
                if done is not None:
                    return done
        raise BackendError(
            f"gateway on {self.where}: its route map changed under every one of {MAP_TRIES} "
            "edits (other machines editing it without pause); try again"
        )

    def _set_upstream(
        self,
        unit: str,
        servers: Sequence[Server],
        live: Mapping[str, Sequence[Server]],
        expected: str | None,
    ) -> bool:
        """Write the unit's servers into `live` (the map as read) and write it back (the
        caller holds the lock); False when a remote map changed since it was read."""
        return self._write({**live, unit: list(servers)}, expected)

    def _write(self, live: Mapping[str, Sequence[Server]], expected: str | None = None) -> bool:
        """Render, `nginx -t` a temporary copy of this write's own, then start or reload (the
        caller holds the lock). On a remote host only while its map is still `expected`:
        False (nothing written) when it is not."""
        text = _map_text(live)
        if self.runner is not None:
            if not self._write_there(live, text, expected):
                return False
        else:
            self._write_here(live)
        _write_atomically(self.upstreams_file, text)
        return True

    def _write_here(self, live: Mapping[str, Sequence[Server]]) -> None:
        for sub in ("logs", "tmp"):
            (self.prefix / sub).mkdir(parents=True, exist_ok=True)
        text = render_gateway(self.stack, self.spec, live, str(self.prefix), names=self.names)
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
        pid = self.master_pid()
        if pid is not None and previous != text:
            before = set(self._workers(pid))  # before the signal: new workers can be quick
            try:
                os.kill(pid, signal.SIGHUP)  # graceful reload: old workers finish their requests
            except ProcessLookupError:  # the master died just now: start a new one
                pid = None
            else:
                self._wait_reloaded(pid, before)
                if self.master_pid() is None:  # it died while reloading
                    pid = None
        if pid is None:
            self.reap_orphans()
            self._start()

    def reap_orphans(self) -> None:
        """Before a start with no master running: stop the workers a killed master left
        behind (SIGKILL does not reach them; they keep the gateway's ports, so a new master
        could not listen). A process is one when it is nginx's and holds a file under this
        gateway's prefix (its error log)."""
        prefix = str(self.prefix.resolve()) + "/"
        orphans: list[tuple[int, int | None]] = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                if not (entry / "cmdline").read_bytes().startswith(b"nginx: "):
                    continue
                fds = list((entry / "fd").iterdir())
            except OSError:
                continue
            for fd in fds:
                try:
                    target = os.readlink(fd)
                except OSError:
                    continue
                if target.startswith(prefix):
                    pid = int(entry.name)
                    orphans.append((pid, start_ticks(pid)))
                    break
        for pid, _ in orphans:
            with suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 5
        while any(alive(p, t) for p, t in orphans) and time.monotonic() < deadline:
            time.sleep(0.02)

    def _write_there(
        self, live: Mapping[str, Sequence[Server]], map_text: str, expected: str | None
    ) -> bool:
        """The same on the remote host, through its runner: the config goes to a temporary
        file there; under the lock there, if the map there is still `expected`, `nginx -t`
        checks it and it replaces the one nginx runs, with the map; then nginx starts or
        reloads gracefully and the new workers are waited for; the copy here follows. False
        when the map there changed since it was read (nothing written)."""
        nginx = self._nginx_there()
        prefix = self.nginx_prefix
        text = render_gateway(self.stack, self.spec, live, prefix, names=self.names)
        conf = f"{prefix}/nginx.conf"
        tmp = f"{conf}.{os.getpid()}-{threading.get_ident()}.new"
        check = self._remote(
            [
                "sh",
                "-c",
                _INSTALL,
                "sh",
                nginx,
                prefix,
                tmp,
                conf,
                "-" if expected is None else expected,
                map_text,
            ],
            input=text.encode("utf-8"),
            check=False,
        )
        if check.returncode == MAP_CHANGED:
            return False
        if check.returncode != 0:
            raise BackendError(
                f"gateway config rejected by nginx -t on {self.where}: "
                f"{check.error_text or f'exit {check.returncode}'}"
            )
        pid = self._remote_pid()
        if pid is None:
            started = self._remote(["sh", "-c", _START, "sh", nginx, prefix, conf], check=False)
            if started.returncode != 0 or not started.text.strip().isdigit():
                raise BackendError(
                    f"gateway did not start on {self.where}: "
                    f"{started.error_text or 'it wrote no pid file'}"
                )
        elif check.text.strip().endswith("changed"):
            tenths = str(int(RELOAD_WAIT * 10))
            self._remote(["sh", "-c", _RELOAD, "sh", str(pid), tenths])
        _write_atomically(self.conf, text)
        return True

    def clear(self) -> None:
        """After `stop`: remove what a stopped gateway leaves (pid file, temporary config
        files and directories, the upstream map), so the next start begins with no routes."""
        with self._locked():
            if self.runner is not None:
                self._remote(["sh", "-c", _CLEAR, "sh", self.nginx_prefix])
            else:
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
        deadline = time.monotonic() + RELOAD_WAIT
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
        pid = self.master_pid()
        if pid is None:
            return False
        if self.runner is not None:
            self._remote(["sh", "-c", _STOP, "sh", str(pid)])
            return True
        os.kill(pid, signal.SIGQUIT)  # graceful shutdown
        deadline = time.monotonic() + 10
        ticks = start_ticks(pid)
        while alive(pid, ticks) and time.monotonic() < deadline:
            time.sleep(0.05)
        if alive(pid, ticks):
            os.kill(pid, signal.SIGKILL)
        (self.prefix / "master.json").unlink(missing_ok=True)
        return True


def stack_gateway(stack: Stack, state_dir: str | Path) -> NginxGateway:
    """The stack's gateway, driven where its host is: on this machine for a local host (or by
    the agent on an agent host, for which that host is this machine), over SSH through the
    host's runner otherwise (hxp.spec refuses a gateway host hxp cannot reach either way)."""
    spec = stack.gateway
    assert spec is not None, f"stack {stack.stack} has no gateway"
    host = stack.hosts[spec.host]
    names = {u: s.part_of for u, s in stack.units().items() if s.part_of is not None}
    match host.runner:
        case "local":
            return NginxGateway(state_dir, stack.stack, spec, names=names)
        case "ssh":
            runner = runner_for(host, timeout=NGINX_TIMEOUT, state_dir=state_dir)
            return NginxGateway(state_dir, stack.stack, spec, runner, host=spec.host, names=names)
        case "docker-exec":
            raise BackendError(f"gateway.host {spec.host!r}: runner docker-exec cannot run nginx")
