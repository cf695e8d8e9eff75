"""aggregate-metrics over 100 vLLM `/metrics` endpoints: the whole flow vs the naive baseline.

Measured in one run, on one machine, interleaved (the machine is shared and noisy):
- targets: ONE helper process serves 100 ports with asyncio (100 simulator processes would
  swamp 2 cores); each port answers realistic vLLM 0.33 pages (tests/support/vllm_pages.py:
  every family vLLM creates, Python/process and http_* families, ~49 KB, 18 histogram
  families), cycling through 8 snapshots of growing counters (a wrap looks like a restart);
- baseline ("naive"): GET every page (same raw asyncio client, same concurrency) and parse it
  whole with prometheus-client's text parser; nothing else;
- ours: the `aggregate-metrics` flow, warm process, against a local Prefect server: load the
  stack, scrape (pre-filtered parse as pages arrive), rates against the stored previous scrape,
  quantiles, store write, table artifact. No Pushgateway.
Also printed: the fetch alone with raw asyncio streams vs httpx, and the flow's core without
Prefect (scrape + aggregate), to show where the time goes.

Target (issue): the whole flow <= 1.0x the naive baseline. Last line:
`BENCH aggregate ratio=<flow/naive> target=1.0`.

Run: .venv/bin/python bench/aggregate.py [--targets 100] [--runs 7]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SNAPSHOTS = 8


# ------------------------------------------------------------------------------ the helper


def serve(base: int, count: int) -> None:
    """Serve `count` ports from `base`: target i answers snapshot (request number % 8)."""
    from tests.support.vllm_pages import random_spec, render_page

    pages: list[list[bytes]] = []
    for i in range(count):
        model = "a" if i < count // 2 else "b"
        pages.append([
            render_page(random_spec(i, model, minutes=30 + k)).encode()
            for k in range(SNAPSHOTS)
        ])  # fmt: skip
    sizes = [len(p[0]) for p in pages]

    async def main() -> None:
        served = [0] * count

        def handler(i: int):  # type: ignore[no-untyped-def]
            async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
                try:
                    await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, ConnectionError):
                    writer.close()
                    return
                body = pages[i][served[i] % SNAPSHOTS]
                served[i] += 1
                writer.write(
                    b"HTTP/1.1 200 OK\r\nContent-Type: text/plain; version=0.0.4; charset=utf-8"
                    b"\r\nContent-Length: %d\r\nConnection: close\r\n\r\n" % len(body) + body
                )
                try:
                    await writer.drain()
                finally:
                    writer.close()

            return handle

        # Bind after rendering (seconds): ports checked free earlier may be taken by then.
        servers: list[asyncio.Server] = []
        first = base
        for _ in range(50):
            try:
                for i in range(count):
                    servers.append(
                        await asyncio.start_server(handler(i), "127.0.0.1", first + i, backlog=256)
                    )
                break
            except OSError:
                for server in servers:
                    server.close()
                servers = []
                first = random.randrange(20000, 30000)
        else:
            raise SystemExit("no run of free ports")
        print(f"ready {first} {statistics.mean(sizes):.0f}", flush=True)
        await asyncio.gather(*(s.serve_forever() for s in servers))

    asyncio.run(main())


# ------------------------------------------------------------------------------ the measurement


def naive(urls: list[str], concurrency: int, client: str = "raw", parse: bool = True) -> float:
    """Fetch every page, then parse each whole: the baseline."""
    from prometheus_client.parser import text_string_to_metric_families

    from hxp.io.scrape import fetch_all

    start = time.perf_counter()
    pages = asyncio.run(fetch_all(urls, 5.0, concurrency, None, client))  # type: ignore[arg-type]
    assert all(p.body for p in pages.values()), [p.error for p in pages.values() if not p.body]
    if parse:
        for page in pages.values():
            assert page.body is not None
            list(text_string_to_metric_families(page.body))
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--targets", type=int, default=100)
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--serve", nargs=2, type=int, metavar=("BASE", "COUNT"))
    args = parser.parse_args()
    if args.serve:
        serve(*args.serve)
        return
    count = args.targets
    tmp = Path(tempfile.mkdtemp(prefix="hxp-bench-agg-"))
    helper = subprocess.Popen(
        [sys.executable, __file__, "--serve", str(random.randrange(20000, 30000)), str(count)],
        stdout=subprocess.PIPE, text=True, cwd=ROOT,
    )  # fmt: skip
    try:
        assert helper.stdout is not None
        ready = helper.stdout.readline().split()
        assert ready, "the helper did not start"
        assert ready[0] == "ready", ready
        base, page_size = int(ready[1]), float(ready[2])
        half = count // 2
        stack = {
            "stack": "bench",
            "hosts": {"local": {"backend": "process"}},
            "models": {
                "a": {"host": "local", "model": "org/a", "engine": "simulator",
                      "replicas": half, "port": base, "vllm": {"version": "0.33.0"}},
                "b": {"host": "local", "model": "org/b", "engine": "simulator",
                      "replicas": count - half, "port": base + half,
                      "vllm": {"version": "0.33.0"}},
            },
            "metrics": {"max_concurrency": 64, "scrape_timeout": "5s"},
        }  # fmt: skip
        stack_file = tmp / "stack.yaml"
        stack_file.write_text(yaml.safe_dump(stack))
        urls = [f"http://127.0.0.1:{base + i}/metrics" for i in range(count)]

        from hxp.io.prefect_server import ensure_api, stop_server

        ensure_api(tmp / "server")
        from prefect.logging.handlers import APILogWorker
        from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY, temporary_settings

        from flows.metrics import aggregate_metrics
        from hxp.config import load_config
        from hxp.io.scrape import scrape
        from hxp.metrics import Baseline, aggregate, replica_targets, wanted_families

        state = tmp / "state"
        loaded = load_config([stack_file], {}).stack
        targets, _ = replica_targets(loaded)
        wanted = wanted_families(loaded.metrics)

        def core(previous: dict[str, Baseline]) -> tuple[float, dict[str, Baseline]]:
            start = time.perf_counter()
            result = aggregate(loaded, targets, scrape(targets, wanted, 5.0, 64), previous)
            return time.perf_counter() - start, result.baselines

        flows, naives, cores, fetch_raw, fetch_httpx = [], [], [], [], []
        with temporary_settings(updates={PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}):
            warm = aggregate_metrics(str(stack_file), state_dir=str(state), observe=False)
            assert warm["up"] == count, warm["issues"][:5]
            naive(urls, 64)
            _, previous = core({})
            for _ in range(args.runs):
                naives.append(naive(urls, 64))
                start = time.perf_counter()
                result = aggregate_metrics(str(stack_file), state_dir=str(state), observe=False)
                flows.append(time.perf_counter() - start)
                assert result["up"] == count
                took, previous = core(previous)
                cores.append(took)
                fetch_raw.append(naive(urls, 64, "raw", parse=False))
                fetch_httpx.append(naive(urls, 64, "httpx", parse=False))
            APILogWorker.drain_all(timeout=10)  # the runs' logs reach the server before it stops
        stop_server(tmp / "server")
    finally:
        helper.terminate()
        helper.wait(10)
        shutil.rmtree(tmp, ignore_errors=True)
    med = statistics.median
    ratio = med(flows) / med(naives)
    print(
        f"machine: {platform.node()} {platform.machine()} {os.cpu_count()} cpus, "
        f"Python {platform.python_version()}"
    )
    print(
        f"{count} targets from one helper process, pages of {page_size / 1024:.1f} KB "
        f"(vLLM 0.33 exposition), concurrency 64, local prefect server (SQLite)"
    )
    print(f"fetch only, raw asyncio streams (median of {args.runs}): {med(fetch_raw):.3f}s")
    print(f"fetch only, httpx (median of {args.runs}):               {med(fetch_httpx):.3f}s")
    print(f"naive: fetch + full parse (median of {args.runs}):       {med(naives):.3f}s")
    print(f"core: scrape + pre-filtered parse + aggregate, no Prefect: {med(cores):.3f}s")
    print(f"aggregate-metrics flow, warm (median of {args.runs}):    {med(flows):.3f}s")
    print(f"BENCH aggregate ratio={ratio:.2f} target=1.0")


if __name__ == "__main__":
    main()
