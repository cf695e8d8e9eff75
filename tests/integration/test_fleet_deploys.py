"""Deploys of one stack on the fleet lab, driven over SSH, through one Prefect server.

- Two orchestrators, each inside a lab namespace of its own (o1, o2: two machines on the lab's
  network) with a state directory of its own (so their file locks never meet), both reaching
  the test's Prefect server through the relay on the bridge address, run `hxp apply` of one
  stack (two revisions of it) at the same moment. Only the server's global concurrency limit
  can serialize them: the stores' unit actions must not interleave, both succeed, and the
  second says whom it waited for.
- A host comes back: a deploy that touched the dead host d1 failed (exit 1, naming it); once
  its link is back, the next `hxp apply` of that same stack converges with no manual step and
  `hxp plan --json` then shows 0 changes.

The units are busybox containers on two Docker hosts (d1, d2), each driven over SSH.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import yaml

from hxp.store import DeployRecord, Store
from tests.support.docker_engine import BUSYBOX_IMAGE, build_busybox_image
from tests.support.fleet_lab import FleetLab, LabState, lab_available

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
HXP = str(Path(sys.executable).parent / "hxp")  # the installed script, as an operator runs it
TARGETS = ("d1", "d2")
UNITS_PER_HOST = 2
# A deploy holds the stack's lock through its bake window too. For the two orchestrators: long
# enough that they meet at the lock and the second, past its first try (3 s), says whom it
# waits for, whatever their start-up jitter (2 s seen on a loaded 2-core machine).
BAKE_WHILE_RACING = "8s"
BAKE = "500ms"


@dataclass
class Lab:
    lab: FleetLab
    state: LabState
    api: str  # the Prefect API as the lab's namespaces reach it (the relay on the bridge)


@pytest.fixture(scope="module")
def lab(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    why = lab_available()
    if why is not None:
        pytest.skip(why)
    prefect_server: str = request.getfixturevalue("prefect_server")  # after the skip: 20 s
    made = FleetLab("deploys", tmp_path_factory.mktemp("lab"))
    try:
        state = made.up([("o1", "plain"), ("o2", "plain"), ("d1", "docker"), ("d2", "docker")])
        for host in TARGETS:
            build_busybox_image(f"unix://{state.host(host).docker_socket}")
        yield Lab(made, state, made.relay(prefect_server))
    finally:
        made.down()


def stack_file(lab: Lab, path: Path, stack: str, version: str, bake: str = BAKE) -> Path:
    """`stack`: UNITS_PER_HOST busybox services on each Docker host, all at `version`."""
    services = {
        f"{host}s{i}": {
            "host": host,
            "image": BUSYBOX_IMAGE,
            "command": ["sleep", "3600"],
            "env": {"V": version},
            "stop_timeout": "1s",
        }
        for host in TARGETS
        for i in range(UNITS_PER_HOST)
    }
    data = {
        "stack": stack,
        "hosts": {h: lab.state.ssh_host_entry(h) for h in TARGETS},
        "deploy": {"bake": bake},
        "services": services,
    }
    path.write_text(yaml.safe_dump(data))
    return path


def hxp_env(api: str, state_dir: Path) -> dict[str, str]:
    return {
        **os.environ,
        "PREFECT_API_URL": api,
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "HXP_STATE_DIR": str(state_dir),
    }


def orchestrator(
    lab: Lab, host: str, state_dir: Path, *args: str, stderr: int = subprocess.STDOUT
) -> subprocess.Popen[str]:
    """`hxp ARGS` run inside lab host `host`'s network namespace: an orchestrator on that
    machine, reaching the Prefect server and the SSH hosts over the lab's network only."""
    ns = lab.state.host(host).namespace
    return subprocess.Popen(
        ["nsenter", f"--net=/run/netns/{ns}", HXP, *args],
        cwd=ROOT,
        env=hxp_env(lab.api, state_dir),
        text=True,
        stdout=subprocess.PIPE,
        stderr=stderr,
        start_new_session=True,
    )


def hxp(api: str, state_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """`hxp ARGS` on this machine (the bridge's address: on the lab's network too)."""
    return subprocess.run(
        [HXP, *args],
        cwd=ROOT,
        env=hxp_env(api, state_dir),
        text=True,
        capture_output=True,
        timeout=300,
        check=False,
    )


def clock(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).strftime("%H:%M:%S.%f")[:-3]


@dataclass
class Run:
    """One orchestrator's deploy, as its own store recorded it."""

    host: str
    pid: int
    output: str
    record: DeployRecord
    actions: list[float]  # when each unit action was recorded

    def describe(self) -> str:
        r = self.record
        assert r.finished_at is not None
        return (
            f"{self.host} (pid {self.pid}): deploy #{r.id} {clock(r.started_at)}-"
            f"{clock(r.finished_at)}, {len(self.actions)} unit actions "
            f"{clock(min(self.actions))}-{clock(max(self.actions))}"
        )


def test_two_orchestrators_in_two_namespaces_are_serialized_by_the_prefect_server(
    lab: Lab, tmp_path: Path
) -> None:
    files = [
        stack_file(lab, tmp_path / f"v{v}.yaml", "racing", str(v), BAKE_WHILE_RACING)
        for v in (1, 2)
    ]
    states = {"o1": tmp_path / "o1", "o2": tmp_path / "o2"}
    started = time.monotonic()
    procs = {
        host: orchestrator(lab, host, states[host], "apply", "-f", str(path))
        for host, path in zip(("o1", "o2"), files, strict=True)
    }
    outputs = {h: p.communicate(timeout=300)[0] for h, p in procs.items()}
    wall = time.monotonic() - started
    assert [p.returncode for p in procs.values()] == [0, 0], outputs

    runs = []
    for host, state_dir in states.items():
        store = Store(state_dir)
        (record,) = store.deploys("racing")
        assert record.status == "succeeded", (host, record)
        assert record.finished_at is not None
        actions = [e["at"] for e in store.events("racing", record.id) if e["unit"]]
        assert actions, f"{host}'s deploy recorded no unit action"
        runs.append(Run(host, procs[host].pid, outputs[host], record, actions))
    first, second = sorted(runs, key=lambda r: r.record.started_at)
    assert first.record.finished_at is not None
    print(f"\ntwo orchestrators, {wall:.1f}s wall:\n  {first.describe()}\n  {second.describe()}")
    # every unit action of one orchestrator before every one of the other's, and the second's
    # deploy (and plan: both are made under the lock) began once the first's had ended
    assert max(first.actions) < min(second.actions), (first.describe(), second.describe())
    assert first.record.finished_at < second.record.started_at
    # the second waited, and said for whom: the first's run, on its machine, with its pid
    waited = re.search(r"waiting for the lock of stack 'racing', held by (.*)", second.output)
    assert waited, second.output
    assert f"pid {first.pid}," in waited.group(1), waited.group(1)
    print(f"  {second.host} said: {waited.group(0).strip()}")
    print(f"  lock handed over in {second.record.started_at - first.record.finished_at:.2f}s")
    assert "waiting for the lock" not in first.output, first.output
    # the second's plan was made after the first's deploy: it replaced every unit, and what
    # runs now is its revision, which both orchestrators see
    assert all(f"{h}s{i}" in second.output for h in TARGETS for i in range(UNITS_PER_HOST))
    last = files[0] if second.host == "o1" else files[1]
    for host in states:
        plan = orchestrator(
            lab, host, states[host], "plan", "-f", str(last), "--json", stderr=subprocess.PIPE
        )
        out, err = plan.communicate(timeout=120)
        assert plan.returncode == 0, err
        assert json.loads(out)["actions"] == [], (host, out)


def close_ssh_masters(state_dir: Path) -> None:
    """End the shared SSH connections an orchestrator on this machine left (kept 5 minutes
    after its last command); those of the orchestrators in lab namespaces end with them."""
    from hxp.backends.runners import control_dir_for

    for sock in control_dir_for(state_dir).glob("hxp-*"):
        # the control sockets only (not the Docker engines' forwarded sockets beside them)
        if re.fullmatch(r"hxp-[0-9a-f]+", sock.name) and sock.is_socket():
            subprocess.run(
                ["ssh", "-o", f"ControlPath={sock}", "-O", "exit", "lab-host"],
                capture_output=True,
                timeout=10,
                check=False,
            )


def plan_json(lab: Lab, state_dir: Path, path: Path) -> dict[str, Any]:
    done = hxp(lab.api, state_dir, "plan", "-f", str(path), "--json")
    assert done.returncode == 0, done.stderr
    result: dict[str, Any] = json.loads(done.stdout)
    return result


def test_the_next_apply_after_a_host_returns_reconciles_it_with_no_manual_step(
    lab: Lab, tmp_path: Path
) -> None:
    state_dir = tmp_path / "state"
    v1 = stack_file(lab, tmp_path / "v1.yaml", "rejoin", "1")
    v2 = stack_file(lab, tmp_path / "v2.yaml", "rejoin", "2")
    try:
        first = hxp(lab.api, state_dir, "apply", "-f", str(v1))
        assert first.returncode == 0, first.stdout + first.stderr

        d1 = lab.state.host("d1").address
        lab.lab.set_link("d1", False)
        try:
            refused = hxp(lab.api, state_dir, "apply", "-f", str(v2))
        finally:
            lab.lab.set_link("d1", True)
        assert refused.returncode == 1, refused.stdout + refused.stderr
        assert re.search(
            rf"error: host d1 \({re.escape(d1)}\) unreachable: "
            r"(no answer within \d+s|no route to host) \(ssh port 22\)",
            refused.stderr,
        ), refused.stderr

        # The link is back: no manual step, the same apply again.
        started = time.monotonic()
        again = hxp(lab.api, state_dir, "apply", "-f", str(v2))
        took = time.monotonic() - started
        assert again.returncode == 0, again.stdout + again.stderr
        print(f"\nthe apply after d1 came back converged in {took:.1f}s (CLI start included)")
        newest, *_ = Store(state_dir).deploys("rejoin")
        assert newest.status == "succeeded"
        changed = (newest.result or {}).get("units", {})
        assert sorted(changed) == sorted(f"{h}s{i}" for h in TARGETS for i in range(UNITS_PER_HOST))
        plan = plan_json(lab, state_dir, v2)
        assert (plan["changes"], plan["actions"]) == (False, []), plan
    finally:
        close_ssh_masters(state_dir)
