"""The campaign's unit program (hxp.io.chaos_unit) as a real process: a slow stop keeps it
serving after SIGTERM for the seconds asked, then it exits 0 (the window a kill-during-rollback
run kills the orchestrator in)."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import httpx

from tests.support.stacks import free_port


def test_a_slow_stop_serves_on_after_sigterm_then_exits_0() -> None:
    port = free_port()
    argv = [sys.executable, "-m", "hxp.io.chaos_unit", "--port", str(port), "--stop-delay", "1"]
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                assert httpx.get(f"http://127.0.0.1:{port}/", timeout=1).status_code == 200
                break
            except httpx.TransportError:
                assert time.monotonic() < deadline, "the unit never listened"
                time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        sent = time.monotonic()
        assert httpx.get(f"http://127.0.0.1:{port}/", timeout=1).status_code == 200
        assert proc.wait(timeout=10) == 0
        assert time.monotonic() - sent >= 0.9
    finally:
        proc.kill()
        proc.wait()
