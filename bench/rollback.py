"""Roll back a failed deploy of a generated DAG whose units take known start-up times: the
compensating subflow's wall time against the rollback's reverse critical path, in one run.

Each unit is a Python process that sleeps its start-up time, then listens; its readiness gate
is a TCP check every 50 ms. v1 of the stack is deployed; v2 changes every unit, and a sink
unit that depends on every other one (so it is applied last) exits at once in v2: its gate
fails and the deploy rolls back every unit it changed. Restoring a unit starts its previous
version again (its start-up time) and gates it; a unit is restored once every changed unit
that depends on it is restored, so the rollback can take no less than the longest chain of
start-up times through the DAG, walked backwards (the reverse critical path, the sink's own
start-up time included). A serial rollback takes about the sum of all start-up times.

Wall: the `rollback-deploy` subflow run's start to end, as the Prefect server recorded it
(local server on SQLite, started here, heartbeats off as for CLI runs).

Target (issue 19): the last line's ratio is (wall - 1 s) / reverse critical path, <= 1.2.

Run: .venv/bin/python bench/rollback.py [--units 16] [--seed 11] [--runs 2]
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.lifecycle import SERVER, free_ports  # noqa: E402 - the same generated units

SINK = "sink"


def unit(port: int, delay: float, deps: list[str], version: str) -> dict[str, Any]:
    return {
        "host": "local",
        "command": [sys.executable, "-c", SERVER, str(port), str(delay)],
        "ports": {"tcp": port},
        "depends_on": deps,
        "env": {"VERSION": version},
        "stop_timeout": "2s",
        "health": {
            "tcp": {"port": port},
            "interval": "50ms",
            "timeout": "500ms",
            "retries": 50,
            "start_period": "30s",
        },
    }


def make_stacks(
    units: int, seed: int
) -> tuple[dict[str, Any], dict[str, Any], dict[str, float], dict[str, list[str]]]:
    """v1 and v2 of a DAG (each unit depends on 0-2 of the 4 before it; start-up times
    0.3-1.5 s) plus the sink; v2 changes every unit and its sink exits at once."""
    rng = random.Random(seed)
    names = [f"u{i:02d}" for i in range(units)]
    ports = free_ports(units + 1, seed)
    delays = {n: round(rng.uniform(0.3, 1.5), 2) for n in names}
    delays[SINK] = 0.2
    deps: dict[str, list[str]] = {}
    for i, name in enumerate(names):
        window = names[max(0, i - 4) : i]
        deps[name] = sorted(rng.sample(window, k=min(len(window), rng.randint(0, 2))))
    used = {d for ds in deps.values() for d in ds}
    deps[SINK] = [n for n in names if n not in used]  # every leaf: it goes last
    stacks = []
    for version in ("1", "2"):
        services = {
            n: unit(ports[i], delays[n], deps[n], version) for i, n in enumerate([*names, SINK])
        }
        if version == "2":
            services[SINK]["command"] = [sys.executable, "-c", "import sys; sys.exit(3)"]
        stacks.append(
            {
                "stack": "rbbench",
                "hosts": {"local": {"backend": "process"}},
                # No bake: the sink fails its gate, the bake is not what is measured.
                "deploy": {"bake": "0s"},
                "services": services,
            }
        )
    return stacks[0], stacks[1], delays, deps


def critical_path(deps: dict[str, list[str]], delays: dict[str, float]) -> float:
    """The longest chain of start-up times (the same walked forwards or backwards)."""
    from hxp.graph import DependencyGraph

    finish: dict[str, float] = {}
    for name in DependencyGraph(deps).order():
        finish[name] = delays[name] + max((finish[d] for d in deps[name]), default=0.0)
    return max(finish.values())


def rollback_wall(since: float) -> float:
    """Start to end of the newest `rollback-deploy` flow run (started after `since`)."""
    from prefect import get_client
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName
    from prefect.client.schemas.sorting import FlowRunSort

    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(
            flow_filter=FlowFilter(name=FlowFilterName(any_=["rollback-deploy"])),
            sort=FlowRunSort.START_TIME_DESC,
            limit=1,
        )
    run = runs[0]
    assert run.start_time is not None
    assert run.end_time is not None
    assert run.start_time.timestamp() >= since - 1, "not this run's rollback"
    return (run.end_time - run.start_time).total_seconds()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--units", type=int, default=16)
    parser.add_argument("--seed", type=int, default=11)
    parser.add_argument("--runs", type=int, default=2, help="timed rollbacks (best counts)")
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="hxp-rbbench-"))
    walls: list[float] = []
    try:
        from hxp.io.prefect_server import ensure_api, stop_server

        ensure_api(tmp / "server")
        from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY, temporary_settings

        from flows.deploy import deploy_stack
        from hxp.backends.base import Remove, UnitRef
        from hxp.backends.process import ProcessBackend
        from hxp.errors import DeployError

        v1, v2, delays, deps = make_stacks(args.units, args.seed)
        files = {}
        for name, data in (("v1", v1), ("v2", v2)):
            files[name] = tmp / f"{name}.yaml"
            files[name].write_text(yaml.safe_dump(data))
        state = tmp / "state"
        with temporary_settings(updates={PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}):
            assert deploy_stack(str(files["v1"]), state_dir=str(state))["changed"]
            for _ in range(args.runs):
                since = time.time()
                try:
                    deploy_stack(str(files["v2"]), state_dir=str(state))
                except DeployError:
                    pass
                else:
                    raise SystemExit("v2 was meant to fail and roll back")
                walls.append(rollback_wall(since))
                seen = ProcessBackend(state).observe("rbbench")
                assert all(o.running for o in seen.values()), "not everything came back"
        backend = ProcessBackend(state)
        for name in backend.observe("rbbench"):
            backend.apply(Remove(UnitRef("rbbench", name, name)))
        stop_server(tmp / "server")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    path = critical_path(deps, delays)
    serial = sum(delays.values())
    best = min(walls)
    print(
        f"machine: {platform.node()} {platform.machine()} {os.cpu_count()} cpus, "
        f"Python {platform.python_version()}, load average "
        f"{' '.join(f'{x:.1f}' for x in os.getloadavg())}"
    )
    print(f"{args.units} units + sink (seed {args.seed}), process backend, local prefect server")
    print(
        f"reverse critical path: {path:.2f}s; serial bound (sum of start-up times): {serial:.2f}s"
    )
    print(
        f"rollback-deploy wall (best of {len(walls)}): {best:.2f}s "
        f"({', '.join(f'{w:.2f}' for w in walls)}) = {best / path:.2f} x critical path"
    )
    print(f"BENCH rollback ratio={(best - 1.0) / path:.3f} target=1.2")


if __name__ == "__main__":
    main()
