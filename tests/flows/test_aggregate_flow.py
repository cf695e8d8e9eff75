"""The aggregate-metrics flow against simulator replicas (a real Prefect server): the first run
sets the baselines, the second publishes rates; a dead replica is reported; the fleet series
reach the store (for `hxp exporter`) and a Pushgateway; a table artifact is written."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client import generate_latest

from hxp.io.telemetry import store_registry
from hxp.store import Store
from tests.support.metrics_env import free_ports, load, pushgateway, simulator

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("prefect_server")]


def stack_file(tmp: Path, port: int, extra: str = "") -> Path:
    path = tmp / "fleet.yaml"
    path.write_text(
        f"""\
stack: fleet
hosts:
  local: {{backend: process}}
models:
  chat:
    host: local
    model: org/chat
    engine: simulator
    replicas: 3
    port: {port}
    vllm: {{version: "0.33.0"}}
metrics:
  price_per_million_tokens: 0.5
  per_label: [model_name, tenant]
  series:
    preemptions: {{family: "vllm:num_preemptions", op: rate}}
    old_kv: {{family: "vllm:gpu_cache_usage_perc", op: max}}
{extra}"""
    )
    return path


def run(path: Path, state: Path, **kw: Any) -> dict[str, Any]:
    from flows.metrics import aggregate_metrics

    return aggregate_metrics(str(path), state_dir=str(state), observe=False, **kw)


def test_two_runs_publish_rates_and_report_the_dead_replica(tmp_path: Path) -> None:
    base = free_ports(3)
    path = stack_file(tmp_path, base)
    state = tmp_path / "state"
    with pushgateway(tmp_path) as pg, simulator(base), simulator(base + 1):
        load(base, 5)
        first = run(path, state, pushgateway=pg)
        load(base, 20)
        load(base + 1, 20)
        second = run(path, state, pushgateway=pg)
        pushed = httpx.get(f"{pg}/metrics", timeout=5).text
    assert first["up"] == 2
    assert first["down"] == ["chat-2"]
    assert second["pushed"] is True
    chat = second["models"]["chat"]
    assert chat["up"] == "2/3"
    assert chat["req/s"] != "-"
    assert chat["req/s"] > 0
    assert chat["cost/h"] > 0
    issues = "\n".join(second["issues"])
    assert "chat-2: down, left out" in issues
    assert "per_label: no target labels" in issues
    assert "'tenant'" in issues
    assert "old_kv" in issues
    assert "gone since 0.12.0" in issues
    # the store has what `hxp exporter` serves
    served = generate_latest(store_registry(state)).decode()
    assert 'fleet:request_rate{model="chat",stack="fleet"}' in served
    assert 'fleet:label_tokens_per_second{kind="generation",label="model_name"' in served
    assert 'hxp_errors_total{error_class="transient",stack="fleet",where="scrape"} 2.0' in served
    assert 'hxp_metrics_aggregation_duration_seconds_count{stack="fleet"} 2.0' in served
    assert set(Store(state).metric_baselines("fleet")) == {"chat-0", "chat-1"}
    # the Pushgateway holds the group job=hxp, stack=fleet, flow=aggregate-metrics
    assert (
        'fleet:request_rate{flow="aggregate-metrics",instance="",job="hxp",model="chat"' in pushed
    )
    assert "vllm:" not in served


def test_artifact_is_a_table(tmp_path: Path) -> None:
    from prefect.client.orchestration import get_client

    base = free_ports(3)
    path = stack_file(tmp_path, base)
    with simulator(base):
        run(path, tmp_path / "state")

    async def latest() -> Any:
        async with get_client() as client:
            return await client.read_latest_artifacts()

    artifacts = [a for a in asyncio.run(latest()) if a.key == "metrics-fleet"]
    assert artifacts
    assert artifacts[0].type == "table"
