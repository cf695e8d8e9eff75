"""The autoscaler's reaction to a load step: time from the step to the new replicas serving
behind the gateway, against `scale_up_after` plus a replica's measured start time.

Setup (tests.support.autoscale_lab): one routed hxp-vllm-sim model (the development double of
vLLM; 4 slots, 250 ms prefill per request) behind the real nginx gateway, autoscale min 1 /
max 3 on waiting requests per replica (threshold 1), the autoscale flow every `--interval`
seconds on a local Prefect server (heartbeats off, as CLI runs), closed-loop load of 16
clients (4 x one replica's slots; about 3 x reach the replicas at once, each request being a
new gateway connection) from tests.support.loadgen.

Measured: load step -> the gateway routes to 3 replicas. A replica's start time: the wall time
of the scale-up deploy the autoscaler ran (plan, placement, start, readiness gate, gateway),
from its deploy record. The last line's ratio is measured / (scale_up_after + replica start);
the issue's target is 1.2 (the decision may wait up to an interval for the next pass, and a
pass scrapes and aggregates before it acts).

Run: .venv/bin/python bench/autoscale.py [--scale-up-after 5] [--interval 2]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--scale-up-after", type=float, default=5.0)
    parser.add_argument("--interval", type=float, default=2.0)
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="hxp-asbench-"))
    path = tmp / "stack.yaml"
    state = tmp / "state"
    from hxp.io.prefect_server import ensure_api, stop_server
    from tests.support.stacks import free_port, free_range, tear_down_fleet

    try:
        ensure_api(tmp / "server")
        from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY, temporary_settings

        from flows.deploy import deploy_stack
        from hxp.store import Store
        from tests.support.autoscale_lab import (
            SLOTS,
            Autoscaler,
            autoscale_fleet,
            live_ports,
            wait_for,
        )
        from tests.support.loadgen import BackgroundLoad

        base, gateway = free_range(8), free_port()
        autoscale_fleet(
            path,
            "asbench",
            base,
            gateway,
            interval=f"{args.interval}s",
            scale_up_after=f"{args.scale_up_after}s",
            scale_down_after="60s",
            cooldown="10s",
        )
        with temporary_settings(updates={PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}):
            first = deploy_stack([str(path)], state_dir=str(state))
            scaler = Autoscaler(path, state, "asbench", args.interval)
            for _ in range(3):  # baselines in place: rates from the first loaded pass
                scaler.once()
            scaler.start()
            load = BackgroundLoad(f"http://127.0.0.1:{gateway}", "chat", 100_000, 4 * SLOTS)
            step = time.monotonic()
            load.start()
            took = wait_for(lambda: len(live_ports(state, "asbench", path)) == 3, 300)
            scaler.stop()
        if took is None:
            raise SystemExit(f"never reached 3 replicas: {scaler.passes[-3:]} {scaler.errors}")
        record = next(d for d in Store(state).deploys("asbench") if d.id != first["deploy_id"])
        assert record.finished_at is not None
        start_s = record.finished_at - record.started_at
        initial = next(d for d in Store(state).deploys("asbench") if d.id == first["deploy_id"])
        assert initial.finished_at is not None
        ups = scaler.actions("scale_up")
        print(f"load step -> 3 replicas serving: {took:.2f} s (wall {time.monotonic() - step:.1f})")
        print(f"scale_up_after {args.scale_up_after:g} s, interval {args.interval:g} s")
        print(f"replica start (the scale-up deploy #{record.id}, gated): {start_s:.2f} s")
        print(
            "baseline, `hxp apply` of the first replica (same run): "
            f"{initial.finished_at - initial.started_at:.2f} s"
        )
        print(f"scale-up decisions: {[(d['current'], d['desired'], d['reason']) for d in ups]}")
        bound = args.scale_up_after + 2 * args.interval + start_s
        print(f"acceptance bound (scale_up_after + 2 intervals + start): {bound:.2f} s")
        ratio = took / (args.scale_up_after + start_s)
        print(f"BENCH autoscale ratio={ratio:.3f} target=1.2")
    finally:
        try:
            if path.exists():
                tear_down_fleet(path, state, "asbench")
        finally:
            stop_server(tmp / "server")
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
