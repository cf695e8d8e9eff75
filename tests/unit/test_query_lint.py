"""Query lint: every series a rule or dashboard reads is served by the simulator, the hxp
exporter, a recorded fixture, Prometheus itself or a recording rule; a broken name fails."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from hxp.config import load_config
from hxp.dashboards import dashboard_queries
from hxp.errors import QueryLintError
from hxp.monitoring import (
    MonitoringFile,
    lint_files,
    monitoring_files,
    recorded_series,
    rule_expressions,
)
from hxp.querylint import (
    MetricSource,
    default_sources,
    exporter_source,
    exposition_series,
    fixture_sources,
    lint_queries,
)
from hxp.render import render_stack
from hxp.spec import Stack

ROOT = Path(__file__).parents[2]
STACKS = [
    ROOT / "examples" / "gpu-fleet" / "stack.yaml",
    ROOT / "tests" / "data" / "monitoring" / "rules-stack.yaml",
]


def load(path: Path) -> Stack:
    return load_config([path], environ={}).stack


@pytest.mark.parametrize("path", STACKS, ids=lambda p: p.parent.name)
def test_rules_and_dashboards_name_only_served_series(path: Path) -> None:
    stack = load(path)
    assert lint_files(stack, monitoring_files(stack)) == []


def _break_dashboard(files: list[MonitoringFile], old: str, new: str) -> list[MonitoringFile]:
    out = []
    for f in files:
        if f.path.endswith("vllm-chat.json"):
            assert old in f.content
            f = MonitoringFile(f.path, f.content.replace(old, new), f.mode)
        out.append(f)
    return out


def test_a_broken_metric_name_in_a_dashboard_fails_the_lint() -> None:
    stack = load(STACKS[1])
    files = _break_dashboard(
        monitoring_files(stack), "vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc"
    )
    problems = lint_files(stack, files)
    assert len(problems) == 1
    assert "dashboard hxp-rt-vllm-chat: panel 'KV-cache usage' A" in problems[0]
    assert "'vllm:gpu_cache_usage_perc' is served by none of" in problems[0]


def test_a_counter_without_total_is_named_with_a_hint() -> None:
    stack = load(STACKS[1])
    files = _break_dashboard(
        monitoring_files(stack), "vllm:num_preemptions_total", "vllm:num_preemptions"
    )
    (problem,) = lint_files(stack, files)
    assert "did you mean 'vllm:num_preemptions_total'?" in problem


def test_render_fails_when_the_lint_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    """`hxp render --target monitoring` runs the lint: a rule naming a missing series fails."""
    import hxp.monitoring as monitoring

    real = monitoring.recording_rules

    def broken(stack: Stack) -> list[monitoring.RecordingRule]:
        rules = real(stack)
        return [*rules, monitoring.RecordingRule("unit:typo:rate", "rate(vllm:prompt_tokenz[5m])")]

    monkeypatch.setattr(monitoring, "recording_rules", broken)
    with pytest.raises(QueryLintError, match="'vllm:prompt_tokenz' is served by none of"):
        render_stack(load(STACKS[1]), "monitoring")


def test_recorded_series_count_as_served() -> None:
    stack = load(STACKS[1])
    queries = [("q", "unit:vllm_time_to_first_token_seconds:p95 > 1")]
    assert lint_queries(queries, [], recorded_series(stack)) == []
    (problem,) = lint_queries(queries, [], set())
    assert "unit:vllm_time_to_first_token_seconds:p95" in problem


def test_unparsable_expression_is_a_problem() -> None:
    (problem,) = lint_queries([("dash x", "sum(rate(up[5m])")], [MetricSource("s", frozenset())])
    assert problem.startswith("dash x: unclosed '('")


def test_exporter_source_has_counter_and_histogram_suffixes() -> None:
    series = exporter_source().series
    assert {"hxp_deploys_total", "hxp_rollbacks_total", "hxp_unit_health"} <= series
    assert "hxp_deploy_duration_seconds_bucket" in series
    assert "hxp_deploys" not in series


def test_fixtures_are_recorded_expositions() -> None:
    by_name = {s.name: s.series for s in fixture_sources()}
    vllm = by_name["fixture vllm-0.11.0.prom"]
    assert {"vllm:num_preemptions_total", "vllm:kv_cache_usage_perc"} <= vllm
    assert "vllm:time_to_first_token_seconds_bucket" in vllm
    assert "DCGM_FI_DEV_FB_USED" in by_name["fixture dcgm-exporter.prom"]


def test_exposition_series_from_help_and_type_only() -> None:
    text = "# HELP a_x x\n# TYPE a_x counter\n# HELP h y\n# TYPE h histogram\n"
    assert exposition_series(text) >= {"a_x_total", "h_bucket", "h_count", "h_sum"}


def test_every_query_is_linted() -> None:
    """The lint sees every rule expression and every dashboard target."""
    stack = load(STACKS[0])
    files = monitoring_files(stack)
    boards = [json.loads(f.content) for f in files if f.path.endswith(".json")]
    targets = sum(len(p["targets"]) for b in boards for p in b["panels"])
    assert len(dashboard_queries(boards)) == targets
    assert len(rule_expressions(stack)) > 20
    assert {s.name for s in default_sources()} >= {
        "vLLM simulator /metrics",
        "hxp exporter /metrics",
    }
