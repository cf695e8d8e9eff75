"""Run the stack's nginx gateway: write its config, check it with `nginx -t`, reload gracefully.

Everything lives under STATE/gateway/<stack>/ (config, pid, logs, temp dirs). A reload starts
new workers with the new upstreams while the old workers finish the requests they hold, so
switching replicas loses no request.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from hxp.backends.supervisor import alive, start_ticks
from hxp.errors import BackendError
from hxp.gateway import render_gateway
from hxp.spec import GatewaySpec

NGINX_TIMEOUT = 30


def nginx_binary() -> str:
    found = shutil.which("nginx") or (
        "/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None
    )
    if found is None:
        raise BackendError("nginx is not installed (scripts/install-system-deps.sh)")
    return found


class NginxGateway:
    """The gateway of one stack on this machine."""

    def __init__(self, state_dir: str | Path, stack: str, spec: GatewaySpec) -> None:
        self.stack = stack
        self.spec = spec
        self.prefix = Path(state_dir) / "gateway" / stack
        self.conf = self.prefix / "nginx.conf"
        self.upstreams_file = self.prefix / "upstreams.json"

    # ------------------------------------------------------------ state

    def live(self) -> dict[str, list[int]]:
        """The upstream servers (ports) per routed unit, as last applied."""
        try:
            data: dict[str, list[int]] = json.loads(self.upstreams_file.read_text())
        except (OSError, ValueError):
            return {}
        return data

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

    def apply(self, live: Mapping[str, Sequence[int]]) -> None:
        """Point every route at `live` ports: write, `nginx -t`, then start or reload."""
        for sub in ("logs", "tmp"):
            (self.prefix / sub).mkdir(parents=True, exist_ok=True)
        text = render_gateway(self.stack, self.spec, live, str(self.prefix))
        previous = self.conf.read_text() if self.conf.exists() else None
        tmp = self.conf.with_name("nginx.conf.new")
        tmp.write_text(text)
        check = subprocess.run(
            [nginx_binary(), "-t", "-p", str(self.prefix), "-c", str(tmp)],
            capture_output=True,
            text=True,
            timeout=NGINX_TIMEOUT,
            check=False,
        )
        if check.returncode != 0:
            tmp.unlink(missing_ok=True)
            raise BackendError(f"gateway config rejected by nginx -t: {check.stderr.strip()}")
        tmp.replace(self.conf)
        pid = self._pid()
        if pid is None:
            self._start()
        elif previous != text:
            before = set(self._workers(pid))  # before the signal: new workers can be quick
            os.kill(pid, signal.SIGHUP)  # graceful reload: old workers finish their requests
            self._wait_reloaded(pid, before)
        self.upstreams_file.write_text(json.dumps({k: list(v) for k, v in live.items()}))

    def set_upstream(self, unit: str, ports: Sequence[int]) -> None:
        live = self.live()
        live[unit] = list(ports)
        self.apply(live)

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
        """nginx answers a reload asynchronously; wait until the new workers are up."""
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            now = set(self._workers(pid))
            if now - before:
                return
            time.sleep(0.02)

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
