"""The one Prefect server hxp's flow runs go to, and the local one hxp starts on demand.

Without an API every Python process would spawn its own temporary server, which is slow,
loses task history, prints tracebacks at exit and holds runs no UI ever shows (see
docs/prefect.md). So every hxp command that runs a flow uses `$PREFECT_API_URL`, else the
active Prefect profile's API, else the `prefect server start` (on SQLite) that hxp keeps
under the state directory: `hxp server start`, or the first command that needs it.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hxp.backends.supervisor import alive, start_ticks, terminate
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
    import httpx  # here: the CLI reads this module's records without paying for httpx

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


@contextmanager
def _starting(home: Path) -> Iterator[None]:
    """One starter at a time per state directory (two commands at once share one server)."""
    home.mkdir(parents=True, exist_ok=True)
    with (home / "server.lock").open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def start_server(state_dir: Path, port: int | None = None) -> dict[str, Any]:
    """Start (or reuse) the local server; returns {url, ui, pid, ...}."""
    home = state_dir / "prefect"
    with _starting(home):
        running = server_status(state_dir)
        if running is not None and _healthy(running["url"]):
            return running
        return _start(home, port)


def _start(home: Path, port: int | None) -> dict[str, Any]:
    port = port or _free_port()
    url = f"http://127.0.0.1:{port}/api"
    # The UI asks the API its settings name (default: port 4200), whatever --port says.
    env = {**os.environ, **SERVER_SETTINGS, "PREFECT_HOME": str(home), "PREFECT_UI_API_URL": url}
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
    record = {
        "pid": proc.pid,
        "ticks": start_ticks(proc.pid),
        "url": url,
        "ui": f"http://127.0.0.1:{port}",
        "log": str(home / "server.log"),
        "started_at": time.time(),
    }
    _record_path(home.parent).write_text(json.dumps(record))
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


# The warm runner (hxp_cli.runner) belongs to the local server: it is started with it and
# stopped with it. Its record lives beside the server's.


def runner_record_path(state_dir: Path) -> Path:
    return state_dir / "prefect" / "runner.json"


def runner_status(state_dir: Path) -> dict[str, Any] | None:
    """The state directory's runner if it still runs (same pid and start time)."""
    try:
        record: dict[str, Any] = json.loads(runner_record_path(state_dir).read_text())
    except (OSError, ValueError):
        return None
    return record if alive(record.get("pid"), record.get("ticks")) else None


def stop_runner(state_dir: Path, grace: float = 5.0) -> bool:
    """Stop the state directory's runner; True if one ran. Commands it is running go on."""
    record = runner_status(state_dir)
    if record is None:
        return False
    terminate(record["pid"], record["ticks"], grace)
    runner_record_path(state_dir).unlink(missing_ok=True)
    return True


def stop_server(state_dir: Path, grace: float = 15.0) -> bool:
    """Stop the server hxp started (and its warm runner); True if one was running."""
    stop_runner(state_dir)
    record = server_status(state_dir)
    if record is None:
        return False
    terminate(record["pid"], record["ticks"], grace, group=True, poll=0.1)
    _record_path(state_dir).unlink(missing_ok=True)
    return True


@dataclass(frozen=True)
class PrefectApi:
    """The API this process's flow runs go to, and where that choice came from."""

    url: str
    source: str  # "PREFECT_API_URL", "Prefect profile <name>" or "local server"
    started: dict[str, Any] | None = None  # the local server's record when this call started it


def ensure_api(state_dir: Path) -> PrefectApi:
    """Point this process at `$PREFECT_API_URL`, else the active profile's API, else the
    local server of `state_dir` (started here when none runs). Never a temporary server.

    Prefect reads its settings once, when it is first imported: a variable set after that
    changes nothing, and every flow run then went to a temporary server of its own. So the
    local server's URL goes into the environment (for child processes) and Prefect's global
    settings are read again.
    """
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    from prefect.context import SettingsContext, refresh_global_settings_context
    from prefect.settings import get_current_settings

    configured = get_current_settings().api.url
    if configured:
        if os.environ.get("PREFECT_API_URL"):
            source = "PREFECT_API_URL"
        else:
            context = SettingsContext.get()
            profile = context.profile.name if context is not None else "?"
            source = f"Prefect profile {profile}"
        return PrefectApi(str(configured), source)
    running = server_status(state_dir)
    started = None
    if running is None or not _healthy(running["url"]):
        asked = time.time()
        running = start_server(state_dir)  # another command may have started it meanwhile
        if running.get("started_at", 0) >= asked:
            started = running
    url: str = running["url"]
    os.environ["PREFECT_API_URL"] = url
    if url.startswith("http://") and not os.environ.get("PREFECT_API_SSL_CERT_FILE"):
        os.environ["PREFECT_API_SSL_CERT_FILE"] = str(plain_http_ca_file(state_dir))
    refresh_global_settings_context()
    if get_current_settings().api.url != url:  # a settings context of the caller's wins
        raise HxpError(f"could not point Prefect at the local server {url}")
    return PrefectApi(url, "local server", started)


def plain_http_ca_file(state_dir: Path) -> Path:
    """A CA file of one certificate, for Prefect clients of the local plain-HTTP server.

    Every Prefect client (two or three per flow run) builds a TLS context from its CA file
    whatever the API's scheme: the whole certifi bundle costs ~20 ms each time here, one
    certificate well under 1 ms. No TLS is spoken to that server, so nothing is verified
    against it; a user's own PREFECT_API_SSL_CERT_FILE, or API, is left alone."""
    path = state_dir / "prefect" / "plain-http-ca.pem"
    if not path.exists():
        import certifi

        bundle = Path(certifi.where()).read_text()
        end = "-----END CERTIFICATE-----"
        begin = bundle.index("-----BEGIN CERTIFICATE-----")
        one = bundle[begin : bundle.index(end, begin) + len(end)] + "\n"
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(one)
        tmp.replace(path)
    return path


def ui_url(state_dir: Path) -> str | None:
    """The UI of the server `ensure_api` would use now, without starting one (None when
    that is the local server and it does not run)."""
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    from prefect.settings import get_current_settings

    settings = get_current_settings()
    if settings.api.url:
        return str(settings.ui_url) if settings.ui_url else None
    running = server_status(state_dir)
    return str(running["ui"]) if running is not None else None
