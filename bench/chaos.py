"""A seeded fault campaign (`hxp chaos`, flows/chaos.py) on a generated stack, on the process,
docker or systemd backend. Docker and systemd run on a private dockerd this bench starts (its own
socket, data and exec roots under a temporary folder; the machine's own engine is never
touched): docker with the test image that holds Python and hxp.io.chaos_unit, systemd in a
container with systemd as PID 1 (tests/support, as the integration tests).

Each run injects one fault into a new revision of one unit or into the orchestrator and checks
the invariants of hxp.chaos. Target (issue 19): at least 99.9% of runs consistent, so the last
line's ratio is (inconsistent fraction / 0.001); ≤ 1.0 meets it.

The generated stack has --units services, a model served by hxp-vllm-sim and an nginx gateway
routing it (--plain: the services only); the state directory is the bench's own, on a small
tmpfs it mounts (root), so the state-disk-full fault runs too. On docker the campaign is handed
the bench's own dockerd to restart (the docker-restart fault: down for DOWN_SECONDS).

Run: .venv/bin/python bench/chaos.py [--runs 1000] [--units 4] [--seed S] [--out results.json]
         [--backend process|docker|systemd]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import random
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


#: How long the docker-restart fault keeps the bench's private daemon down (as
#: tests/integration/test_docker_restart.py): longer than the deploy task's own retries.
DOWN_SECONDS = 5.0


def lab_stack(
    lab: contextlib.ExitStack, backend: str, ports: range, tmp: Path, rich: bool = False
) -> tuple[dict[str, object], Callable[[], None] | None]:
    """The generated stack for `backend`, with what it runs on started inside `lab`: for docker
    and systemd a private dockerd (DOCKER_HOST points at it while the lab lasts). `rich`
    (process backend): with a simulated model after the ports and a gateway routing it. Also,
    on docker, how to restart that daemon (the bench's own: the docker-restart fault)."""
    from hxp.chaos import generated_stack
    from tests.support.stacks import free_port

    if backend == "process":
        if not rich:
            return generated_stack("chaos", ports, sys.executable), None
        model, gateway = ports.stop, free_port()
        stack = generated_stack(
            "chaos", ports, sys.executable, model_port=model, gateway_port=gateway
        )
        return stack, None
    from tests.support.docker_engine import build_chaos_image, own_dockerd

    engine = lab.enter_context(own_dockerd(tmp / "dockerd"))
    url = engine.url
    lab.enter_context(_environ("DOCKER_HOST", url))
    if backend == "docker":
        image = build_chaos_image(url)
        stack = generated_stack("chaos", ports, "python3", "docker", image=image)
        return stack, lambda: engine.restart(DOWN_SECONDS)
    from tests.support.systemd_container import import_systemd_image, run_systemd_container

    container = lab.enter_context(run_systemd_container(url, import_systemd_image(url)))
    host = {"runner": "docker-exec", "container": container}
    return generated_stack("chaos", ports, "python3", "systemd", host=host), None


@contextlib.contextmanager
def _environ(name: str, value: str) -> Iterator[None]:
    previous = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = previous


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=100)
    parser.add_argument("--units", type=int, default=4)
    parser.add_argument("--seed", type=int)
    parser.add_argument("--replay", metavar="SEED:RUN")
    parser.add_argument("--out", type=Path, help="the results as JSON (default: none)")
    parser.add_argument("--minutes", type=float, help="start no run after this many minutes")
    parser.add_argument("--backend", choices=["process", "docker", "systemd"], default="process")
    parser.add_argument(
        "--plain",
        action="store_true",
        help="services only: no hxp-vllm-sim model, no gateway (and so no nginx-killed or "
        "stalled-model runs); the docker and systemd campaigns are always plain",
    )
    args = parser.parse_args()
    from hxp.chaos import inconsistent_fraction, parse_replay, render_table
    from tests.support.stacks import free_range

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

        print(f"chaos bench: seed {seed}, {args.runs} runs, {args.units} units", flush=True)
        with (
            contextlib.ExitStack() as lab,
            temporary_settings(updates={PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}),
        ):
            rich = args.backend == "process" and not args.plain
            base = free_range(args.units + 2)  # the model's two blue-green slots after the units
            stack, restart = lab_stack(lab, args.backend, range(base, base + args.units), tmp, rich)
            stack_file = tmp / "stack.yaml"
            stack_file.write_text(yaml.safe_dump(stack, sort_keys=False))
            campaign = Campaign(
                stack_file, tmp / "state", args.backend, own_state=rich, restart_docker=restart
            )
            lab.callback(campaign.teardown)
            stop_at = time.monotonic() + args.minutes * 60 if args.minutes else None
            results = run_campaign(
                campaign, seed, args.runs, only, lambda s: print(s, flush=True), stop_at
            )
        if args.out:
            write_artifact(args.out, seed, args.backend, results)
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
            results,
            f"Seed {seed}, {args.backend} backend, {len(results)} of {args.runs} runs made.\n",
        )
    )
    print(f"BENCH chaos ratio={inconsistent_fraction(results) / 0.001:.2f} target=1.0")


if __name__ == "__main__":
    main()
