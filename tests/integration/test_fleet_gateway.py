"""A gateway on a remote host of the fleet lab: a blue-green move of a model whose replicas are
on two hosts, behind nginx on a third, under continuous load: 0 failed.

- gw: a Docker host driven over SSH (its stack entry from `LabState.ssh_host_entry`); hxp runs
  nginx there through that host's runner (lab hosts share this machine's files, so Debian's
  nginx is there), its files under `gateway.directory`, listening on gw's address.
- m1, m2: the model `chat` is declared once with `hosts: [m1, m2]` and runs two
  `hxp-vllm-sim` replicas on each (its parts `chat-m1` and `chat-m2`, hxp.spec.spread_hosts),
  behind one route that balances over all four. Each host's part of a deploy is
  `hxp apply --unit chat-<host>` run inside that host's namespace, as the agent on that host
  does (the process backend is local to its host); both parts edit the one gateway on gw over
  SSH, its route map and lock on gw.

The move: v1 on both hosts, then continuous load through gw on both routes while v2 (a new
revision: another max_model_len) replaces every replica blue-green on both hosts; the load
keeps going until both parts are done and at least 10,000 requests were sent, and the new
replicas of both hosts served some of them. Afterwards the route holds only new-slot replicas,
which answer with the new revision; a health sweep from here reads and keeps the remote
gateway's routes; `hxp urls` names gw's address.
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from hxp.backends.runners import SshRunner
from hxp.config import load_config
from hxp.health import SweepSettings
from hxp.io.gateway import stack_gateway
from hxp.io.sweep import sweep_stack
from tests.support.fleet_lab import FleetLab, LabState, lab_available
from tests.support.loadgen import BackgroundLoad, served
from tests.support.stacks import SHORT_BAKE, SIM_ARGS

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("prefect_server")]

ROOT = Path(__file__).resolve().parents[2]
SIM_PORT = 18300  # inside each model host's own namespace
ROUTES = {"chat": 18480}  # nginx's port on gw: one route over both hosts' replicas
PARTS = {"m1": "chat-m1", "m2": "chat-m2"}  # the parts of `chat`, host by host
REQUESTS = 10_000  # at least, in all, during the move
NEW_LEN = 3072  # v2's max_model_len (v1: the simulator's default)


def model(version: int) -> dict[str, Any]:
    args = list(SIM_ARGS) + (["--max-model-len", str(NEW_LEN)] if version == 2 else [])
    return {
        "hosts": list(PARTS),
        "engine": "simulator",
        "python": sys.executable,
        "model": "hxp-sim/chat",
        "replicas": 2,
        "port": SIM_PORT,
        "simulator_args": args,
        "health": {
            "http": {"url": f"http://127.0.0.1:{SIM_PORT}/health"},
            "interval": "500ms",
            "timeout": "1s",
            "retries": 3,
        },
    }


def stack_file(state: LabState, folder: Path, version: int) -> Path:
    gw = state.host("gw").address
    data = {
        "stack": "rgw",
        "hosts": {
            "gw": state.ssh_host_entry("gw"),
            "m1": {"backend": "process", "address": state.host("m1").address},
            "m2": {"backend": "process", "address": state.host("m2").address},
        },
        "deploy": {"bake": SHORT_BAKE},
        "models": {"chat": model(version)},
        "gateway": {
            "host": "gw",
            "bind": gw,
            "directory": str(folder / "gw-nginx"),
            "routes": ROUTES,
            "drain_timeout": "10s",
        },
    }
    path = folder / f"v{version}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@dataclass
class Lab:
    lab: FleetLab
    state: LabState
    folder: Path
    state_dir: Path
    api: str  # the Prefect API as lab hosts reach it (a relay on the bridge)


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory, prefect_server: str) -> Iterator[Lab]:
    why = lab_available()
    if why is not None:
        pytest.skip(why)
    if not Path("/usr/sbin/nginx").exists():
        pytest.skip("nginx is not installed (scripts/install-system-deps.sh)")
    folder = tmp_path_factory.mktemp("rgw")
    made = FleetLab("rgw", folder / "lab")
    state = made.up([("gw", "docker"), ("m1", "plain"), ("m2", "plain")])
    try:
        yield Lab(made, state, folder, folder / "state", made.relay(prefect_server))
    finally:
        v1 = folder / "v1.yaml"
        if v1.exists():
            stack = load_config([v1], {}).stack
            gateway = stack_gateway(stack, folder / "state")
            try:
                gateway.stop()
            except Exception as exc:  # the lab's down ends it anyway
                print(f"gateway stop: {exc}")
            if isinstance(gateway.runner, SshRunner):
                gateway.runner.close()  # the shared connection this process may have started
        made.down()


def part(lab: Lab, host: str, path: Path, unit: str) -> subprocess.Popen[str]:
    """`hxp apply -f PATH --unit UNIT` inside lab host `host`'s namespace: the host's part."""
    env = {
        **os.environ,
        "HXP_STATE_DIR": str(lab.state_dir),
        "PREFECT_API_URL": lab.api,
        "HXP_WARM_RUNNER": "0",
    }
    ns = lab.state.host(host).namespace
    command = ["apply", "-f", str(path), "--unit", unit]
    return subprocess.Popen(
        ["nsenter", f"--net=/run/netns/{ns}", sys.executable, "-m", "hxp_cli", *command],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def deploy(lab: Lab, path: Path) -> float:
    """Both hosts' parts at once (the stack's lock serializes them); their wall time."""
    started = time.monotonic()
    runs = {unit: part(lab, host, path, unit) for host, unit in PARTS.items()}
    for unit, run in runs.items():
        out, _ = run.communicate(timeout=400)
        assert run.returncode == 0, f"{unit}: {out}"
    return time.monotonic() - started


def get(address: str, port: int, path: str) -> Any:
    conn = http.client.HTTPConnection(address, port, timeout=5)
    conn.request("GET", path)
    response = conn.getresponse()
    assert response.status == 200, (path, response.status)
    return json.loads(response.read())


def netns_inode(pid: int) -> int:
    return os.stat(f"/proc/{pid}/ns/net").st_ino


def test_blue_green_move_on_two_hosts_behind_a_gateway_on_a_third_loses_nothing(
    lab: Lab, prefect_server: str
) -> None:
    gw, m1, m2 = (lab.state.host(h).address for h in ("gw", "m1", "m2"))
    v1 = stack_file(lab.state, lab.folder, 1)
    v2 = stack_file(lab.state, lab.folder, 2)
    stack = load_config([v2], {}).stack
    gateway = stack_gateway(stack, lab.state_dir)
    assert gateway.runner is not None
    assert gateway.runner.description.endswith(f"{gw}:22")

    first = deploy(lab, v1)
    old = {
        "chat-m1": [f"{m1}:{SIM_PORT}", f"{m1}:{SIM_PORT + 1}"],
        "chat-m2": [f"{m2}:{SIM_PORT}", f"{m2}:{SIM_PORT + 1}"],
    }
    assert {u: sorted(s) for u, s in gateway.servers().items()} == old
    pid = gateway.master_pid()
    assert pid is not None
    # nginx runs on gw: inside gw's network namespace, its files in gateway.directory there
    assert netns_inode(pid) == os.stat(f"/run/netns/{lab.state.host('gw').namespace}").st_ino
    conf = (lab.folder / "gw-nginx" / "nginx.conf").read_text()
    assert conf == gateway.conf.read_text()
    # one listener, its upstream over the replicas of both hosts
    assert conf.count(f"listen {gw}:") == 1
    assert all(f"server {s} max_fails=0;" in conf for s in old["chat-m1"] + old["chat-m2"])
    assert get(gw, ROUTES["chat"], "/v1/models")["data"][0]["max_model_len"] != NEW_LEN

    done = threading.Event()
    loads = [
        BackgroundLoad(
            f"http://{gw}:{ROUTES['chat']}", "chat", REQUESTS // 2, 16, until=done
        ).start()
        for _ in range(2)  # two clients of 16 connections each on the one route
    ]
    try:
        time.sleep(2.0)  # the load runs before the move starts
        moved = deploy(lab, v2)
    finally:
        done.set()
    results = [load.join(timeout=600) for load in loads]
    sent = sum(r.sent for r in results)
    failed = sum(r.failed for r in results)
    errors = sum((r.errors for r in results), start=Counter[str]())
    seconds = max(r.seconds for r in results)
    print(
        f"\nremote gateway blue-green: v1 on both hosts {first:.1f}s; move {moved:.1f}s under "
        f"load; {sent} requests through gw in {seconds:.1f}s ({sent / seconds:.0f}/s), "
        f"{failed} failed {dict(errors)}"
    )
    assert failed == 0, dict(errors)
    assert sent >= REQUESTS

    new = {
        "chat-m1": [f"{m1}:{SIM_PORT + 2}", f"{m1}:{SIM_PORT + 3}"],
        "chat-m2": [f"{m2}:{SIM_PORT + 2}", f"{m2}:{SIM_PORT + 3}"],
    }
    # the one route balanced the load over both hosts' new replicas
    for unit, servers in new.items():
        count = sum(served(s.split(":")[0], int(s.split(":")[1])) for s in servers)
        print(f"{unit}: its new replicas served {count:.0f} requests")
        assert count > 0, unit
    assert {u: sorted(s) for u, s in gateway.servers().items()} == new
    assert gateway.master_pid() == pid  # reloads all along, never a restart
    for port in ROUTES.values():
        for _ in range(4):  # both replicas of each route answer with the new revision
            assert get(gw, port, "/v1/models")["data"][0]["max_model_len"] == NEW_LEN
    # the old slots are gone
    for address in (m1, m2):
        for port in (SIM_PORT, SIM_PORT + 1):
            with pytest.raises(ConnectionRefusedError):
                get(address, port, "/health")

    # The health sweep from here reads the remote gateway and keeps its routes.
    report = sweep_stack(stack, lab.state_dir, SweepSettings(synthetic_window=0))
    print(f"sweep after the move: {report.status.value} in {report.seconds:.2f}s")
    assert report.status.value != "unhealthy", report.to_dict()
    assert report.unreachable == []
    assert not [n for n in report.notes if "gateway" in n], report.notes
    assert {u: sorted(s) for u, s in gateway.servers().items()} == new

    # `hxp urls`: the gateway at gw's address
    env = {**os.environ, "HXP_STATE_DIR": str(lab.state_dir), "PREFECT_API_URL": prefect_server}
    urls = subprocess.run(
        [sys.executable, "-m", "hxp_cli", "urls", "-f", str(v2)],
        cwd=ROOT,
        env={**env, "HXP_WARM_RUNNER": "0"},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert urls.returncode == 0, urls.stderr
    assert f"http://{gw}:{ROUTES['chat']}/v1" in urls.stdout, urls.stdout


def sim_pid(lab: Lab, host: str, port: int) -> int:
    """The pid of the `hxp-vllm-sim` listening on `port` inside lab host `host`."""
    netns = os.stat(f"/run/netns/{lab.state.host(host).namespace}").st_ino
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0")
            ours = b"hxp.sim.vllm" in argv and str(port).encode() in argv
            if ours and netns_inode(int(proc.name)) == netns:
                return int(proc.name)
        except OSError:
            continue
    raise AssertionError(f"no simulator on {host}:{port}")


def test_the_sweep_fails_over_on_the_remote_gateway(lab: Lab) -> None:
    """After the move (the test above): a replica that stops answering leaves the gateway on gw
    in one sweep from here (flap threshold 1), and is put back once it answers again."""
    m1 = lab.state.host("m1").address
    stack = load_config([lab.folder / "v2.yaml"], {}).stack
    gateway = stack_gateway(stack, lab.state_dir)
    both = [f"{m1}:{SIM_PORT + 2}", f"{m1}:{SIM_PORT + 3}"]
    assert sorted(gateway.servers()["chat-m1"]) == both, "runs after the blue-green move"
    settings = SweepSettings(flap_threshold=1, synthetic_window=0)
    pid = sim_pid(lab, "m1", SIM_PORT + 2)
    os.kill(pid, signal.SIGSTOP)  # alive, but answers nothing
    try:
        out = sweep_stack(stack, lab.state_dir, settings)
        assert gateway.servers()["chat-m1"] == both[1:], out.to_dict()
        conf = (lab.folder / "gw-nginx" / "nginx.conf").read_text()  # what nginx on gw runs
        assert f"server {both[0]} " not in conf
        assert f"server {both[1]} " in conf
    finally:
        os.kill(pid, signal.SIGCONT)
    deadline = time.monotonic() + 30
    while sorted(gateway.servers()["chat-m1"]) != both:
        assert time.monotonic() < deadline, gateway.servers()
        sweep_stack(stack, lab.state_dir, settings)
    print(f"\nfailover on the remote gateway: out in one sweep ({out.seconds:.2f}s), back")
