"""hxp.io.telemetry: the orchestrator's series rebuilt from the store (what `hxp exporter` serves
and the Pushgateway gets), the exporter over HTTP, pushes with their grouping key."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from hxp.config import ConfigSnapshot
from hxp.io import telemetry
from hxp.io.telemetry import (
    REGISTRY,
    deploy_facts,
    make_exporter,
    push_group,
    pushgateway_url,
    record_deploy,
    store_registry,
)
from hxp.spec import Stack
from hxp.store import Store


def snapshot(store: Store, content_hash: str, units: tuple[str, ...] = ("api", "db")) -> None:
    config = {"stack": "t", "services": {u: {} for u in units}}
    store.save_snapshot(ConfigSnapshot("t", content_hash, config, (), "now"))


def history(state: Path) -> Store:
    """A good deploy of api+db, a no-op re-apply, then a failed update of api, rolled back."""
    store = Store(state)
    snapshot(store, "h1")
    snapshot(store, "h2")
    first = store.begin_deploy("t", "deploy", "h1")
    for unit in ("db", "api"):
        rev = store.record_revision("t", unit, f"{unit}-1", "h1", first, {})
        store.set_revision_status("t", unit, rev, "good")
    store.finish_deploy(first, "succeeded", {
        "changes": True,
        "units": {"db": {"revision": 1, "applied": [], "seconds": 0.8},
                  "api": {"revision": 1, "applied": [], "seconds": 1.6}},
    })  # fmt: skip
    noop = store.begin_deploy("t", "deploy", "h1")
    store.finish_deploy(noop, "succeeded", {"changes": False})
    failed = store.begin_deploy("t", "deploy", "h2")
    rev = store.record_revision("t", "api", "api-2", "h2", failed, {})
    store.add_event("t", "unit-failed", "api never became ready", "api", failed)
    store.add_event("t", "rolled-back", "api: restored revision 1, healthy", "api", failed)
    store.set_revision_status("t", "api", rev, "rolled-back")
    store.finish_deploy(failed, "failed", {
        "failed_unit": "api", "reason": "api never became ready: http http://x failed 3 time(s)",
        "seconds": 7.5, "units": {},
    })  # fmt: skip
    return store


def series(registry: Any) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    text = generate_latest(registry).decode()
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def value(
    found: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str
) -> float:
    return found[(name, frozenset(labels.items()))]


def test_deploy_series_rebuilt_from_the_store(tmp_path: Path) -> None:
    history(tmp_path)
    found = series(store_registry(tmp_path))
    assert value(found, "hxp_deploys_total", stack="t", kind="deploy", outcome="succeeded") == 1
    assert value(found, "hxp_deploys_total", stack="t", kind="deploy", outcome="no-change") == 1
    assert value(found, "hxp_deploys_total", stack="t", kind="deploy", outcome="failed") == 1
    assert value(found, "hxp_deploy_duration_seconds_count", stack="t", kind="deploy") == 3
    assert value(found, "hxp_unit_deploy_duration_seconds_sum", stack="t", unit="api",
                 outcome="succeeded") == pytest.approx(1.6)  # fmt: skip
    assert value(found, "hxp_unit_deploy_duration_seconds_bucket", stack="t", unit="api",
                 outcome="failed", le="5.0") == 0  # fmt: skip
    assert value(found, "hxp_unit_deploy_duration_seconds_bucket", stack="t", unit="api",
                 outcome="failed", le="10.0") == 1  # fmt: skip
    assert value(found, "hxp_rollbacks_total", stack="t", unit="api",
                 reason_class="readiness") == 1  # fmt: skip
    assert value(found, "hxp_errors_total", stack="t", where="deploy",
                 error_class="permanent") == 1  # fmt: skip
    assert value(found, "hxp_unit_lifecycle_state", stack="t", unit="api",
                 state="rolled-back") == 1  # fmt: skip
    assert value(found, "hxp_unit_lifecycle_state", stack="t", unit="api", state="running") == 0
    assert value(found, "hxp_unit_lifecycle_state", stack="t", unit="db", state="running") == 1


def test_series_survive_an_orchestrator_restart(tmp_path: Path) -> None:
    """Another process (a new registry over the same store) sees the same counters."""
    history(tmp_path)
    first = series(store_registry(tmp_path))
    again = series(store_registry(tmp_path))
    assert first == again
    created = value(first, "hxp_deploys_created", stack="t", kind="deploy", outcome="succeeded")
    assert created <= time.time()


def test_stopped_and_removed_units(tmp_path: Path) -> None:
    store = history(tmp_path)
    store.add_event("t", "down", "removed 2 instance(s)")
    found = series(store_registry(tmp_path, groups=["deploy"]))
    assert value(found, "hxp_unit_lifecycle_state", stack="t", unit="db", state="stopped") == 1
    snapshot(store, "h3", units=("api",))
    deploy = store.begin_deploy("t", "deploy", "h3")
    store.finish_deploy(deploy, "succeeded", {"changes": True, "units": {}})
    found = series(store_registry(tmp_path, groups=["deploy"]))
    assert value(found, "hxp_unit_lifecycle_state", stack="t", unit="db", state="stopped") == 1


def test_the_reason_class_is_the_recorded_failure_class_not_the_wording(tmp_path: Path) -> None:
    """A deploy record carries its FailureClass: the label follows it whatever the reason
    says (here a reason worded like a readiness failure, recorded as a secret failure)."""
    store = Store(tmp_path)
    snapshot(store, "h1")
    failed = store.begin_deploy("t", "deploy", "h1")
    store.add_event("t", "rolled-back", "api: restored revision 1, healthy", "api", failed)
    store.finish_deploy(failed, "failed", {
        "failed_unit": "api", "reason": "api never became ready (reworded any way at all)",
        "reason_class": "secret", "seconds": 1.0, "units": {},
    })  # fmt: skip
    found = series(store_registry(tmp_path))
    assert value(found, "hxp_rollbacks_total", stack="t", unit="api", reason_class="secret") == 1
    assert ("hxp_rollbacks_total", frozenset(
        {"stack": "t", "unit": "api", "reason_class": "readiness"}.items()
    )) not in found  # fmt: skip
    assert value(found, "hxp_errors_total", stack="t", where="deploy",
                 error_class="input") == 1  # fmt: skip


def test_interrupted_deploy_and_manual_rollback(tmp_path: Path) -> None:
    store = history(tmp_path)
    crashed = store.begin_deploy("t", "deploy", "h2")
    store.add_event("t", "rolled-back", "api: restored", "api", crashed)
    store.finish_deploy(crashed, "interrupted", {"reason": "the orchestrator stopped"})
    back = store.begin_deploy("t", "rollback", "h1")
    store.finish_deploy(back, "succeeded", {"changes": True, "units": {"api": {"seconds": 2}}})
    found = series(store_registry(tmp_path))
    assert value(found, "hxp_deploys_total", stack="t", kind="deploy", outcome="interrupted") == 1
    assert value(found, "hxp_rollbacks_total", stack="t", unit="api",
                 reason_class="interrupted") == 1  # fmt: skip
    assert value(found, "hxp_rollbacks_total", stack="t", unit="api", reason_class="manual") == 1
    assert value(found, "hxp_errors_total", stack="t", where="deploy",
                 error_class="transient") == 1  # fmt: skip


def test_running_deploy_counts_for_nothing_yet(tmp_path: Path) -> None:
    store = Store(tmp_path)
    store.begin_deploy("t", "deploy", None)
    record = store.deploys("t")[0]
    assert deploy_facts(record) is None
    found = series(store_registry(tmp_path))
    assert not [k for k in found if k[0] == "hxp_deploys_total"]


def test_health_comes_from_the_sweep_tables(tmp_path: Path) -> None:
    store = history(tmp_path)
    if not hasattr(store, "save_health"):
        pytest.skip("no health tables in this store")
    status = lambda v: SimpleNamespace(value=v)  # noqa: E731
    units = [
        SimpleNamespace(unit="api", status=status("degraded"), reason="slow", since=1.0),
        SimpleNamespace(unit="db", status=status("healthy"), reason="ok", since=1.0),
    ]
    store.save_health("t", [], units)
    found = series(store_registry(tmp_path))
    assert value(found, "hxp_unit_health", stack="t", unit="api", layer="composite") == 0.5
    assert value(found, "hxp_unit_health", stack="t", unit="db", layer="composite") == 1
    stale = telemetry.StoreCollector(tmp_path, health_max_age=-1)
    stale_registry = telemetry.CollectorRegistry(auto_describe=False)
    stale_registry.register(stale)
    found = series(stale_registry)
    assert value(found, "hxp_unit_health", stack="t", unit="db", layer="composite") == -1


def test_fleet_series_and_aggregation_runs(tmp_path: Path) -> None:
    store = Store(tmp_path)
    samples = [
        ["fleet:request_rate", [["model", "chat"], ["stack", "t"]], 6.5],
        ["fleet:ttft_seconds", [["model", ""], ["quantile", "0.95"], ["stack", "t"]], 0.2],
        ["fleet:my_series", [["model", ""], ["stack", "t"]], 3.0],
    ]
    bounds = telemetry.finite_bounds(telemetry.AGGREGATION_SECONDS)
    store.save_aggregation("t", {}, [], samples, 0.3, bounds, {"scrape|transient": 2})
    found = series(store_registry(tmp_path))
    assert value(found, "fleet:request_rate", stack="t", model="chat") == 6.5
    assert value(found, "fleet:ttft_seconds", stack="t", model="", quantile="0.95") == 0.2
    assert value(found, "fleet:my_series", stack="t", model="") == 3.0
    assert value(found, "hxp_metrics_aggregation_duration_seconds_count", stack="t") == 1
    assert value(found, "hxp_metrics_aggregation_duration_seconds_bucket", stack="t",
                 le="0.25") == 0  # fmt: skip
    assert value(found, "hxp_metrics_aggregation_duration_seconds_bucket", stack="t",
                 le="0.5") == 1  # fmt: skip
    assert value(found, "hxp_errors_total", stack="t", where="scrape", error_class="transient") == 2
    assert value(found, "hxp_metrics_aggregation_timestamp_seconds", stack="t") <= time.time()
    old = telemetry.CollectorRegistry(auto_describe=False)
    old.register(telemetry.StoreCollector(tmp_path, fleet_max_age=-1))
    assert not [k for k in series(old) if k[0].startswith("fleet:")]  # stale: not served
    text = generate_latest(store_registry(tmp_path)).decode()
    assert "vllm:" not in text


def test_record_deploy_counts_into_the_shared_registry(tmp_path: Path) -> None:
    store = history(tmp_path)
    before = REGISTRY.get_sample_value(
        "hxp_rollbacks_total", {"stack": "t", "unit": "api", "reason_class": "readiness"}
    )
    failed = store.deploys("t")[0]
    record_deploy(store, "t", failed.id)
    after = REGISTRY.get_sample_value(
        "hxp_rollbacks_total", {"stack": "t", "unit": "api", "reason_class": "readiness"}
    )
    assert (after or 0) == (before or 0) + 1
    assert (
        REGISTRY.get_sample_value(
            "hxp_unit_lifecycle_state", {"stack": "t", "unit": "api", "state": "rolled-back"}
        )
        == 1
    )


@pytest.fixture
def exporter(tmp_path: Path) -> Iterator[str]:
    history(tmp_path)
    server = make_exporter(tmp_path, 0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_exporter_serves_the_store_over_http(exporter: str, tmp_path: Path) -> None:
    first = httpx.get(exporter + "/metrics", timeout=5)
    assert first.status_code == 200
    assert 'hxp_deploys_total{kind="deploy",outcome="failed",stack="t"} 1.0' in first.text
    store = Store(tmp_path)  # a deploy finishes while the exporter runs: the next scrape has it
    deploy = store.begin_deploy("t", "deploy", "h1")
    store.finish_deploy(deploy, "succeeded", {"changes": False})
    second = httpx.get(exporter + "/metrics", timeout=5)
    assert 'hxp_deploys_total{kind="deploy",outcome="no-change",stack="t"} 2.0' in second.text


class _Gateway(BaseHTTPRequestHandler):
    seen: list[tuple[str, str, str]] = []

    def do_PUT(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"])).decode()
        _Gateway.seen.append(("PUT", self.path, body))
        self.send_response(200)
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


def test_push_puts_one_flow_group_per_stack(tmp_path: Path) -> None:
    history(tmp_path)
    server = HTTPServer(("127.0.0.1", 0), _Gateway)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        push_group(f"http://127.0.0.1:{server.server_address[1]}", tmp_path, "t", "deploy")
    finally:
        server.shutdown()
        server.server_close()
    method, path, body = _Gateway.seen[-1]
    assert (method, path) == ("PUT", "/metrics/job/hxp/flow/deploy/stack/t")
    assert "hxp_deploys_total" in body
    assert "hxp_unit_health" not in body  # the health sweep's group, not this one
    assert "fleet:" not in body
    with pytest.raises(ValueError, match="unknown flow group"):
        push_group("http://127.0.0.1:1", tmp_path, "t", "bogus")


def test_pushgateway_url() -> None:
    stack = Stack.model_validate({
        "stack": "t", "hosts": {"local": {}, "mon": {"backend": "systemd", "address": "10.0.0.9"}},
        "monitoring": {"pushgateway": {"host": "mon", "port": 9191}},
    })  # fmt: skip
    assert pushgateway_url(stack) == "http://10.0.0.9:9191"
    assert pushgateway_url(stack, "http://pg:9091/") == "http://pg:9091"
    bare = Stack.model_validate({"stack": "t", "hosts": {"local": {}}})
    assert pushgateway_url(bare) is None


def test_exporter_keeps_colons_when_prometheus_asks_for_openmetrics(
    exporter: str, tmp_path: Path
) -> None:
    store = Store(tmp_path)
    sample = ["fleet:request_rate", [["model", ""], ["stack", "t"]], 2.0]
    store.save_aggregation("t", {}, [], [sample], 0.1, [1.0], {})
    accept = (
        "application/openmetrics-text;version=1.0.0,application/openmetrics-text;"
        "version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1"
    )  # what Prometheus 2.42 sends
    response = httpx.get(exporter + "/metrics", headers={"Accept": accept}, timeout=5)
    assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
    assert 'fleet:request_rate{model="",stack="t"} 2.0' in response.text
