"""Monitoring for the vLLM release each model is pinned at (issue 16 items 5 and 6): rules and
dashboards rendered for models at 0.10.1, 0.11.0, 0.16.0 and 0.34.0 lint clean against the
expositions of those releases; the old rendering (inter-token latency read only under its
0.11+ name) does not at 0.10.1; vLLM scrape jobs rename OpenMetrics-escaped samples back."""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from hxp import metric_names
from hxp.monitoring import (
    VLLM_SCRAPE_FIXES,
    histogram_names,
    lint_files,
    monitoring_files,
    prometheus_config,
    recording_rules,
)
from hxp.querylint import exposition_series, lint_queries, stack_sources, vllm_source
from hxp.spec import Stack
from tests.support.metric_fixtures import VERSIONS, render_fixture
from tests.support.render_data import stack_from_data

ROOT = Path(__file__).parents[2]
FIXTURES = ROOT / "hxp" / "data" / "metrics"
RULES_STACK = ROOT / "tests" / "data" / "monitoring" / "rules-stack.yaml"
OLD_ITL_RULE = (
    "histogram_quantile(0.5, sum by (stack, unit, le) (rate(vllm:inter_token_latency_seconds_bucket"
    '{stack="rt"}[5m])))'
)


def stack_at(*versions: str) -> Stack:
    data: dict[str, Any] = yaml.safe_load(RULES_STACK.read_text())
    model = data["models"].pop("chat")
    for i, version in enumerate(versions):
        pinned = copy.deepcopy(model)
        pinned["port"] = 8000 + i
        pinned["vllm"] = {"version": version}
        data["models"][f"chat{i}"] = pinned
    return stack_from_data(data)


@pytest.mark.parametrize("version", VERSIONS)
def test_the_fixture_is_the_simulator_imitating_the_release(version: str) -> None:
    text = (FIXTURES / f"vllm-{version}.prom").read_text()
    assert text == render_fixture(version), "regenerate: see tests/support/metric_fixtures.py"
    served = {n for n in exposition_series(text) if n.startswith("vllm:")}
    assert served == metric_names.vllm_series(version, lazy=True)


@pytest.mark.parametrize("version", VERSIONS)
def test_monitoring_for_a_pinned_release_lints_clean_against_its_fixture(version: str) -> None:
    stack = stack_at(version)
    assert vllm_source(version).name == f"fixture vllm-{version}.prom"
    assert lint_files(stack, monitoring_files(stack)) == []
    itl = [r.expr for r in recording_rules(stack) if r.record.startswith("unit:vllm_inter")]
    assert len(itl) == 3
    assert all(metric_names.name_at(metric_names.ITL, version) in e for e in itl)


def test_the_inter_token_rules_read_the_old_name_below_0_11() -> None:
    assert histogram_names(stack_at("0.10.1"), metric_names.ITL) == [
        "vllm:time_per_output_token_seconds"
    ]
    # What the rules read before: nothing at 0.10.1 serves it.
    (problem,) = lint_queries([("old", OLD_ITL_RULE)], stack_sources(["0.10.1"]))
    assert "'vllm:inter_token_latency_seconds_bucket' is served by none of" in problem
    assert "fixture vllm-0.10.1.prom" in problem
    assert lint_queries([("old", OLD_ITL_RULE)], stack_sources(["0.11.0"])) == []


def test_a_stack_mixing_releases_reads_both_names_newest_first() -> None:
    stack = stack_at("0.34.0", "0.10.1")
    assert histogram_names(stack, metric_names.ITL) == [
        "vllm:inter_token_latency_seconds",
        "vllm:time_per_output_token_seconds",
    ]
    (p50,) = [r.expr for r in recording_rules(stack) if r.record.endswith("latency_seconds:p50")
              and "inter" in r.record]  # fmt: skip
    assert re.fullmatch(
        r"histogram_quantile\(0\.5, sum by \(stack, unit, le\) \(rate\("
        r"vllm:inter_token_latency_seconds_bucket\{stack=\"rt\"\}\[5m\]\)\) or "
        r"sum by \(stack, unit, le\) \(rate\(vllm:time_per_output_token_seconds_bucket"
        r"\{stack=\"rt\"\}\[5m\]\)\)\)",
        p50,
    ), p50
    assert lint_files(stack, monitoring_files(stack)) == []


def test_a_model_dashboard_is_linted_against_its_own_release() -> None:
    """A panel of the 0.10.1 model that read a 0.11+ name fails, though a 0.34 model of the
    same stack serves that name."""
    stack = stack_at("0.34.0", "0.10.1")
    files = []
    for f in monitoring_files(stack):
        if f.path.endswith("vllm-chat1.json"):
            f = type(f)(f.path, f.content.replace("vllm:kv_cache_usage_perc",
                                                  "vllm:engine_sleep_state"), f.mode)  # fmt: skip
        files.append(f)
    (problem,) = lint_files(stack, files)
    assert "dashboard hxp-rt-vllm-chat1" in problem
    assert "'vllm:engine_sleep_state' is served by none of: fixture vllm-0.10.1.prom" in problem


def test_vllm_scrape_jobs_rename_escaped_samples_back() -> None:
    stack = stack_at("0.10.1")
    jobs = {j["job_name"]: j for j in prometheus_config(stack)["scrape_configs"]}
    assert jobs["chat0"]["metric_relabel_configs"] == VLLM_SCRAPE_FIXES["metric_relabel_configs"]
    assert "scrape_protocols" not in jobs["chat0"]  # Prometheus 2.42 rejects the field
    for name in ("exporter", "hxp-prometheus", "hxp-alertmanager"):
        assert "metric_relabel_configs" not in jobs[name]
    (rule,) = VLLM_SCRAPE_FIXES["metric_relabel_configs"]
    escaped = "vllm_time_per_output_token_seconds_bucket"
    go_regex = "^(?:" + rule["regex"] + ")$"
    renamed = re.sub(go_regex, rule["replacement"].replace("$1", r"\1"), escaped)
    assert renamed == "vllm:time_per_output_token_seconds_bucket"
    assert re.fullmatch(go_regex, "vllm:num_requests_running") is None
