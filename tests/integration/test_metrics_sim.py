"""Scrape and aggregate real `/metrics` pages of the vLLM simulator (subprocesses): rates from
two scrapes, quantiles inside the simulated latency, a dead target, a replica restarted
mid-series."""

from __future__ import annotations

import time
from typing import Any

import pytest

from hxp.io.scrape import scrape
from hxp.metrics import Aggregation, Baseline, Target, aggregate, wanted_families
from hxp.spec import Stack
from tests.support.metrics_env import free_port, free_ports, load, simulator

pytestmark = pytest.mark.slow


def chat_stack(port: int, replicas: int) -> Stack:
    return Stack.model_validate({
        "stack": "sim", "hosts": {"local": {"backend": "process"}},
        "models": {"chat": {"host": "local", "model": "org/chat", "engine": "simulator",
                            "replicas": replicas, "port": port,
                            "vllm": {"version": "0.33.0"}}},
    })  # fmt: skip


def run(stack: Stack, targets: list[Target], baselines: dict[str, Baseline]) -> Aggregation:
    pages = scrape(targets, wanted_families(stack.metrics), timeout=2.0, concurrency=16)
    return aggregate(stack, targets, pages, baselines)


def sample(result: Aggregation, name: str, **labels: str) -> float:
    want = {"stack": "sim", "model": "chat", **labels}
    hits = [s.value for s in result.samples if s.name == name and dict(s.labels) == want]
    assert len(hits) == 1, (name, want)
    return hits[0]


def test_rates_and_quantiles_from_two_live_replicas_and_a_dead_one() -> None:
    base = free_ports(3)
    stack = chat_stack(base, 3)
    targets = [Target(f"chat-{i}", "chat", f"http://127.0.0.1:{base + i}/metrics", "0.33.0")
               for i in range(3)]  # fmt: skip
    with simulator(base), simulator(base + 1):  # chat-2's port: nothing listens
        load(base, 10)
        first = run(stack, targets, {})
        started = time.monotonic()
        load(base, 40)
        load(base + 1, 20)
        elapsed = time.monotonic() - started
        second = run(stack, targets, first.baselines)
    window = sample(second, "fleet:window_seconds")
    assert elapsed <= window
    # Each replica's rate uses its own scrape interval, which differs from the fleet window
    # by the scrape jitter: a few percent on a loaded 2-core machine.
    assert sample(second, "fleet:request_rate") * window == pytest.approx(60, rel=0.08)
    assert sample(second, "fleet:success_ratio") == 1.0
    # the simulator answers "hello" (1 token + BOS) with max_tokens=2 generated tokens
    assert sample(second, "fleet:generation_tokens_per_second") * window == pytest.approx(
        120, rel=0.08
    )
    p50 = sample(second, "fleet:ttft_seconds", quantile="0.5")
    p99 = sample(second, "fleet:ttft_seconds", quantile="0.99")
    assert 0.005 < p50 <= p99 < 1.0  # --latency-ms 10 plus scheduling, on a busy 2-core box
    assert sample(second, "fleet:targets", state="up") == 2
    assert sample(second, "fleet:targets", state="down") == 1
    dead = [i for i in second.issues if i.target == "chat-2"]
    assert dead
    assert "refused" in dead[0].message
    assert "chat-2" not in second.baselines


def test_restarted_replica_gives_no_negative_rate() -> None:
    port = free_port()
    stack = chat_stack(port, 1)
    target = [Target("chat-0", "chat", f"http://127.0.0.1:{port}/metrics", "0.33.0")]
    with simulator(port):
        load(port, 30)
        before = run(stack, target, {})
    time.sleep(1.1)  # process_start_time_seconds has a 10 ms resolution; make the restart plain
    with simulator(port):
        load(port, 5)
        after = run(stack, target, before.baselines)
    window = sample(after, "fleet:window_seconds")
    assert sample(after, "fleet:request_rate") * window == pytest.approx(5)
    assert all(s.value >= 0 for s in after.samples)
    assert any("counters reset" in i.message for i in after.issues)


def test_simulator_pages_have_every_aggregated_family() -> None:
    port = free_port()
    stack = chat_stack(port, 1)
    target = [Target("chat-0", "chat", f"http://127.0.0.1:{port}/metrics", "0.33.0")]
    with simulator(port):
        result: Any = run(stack, target, {})
    assert not [i for i in result.issues if "exposes no" in i.message]
