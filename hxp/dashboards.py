"""Grafana dashboards of a stack, built in code with grafana-foundation-sdk, plus provisioning.

Three kinds: a fleet overview, one vLLM dashboard per model (current vLLM metric names), and
the orchestrator's own metrics. Every query is data the query lint reads (hxp.querylint).
Needs the `monitoring` extra (`pip install 'hxp-orchestration[monitoring]'`). The files
(dashboard JSON, Grafana provisioning) are assembled by hxp.monitoring, which imports this
module, never the other way round.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from grafana_foundation_sdk.builders import dashboard as gd
from grafana_foundation_sdk.builders import prometheus, stat, timeseries
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models.dashboard import DataSourceRef, GridPos

from hxp.spec import Stack

RATE = "$__rate_interval"


@dataclass(frozen=True)
class Query:
    expr: str
    legend: str = ""


@dataclass(frozen=True)
class PanelSpec:
    title: str
    queries: tuple[Query, ...]
    unit: str = "short"
    kind: str = "timeseries"  # or "stat"
    width: int = 12
    description: str = ""


def datasource_uid(stack: Stack) -> str:
    return f"hxp-{stack.stack}"[:40]


def _sel(stack: Stack, **matchers: str) -> str:
    parts = [f"stack={json.dumps(stack.stack)}"] + [
        f"{k}={json.dumps(v)}" for k, v in matchers.items()
    ]
    return "{" + ", ".join(parts) + "}"


def fleet_panels(stack: Stack) -> list[PanelSpec]:
    s = _sel(stack)
    return [
        PanelSpec(
            "Units by lifecycle state",
            (Query(f"count by (state) (hxp_unit_lifecycle_state{s} == 1)", "{{state}}"),),
            kind="stat",
            width=8,
        ),
        PanelSpec(
            "Scrape targets up",
            (Query(f"sum by (unit) (up{s})", "{{unit}}"),),
            kind="stat",
            width=8,
        ),
        PanelSpec(
            "Firing alerts",
            (Query(f"count by (alertname) (ALERTS{_sel(stack, alertstate='firing')})", ""),),
            kind="stat",
            width=8,
        ),
        PanelSpec(
            "Unit health (1 healthy, 0.5 degraded, 0 unhealthy, -1 unknown)",
            (Query(f"min by (unit) (hxp_unit_health{s})", "{{unit}}"),),
            width=24,
        ),
        PanelSpec(
            "Deploys",
            (
                Query(
                    f"sum by (outcome) (increase(hxp_deploys_total{s}[{RATE}]))",
                    "{{outcome}}",
                ),
            ),
        ),
        PanelSpec(
            "Rollbacks",
            (
                Query(
                    f"sum by (unit, reason_class) (increase(hxp_rollbacks_total{s}[{RATE}]))",
                    "{{unit}} ({{reason_class}})",
                ),
            ),
        ),
        PanelSpec(
            "Fleet requests per second",
            (Query(f"stack:vllm_request_success:rate{s}", "requests/s"),),
            unit="reqps",
        ),
        PanelSpec(
            "Fleet generated tokens per second",
            (Query(f"stack:vllm_generation_tokens:rate{s}", "tokens/s"),),
        ),
    ]


def vllm_panels(stack: Stack, unit: str) -> list[PanelSpec]:
    u = _sel(stack, unit=unit)
    ok = u[:-1] + ', finished_reason=~"stop|length"}'

    def quantiles(metric: str) -> tuple[Query, ...]:
        return tuple(Query(f"unit:{metric}:{tag}{u}", tag) for tag in ("p50", "p95", "p99"))

    return [
        PanelSpec(
            "Requests per second by finish reason",
            (
                Query(
                    f"sum by (finished_reason) (rate(vllm:request_success_total{u}[{RATE}]))",
                    "{{finished_reason}}",
                ),
            ),
            unit="reqps",
        ),
        PanelSpec(
            "Tokens per second",
            (
                Query(f"sum(rate(vllm:prompt_tokens_total{u}[{RATE}]))", "prompt"),
                Query(f"sum(rate(vllm:generation_tokens_total{u}[{RATE}]))", "generation"),
            ),
        ),
        PanelSpec("Time to first token", quantiles("vllm_time_to_first_token_seconds"), "s"),
        PanelSpec("Inter-token latency", quantiles("vllm_inter_token_latency_seconds"), "s"),
        PanelSpec("End-to-end latency", quantiles("vllm_e2e_request_latency_seconds"), "s"),
        PanelSpec(
            "Queue",
            (
                Query(f"sum by (replica) (vllm:num_requests_running{u})", "{{replica}} running"),
                Query(f"sum by (replica) (vllm:num_requests_waiting{u})", "{{replica}} waiting"),
            ),
        ),
        PanelSpec(
            "KV-cache usage",
            (Query(f"max by (replica) (vllm:kv_cache_usage_perc{u})", "{{replica}}"),),
            unit="percentunit",
        ),
        PanelSpec(
            "Preemptions per second",
            (
                Query(
                    f"sum by (replica) (rate(vllm:num_preemptions_total{u}[{RATE}]))",
                    "{{replica}}",
                ),
            ),
        ),
        PanelSpec(
            "Success ratio",
            (
                Query(
                    f"sum(rate(vllm:request_success_total{ok}[{RATE}])) / "
                    f"sum(rate(vllm:request_success_total{u}[{RATE}]))",
                    "stop or length",
                ),
            ),
            unit="percentunit",
        ),
        PanelSpec(
            "Replicas up",
            (Query(f"sum(up{u})", "up"),),
            kind="stat",
        ),
    ]


def orchestrator_panels(stack: Stack) -> list[PanelSpec]:
    s = _sel(stack)

    def p95(metric: str, by: str) -> str:
        return f"histogram_quantile(0.95, sum by ({by}, le) (rate({metric}_bucket{s}[{RATE}])))"

    return [
        PanelSpec(
            "Deploy duration p95",
            (Query(p95("hxp_deploy_duration_seconds", "kind"), "{{kind}}"),),
            unit="s",
        ),
        PanelSpec(
            "Unit deploy duration p95",
            (Query(p95("hxp_unit_deploy_duration_seconds", "unit"), "{{unit}}"),),
            unit="s",
        ),
        PanelSpec(
            "Deploys by outcome (total)",
            (Query(f"sum by (kind, outcome) (hxp_deploys_total{s})", "{{kind}} {{outcome}}"),),
        ),
        PanelSpec(
            "Rollbacks by reason (total)",
            (Query(f"sum by (reason_class) (hxp_rollbacks_total{s})", "{{reason_class}}"),),
        ),
        PanelSpec(
            "Health sweep duration p95",
            (Query(p95("hxp_health_sweep_duration_seconds", "stack"), "sweep"),),
            unit="s",
        ),
        PanelSpec(
            "Metrics aggregation duration p95",
            (Query(p95("hxp_metrics_aggregation_duration_seconds", "stack"), "aggregation"),),
            unit="s",
        ),
        PanelSpec(
            "Errors by class",
            (
                Query(
                    f"sum by (where, error_class) (increase(hxp_errors_total{s}[{RATE}]))",
                    "{{where}} {{error_class}}",
                ),
            ),
        ),
        PanelSpec(
            "Lifecycle state",
            (Query(f"hxp_unit_lifecycle_state{s} == 1", "{{unit}}: {{state}}"),),
        ),
    ]


@dataclass(frozen=True)
class DashboardSpec:
    """`unit`: the model a vLLM dashboard shows (its queries are linted against the vLLM
    release that model is pinned at); None for the stack-wide dashboards."""

    uid: str
    title: str
    panels: tuple[PanelSpec, ...]
    tags: tuple[str, ...]
    unit: str | None = None


def dashboard_specs(stack: Stack) -> list[DashboardSpec]:
    """Every dashboard of the stack, as plain data (the lint and the builder both read it)."""
    tags = ("hxp", stack.stack)
    out = [
        DashboardSpec(
            f"hxp-{stack.stack}-fleet"[:40],
            f"{stack.stack}: fleet overview",
            tuple(fleet_panels(stack)),
            tags,
        ),
        DashboardSpec(
            f"hxp-{stack.stack}-orchestrator"[:40],
            f"{stack.stack}: orchestrator",
            tuple(orchestrator_panels(stack)),
            tags,
        ),
    ]
    for unit in sorted(stack.models):
        out.append(
            DashboardSpec(
                _model_uid(stack.stack, unit),
                f"{stack.stack}: vLLM {unit}",
                tuple(vllm_panels(stack, unit)),
                (*tags, "vllm"),
                unit,
            )
        )
    return out


def _model_uid(stack: str, unit: str) -> str:
    """Grafana uids are at most 40 characters: long names keep a hash to stay unique."""
    uid = f"hxp-{stack}-vllm-{unit}"
    if len(uid) <= 40:
        return uid
    import hashlib

    digest = hashlib.sha256(uid.encode()).hexdigest()[:8]
    return f"{uid[:31]}-{digest}"


def _grid(width: int, x: int, y: int) -> GridPos:
    return GridPos(h=8, w=width, x=x, y=y)


def _layout(panels: tuple[PanelSpec, ...]) -> Iterator[tuple[PanelSpec, GridPos]]:
    x = y = 0
    for p in panels:
        if x + p.width > 24:
            x, y = 0, y + 8
        yield p, _grid(p.width, x, y)
        x += p.width


def build_dashboard(spec: DashboardSpec, datasource: str) -> dict[str, Any]:
    """The dashboard JSON model (what Grafana's API and file provisioning read)."""
    ds = DataSourceRef(type_val="prometheus", uid=datasource)
    board = (
        gd.Dashboard(spec.title)
        .uid(spec.uid)
        .tags(list(spec.tags))
        .refresh("30s")
        .time("now-1h", "now")
        .timezone("browser")
        .editable()
    )
    for panel_id, (p, pos) in enumerate(_layout(spec.panels), start=1):
        panel: timeseries.Panel | stat.Panel = (
            stat.Panel() if p.kind == "stat" else timeseries.Panel()
        )
        panel.id(panel_id).title(p.title).datasource(ds).unit(p.unit).grid_pos(pos)
        if p.description:
            panel.description(p.description)
        for i, q in enumerate(p.queries):
            target = prometheus.Dataquery().expr(q.expr).ref_id(chr(ord("A") + i))
            if q.legend:
                target.legend_format(q.legend)
            panel.with_target(target.datasource(ds))
        board.with_panel(panel)
    encoded = JSONEncoder(sort_keys=True, indent=2).encode(board.build())
    doc: dict[str, Any] = json.loads(encoded)
    return doc


def dashboard_queries(dashboards: list[dict[str, Any]]) -> list[tuple[str, str]]:
    """(where, expression) of every target of every panel of dashboard JSON models."""
    out: list[tuple[str, str]] = []
    for board in dashboards:
        for panel in board.get("panels") or []:
            for target in panel.get("targets") or []:
                expr = target.get("expr")
                if isinstance(expr, str):
                    where = f"dashboard {board.get('uid')}: panel {panel.get('title')!r}"
                    out.append((f"{where} {target.get('refId', '')}".strip(), expr))
    return out


__all__ = [
    "DashboardSpec",
    "PanelSpec",
    "Query",
    "build_dashboard",
    "dashboard_queries",
    "dashboard_specs",
    "datasource_uid",
]
