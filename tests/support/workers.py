"""Prefect process workers as subprocesses of a test, and waiting for the runs they take."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).parents[2]
PREFECT = str(Path(sys.executable).parent / "prefect")


def prefect_env(api_url: str, **extra: str) -> dict[str, str]:
    """The environment of a Prefect CLI or worker subprocess talking to the test server."""
    env = {
        **os.environ,
        "PREFECT_API_URL": api_url,
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        # a worker asks for work every second (default 10 s)
        "PREFECT_WORKER_QUERY_SECONDS": "1",
        "PREFECT_WORKER_PREFETCH_SECONDS": "1",
        "PREFECT_LOGGING_LEVEL": "INFO",
        **extra,
    }
    return env


def prefect_cli(api_url: str, *args: str, timeout: float = 120) -> str:
    """Run `prefect ARGS` in the checkout; its output, or an assertion error with it."""
    proc = subprocess.run(
        [PREFECT, "--no-prompt", *args],
        cwd=ROOT,
        env=prefect_env(api_url),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode == 0, f"prefect {' '.join(args)}: {proc.stdout}\n{proc.stderr}"
    return proc.stdout


def start_worker(
    api_url: str,
    pool: str,
    state_dir: Path,
    log: Path,
    queue: str | None = None,
    env: dict[str, str] | None = None,
) -> subprocess.Popen[bytes]:
    """`prefect worker start --pool POOL --type process` with its own HXP_STATE_DIR (and `env`
    added to its environment)."""
    args = [PREFECT, "worker", "start", "--pool", pool, "--type", "process"]
    if queue:
        args += ["--work-queue", queue]
    with log.open("ab") as out:
        return subprocess.Popen(
            args,
            cwd=ROOT,
            env=prefect_env(api_url, HXP_STATE_DIR=str(state_dir), **(env or {})),
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def stop_worker(proc: subprocess.Popen[bytes]) -> None:
    """Stop a worker and the flow-run processes it started (its process group)."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def wait_for(what: str, check: Callable[[], Any], timeout: float, log: Path | None = None) -> Any:
    """Poll `check` until it returns something truthy; fail naming `what` (and the log)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = check()
        if found:
            return found
        time.sleep(0.5)
    tail = log.read_text(errors="replace")[-3000:] if log and log.exists() else ""
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}\n{tail}")
