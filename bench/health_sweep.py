"""Health sweep over 1,000 loopback HTTP endpoints: the whole `health-sweep` flow vs bare probes.

All in one run, on one machine, against a local `prefect server` on SQLite (started here); the
endpoints are served by a separate process (asyncio, one listener per endpoint):
- baseline: a raw asyncio socket probe of the same endpoints (open_connection, write a GET,
  read the status line; 200 in flight), the floor of any sweep;
- ours: the `health-sweep` flow in a warm process (flow run, tasks, composite, damping, store,
  table and summary artifacts), heartbeat off; `observe=False` (1,000 units hxp did not
  deploy: there is no backend to ask), and the same steps without Prefect (`hxp health`'s path);
- for scale: a bare httpx gather, and one Prefect task per endpoint (100, extrapolated x10).

Target (issue): the whole sweep within 2.5x the raw-socket probe. Last line:
`BENCH health_sweep ratio=<sweep/raw> target=2.5`, the median over interleaved rounds of each
round's flow/raw (on a shared machine a busy moment slows both alike).

Fixed and per-endpoint cost: each round also sweeps a stack of the first `--small` (100)
endpoints; the line through the two medians gives the cost per endpoint (its slope) and per
flow run (its intercept), for the flow and for the raw probe alike.

Run: .venv/bin/python bench/health_sweep.py [--endpoints 1000] [--repeat 9] [--small 100]
[--quick: skip the httpx and task-per-endpoint comparisons (about 60 s)]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CONCURRENCY = 200

SERVER = r"""
import asyncio, json, resource, sys
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
ANSWER = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok"

async def handle(reader, writer):
    try:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(ANSWER)
        await writer.drain()
    except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
        pass
    finally:
        writer.close()

async def main(n):
    servers = [await asyncio.start_server(handle, "127.0.0.1", 0, backlog=512) for _ in range(n)]
    print(json.dumps([s.sockets[0].getsockname()[1] for s in servers]), flush=True)
    await asyncio.Event().wait()

asyncio.run(main(int(sys.argv[1])))
"""


def raise_fd_limit() -> None:
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def median_time(fn: Callable[[], Any], repeat: int) -> tuple[float, Any]:
    times, last = [], None
    for _ in range(repeat):
        start = time.perf_counter()
        last = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), last


async def raw_probe(ports: list[int]) -> int:
    """The baseline: open, GET, read the status line, close; 200 in flight."""
    limit = asyncio.Semaphore(CONCURRENCY)

    async def one(port: int) -> bool:
        async with limit:
            try:
                async with asyncio.timeout(2.0):
                    reader, writer = await asyncio.open_connection("127.0.0.1", port)
                    writer.write(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
                    line = await reader.readline()
                    writer.close()
            except (OSError, TimeoutError):
                return False
            return line.split(b" ", 2)[1:2] == [b"200"]

    return sum(await asyncio.gather(*(one(p) for p in ports)))


async def httpx_gather(ports: list[int]) -> int:
    import httpx

    # A generous timeout: with 1,000 distinct origins httpx's pool takes tens of seconds here.
    limits = httpx.Limits(max_connections=CONCURRENCY)
    async with httpx.AsyncClient(timeout=60.0, limits=limits) as client:

        async def one(port: int) -> bool:
            try:
                return (await client.get(f"http://127.0.0.1:{port}/")).status_code == 200
            except httpx.HTTPError:
                return False

        return sum(await asyncio.gather(*(one(p) for p in ports)))


def task_per_endpoint(ports: list[int]) -> int:
    """One Prefect task run per endpoint (each doing the raw probe), gathered in a flow."""
    from prefect import flow, task
    from prefect.cache_policies import NO_CACHE

    @task(cache_policy=NO_CACHE)
    async def probe_one(port: int) -> bool:
        return await raw_probe([port]) == 1

    @flow(name="bench-task-per-endpoint")
    async def per_endpoint(ports: list[int]) -> int:
        return sum(await asyncio.gather(*(probe_one(p) for p in ports)))

    return int(asyncio.run(per_endpoint(ports)))


def make_stack(ports: list[int]) -> dict[str, Any]:
    services = {
        f"ep-{i:04d}": {
            "host": "local",
            "command": ["sleep", "3600"],  # never started: the endpoints live in another process
            "ports": {"http": port},
            "health": {"http": {"url": f"http://127.0.0.1:{port}/"}, "timeout": "2s"},
        }
        for i, port in enumerate(ports)
    }
    return {"stack": "bench", "hosts": {"local": {"backend": "process"}}, "services": services}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--endpoints", type=int, default=1000)
    parser.add_argument("--repeat", type=int, default=9)
    parser.add_argument("--small", type=int, default=100)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    load_before = " ".join(f"{x:.2f}" for x in os.getloadavg())
    raise_fd_limit()
    tmp = Path(tempfile.mkdtemp(prefix="hxp-bench-health-"))
    server = subprocess.Popen(
        [sys.executable, "-c", SERVER, str(args.endpoints)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert server.stdout is not None
        ports: list[int] = json.loads(server.stdout.readline())
        stack_file = tmp / "stack.yaml"
        stack_file.write_text(yaml.safe_dump(make_stack(ports)))
        small = ports[: args.small]
        small_file = tmp / "small.yaml"
        small_file.write_text(yaml.safe_dump(make_stack(small)))

        from hxp.io.prefect_server import ensure_api, stop_server

        ensure_api(tmp / "server")
        from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY, temporary_settings

        from flows.health import run_health_sweep
        from hxp.config import load_config
        from hxp.health import SweepSettings
        from hxp.io.sweep import sweep_stack

        stack = load_config([stack_file], {}).stack
        settings = SweepSettings(observe=False)
        state, direct_state = tmp / "state", tmp / "direct"

        def flow_run() -> dict[str, Any]:
            out = run_health_sweep(str(stack_file), state_dir=str(state), observe=False)
            assert out["status"] == "healthy", out["status"]
            assert len(out["instances"]) == len(ports)
            return out

        def small_flow_run() -> None:
            out = run_health_sweep(str(small_file), state_dir=str(state), observe=False)
            assert out["status"] == "healthy", out["status"]

        def small_raw_run() -> None:
            assert asyncio.run(raw_probe(small)) == len(small)

        def direct_run() -> None:
            assert sweep_stack(stack, direct_state, settings).status.value == "healthy"

        def raw_run() -> None:
            ok = asyncio.run(raw_probe(ports))
            assert ok == len(ports), f"raw probe: {ok}/{len(ports)} answered"

        flow_run()  # warm-up: imports, the stack parsed once, the store's first rows
        small_flow_run()
        direct_run()
        # Interleaved rounds: the machine's noise (2 shared cores) hits all alike.
        times: dict[str, list[float]] = {
            "raw": [],
            "flow": [],
            "direct": [],
            "small_raw": [],
            "small_flow": [],
        }
        steps = (
            ("raw", raw_run),
            ("flow", flow_run),
            ("direct", direct_run),
            ("small_raw", small_raw_run),
            ("small_flow", small_flow_run),
        )
        for _ in range(args.repeat):
            for name, fn in steps:
                start = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - start)
        raw, flow_s, direct = (statistics.median(times[k]) for k in ("raw", "flow", "direct"))
        # Each round's own ratio: a busy moment slows that round's probe and sweep alike.
        ratio = statistics.median(f / r for f, r in zip(times["flow"], times["raw"], strict=True))
        rounds = " ".join(f"{f / r:.2f}" for f, r in zip(times["flow"], times["raw"], strict=True))
        load_after = " ".join(f"{x:.2f}" for x in os.getloadavg())
        load_s, _ = median_time(lambda: load_config([stack_file], {}), args.repeat)

        few = ports[:100]
        bare_httpx = per_task = per_task_1000 = float("nan")
        if not args.quick:
            bare_httpx, ok = median_time(lambda: asyncio.run(httpx_gather(ports)), 1)
            assert ok == len(ports), f"httpx: {ok}/{len(ports)} answered"
            with temporary_settings(updates={PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}):
                task_per_endpoint(few)  # warm-up
                per_task, ok = median_time(lambda: task_per_endpoint(few), 3)
            assert ok == len(few)
            per_task_1000 = per_task * len(ports) / len(few)
        from prefect.logging.handlers import APILogHandler

        APILogHandler().flush()  # the runs' logs reach the server before it stops
        stop_server(tmp / "server")
    finally:
        server.terminate()
        server.wait(10)
        shutil.rmtree(tmp, ignore_errors=True)

    n = len(ports)
    print(
        f"machine: {platform.node()} {platform.machine()} {os.cpu_count()} cpus, "
        f"Python {platform.python_version()}; load average {load_before} before, "
        f"{load_after} after the rounds"
    )
    print(
        f"{n} loopback HTTP endpoints in a separate process, {CONCURRENCY} in flight, "
        f"median of {args.repeat}; local prefect server (SQLite), heartbeat off"
    )
    print(f"raw asyncio socket probe (baseline):        {raw:.3f}s")
    print(f"health-sweep flow, warm (observe=False):    {flow_s:.3f}s ({flow_s / raw:.2f}x)")
    print(f"same steps without Prefect (hxp health):    {direct:.3f}s ({direct / raw:.2f}x)")
    print(f"  of which loading the {n}-unit stack file: {load_s:.3f}s")
    print(
        f"bare httpx gather:                          {bare_httpx:.3f}s ({bare_httpx / raw:.2f}x)"
    )
    print(
        f"one Prefect task per endpoint: {per_task:.3f}s for {len(few)}, "
        f"~{per_task_1000:.1f}s for {n} ({per_task_1000 / raw:.0f}x)"
    )
    med = {k: statistics.median(v) for k, v in times.items()}
    m = len(small)
    for label, big, little in (("flow", "flow", "small_flow"), ("raw probe", "raw", "small_raw")):
        per = (med[big] - med[little]) / (n - m)
        print(
            f"{label:<9} per endpoint {per * 1e3:.3f} ms, fixed per run "
            f"{(med[big] - per * n) * 1e3:.0f} ms  ({m}: {med[little]:.3f}s, {n}: {med[big]:.3f}s)"
        )
    print(f"flow/raw per round: {rounds}")
    print(f"BENCH health_sweep ratio={ratio:.2f} target=2.5")


if __name__ == "__main__":
    main()
