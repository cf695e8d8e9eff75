"""Stalled engines end to end (issue 16, item 8): hxp-vllm-sim's `--stall-after` engine keeps
answering /health 200 while no token moves; the health sweep's progress layer finds it within
the stall window plus one sweep (unhealthy: out of the gateway when other replicas serve), and
the supervisor restarts it as a crash. Saturated (queue full, tokens moving) and idle replicas
are never restarted. Time-compressed: a 4 s window and sweeps back to back; the code path is
the production one."""

from __future__ import annotations

import contextlib
import itertools
import json
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.support.loadgen import BackgroundLoad
from tests.support.stacks import SIM_ARGS, free_port, free_range, sim_fleet, tear_down_fleet

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("prefect_server")]
WINDOW = 4.0


def sweep(files: list[Path], state: Path) -> dict[str, Any]:
    from flows.health import run_health_sweep

    result: dict[str, Any] = run_health_sweep(
        [str(f) for f in files], state_dir=str(state), flap_threshold=1
    )
    return result


def supervise(files: list[Path], state: Path) -> dict[str, Any]:
    from flows.lifecycle import supervise_stack

    result: dict[str, Any] = supervise_stack([str(f) for f in files], state_dir=str(state))
    return result


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[Any]:
    made: list[tuple[Path, Path]] = []

    def make(*args: str) -> tuple[list[Path], Path, int, str]:
        base, gateway = free_range(2), free_port()
        path = sim_fleet(
            tmp_path / "stall.yaml", "st", base, gateway, replicas=1, revision=None,
            simulator_args=(*SIM_ARGS, *args), stop_timeout="2s",
        )  # fmt: skip
        window = tmp_path / "window.yaml"
        window.write_text(f"models:\n  chat:\n    health:\n      stall_window: {WINDOW:g}s\n")
        state = tmp_path / "state"
        made.append((path, state))
        from flows.deploy import deploy_stack

        deploy_stack([str(path), str(window)], state_dir=str(state))
        return [path, window], state, base, f"http://127.0.0.1:{gateway}"

    yield make
    for path, state in made:
        tear_down_fleet(path, state, "st")


#: Polls a /metrics page every 20 ms from its own process (the flows hold this one's GIL for
#: seconds on a busy machine) and prints `monotonic-time tokens` whenever the token count moves.
POLLER = """
import re, sys, time, urllib.request
last = None
while True:
    page = urllib.request.urlopen(sys.argv[1], timeout=5).read().decode()
    found = re.search(r"^vllm:generation_tokens_total[{][^}]*[}] (\\S+)$", page, re.M)
    value = found and float(found.group(1))
    if value != last:
        print(time.monotonic(), value, flush=True)
        last = value
    time.sleep(0.02)
"""


def test_a_stalled_engine_is_found_within_the_window_plus_one_sweep_and_restarted(
    fleet: Any,
) -> None:
    files, state, port, _url = fleet("--tokens-per-second", "20", "--stall-after", "6")
    poller = subprocess.Popen(
        [sys.executable, "-c", POLLER, f"http://127.0.0.1:{port}/metrics"],
        stdout=subprocess.PIPE,
        text=True,
    )

    def stream() -> None:  # a long stream: it stops getting tokens when the engine stalls
        body = {"model": "chat", "prompt": "x", "max_tokens": 4000, "ignore_eos": True,
                "stream": True}  # fmt: skip
        url = f"http://127.0.0.1:{port}/v1/completions"
        with (
            contextlib.suppress(httpx.HTTPError),
            httpx.stream("POST", url, json=body, timeout=120) as reply,
        ):
            for _ in reply.iter_lines():
                pass

    threading.Thread(target=stream, daemon=True).start()
    sweeps: list[tuple[float, str]] = []  # (started, the unit's reason)
    deadline = time.monotonic() + 90
    try:
        while True:
            assert time.monotonic() < deadline, sweeps
            started = time.monotonic()
            out = sweep(files, state)
            reason = json.dumps(out["units"]["chat"])
            sweeps.append((started, reason))
            if "progress: stalled" in reason:
                break
            time.sleep(0.3)
    finally:
        poller.terminate()
    moves = [line.split() for line in poller.communicate()[0].splitlines()]
    stalled_at = float(moves[-1][0])  # the last move of the token counter
    assert float(moves[-1][1]) > 20, moves  # the stream ran before the stall
    # Any sweep but the first after the stall (it may still see the last tokens move) that
    # begins a window after it finds it; none finds it before the window is over, less the
    # sweep interval (the counter's last move is known to one sweep).
    after = [started for started, _ in sweeps[:-1] if started >= stalled_at]
    assert all(started < stalled_at + WINDOW for started in after[1:]), (stalled_at, sweeps)
    period = max(b[0] - a[0] for a, b in itertools.pairwise(sweeps))
    assert period < WINDOW, f"sweeps every {period:.1f}s: slower than the window"
    assert sweeps[-1][0] >= stalled_at + WINDOW - period - 0.5, (stalled_at, sweeps)
    assert sweeps[-1][0] <= stalled_at + WINDOW + period, (stalled_at, sweeps)
    assert out["instances"]["chat"] == "unhealthy"  # (its only replica: the gateway keeps it)
    print(f"\nstall found {sweeps[-1][0] - stalled_at:.1f}s after the last token "
          f"(window {WINDOW:g}s, sweeps every {period:.1f}s)")  # fmt: skip

    result = supervise(files, state)
    assert result["crashed"] == ["chat"]
    assert result["restarted"] == ["chat"]
    # The sweep's verdict predates the restart: the next pass leaves the new engine alone.
    assert supervise(files, state)["restarted"] == []
    assert sweep(files, state)["instances"]["chat"] == "healthy"  # stalls again 6 s later


def test_no_restart_when_idle_or_saturated(fleet: Any) -> None:
    files, state, _port, url = fleet("--max-concurrency", "2", "--tokens-per-second", "200")
    until = time.monotonic() + 2 * WINDOW + 1  # idle: nothing runs
    while time.monotonic() < until:
        assert sweep(files, state)["instances"]["chat"] == "healthy"
    assert supervise(files, state)["restarted"] == []

    # Saturated: 2 slots, 32 clients: a full queue, every request a few tokens.
    load = BackgroundLoad(url, "chat", 3000, concurrency=32).start()
    seen = []
    until = time.monotonic() + 2 * WINDOW + 1
    while time.monotonic() < until:
        out = sweep(files, state)
        seen.append(out["instances"]["chat"])
    report = supervise(files, state)
    assert report["restarted"] == []
    assert report["crashed"] == []
    assert "unhealthy" not in seen, seen
    assert load._thread.is_alive(), "the load ended before the sweeps"
