"""Deploy a generated 20-unit stack on the process backend: the flow vs the bare backend calls.

Measured in one run, on one machine, against a local `prefect server` on SQLite (started here):
- baseline: the same backend actions called directly (create each unit, gate it on its TCP
  check, dependencies first, one at a time), then the bare observe call;
- ours: `deploy-stack` (full deploy into empty state), then a no-op re-apply.

Target (issue): a no-op re-apply of 20 units finishes within 2 s of the bare observe calls.
The last line's ratio is (no-op re-apply - bare observe) / 2 s, so ≤ 1.0 meets it.

Run: .venv/bin/python bench/deploy.py [--units 20]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from hxp.bake import default_bake  # noqa: E402 - after the path is set
from hxp.spec import HealthSpec  # noqa: E402


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def make_stack(units: int, seed: int = 3) -> dict[str, object]:
    rng = random.Random(seed)
    names = [f"svc-{i:02d}" for i in range(units)]
    services = {}
    for i, name in enumerate(names):
        port = free_port()
        services[name] = {
            "host": "local",
            "command": [sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1"],
            "ports": {"http": port},
            "depends_on": rng.sample(names[max(0, i - 5) : i], k=min(i, rng.randint(0, 2))),
            "health": {"tcp": {"port": port}, "interval": "1s", "timeout": "500ms", "retries": 10},
        }
    return {"stack": "bench", "hosts": {"local": {"backend": "process"}}, "services": services}


def direct(stack_file: Path, state: Path) -> tuple[float, float]:
    """The backend actions without Prefect: (full deploy seconds, bare observe seconds)."""
    from hxp.backends import observe_all
    from hxp.backends.base import Create, Remove, UnitRef
    from hxp.backends.process import ProcessBackend
    from hxp.config import load_config, unit_config_hash
    from hxp.graph import DependencyGraph
    from hxp.io.probes import wait_ready
    from hxp.units import expand_units

    stack = load_config([stack_file], {}).stack
    backend = ProcessBackend(state)
    start = time.perf_counter()
    for name in DependencyGraph(stack.dependencies()).order():
        for unit in expand_units(stack, {name}):
            backend.apply(Create(unit, unit_config_hash(stack, name), 1))
            assert unit.health is not None
            gate = asyncio.run(wait_ready(unit.health, lambda: True))
            assert gate.verdict == "ready", gate.explain()
    full = time.perf_counter() - start
    start = time.perf_counter()
    observe_all(stack, state)
    observe = time.perf_counter() - start
    for name in backend.observe("bench"):
        backend.apply(Remove(UnitRef("bench", name, name)))
    return full, observe


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--units", type=int, default=20)
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="hxp-bench-"))
    try:
        from hxp.io.prefect_server import ensure_api

        ensure_api(tmp / "server")
        from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY, temporary_settings

        stack_file = tmp / "stack.yaml"
        stack_file.write_text(yaml.safe_dump(make_stack(args.units)))
        base_full, base_observe = direct(stack_file, tmp / "direct")

        from flows.deploy import deploy_stack
        from hxp.backends.base import Remove, UnitRef
        from hxp.backends.process import ProcessBackend

        state = tmp / "flow"
        with temporary_settings(updates={PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}):
            start = time.perf_counter()
            first = deploy_stack(str(stack_file), state_dir=str(state))
            full = time.perf_counter() - start
            assert first["changed"]
            noops = []
            for _ in range(3):
                start = time.perf_counter()
                again = deploy_stack(str(stack_file), state_dir=str(state))
                noops.append(time.perf_counter() - start)
                assert not again["changed"]
        backend = ProcessBackend(state)
        for name in backend.observe("bench"):
            backend.apply(Remove(UnitRef("bench", name, name)))
    finally:
        from hxp.io.prefect_server import stop_server

        stop_server(tmp / "server")
        shutil.rmtree(tmp, ignore_errors=True)
    noop = sorted(noops)[1]
    bake = default_bake("service", HealthSpec(tcp={"port": 1}, interval=1.0))
    print(
        f"machine: {platform.node()} {platform.machine()} {os.cpu_count()} cpus, "
        f"Python {platform.python_version()}"
    )
    print(f"{args.units} units, process backend, local prefect server (SQLite)")
    print(f"direct backend calls, full deploy (sequential): {base_full:.2f}s")
    print(
        f"deploy-stack flow, full deploy (concurrent):     {full:.2f}s "
        f"(ratio {full / base_full:.2f}; it includes the default bake window, {bake:.0f}s, "
        "which the direct calls do not have)"
    )
    print(f"bare observe: {base_observe * 1000:.0f} ms")
    print(
        f"deploy-stack no-op re-apply (median of 3): {noop:.2f}s "
        f"-> {noop - base_observe:.2f}s above the bare observe (target: within 2 s)"
    )
    print(f"BENCH deploy ratio={(noop - base_observe) / 2.0:.2f} target=1.0")


if __name__ == "__main__":
    main()
