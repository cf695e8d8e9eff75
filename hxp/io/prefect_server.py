"""A local Prefect server on SQLite that hxp starts on demand (the embedded default).

Without PREFECT_API_URL every Python process would spawn its own ephemeral server, which is
slow, loses task history and prints tracebacks at exit (see docs/prefect.md). So `hxp apply`
and `make demo` share one `prefect server start` under the state directory instead.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

from hxp.backends.supervisor import alive, start_ticks
from hxp.errors import HxpError

SERVER_SETTINGS = {
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "PREFECT_SERVER_SERVICES_TASK_RUN_RECORDER_BATCH_SIZE": "100",
    "PREFECT_SERVER_SERVICES_TASK_RUN_RECORDER_READ_BATCH_SIZE": "100",
    "PREFECT_SERVER_SERVICES_TASK_RUN_RECORDER_FLUSH_INTERVAL": "1",
    "PREFECT_SERVER_LOGGING_LEVEL": "WARNING",
}
START_TIMEOUT = 120.0


def _record_path(state_dir: Path) -> Path:
    return state_dir / "prefect" / "server.json"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _healthy(url: str) -> bool:
    try:
        return httpx.get(f"{url}/health", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def server_status(state_dir: Path) -> dict[str, Any] | None:
    """The recorded server if it still runs (same pid and start time) and answers."""
    try:
        record: dict[str, Any] = json.loads(_record_path(state_dir).read_text())
    except (OSError, ValueError):
        return None
    if not alive(record.get("pid"), record.get("ticks")):
        return None
    return record


def start_server(state_dir: Path, port: int | None = None) -> dict[str, Any]:
    """Start (or reuse) the local server; returns {url, ui, pid, ...}."""
    running = server_status(state_dir)
    if running is not None and _healthy(running["url"]):
        return running
    home = state_dir / "prefect"
    home.mkdir(parents=True, exist_ok=True)
    port = port or _free_port()
    env = {**os.environ, **SERVER_SETTINGS, "PREFECT_HOME": str(home)}
    env.pop("PREFECT_API_URL", None)
    prefect = Path(sys.executable).parent / "prefect"
    with (home / "server.log").open("ab") as log:
        proc = subprocess.Popen(
            [str(prefect), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    url = f"http://127.0.0.1:{port}/api"
    record = {
        "pid": proc.pid,
        "ticks": start_ticks(proc.pid),
        "url": url,
        "ui": f"http://127.0.0.1:{port}",
        "log": str(home / "server.log"),
        "started_at": time.time(),
    }
    _record_path(state_dir).write_text(json.dumps(record))
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise HxpError(
                f"prefect server exited with code {proc.returncode}; see {record['log']}"
            )
        if _healthy(url):
            return record
        time.sleep(0.25)
    raise HxpError(
        f"prefect server did not answer within {START_TIMEOUT:.0f}s; see {record['log']}"
    )


def stop_server(state_dir: Path, grace: float = 15.0) -> bool:
    """Stop the server hxp started; True if one was running."""
    record = server_status(state_dir)
    if record is None:
        return False
    pid, ticks = record["pid"], record["ticks"]
    os.killpg(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while alive(pid, ticks) and time.monotonic() < deadline:
        time.sleep(0.1)
    if alive(pid, ticks):
        os.killpg(pid, signal.SIGKILL)
    _record_path(state_dir).unlink(missing_ok=True)
    return True


def ensure_api(state_dir: Path) -> str:
    """PREFECT_API_URL if set, else the local server (started if needed); sets the variable."""
    if os.environ.get("PREFECT_API_URL"):
        return os.environ["PREFECT_API_URL"]
    from prefect.settings import PREFECT_API_URL  # a profile or temporary settings may set it

    configured = PREFECT_API_URL.value()
    if configured:
        return str(configured)
    url: str = start_server(state_dir)["url"]
    os.environ["PREFECT_API_URL"] = url
    return url
