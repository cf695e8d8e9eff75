"""Start a generated 50-unit DAG whose units take known start-up times: `start-stack` (each unit
starts the moment its own dependencies are ready) vs a level-by-level start, in the same run.

Each unit is a Python process that sleeps its start-up time, then listens; its readiness gate
is a TCP check every 50 ms. The critical path is the longest chain of declared start-up times
through the DAG. Both starts use the same task (`start-unit`) and the same local Prefect server
(SQLite, started here, heartbeats off as for CLI runs); only the scheduling differs:
- ours: `start-stack` (hxp.graph.ReadyScheduler through flows.scheduling.run_ready_set);
- baseline: every unit of a level together, the next level when the whole level is ready.

Target (issue): ours <= 1.1 x critical path + 1 s. The last line's ratio follows the project's
rule for start-up benches: (ours - 1 s) / critical path, so <= 1.1 meets it (ours: the best
start-stack run).

Run: .venv/bin/python bench/lifecycle.py [--units 50] [--seed 7]
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

SERVER = (
    "import socket, sys, time; time.sleep(float(sys.argv[2])); "
    "s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); "
    "s.bind(('127.0.0.1', int(sys.argv[1]))); s.listen(64); "
    "[s.accept()[0].close() for _ in iter(int, 1)]"
)


def free_ports(n: int, seed: int) -> list[int]:
    """n distinct free ports below the ephemeral range (no unit can find its port taken by a
    client's source port)."""
    import socket

    rng = random.Random(seed)
    found: list[int] = []
    while len(found) < n:
        port = rng.randint(20000, 32000)
        if port in found:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        found.append(port)
    return found


def make_stack(units: int, seed: int) -> tuple[dict[str, Any], dict[str, float]]:
    """A DAG: each unit depends on 0-3 of the 8 before it; start-up times 0.2-2.0 s."""
    rng = random.Random(seed)
    names = [f"u{i:02d}" for i in range(units)]
    ports = free_ports(units, seed)
    delays = {n: round(rng.uniform(0.2, 2.0), 2) for n in names}
    services: dict[str, Any] = {}
    for i, name in enumerate(names):
        port = ports[i]
        window = names[max(0, i - 8) : i]
        deps = sorted(rng.sample(window, k=min(len(window), rng.randint(0, 3))))
        services[name] = {
            "host": "local",
            "command": [sys.executable, "-c", SERVER, str(port), str(delays[name])],
            "ports": {"tcp": port},
            "depends_on": deps,
            "stop_timeout": "2s",
            "health": {
                "tcp": {"port": port},
                "interval": "50ms",
                "timeout": "500ms",
                "retries": 50,
                "start_period": "30s",
            },
        }
    stack = {"stack": "lcbench", "hosts": {"local": {"backend": "process"}}, "services": services}
    return stack, delays


def critical_path(deps: dict[str, list[str]], delays: dict[str, float]) -> float:
    from hxp.graph import DependencyGraph

    finish: dict[str, float] = {}
    for unit in DependencyGraph(deps).order():
        finish[unit] = delays[unit] + max((finish[d] for d in deps[unit]), default=0.0)
    return max(finish.values())


def level_bound(deps: dict[str, list[str]], delays: dict[str, float]) -> float:
    from hxp.graph import DependencyGraph

    return sum(max(delays[u] for u in level) for level in DependencyGraph(deps).levels())


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--units", type=int, default=50)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--runs", type=int, default=2, help="timed starts of each kind")
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="hxp-lcbench-"))
    try:
        from hxp.io.prefect_server import ensure_api, stop_server

        ensure_api(tmp / "server")
        from prefect import flow
        from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY, temporary_settings
        from prefect.task_runners import ThreadPoolTaskRunner
        from prefect.utilities.annotations import quote

        from flows.deploy import deploy_stack
        from flows.lifecycle import start_stack, stop_stack
        from flows.scheduling import MAX_PARALLEL_UNITS
        from hxp.backends.base import Remove, UnitRef
        from hxp.backends.process import ProcessBackend
        from hxp.config import load_config
        from hxp.graph import DependencyGraph
        from tasks.lifecycle import lifecycle_context, start_unit

        data, delays = make_stack(args.units, args.seed)
        stack_file = tmp / "stack.yaml"
        stack_file.write_text(yaml.safe_dump(data))
        stack = load_config([stack_file], {}).stack
        deps = stack.dependencies()
        graph = DependencyGraph(deps)
        state = tmp / "state"

        @flow(name="start-level-by-level", task_runner=ThreadPoolTaskRunner(MAX_PARALLEL_UNITS))
        def start_by_level() -> None:
            ctx = lifecycle_context(stack, str(state))
            for level in graph.levels():
                # Passed as start-stack passes it (flows.lifecycle._start).
                futures = [start_unit.submit(quote(ctx), u) for u in level]
                for f in futures:
                    f.result()

        ours: list[float] = []
        levels: list[float] = []
        with temporary_settings(updates={PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}):
            deploy_stack(str(stack_file), state_dir=str(state))
            for _ in range(args.runs):  # interleaved: the machine is shared and noisy
                stop_stack(str(stack_file), state_dir=str(state), drain=False)
                start = time.perf_counter()
                start_stack(str(stack_file), state_dir=str(state))
                ours.append(time.perf_counter() - start)
                stop_stack(str(stack_file), state_dir=str(state), drain=False)
                start = time.perf_counter()
                start_by_level()
                levels.append(time.perf_counter() - start)
        backend = ProcessBackend(state)
        for name in backend.observe("lcbench"):
            backend.apply(Remove(UnitRef("lcbench", name, name)))
        stop_server(tmp / "server")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    cp = critical_path(deps, delays)
    bound = level_bound(deps, delays)
    best, best_level = min(ours), min(levels)
    target = 1.1 * cp + 1.0
    ratio = (best - 1.0) / cp
    print(
        f"machine: {platform.node()} {platform.machine()} {os.cpu_count()} cpus, "
        f"Python {platform.python_version()}"
    )
    print(
        f"{args.units} units, {len(graph.levels())} levels, start-up times "
        f"{min(delays.values()):.2f}-{max(delays.values()):.2f} s "
        f"(sum {sum(delays.values()):.1f} s)"
    )
    print(f"critical path (declared start-up times): {cp:.2f} s")
    print(f"level-by-level lower bound (sum of each level's slowest): {bound:.2f} s")
    print(
        f"start-stack (ready-set), best of {len(ours)}: {best:.2f} s "
        f"= {best / cp:.2f} x critical path ({', '.join(f'{t:.2f}' for t in ours)})"
    )
    print(
        f"level-by-level start, best of {len(levels)}: {best_level:.2f} s "
        f"= {best_level / cp:.2f} x critical path ({', '.join(f'{t:.2f}' for t in levels)})"
    )
    print(f"target: <= 1.1 x {cp:.2f} + 1 = {target:.2f} s")
    print(f"BENCH lifecycle ratio={ratio:.3f} target=1.1")


if __name__ == "__main__":
    main()
