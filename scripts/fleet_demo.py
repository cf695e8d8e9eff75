"""`make fleet-demo` / `make fleet-demo-down`: the fleet lab with four hosts, deployed through
the local Prefect server (see examples/fleet-demo/stack.yaml.tmpl for what runs where).

up: the lab `demo` (edge: docker, gpu1 and gpu2: agents, sysd: systemd), `hxp server start`, a
Prefect worker here for the SSH hosts and one inside each agent host, the stack deployed with
`dispatch`, URLs printed. down: stop the workers, remove what was deployed, stop the server,
remove the lab. Needs root (network namespaces); says so and exits 2 otherwise.
"""

from __future__ import annotations

import contextlib
import os
import signal
import string
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.support.fleet_lab import FleetLab, LabError, require_root  # noqa: E402

STATE = Path(os.environ.get("HXP_STATE_DIR", ROOT / ".hxp-fleet-demo"))
TEMPLATE = ROOT / "examples" / "fleet-demo" / "stack.yaml.tmpl"
POOLS = ("hxl-demo-here", "hxl-demo-gpu1", "hxl-demo-gpu2")
AGENTS = ("gpu1", "gpu2")  # the model hosts, each with its worker (POOLS[1:])


def _stack_file(state: object) -> Path:
    from tests.support.fleet_lab import LabState

    assert isinstance(state, LabState)
    values = {
        "edge_address": state.host("edge").address,
        "sysd_address": state.host("sysd").address,
        "gpu1_address": state.host("gpu1").address,
        "gpu2_address": state.host("gpu2").address,
        "state": str(STATE),
        "client_key": state.client_key,
        "known_hosts": state.known_hosts,
        "edge_docker_socket": state.host("edge").docker_socket,
        "python": sys.executable,
    }
    path = STATE / "fleet-demo.yaml"
    path.write_text(string.Template(TEMPLATE.read_text()).substitute(values))
    return path


def up() -> int:
    from hxp.io.prefect_server import start_server
    from tests.support.docker_engine import build_busybox_image
    from tests.support.workers import start_worker

    STATE.mkdir(parents=True, exist_ok=True)
    lab = FleetLab("demo")
    state = lab.up([("edge", "docker"), ("gpu1", "agent"), ("gpu2", "agent"), ("sysd", "systemd")])
    build_busybox_image(f"unix://{state.host('edge').docker_socket}")
    server = start_server(STATE)
    api = server["url"]
    os.environ["PREFECT_API_URL"] = api  # before Prefect is imported: it reads it once
    from prefect import get_client
    from prefect.client.schemas.actions import WorkPoolCreate

    with get_client(sync_client=True) as client:
        for pool in POOLS:
            client.create_work_pool(WorkPoolCreate(name=pool, type="process"), overwrite=True)
    here = start_worker(api, POOLS[0], STATE / "here", STATE / "worker-here.log")
    (STATE / "worker-here.pid").write_text(f"{here.pid}\n")
    for host, pool in zip(AGENTS, POOLS[1:], strict=True):
        lab.start_agent(state, host, api, pool, STATE / host, STATE / f"worker-{host}.log")
    path = _stack_file(state)
    from flows.deploy import deploy_stack

    result = deploy_stack([str(path)], dispatch=True)
    parts = ", ".join(f"{p['host']}: {'+'.join(sorted(p['units']))}" for p in result["dispatched"])
    from flows.monitoring import deploy_monitoring

    # Prometheus on this machine (the stack's host `here`), in the state of the worker here
    monitoring = deploy_monitoring([str(path)], state_dir=str(STATE / "here"))
    up_targets = len(monitoring["targets_up"])
    edge = state.host("edge").address
    print(f"\nFleet demo deployed ({parts}); stack file {path}")
    print(f"  Prefect UI        {server['ui']}")
    print(f"  gateway (chat)    http://{edge}:18080/v1/models   (on edge, over gpu1 and gpu2)")
    for host in AGENTS:
        address = state.host(host).address
        print(
            f"  chat on {host}      http://{address}:18000/metrics  http://{address}:18001/metrics"
        )
    prometheus = monitoring["urls"]["prometheus"]
    print(f"  Prometheus        {prometheus}/targets   ({up_targets} targets up; on this machine)")
    print(f"  web (Docker)      http://{edge}:8080/   (on edge)")
    print(f"  worker (systemd)  on sysd {state.host('sysd').address}")
    print("  (the lab's addresses are reachable from this machine only; as root)")
    print("Remove everything with: make fleet-demo-down")
    return 0


def _stop_group(pid: int) -> None:
    """End the worker started here and its flow-run processes (its process group): SIGTERM,
    then SIGKILL after 15 s (a Prefect worker takes a few seconds to finish)."""
    for sig, wait in ((signal.SIGTERM, 15.0), (signal.SIGKILL, 5.0)):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, sig)
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            try:
                os.killpg(pid, 0)
            except (ProcessLookupError, PermissionError):
                return
            time.sleep(0.2)


def down() -> int:
    from hxp.io.prefect_server import server_status, stop_server

    pidfile = STATE / "worker-here.pid"
    if pidfile.exists():
        _stop_group(int(pidfile.read_text()))
        pidfile.unlink()
    path = STATE / "fleet-demo.yaml"
    running = server_status(STATE) if STATE.exists() else None
    if path.exists() and running is not None:
        # Prometheus (on this machine), then what the worker here deployed (the Docker and
        # systemd units): in its state, as flow runs on the demo's server (else `hxp down`
        # would start a server of its own in that state dir).
        for command in (["monitoring", "--down"], ["down"]):
            subprocess.run(
                [sys.executable, "-m", "hxp_cli", *command, "-f", str(path)],
                cwd=ROOT,
                env={
                    **os.environ,
                    "HXP_STATE_DIR": str(STATE / "here"),
                    "PREFECT_API_URL": running["url"],
                },
                timeout=300,
                check=False,
            )
    # the agents' workers and units, and nginx on edge, end with their namespaces
    removed = FleetLab("demo").down()
    stopped = stop_server(STATE) if STATE.exists() else False
    print(f"fleet demo: removed {len(removed)} lab thing(s); Prefect server stopped: {stopped}")
    return 0


def main(argv: list[str]) -> int:
    if argv not in (["up"], ["down"]):
        print("usage: fleet_demo.py up|down", file=sys.stderr)
        return 2
    if os.geteuid() != 0:
        print(
            "fleet-demo: needs root: the fleet lab creates network namespaces, a bridge and veth "
            f"links and runs sshd and dockerd in them; run it as root (sudo make fleet-demo"
            f"{'' if argv == ['up'] else '-down'})",
            file=sys.stderr,
        )
        return 2
    try:
        require_root()
        return up() if argv == ["up"] else down()
    except LabError as exc:
        print(f"fleet-demo: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
