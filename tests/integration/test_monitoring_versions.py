"""The real Prometheus (Debian's 2.42) scraping hxp-vllm-sim imitating vLLM 0.10.1, 0.11.0,
0.16.0 and 0.34.0 with the scrape jobs and recording rules hxp renders for models pinned at
those releases (issue 16 items 5 and 6): the simulator negotiates OpenMetrics as vLLM does, a
plain job stores `vllm_*` names, hxp's jobs store `vllm:*`, and every model's inter-token
latency quantiles are recorded, the 0.10.1 one from vllm:time_per_output_token_seconds."""

from __future__ import annotations

import math
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import pytest
import yaml

from hxp.monitoring import prometheus_config, rule_files
from tests.support.metric_fixtures import VERSIONS
from tests.support.metrics_env import (
    answers,
    free_port,
    free_ports,
    load,
    query,
    simulator,
    wait_for_series,
    wait_until,
)
from tests.support.render_data import stack_from_data

pytestmark = pytest.mark.slow


@contextmanager
def prometheus_server(argv: list[str], url: str, log: Path) -> Iterator[None]:
    if shutil.which(argv[0]) is None:
        pytest.skip(f"{argv[0]} is not installed (scripts/install-system-deps.sh)")
    with log.open("wb") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_until(lambda: answers(f"{url}/-/ready") or proc.poll() is not None, what=url)
        assert proc.poll() is None, log.read_text()[-2000:]
        yield
    finally:
        proc.terminate()
        proc.wait(10)


def stack_data(base_port: int, prom_port: int) -> dict[str, Any]:
    models = {
        f"m{i}": {
            "host": "local",
            "model": "org/chat",
            "engine": "simulator",
            "port": base_port + i,
            "vllm": {"version": version},
        }
        for i, version in enumerate(VERSIONS)
    }
    return {
        "stack": "vt",
        "hosts": {"local": {"backend": "process"}},
        "models": models,
        "monitoring": {"prometheus": {"host": "local", "port": prom_port, "scrape_interval": "1s"}},
    }


def values(result: list[dict[str, Any]]) -> dict[str, float]:
    return {
        r["metric"].get("unit", r["metric"].get("job", "")): float(r["value"][1]) for r in result
    }


def test_prometheus_2_42_records_every_pinned_release(tmp_path: Path) -> None:
    base, prom_port = free_ports(len(VERSIONS)), free_port()
    stack = stack_from_data(stack_data(base, prom_port))
    config = prometheus_config(stack)
    jobs = {j["job_name"]: j for j in config["scrape_configs"]}
    for i in range(len(VERSIONS)):
        assert jobs[f"m{i}"]["static_configs"][0]["targets"] == [f"127.0.0.1:{base + i}"]
    # The same 0.10.1 target scraped by a job without hxp's settings: what a hand-written
    # Prometheus config stores.
    plain = {"job_name": "plain", "static_configs": [{"targets": [f"127.0.0.1:{base}"]}]}
    config["scrape_configs"].append(plain)
    root = tmp_path / "prom"
    for rel, doc in rule_files(stack).items():
        path = root / rel.removeprefix("prometheus/")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(yaml.safe_dump(doc, sort_keys=False))
    (root / "prometheus.yml").write_text(yaml.safe_dump(config, sort_keys=False))
    data = Path(tempfile.mkdtemp(prefix="prom-", dir=tmp_path))
    argv = [
        "prometheus",
        f"--config.file={root / 'prometheus.yml'}",
        f"--web.listen-address=127.0.0.1:{prom_port}",
        f"--storage.tsdb.path={data}",
    ]
    prom = f"http://127.0.0.1:{prom_port}"
    with ExitStack() as stack_:
        for i, version in enumerate(VERSIONS):
            stack_.enter_context(simulator(base + i, f"m{i}", "--version", version))
        stack_.enter_context(prometheus_server(argv, prom, tmp_path / "prometheus.log"))
        wait_for_series(prom, "up == 1", count=len(VERSIONS) + 2)  # and plain, hxp-prometheus
        for _ in range(2):
            for i in range(len(VERSIONS)):
                load(base + i, 6, model=f"m{i}")
            time.sleep(2.5)

        # Without hxp's rename, Prometheus 2.42 stores the escaped names.
        plain_names = {r["metric"]["__name__"] for r in query(prom, '{job="plain"}')}
        assert "vllm_time_per_output_token_seconds_count" in plain_names
        assert not {n for n in plain_names if n.startswith("vllm:")}
        # hxp's job for the same target stores vLLM's names.
        m0 = {r["metric"]["__name__"] for r in query(prom, '{job="m0"}')}
        assert "vllm:time_per_output_token_seconds_count" in m0
        assert "vllm:inter_token_latency_seconds_count" not in m0
        assert not {n for n in m0 if n.startswith("vllm_")}

        running = values(query(prom, "vllm:num_requests_running"))
        assert set(running) == {f"m{i}" for i in range(len(VERSIONS))}

        def recorded() -> bool:
            got = values(query(prom, "unit:vllm_inter_token_latency_seconds:p50"))
            return len(got) == len(VERSIONS) and all(not math.isnan(v) for v in got.values())

        wait_until(recorded, 30, "inter-token latency p50 of every release")
        p50 = values(query(prom, "unit:vllm_inter_token_latency_seconds:p50"))
        assert set(p50) == {f"m{i}" for i in range(len(VERSIONS))}
        assert all(0 < v < 1 for v in p50.values()), p50
        ttft = values(query(prom, "unit:vllm_time_to_first_token_seconds:p95"))
        assert set(ttft) == set(p50)
