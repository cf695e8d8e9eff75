"""A seeded fault campaign (`hxp chaos`, flows/chaos.py) on a generated stack, process backend.

Each run injects one fault into a new revision of one unit or into the orchestrator and checks
the invariants of hxp.chaos. Target (issue 19): at least 99.9% of runs consistent, so the last
line's ratio is (inconsistent fraction / 0.001); ≤ 1.0 meets it.

The generated stack has --units services, a model served by hxp-vllm-sim and an nginx gateway
routing it (--plain: the services only); the state directory is the bench's own, on a small
tmpfs it mounts (root), so the state-disk-full fault runs too.

Run: .venv/bin/python bench/chaos.py [--runs 1000] [--units 4] [--seed S] [--out results.json]
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

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=100)
    parser.add_argument("--units", type=int, default=4)
    parser.add_argument("--seed", type=int)
    parser.add_argument("--replay", metavar="SEED:RUN")
    parser.add_argument("--out", type=Path, help="the results as JSON (default: none)")
    parser.add_argument("--minutes", type=float, help="start no run after this many minutes")
    parser.add_argument(
        "--plain",
        action="store_true",
        help="services only: no hxp-vllm-sim model, no gateway (and so no nginx-killed or "
        "stalled-model runs)",
    )
    args = parser.parse_args()
    from hxp.chaos import generated_stack, inconsistent_fraction, parse_replay, render_table
    from tests.support.stacks import free_port, free_range

    seed = args.seed if args.seed is not None else random.randrange(1, 10**6)
    only = None
    if args.replay:
        seed, only = parse_replay(args.replay)
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "CRITICAL")  # one line per run, not per task
    tmp = Path(tempfile.mkdtemp(prefix="hxp-chaos-"))
    load = os.getloadavg()
    started = time.perf_counter()
    try:
        from hxp.io.prefect_server import ensure_api

        ensure_api(tmp / "server")
        from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY, temporary_settings

        from flows.chaos import Campaign, run_campaign, write_artifact

        base = free_range(args.units + 2)  # the model's two blue-green slots after the units
        model, gateway = (None, None) if args.plain else (base + args.units, free_port())
        stack = generated_stack(
            "chaos", range(base, base + args.units), sys.executable, model, gateway
        )
        stack_file = tmp / "stack.yaml"
        stack_file.write_text(yaml.safe_dump(stack, sort_keys=False))
        print(f"chaos bench: seed {seed}, {args.runs} runs, {args.units} units", flush=True)
        with temporary_settings(updates={PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}):
            campaign = Campaign(stack_file, tmp / "state", own_state=True)
            try:
                stop_at = time.monotonic() + args.minutes * 60 if args.minutes else None
                results = run_campaign(
                    campaign, seed, args.runs, only, lambda s: print(s, flush=True), stop_at
                )
            finally:
                campaign.teardown()
        if args.out:
            write_artifact(args.out, seed, "process", results)
    finally:
        from hxp.io.prefect_server import stop_server

        stop_server(tmp / "server")
        shutil.rmtree(tmp, ignore_errors=True)
    wall = time.perf_counter() - started
    print(
        f"machine: {platform.node()} {platform.machine()} {os.cpu_count()} cpus, "
        f"load average at start {load[0]:.1f}, now {os.getloadavg()[0]:.1f}; wall {wall:.0f}s"
    )
    print(
        render_table(
            results, f"Seed {seed}, process backend, {len(results)} of {args.runs} runs made.\n"
        )
    )
    print(f"BENCH chaos ratio={inconsistent_fraction(results) / 0.001:.2f} target=1.0")


if __name__ == "__main__":
    main()
