"""Monitoring config from the stack: scrape jobs and labels, rules, Alertmanager routing and
secrets, the synthesized Prometheus/Alertmanager/Pushgateway units, dashboards, the render
target."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from hxp.config import load_config
from hxp.dashboards import dashboard_specs, datasource_uid
from hxp.errors import StackValidationError
from hxp.monitoring import (
    ALERTMANAGER_CONFIG,
    MonitoringPaths,
    alert_rules,
    alertmanager_config,
    config_files,
    monitoring_stack_data,
    prometheus_config,
    rule_files,
    secret_blocks,
)
from hxp.render import render_stack
from hxp.spec import Stack
from tests.support.render_data import stack_from_data

ROOT = Path(__file__).parents[2]
RULES_STACK = ROOT / "tests" / "data" / "monitoring" / "rules-stack.yaml"


def fleet() -> Stack:
    return load_config([ROOT / "examples" / "gpu-fleet" / "stack.yaml"], environ={}).stack


def rules_stack() -> Stack:
    return load_config([RULES_STACK], environ={}).stack


def _data(path: Path) -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load(path.read_text())
    return data


def jobs(stack: Stack) -> dict[str, dict[str, Any]]:
    return {j["job_name"]: j for j in prometheus_config(stack)["scrape_configs"]}


def test_a_job_per_model_service_with_metrics_port_and_component() -> None:
    got = jobs(rules_stack())
    assert list(got) == ["chat", "exporter", "hxp-prometheus", "hxp-alertmanager"]
    chat = got["chat"]["static_configs"]
    assert chat == [
        {
            "targets": ["127.0.0.2:8000"],
            "labels": {
                "host": "node-b",
                "kind": "model",
                "model": "org/chat",
                "replica": "chat",
                "stack": "rt",
                "unit": "chat",
            },
        }
    ]
    assert got["exporter"]["static_configs"][0]["targets"] == ["127.0.0.1:9400"]
    assert got["exporter"]["honor_labels"] is True  # it reports other units' stack/unit
    assert "honor_labels" not in got["chat"]


def test_replicas_remote_hosts_and_the_pushgateway() -> None:
    got = jobs(fleet())
    chat = got["chat"]["static_configs"]
    assert [c["targets"] for c in chat] == [["10.0.0.5:8000"], ["10.0.0.5:8001"]]
    assert [c["labels"]["replica"] for c in chat] == ["chat-0", "chat-1"]
    assert got["coder"]["static_configs"][0]["labels"]["host"] == "gpu-02"
    assert got["hxp-pushgateway"]["honor_labels"] is True
    # postgres, redis and the nginx gateway declare no `metrics` port: not scraped
    assert not {"postgres", "redis", "gateway"} & set(got)


def test_global_settings_rule_files_and_alertmanager() -> None:
    config = prometheus_config(fleet())
    assert config["global"] == {
        "scrape_interval": "15s",
        "scrape_timeout": "10s",
        "evaluation_interval": "15s",
        "external_labels": {"hxp_stack": "fleet"},
    }
    assert config["rule_files"] == ["rules/recording.yml", "rules/alerts.yml"]
    am = config["alerting"]["alertmanagers"][0]["static_configs"][0]["targets"]
    assert am == ["10.0.0.5:9093"]


def test_short_scrape_interval_shortens_the_timeout(tmp_path: Path) -> None:
    data = _data(RULES_STACK)
    data["monitoring"]["prometheus"]["scrape_interval"] = "500ms"
    config = prometheus_config(stack_from_data(data))
    assert config["global"]["scrape_timeout"] == "500ms"
    assert config["global"]["evaluation_interval"] == "500ms"


def test_blue_green_units_scrape_both_slots_as_one_replica() -> None:
    data = _data(RULES_STACK)
    data["gateway"] = {"host": "node-a", "routes": {"chat": 18000}}
    data["models"]["chat"]["host"] = "node-a"
    chat = jobs(stack_from_data(data))["chat"]["static_configs"]
    assert [c["targets"] for c in chat] == [["127.0.0.1:8000"], ["127.0.0.1:8001"]]
    assert {c["labels"]["replica"] for c in chat} == {"chat"}


def test_a_unit_cannot_take_a_monitoring_job_name() -> None:
    data = _data(RULES_STACK)
    data["services"]["hxp-prometheus"] = data["services"].pop("exporter")
    with pytest.raises(StackValidationError, match="reserved for a monitoring scrape job"):
        prometheus_config(stack_from_data(data))


def test_every_alert_has_severity_scope_and_runbook() -> None:
    for stack in (fleet(), rules_stack()):
        for group in rule_files(stack)["prometheus/rules/alerts.yml"]["groups"]:
            for rule in group["rules"]:
                assert rule["labels"]["severity"] in {"critical", "warning", "info"}, rule
                assert rule["labels"]["scope"] in {"unit", "host", "stack"}, rule
                assert rule["annotations"]["runbook_url"].startswith("docs/monitoring.md#")
                assert rule["annotations"]["summary"]


def test_runbook_anchors_exist_in_the_docs() -> None:
    doc = (ROOT / "docs" / "monitoring.md").read_text().lower()
    for rule in alert_rules(rules_stack()):
        anchor = rule.name.lower()
        assert f"### {anchor}" in doc, f"docs/monitoring.md has no runbook section for {rule.name}"


def test_slo_thresholds_come_from_the_stack() -> None:
    data = _data(RULES_STACK)
    data["monitoring"]["slo"] = {"ttft_p95": "750ms", "e2e_p99": "1m"}
    exprs = {r.name: r.expr for r in alert_rules(stack_from_data(data))}
    assert exprs["HxpVllmTtftSloBreach"].endswith("> 0.75")
    assert exprs["HxpVllmE2eSloBreach"].endswith("> 60")


def test_preemptions_alert_reads_the_total_counter() -> None:
    exprs = {r.name: r.expr for r in alert_rules(rules_stack())}
    assert "vllm:num_preemptions_total{" in exprs["HxpVllmPreemptions"]


def test_gpu_alert_only_where_gpus_are() -> None:
    assert "HxpGpuMemoryNearFull" in {r.name for r in alert_rules(fleet())}
    data = _data(RULES_STACK)
    data["hosts"]["node-b"].pop("gpus")
    assert "HxpGpuMemoryNearFull" not in {r.name for r in alert_rules(stack_from_data(data))}


def test_no_vllm_alerts_without_models() -> None:
    data = _data(RULES_STACK)
    del data["models"]
    names = {r.name for r in alert_rules(stack_from_data(data))}
    assert not {n for n in names if n.startswith("HxpVllm")}


def test_alertmanager_routes_by_stack_and_severity_with_inhibitions() -> None:
    config = alertmanager_config(fleet())
    route = config["route"]
    assert route["receiver"] == "hxp-default"
    assert route["routes"] == [
        {
            "receiver": "oncall",
            "matchers": ['stack="fleet"', 'severity=~"critical"'],
            "continue": True,
        },
        {
            "receiver": "ops-mail",
            "matchers": ['stack="fleet"', 'severity=~"warning"'],
            "continue": True,
        },
    ]
    host_down = config["inhibit_rules"][0]
    assert host_down == {
        "source_matchers": ['alertname="HxpHostDown"'],
        "target_matchers": ['scope="unit"'],
        "equal": ["stack", "host"],
    }
    receivers = {r["name"]: r for r in config["receivers"]}
    slack = receivers["oncall"]["slack_configs"][0]
    assert slack["api_url_file"] == "secrets/slack-webhook"
    assert slack["channel"] == "#llm-oncall"
    assert receivers["ops-mail"]["email_configs"][0]["to"] == "ops@example.com"


def test_secrets_go_to_files_or_a_0600_config() -> None:
    data = _data(RULES_STACK)
    data["monitoring"]["alertmanager"]["receivers"] = [
        {"name": "hook", "type": "webhook", "url": "http://127.0.0.1:1/x"},
        {"name": "pager", "type": "webhook", "secret_block": "pager-url"},
        {"name": "slack", "type": "slack", "secret_block": "slack-url", "channel": "#c"},
        {
            "name": "mail",
            "type": "email",
            "to": "a@example.com",
            "username": "bot",
            "secret_block": "smtp-password",
        },
    ]
    stack = stack_from_data(data)
    assert secret_blocks(stack) == {
        "pager-url": "inline",
        "slack-url": "file",
        "smtp-password": "file",
    }
    config = alertmanager_config(
        stack, "/state/am/secrets", {"pager-url": "https://pager.example/t0ken"}
    )
    receivers = {r["name"]: r for r in config["receivers"]}
    assert receivers["pager"]["webhook_configs"][0]["url"] == "https://pager.example/t0ken"
    assert receivers["slack"]["slack_configs"][0]["api_url_file"] == "/state/am/secrets/slack-url"
    mail = receivers["mail"]["email_configs"][0]
    assert mail["auth_password_file"] == "/state/am/secrets/smtp-password"
    assert mail["auth_username"] == "bot"
    files = {f.path: f for f in config_files(stack, "/s", {"pager-url": "https://p/t0ken"})}
    assert files[ALERTMANAGER_CONFIG].mode == 0o600
    # Rendered without the values (hxp render): no secret, a placeholder URL.
    rendered = {f.path: f for f in config_files(stack)}[ALERTMANAGER_CONFIG].content
    assert "t0ken" not in rendered
    assert "http://secret.invalid/pager-url" in rendered


def test_hostile_receiver_values_stay_yaml_strings() -> None:
    data = _data(RULES_STACK)
    hostile = '#x" ]} {{ .Foo }} - ; rm -rf /'
    data["monitoring"]["alertmanager"]["receivers"] = [
        {"name": "s", "type": "slack", "url": "http://127.0.0.1:1/x", "channel": hostile}
    ]
    stack = stack_from_data(data)
    text = {f.path: f for f in config_files(stack)}[ALERTMANAGER_CONFIG].content
    doc = yaml.safe_load(text)
    assert doc["receivers"][1]["slack_configs"][0]["channel"] == hostile


def test_monitoring_units_are_process_services_with_lifecycle(tmp_path: Path) -> None:
    stack = rules_stack()
    data = monitoring_stack_data(stack, MonitoringPaths("/state/monitoring/rt"))
    assert data["stack"] == "rt-monitoring"
    prom = data["services"]["prometheus"]
    assert prom["command"] == [
        "prometheus",
        "--config.file=/state/monitoring/rt/prometheus/prometheus.yml",
        "--web.listen-address=127.0.0.1:9090",
        "--storage.tsdb.path=/state/monitoring/rt/prometheus/data",
        "--storage.tsdb.retention.time=15d",
        "--web.enable-lifecycle",
    ]
    assert prom["health"]["http"]["url"] == "http://127.0.0.1:9090/-/ready"
    am = data["services"]["alertmanager"]["command"]
    assert "--cluster.listen-address=" in am
    stack_from_data(copy.deepcopy(data))  # a valid stack of its own


def test_monitoring_on_a_docker_or_remote_host_is_refused() -> None:
    with pytest.raises(StackValidationError, match="monitoring runs on a local process"):
        monitoring_stack_data(fleet(), MonitoringPaths("/s"))


def test_render_target_monitoring_writes_everything() -> None:
    files = {f.path: f for f in render_stack(fleet(), "monitoring")}
    assert sorted(files) == [
        "alertmanager/alertmanager.yml",
        "grafana/dashboards/hxp-fleet-fleet.json",
        "grafana/dashboards/hxp-fleet-orchestrator.json",
        "grafana/dashboards/hxp-fleet-vllm-chat.json",
        "grafana/dashboards/hxp-fleet-vllm-coder.json",
        "grafana/provisioning/dashboards/hxp.yaml",
        "grafana/provisioning/datasources/hxp.yaml",
        "prometheus/prometheus.yml",
        "prometheus/rules/alerts.yml",
        "prometheus/rules/recording.yml",
    ]
    for path, f in files.items():
        if path.endswith(".yml") or path.endswith(".yaml"):
            assert f.content.startswith("# Rendered by hxp "), path
    ds = yaml.safe_load(files["grafana/provisioning/datasources/hxp.yaml"].content)
    assert ds["datasources"][0]["uid"] == datasource_uid(fleet())
    assert ds["datasources"][0]["url"] == "http://10.0.0.5:9090"


def test_render_monitoring_needs_prometheus(hostile_stack: Stack) -> None:
    data = _data(RULES_STACK)
    del data["monitoring"]
    with pytest.raises(StackValidationError, match=r"monitoring\.prometheus"):
        render_stack(stack_from_data(data), "monitoring")


def test_dashboards_per_model_on_current_metric_names() -> None:
    specs = {d.uid: d for d in dashboard_specs(fleet())}
    assert set(specs) == {
        "hxp-fleet-fleet",
        "hxp-fleet-orchestrator",
        "hxp-fleet-vllm-chat",
        "hxp-fleet-vllm-coder",
    }
    exprs = " ".join(q.expr for p in specs["hxp-fleet-vllm-chat"].panels for q in p.queries)
    for name in (
        "vllm:kv_cache_usage_perc",
        "vllm:num_preemptions_total",
        "vllm:request_success_total",
        "unit:vllm_time_to_first_token_seconds:p95",
        "unit:vllm_inter_token_latency_seconds:p99",
        "unit:vllm_e2e_request_latency_seconds:p50",
        "vllm:num_requests_waiting",
    ):
        assert name in exprs
    assert "gpu_cache_usage_perc" not in exprs  # renamed in vLLM 0.10


def test_long_names_keep_grafana_uids_short_and_unique() -> None:
    data = _data(RULES_STACK)
    long = "m" * 60
    chat = data["models"]["chat"]
    data["models"] = {f"{long}{c}": dict(chat, port=8000 + i) for i, c in enumerate("ab")}
    uids = [d.uid for d in dashboard_specs(stack_from_data(data))]
    assert all(len(u) <= 40 for u in uids)
    assert len(set(uids)) == len(uids)


def test_dashboard_json_is_a_grafana_model() -> None:
    files = {f.path: f for f in render_stack(rules_stack(), "monitoring")}
    board = json.loads(files["grafana/dashboards/hxp-rt-vllm-chat.json"].content)
    assert board["uid"] == "hxp-rt-vllm-chat"
    assert board["schemaVersion"] >= 39
    panel = board["panels"][0]
    assert panel["datasource"] == {"type": "prometheus", "uid": "hxp-rt"}
    assert panel["targets"][0]["refId"] == "A"
    assert all(p["gridPos"]["w"] + p["gridPos"]["x"] <= 24 for p in board["panels"])


def test_a_replica_is_up_when_any_of_its_slots_is() -> None:
    from hxp.monitoring import replica_health

    up, down = replica_health(
        [
            ("chat", "chat-0", "up", ""),
            ("chat", "chat-0", "down", "connection refused"),  # the idle blue-green slot
            ("chat", "chat-1", "down", "connection refused"),
            ("chat", "chat-1", "unknown", ""),
            ("hxp-prometheus", "prometheus", "up", ""),
        ]
    )
    assert up == ["chat/chat-0", "hxp-prometheus/prometheus"]
    assert down == ["chat/chat-1: down (connection refused)"]
