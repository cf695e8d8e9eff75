"""`make fleet-demo` / `make fleet-demo-down` (scripts/fleet_demo.py): four fleet-lab hosts
deployed through the local Prefect server; the URLs it prints answer, the gateway on edge
balancing the one model over the replicas of both model hosts; down removes it all. Not as
root, it says so and exits 2."""

from __future__ import annotations

import http.client
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.support.fleet_lab import lab_available
from tests.support.loadgen import served

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "fleet_demo.py"


def demo(action: str, state: Path, *prefix: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env["HXP_STATE_DIR"] = str(state)
    return subprocess.run(
        [*prefix, sys.executable, str(SCRIPT), action],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )


def test_not_root_says_so(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        done = demo("up", tmp_path)
    else:
        done = demo("up", tmp_path, "setpriv", "--reuid=65534", "--regid=65534", "--clear-groups")
    assert done.returncode == 2, done.stderr
    assert "fleet-demo: needs root" in done.stderr
    assert "sudo make fleet-demo" in done.stderr
    assert "Traceback" not in done.stderr
    assert list(tmp_path.iterdir()) == []  # nothing made


@pytest.mark.slow
def test_fleet_demo_up_serves_and_down_removes_everything(tmp_path: Path) -> None:
    why = lab_available()
    if why is not None:
        pytest.skip(why)
    state = tmp_path / "demo"
    try:
        up = demo("up", state)
        assert up.returncode == 0, up.stdout[-3000:] + up.stderr[-3000:]
        gateway = re.search(r"gateway \(chat\)\s+http://([\d.]+):(\d+)/v1/models", up.stdout)
        web = re.search(r"web \(Docker\)\s+http://([\d.]+):(\d+)/", up.stdout)
        assert gateway, up.stdout
        assert web, up.stdout
        assert re.search(r"Prefect UI\s+http://127\.0\.0\.1:\d+", up.stdout)
        replicas = re.findall(r"chat on (gpu\d)\s+(http://[\d.]+:\d+)/metrics", up.stdout)
        assert [host for host, _ in replicas] == ["gpu1", "gpu2"], up.stdout
        for _ in range(40):
            conn = http.client.HTTPConnection(gateway[1], int(gateway[2]), timeout=5)
            body = json.dumps({"model": "chat", "prompt": "hi", "max_tokens": 2})
            conn.request("POST", "/v1/completions", body, {"Content-Type": "application/json"})
            answer = conn.getresponse()
            assert answer.status == 200
            assert json.loads(answer.read())["model"] == "chat"
        for host, url in replicas:  # the one route reached both model hosts
            assert served_by_host(url) > 0, host
        # Prometheus (on this machine) scrapes the replicas of both model hosts by address
        prom = re.search(r"Prometheus\s+http://(127\.0\.0\.1):(\d+)/targets", up.stdout)
        assert prom, up.stdout
        deadline = time.monotonic() + 30
        while True:
            conn = http.client.HTTPConnection(prom[1], int(prom[2]), timeout=5)
            conn.request("GET", "/api/v1/targets")
            active = json.loads(conn.getresponse().read())["data"]["activeTargets"]
            up_on = {t["labels"].get("host") for t in active if t["health"] == "up"}
            if {"gpu1", "gpu2"} <= up_on:
                break
            assert time.monotonic() < deadline, active
            time.sleep(1)
        conn = http.client.HTTPConnection(web[1], int(web[2]), timeout=5)
        conn.request("GET", "/")
        assert conn.getresponse().status in (200, 404)  # busybox httpd answers
    finally:
        down = demo("down", state)
    assert down.returncode == 0, down.stderr[-3000:]
    assert "Prefect server stopped: True" in down.stdout
    assert not [ns for ns in subprocess.run(["ip", "netns", "list"], capture_output=True,
                text=True).stdout.split() if ns.startswith("hxl-demo-")]  # fmt: skip
    leftover = subprocess.run(
        ["pgrep", "-f", "worker start --pool hxl-demo-"], capture_output=True, text=True
    )
    assert leftover.stdout.strip() == ""
    assert started_under(state) == []  # no Prefect server (or anything) left behind


def served_by_host(base: str) -> float:
    """Completions both replicas of one model host served (ports 18000 and 18001)."""
    address = base.removeprefix("http://").split(":")[0]
    return served(address, 18000) + served(address, 18001)


def started_under(state: Path) -> list[int]:
    """Processes whose HXP_STATE_DIR lies under `state`."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            env = (proc / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if any(e.startswith(f"HXP_STATE_DIR={state}".encode()) for e in env):
            found.append(int(proc.name))
    return found
