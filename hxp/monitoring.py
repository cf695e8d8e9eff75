"""Monitoring of a stack, decided purely: Prometheus scrape config, recording and alert rules,
Alertmanager routing, and the Prometheus/Alertmanager/Pushgateway units that run them.

Everything here turns a `Stack` into data (dicts written as YAML, `ServiceSpec`s deployed like
any unit); hxp.io.monitoring checks it with promtool/amtool and talks to the running servers.

Labels every scrape target carries: `stack`, `unit`, `host`, `replica` (the instance name
without its blue-green slot), `kind` (model, service, monitoring) and, for models, `model` (the
model id). A service is scraped when it declares a port named `metrics`; a model always is
(vLLM serves /metrics on its API port).
"""

from __future__ import annotations

import copy
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import yaml

from hxp import __version__
from hxp.endpoints import host_address as host_address  # re-exported: its old home
from hxp.endpoints import netloc
from hxp.errors import Issue, StackValidationError
from hxp.metric_names import (
    E2E,
    ITL,
    RUNNING,
    TTFT,
    VLLM_REFERENCE_VERSION,
    name_at,
    version_key,
)
from hxp.spec import (
    AlertmanagerSpec,
    ModelSpec,
    MonitoringSpec,
    PrometheusSpec,
    ReceiverSpec,
    Stack,
    format_duration,
)
from hxp.units import UnitInstance, all_slots

GENERATOR = "hxp.monitoring"
GENERATOR_VERSION = 1
METRICS_PORT = "metrics"
RUNBOOK_BASE = "docs/monitoring.md#"

# Files under the monitoring directory (render output and STATE/monitoring/<stack>/).
PROMETHEUS_CONFIG = "prometheus/prometheus.yml"
RECORDING_RULES = "prometheus/rules/recording.yml"
ALERT_RULES = "prometheus/rules/alerts.yml"
ALERTMANAGER_CONFIG = "alertmanager/alertmanager.yml"
ALERTMANAGER_SECRETS = "alertmanager/secrets"
DASHBOARDS_DIR = "grafana/dashboards"
GRAFANA_DATASOURCE = "grafana/provisioning/datasources/hxp.yaml"
GRAFANA_PROVIDER = "grafana/provisioning/dashboards/hxp.yaml"

Component = Literal["prometheus", "alertmanager", "pushgateway"]
COMPONENTS: tuple[Component, ...] = ("prometheus", "alertmanager", "pushgateway")
SELF_JOBS = {c: f"hxp-{c}" for c in COMPONENTS}
# The metric every replica of a model serves from the first scrape on: absent means broken.
MODEL_PRESENCE_METRIC = RUNNING

#: Settings of every scrape job of vLLM targets. vLLM's /metrics negotiates the format from the
#: Accept header (prometheus_client's make_asgi_app). Prometheus 2.42 (Debian's, the one run
#: here) asks for OpenMetrics 1.0.0 first without `escaping=allow-utf-8`, and prometheus-client
#: >= 0.22 then escapes every sample name: `vllm:num_requests_running` is stored as
#: `vllm_num_requests_running`, and no rule or dashboard finds it. `scrape_protocols` would pin
#: the text format, but only Prometheus >= 2.49 knows the field (2.42 rejects the whole config:
#: "field scrape_protocols not found"); renaming the samples back works on every version, and
#: is a no-op where the colon arrives intact (text format, or Prometheus 3's allow-utf-8).
VLLM_SCRAPE_FIXES: dict[str, Any] = {
    "metric_relabel_configs": [
        {
            "source_labels": ["__name__"],
            "regex": "vllm_(.+)",
            "target_label": "__name__",
            "replacement": "vllm:$1",
        }
    ]
}


# --------------------------------------------------------------------------- scrape targets


@dataclass(frozen=True)
class ScrapeTarget:
    address: str
    labels: Mapping[str, str]


@dataclass(frozen=True)
class ScrapeJob:
    """One Prometheus scrape job: a unit of the stack, or a monitoring component."""

    name: str
    kind: Literal["model", "service", "monitoring"]
    unit: str
    targets: tuple[ScrapeTarget, ...]
    honor_labels: bool = False
    presence_metric: str | None = None


def _unit_labels(stack: Stack, inst: UnitInstance) -> dict[str, str]:
    labels = {
        "stack": stack.stack,
        "unit": inst.unit,
        "host": inst.host,
        "replica": inst.base_name,
        "kind": inst.kind,
    }
    if isinstance(inst.spec, ModelSpec):
        labels["model"] = inst.spec.model
    return labels


def scrape_jobs(stack: Stack) -> list[ScrapeJob]:
    """Every scrape job of the stack, in a stable order."""
    jobs: list[ScrapeJob] = []
    for name in sorted(stack.models):
        targets = tuple(
            ScrapeTarget(
                netloc(host_address(stack, i.host), dict(i.ports)["http"]), _unit_labels(stack, i)
            )
            for i in all_slots(stack, name)
        )
        jobs.append(ScrapeJob(name, "model", name, targets, presence_metric=MODEL_PRESENCE_METRIC))
    for name, svc in sorted(stack.services.items()):
        if METRICS_PORT not in svc.ports:
            continue
        targets = tuple(
            ScrapeTarget(
                netloc(host_address(stack, i.host), dict(i.ports)[METRICS_PORT]),
                _unit_labels(stack, i),
            )
            for i in all_slots(stack, name)
        )
        # An exporter (e.g. `hxp exporter`) reports on other units: its own stack/unit labels
        # win over the target's, as for the Pushgateway.
        jobs.append(ScrapeJob(name, "service", name, targets, honor_labels=True))
    mon = stack.monitoring
    if mon is not None:
        for component in COMPONENTS:
            spec = getattr(mon, component)
            if spec is None:
                continue
            labels = {
                "stack": stack.stack,
                "unit": component,
                "host": spec.host,
                "replica": component,
                "kind": "monitoring",
            }
            target = ScrapeTarget(netloc(host_address(stack, spec.host), spec.port), labels)
            jobs.append(
                ScrapeJob(
                    SELF_JOBS[component],
                    "monitoring",
                    component,
                    (target,),
                    honor_labels=component == "pushgateway",
                )
            )
    clash = sorted({j.name for j in jobs if j.kind != "monitoring"} & set(SELF_JOBS.values()))
    if clash:
        raise StackValidationError(
            [Issue(f"unit name {c!r} is reserved for a monitoring scrape job", c) for c in clash]
        )
    return jobs


# --------------------------------------------------------------------------- Prometheus config


def _monitoring(stack: Stack) -> MonitoringSpec:
    if stack.monitoring is None or stack.monitoring.prometheus is None:
        raise StackValidationError(
            [Issue("required to render or deploy monitoring", "monitoring.prometheus")]
        )
    return stack.monitoring


def _prometheus(stack: Stack) -> PrometheusSpec:
    prom = _monitoring(stack).prometheus
    assert prom is not None
    return prom


def evaluation_interval(prom: PrometheusSpec) -> float:
    return prom.evaluation_interval or prom.scrape_interval


def prometheus_config(stack: Stack) -> dict[str, Any]:
    """prometheus.yml: global intervals, rule files (relative to it), Alertmanager, jobs."""
    mon = _monitoring(stack)
    prom = _prometheus(stack)
    interval = format_duration(prom.scrape_interval)
    config: dict[str, Any] = {
        "global": {
            "scrape_interval": interval,
            "scrape_timeout": format_duration(min(prom.scrape_interval, 10.0)),
            "evaluation_interval": format_duration(evaluation_interval(prom)),
            "external_labels": {"hxp_stack": stack.stack},
        },
        "rule_files": [
            RECORDING_RULES.removeprefix("prometheus/"),
            ALERT_RULES.removeprefix("prometheus/"),
        ],
    }
    if mon.alertmanager is not None:
        am = mon.alertmanager
        config["alerting"] = {
            "alertmanagers": [
                {"static_configs": [{"targets": [netloc(host_address(stack, am.host), am.port)]}]}
            ]
        }
    scrape: list[dict[str, Any]] = []
    for job in scrape_jobs(stack):
        entry: dict[str, Any] = {"job_name": job.name, "metrics_path": "/metrics"}
        if job.honor_labels:
            entry["honor_labels"] = True
        if job.kind == "model":
            entry.update(copy.deepcopy(VLLM_SCRAPE_FIXES))
        entry["static_configs"] = [
            {"targets": [t.address], "labels": dict(sorted(t.labels.items()))} for t in job.targets
        ]
        scrape.append(entry)
    config["scrape_configs"] = scrape
    return config


# --------------------------------------------------------------------------- rules


@dataclass(frozen=True)
class AlertRule:
    """One alerting rule; `scope` says what inhibits it (a host down silences unit alerts)."""

    name: str
    expr: str
    severity: Literal["critical", "warning", "info"]
    scope: Literal["unit", "host", "stack"]
    summary: str
    description: str
    for_seconds: float = 0.0
    extra_labels: Mapping[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        rule: dict[str, Any] = {"alert": self.name, "expr": self.expr}
        if self.for_seconds:
            rule["for"] = format_duration(self.for_seconds)
        rule["labels"] = {
            "severity": self.severity,
            "scope": self.scope,
            **dict(sorted(self.extra_labels.items())),
        }
        rule["annotations"] = {
            "summary": self.summary,
            "description": self.description,
            "runbook_url": RUNBOOK_BASE + self.name.lower(),
        }
        return rule


@dataclass(frozen=True)
class RecordingRule:
    record: str
    expr: str

    def to_dict(self) -> dict[str, Any]:
        return {"record": self.record, "expr": self.expr}


def _sel(stack: Stack, **matchers: str) -> str:
    """A label selector body: `stack="S"` plus the given equality matchers (values JSON-quoted)."""
    parts = [f"stack={json.dumps(stack.stack)}"]
    parts += [f"{k}={json.dumps(v)}" for k, v in matchers.items()]
    return "{" + ", ".join(parts) + "}"


def _number(value: float) -> str:
    return repr(float(value)) if value != int(value) else str(int(value))


# Recorded per unit (`unit:` level) and per stack (`stack:` level), named
# level:metric:operation as Prometheus recommends; dashboards and SLO alerts read these.
def recording_rules(stack: Stack) -> list[RecordingRule]:
    window = format_duration(_monitoring(stack).alerts.window)
    s = _sel(stack)
    by_unit = "sum by (stack, unit)"

    def rate(metric: str) -> str:
        return f"{by_unit} (rate({metric}{s}[{window}]))"

    def quantile(q: str, metric: str) -> str:
        # The histogram under each name the stack's pinned vLLM releases expose it by; with
        # several (a stack mixing releases), `or` takes the first for a unit that has both.
        names = histogram_names(stack, metric)
        parts = " or ".join(
            f"sum by (stack, unit, le) (rate({name}_bucket{s}[{window}]))" for name in names
        )
        return f"histogram_quantile({q}, {parts})"

    rules = [
        RecordingRule("unit:vllm_request_success:rate", rate("vllm:request_success_total")),
        RecordingRule("unit:vllm_prompt_tokens:rate", rate("vllm:prompt_tokens_total")),
        RecordingRule("unit:vllm_generation_tokens:rate", rate("vllm:generation_tokens_total")),
        RecordingRule("unit:vllm_num_preemptions:rate", rate("vllm:num_preemptions_total")),
        RecordingRule(
            "unit:vllm_num_requests_waiting:sum", f"{by_unit} (vllm:num_requests_waiting{s})"
        ),
        RecordingRule(
            "unit:vllm_num_requests_running:sum", f"{by_unit} (vllm:num_requests_running{s})"
        ),
        RecordingRule(
            "unit:vllm_kv_cache_usage_perc:max",
            f"max by (stack, unit) (vllm:kv_cache_usage_perc{s})",
        ),
    ]
    for q, tag in (("0.5", "p50"), ("0.95", "p95"), ("0.99", "p99")):
        rules.append(
            RecordingRule(
                f"unit:vllm_time_to_first_token_seconds:{tag}",
                quantile(q, TTFT),
            )
        )
        rules.append(
            RecordingRule(
                f"unit:vllm_inter_token_latency_seconds:{tag}",
                quantile(q, ITL),
            )
        )
        rules.append(
            RecordingRule(
                f"unit:vllm_e2e_request_latency_seconds:{tag}",
                quantile(q, E2E),
            )
        )
    rules += [
        RecordingRule(
            "stack:vllm_request_success:rate",
            f"sum by (stack) (rate(vllm:request_success_total{s}[{window}]))",
        ),
        RecordingRule(
            "stack:vllm_generation_tokens:rate",
            f"sum by (stack) (rate(vllm:generation_tokens_total{s}[{window}]))",
        ),
        RecordingRule("stack:up:ratio", f"avg by (stack) (up{s})"),
    ]
    return rules


def vllm_versions(stack: Stack) -> list[str]:
    """The vLLM releases the stack's models are pinned at (the simulator imitates its model's),
    oldest first; the reference release for a stack without models."""
    pinned = {m.vllm.version for m in stack.models.values()}
    return sorted(pinned, key=version_key) or [VLLM_REFERENCE_VERSION]


def histogram_names(stack: Stack, name: str) -> list[str]:
    """The names vLLM family `name` has at the stack's pinned releases, newest name first
    (`vllm:inter_token_latency_seconds` is `vllm:time_per_output_token_seconds` before 0.11)."""
    found = {name_at(name, v): version_key(v) for v in reversed(vllm_versions(stack))}
    return sorted(found, key=lambda n: found[n], reverse=True)


def has_gpus(stack: Stack) -> bool:
    """GPU memory alerts are generated for stacks that run real GPUs."""
    if any(h.gpus for h in stack.hosts.values()):
        return True
    return any(m.engine == "vllm" for m in stack.models.values())


def unit_down_for(stack: Stack) -> float:
    """HxpUnitDown's `for`: `alerts.down_for` plus one scrape interval and two evaluations.
    When a host dies, its targets fail their scrapes up to one scrape interval apart, and
    HxpHostDown (every target down, `for` down_for) can start firing only after the last of
    them, up to an evaluation later still; with the margin it fires first, so the unit alerts
    of that host reach Alertmanager already inhibited, however short `group_wait` is."""
    prom = _prometheus(stack)
    return _monitoring(stack).alerts.down_for + prom.scrape_interval + 2 * evaluation_interval(prom)


def alert_rules(stack: Stack) -> list[AlertRule]:
    """Every alert of the stack, each with a severity, a scope and a runbook."""
    mon = _monitoring(stack)
    a, slo = mon.alerts, mon.slo
    s = _sel(stack)
    window = format_duration(a.window)
    down, sat = a.down_for, a.saturation_for
    rules = [
        AlertRule(
            "HxpUnitDown",
            f"max by (stack, job, unit, host, replica, kind) (up{s}) == 0",
            "critical",
            "unit",
            "{{ $labels.replica }} of {{ $labels.stack }} is down",
            "Prometheus cannot scrape {{ $labels.replica }} (unit {{ $labels.unit }}) on host "
            "{{ $labels.host }}: no slot of the replica answers on /metrics.",
            unit_down_for(stack),
        ),
        AlertRule(
            "HxpHostDown",
            f"max by (stack, host) (up{s}) == 0",
            "critical",
            "host",
            "host {{ $labels.host }} of {{ $labels.stack }} is down",
            "No scrape target on host {{ $labels.host }} answers; its unit alerts are inhibited.",
            down,
        ),
    ]
    for job in scrape_jobs(stack):
        labels = {"unit": job.unit, "job": job.name}
        if len({t.labels["host"] for t in job.targets}) == 1:
            labels["host"] = job.targets[0].labels["host"]
        rules.append(
            AlertRule(
                "HxpScrapeJobMissing",
                f"absent(up{_sel(stack, job=job.name)})",
                "critical",
                "stack",
                f"scrape job {job.name} of {{{{ $labels.stack }}}} is missing",
                f"Prometheus has no target for job {job.name}: its scrape config is broken.",
                down,
                labels,
            )
        )
        if job.presence_metric:
            sel = _sel(stack, job=job.name)
            rules.append(
                AlertRule(
                    "HxpMetricsAbsent",
                    f"absent({job.presence_metric}{sel}) and on () (max(up{sel}) == 1)",
                    "warning",
                    "unit",
                    f"{job.name} answers but serves no {job.presence_metric}",
                    f"The targets of job {job.name} are up, but {job.presence_metric} is "
                    "missing: a wrong metrics path, a renamed metric or a broken exporter.",
                    down,
                    labels,
                )
            )
    rules.append(
        AlertRule(
            "HxpUnitUnhealthy",
            f"min by (stack, unit, layer) (hxp_unit_health{s}) == 0",
            "warning",
            "unit",
            "{{ $labels.unit }} of {{ $labels.stack }} is unhealthy ({{ $labels.layer }})",
            "The health sweep reports {{ $labels.unit }} unhealthy at layer {{ $labels.layer }}.",
            down,
        )
    )
    for name, metric, by, what in (
        ("HxpDeployFailed", "hxp_deploys_total", "kind", "a deploy failed"),
        ("HxpRollback", "hxp_rollbacks_total", "unit, reason_class", "a unit was rolled back"),
    ):
        sel = _sel(stack, outcome="failed") if metric == "hxp_deploys_total" else s
        # A series born at its first increment has no earlier sample for increase(): count it
        # when it did not exist one window ago.
        expr = (
            f"sum by (stack, {by}) (increase({metric}{sel}[{window}])) > 0 "
            f"or sum by (stack, {by}) ({metric}{sel} unless {metric}{sel} offset {window}) > 0"
        )
        rules.append(
            AlertRule(
                name,
                expr,
                "warning",
                "stack",
                f"{what} in {{{{ $labels.stack }}}}",
                f"hxp recorded that {what} within the last {window} "
                "(see `hxp history` and the flow run's artifacts).",
            )
        )
    models = bool(stack.models)
    if models:
        rules += [
            AlertRule(
                "HxpVllmQueueSaturated",
                f"vllm:num_requests_waiting{s} > {_number(a.queue_waiting)}",
                "warning",
                "unit",
                "{{ $labels.replica }}: {{ $value }} requests waiting",
                "The replica's queue stayed above "
                f"{_number(a.queue_waiting)} waiting requests: add replicas or shed load.",
                sat,
            ),
            AlertRule(
                "HxpVllmKvCacheNearFull",
                f"vllm:kv_cache_usage_perc{s} > {_number(a.kv_cache_usage)}",
                "warning",
                "unit",
                "{{ $labels.replica }}: KV cache {{ $value | humanizePercentage }} full",
                f"KV-cache usage stayed above {_number(a.kv_cache_usage)}: requests will queue "
                "and be preempted.",
                sat,
            ),
            AlertRule(
                "HxpVllmTtftSloBreach",
                f"unit:vllm_time_to_first_token_seconds:p95{s} > {_number(slo.ttft_p95)}",
                "warning",
                "unit",
                "{{ $labels.unit }}: TTFT p95 {{ $value | humanizeDuration }} over the SLO",
                f"Time to first token p95 over {window} is above the SLO of "
                f"{format_duration(slo.ttft_p95)}.",
                sat,
            ),
            AlertRule(
                "HxpVllmE2eSloBreach",
                f"unit:vllm_e2e_request_latency_seconds:p99{s} > {_number(slo.e2e_p99)}",
                "warning",
                "unit",
                "{{ $labels.unit }}: e2e latency p99 {{ $value | humanizeDuration }} over the SLO",
                f"End-to-end request latency p99 over {window} is above the SLO of "
                f"{format_duration(slo.e2e_p99)}.",
                sat,
            ),
            AlertRule(
                "HxpVllmPreemptions",
                f"increase(vllm:num_preemptions_total{s}[{window}]) > {_number(a.preemptions)}",
                "warning",
                "unit",
                "{{ $labels.replica }} preempts requests",
                f"More than {_number(a.preemptions)} preemptions in {window}: the KV cache is "
                "too small for the load (lower max_num_seqs or add GPU memory).",
            ),
        ]
    if has_gpus(stack):
        used, free = f"DCGM_FI_DEV_FB_USED{s}", f"DCGM_FI_DEV_FB_FREE{s}"
        rules.append(
            AlertRule(
                "HxpGpuMemoryNearFull",
                f"{used} / ({used} + {free}) > {_number(a.gpu_memory_usage)}",
                "warning",
                "host",
                "GPU {{ $labels.gpu }} on {{ $labels.Hostname }} is "
                "{{ $value | humanizePercentage }} full",
                "Framebuffer memory (DCGM exporter) stayed above "
                f"{_number(a.gpu_memory_usage)}: a new model or replica will not fit.",
                sat,
            )
        )
    return rules


def rule_files(stack: Stack) -> dict[str, dict[str, Any]]:
    """Path -> rule file document (recording rules, then alerts)."""
    prom = _prometheus(stack)
    interval = format_duration(evaluation_interval(prom))
    return {
        RECORDING_RULES: {
            "groups": [
                {
                    "name": f"hxp-{stack.stack}-recording",
                    "interval": interval,
                    "rules": [r.to_dict() for r in recording_rules(stack)],
                }
            ]
        },
        ALERT_RULES: {
            "groups": [
                {
                    "name": f"hxp-{stack.stack}-alerts",
                    "interval": interval,
                    "rules": [r.to_dict() for r in alert_rules(stack)],
                }
            ]
        },
    }


def rule_group_names(stack: Stack) -> list[str]:
    return [g["name"] for doc in rule_files(stack).values() for g in doc["groups"]]


# --------------------------------------------------------------------------- Alertmanager


SECRET_FIELD = {"slack": "api_url_file", "email": "auth_password_file"}


def _receiver(
    recv: ReceiverSpec, secrets_dir: str, inline: Mapping[str, str], stack: Stack
) -> dict[str, Any]:
    out: dict[str, Any] = {"name": recv.name}
    if recv.type == "webhook":
        # Alertmanager 0.25 has no url_file for webhooks: a URL from a Secret block is written
        # into alertmanager.yml itself, which is then mode 0600.
        url = recv.url
        if recv.secret_block is not None:
            url = inline.get(recv.secret_block, f"http://secret.invalid/{recv.secret_block}")
        out["webhook_configs"] = [
            {"url": url, "send_resolved": recv.send_resolved, "max_alerts": 0}
        ]
    elif recv.type == "slack":
        slack: dict[str, Any] = {"send_resolved": recv.send_resolved}
        if recv.secret_block is not None:
            slack["api_url_file"] = f"{secrets_dir}/{recv.secret_block}"
        else:
            slack["api_url"] = recv.url
        if recv.channel is not None:
            slack["channel"] = recv.channel
        slack["title"] = (
            "[{{ .Status | toUpper }}] {{ .CommonLabels.alertname }} ({{ .CommonLabels.stack }})"
        )
        slack["text"] = (
            "{{ range .Alerts }}{{ .Annotations.summary }}\n"
            "{{ .Annotations.runbook_url }}\n{{ end }}"
        )
        out["slack_configs"] = [slack]
    else:
        email: dict[str, Any] = {
            "to": recv.to,
            "from": recv.sender or f"hxp-{stack.stack}@localhost",
            "smarthost": recv.smarthost or "localhost:25",
            "send_resolved": recv.send_resolved,
        }
        if recv.username is not None:
            email["auth_username"] = recv.username
        if recv.secret_block is not None:
            email["auth_password_file"] = f"{secrets_dir}/{recv.secret_block}"
        out["email_configs"] = [email]
    return out


def _matcher(name: str, op: str, value: str) -> str:
    return f"{name}{op}{json.dumps(value)}"


def alertmanager_config(
    stack: Stack, secrets_dir: str = "secrets", inline_secrets: Mapping[str, str] | None = None
) -> dict[str, Any]:
    """alertmanager.yml: a route per receiver (by stack and severity), inhibitions.

    `secrets_dir` is where the Slack URL and SMTP password files are (mode 0600);
    `inline_secrets` holds webhook URLs from Secret blocks (only at deploy time).
    """
    am = alertmanager_spec(stack)
    inline = dict(inline_secrets or {})
    routes: list[dict[str, Any]] = []
    for recv in am.receivers:
        matchers = [_matcher("stack", "=", stack.stack)]
        if recv.severity:
            matchers.append(_matcher("severity", "=~", "|".join(recv.severity)))
        routes.append({"receiver": recv.name, "matchers": matchers, "continue": True})
    default = "hxp-default"
    return {
        "route": {
            "receiver": default,
            "group_by": ["alertname", "stack", "unit"],
            "group_wait": format_duration(am.group_wait),
            "group_interval": format_duration(am.group_interval),
            "repeat_interval": format_duration(am.repeat_interval),
            "routes": routes,
        },
        "inhibit_rules": [
            {
                "source_matchers": [_matcher("alertname", "=", "HxpHostDown")],
                "target_matchers": [_matcher("scope", "=", "unit")],
                "equal": ["stack", "host"],
            },
            {
                "source_matchers": [_matcher("alertname", "=", "HxpUnitDown")],
                "target_matchers": [
                    _matcher("alertname", "=~", "HxpMetricsAbsent|HxpUnitUnhealthy")
                ],
                "equal": ["stack", "unit"],
            },
        ],
        "receivers": [
            {"name": default},
            *(_receiver(r, secrets_dir, inline, stack) for r in am.receivers),
        ],
    }


def alertmanager_spec(stack: Stack) -> AlertmanagerSpec:
    am = _monitoring(stack).alertmanager
    if am is None:
        raise StackValidationError([Issue("required", "monitoring.alertmanager")])
    return am


def secret_blocks(stack: Stack) -> dict[str, Literal["file", "inline"]]:
    """Secret block -> how Alertmanager gets it: a 0600 file it reads, or inline in its config."""
    mon = stack.monitoring
    if mon is None or mon.alertmanager is None:
        return {}
    out: dict[str, Literal["file", "inline"]] = {}
    for recv in mon.alertmanager.receivers:
        if recv.secret_block is not None:
            out[recv.secret_block] = "inline" if recv.type == "webhook" else "file"
    return out


# --------------------------------------------------------------------------- the units


@dataclass(frozen=True)
class MonitoringPaths:
    """Where a deployed monitoring stack keeps its files (absolute, under the state dir)."""

    root: str

    def of(self, relative: str) -> str:
        return f"{self.root}/{relative}"


@dataclass(frozen=True)
class Binaries:
    """The programs that run each component (Debian names by default)."""

    prometheus: str = "prometheus"
    alertmanager: str = "prometheus-alertmanager"
    pushgateway: str = "prometheus-pushgateway"


def monitoring_stack_name(stack: Stack) -> str:
    """The stack the monitoring units are deployed as: `<stack>-monitoring` (63 chars at most)."""
    base = stack.stack[: 63 - len("-monitoring")].rstrip("-")
    return f"{base}-monitoring"


def _listen(stack: Stack, host: str, port: int) -> str:
    return netloc(host_address(stack, host), port)


def monitoring_units(
    stack: Stack, paths: MonitoringPaths, binaries: Binaries | None = None
) -> dict[str, dict[str, Any]]:
    """Service definitions (stack-file data) for Prometheus, Alertmanager and the Pushgateway."""
    b = binaries or Binaries()
    mon = _monitoring(stack)
    prom = _prometheus(stack)
    services: dict[str, dict[str, Any]] = {}

    def unit(host: str, port: int, argv: list[str]) -> dict[str, Any]:
        backend = stack.hosts[host]
        if backend.backend == "docker" or backend.runner != "local":
            raise StackValidationError(
                [
                    Issue(
                        f"host {host!r} ({backend.backend}, runner {backend.runner}): monitoring "
                        "runs on a local process or systemd host for now",
                        "monitoring",
                    )
                ]
            )
        ready = f"http://{netloc(host_address(stack, host), port)}/-/ready"
        return {
            "host": host,
            "command": argv,
            "ports": {"http": port},
            "restart": "on-failure",
            "health": {
                "http": {"url": ready},
                "interval": "500ms",
                "timeout": "2s",
                "retries": 60,
            },
        }

    services["prometheus"] = unit(
        prom.host,
        prom.port,
        [
            b.prometheus,
            f"--config.file={paths.of(PROMETHEUS_CONFIG)}",
            f"--web.listen-address={_listen(stack, prom.host, prom.port)}",
            f"--storage.tsdb.path={paths.of('prometheus/data')}",
            f"--storage.tsdb.retention.time={format_duration(prom.retention)}",
            "--web.enable-lifecycle",
        ],
    )
    if mon.alertmanager is not None:
        am = mon.alertmanager
        services["alertmanager"] = unit(
            am.host,
            am.port,
            [
                b.alertmanager,
                f"--config.file={paths.of(ALERTMANAGER_CONFIG)}",
                f"--storage.path={paths.of('alertmanager/data')}",
                f"--web.listen-address={_listen(stack, am.host, am.port)}",
                "--cluster.listen-address=",
            ],
        )
    if mon.pushgateway is not None:
        pg = mon.pushgateway
        services["pushgateway"] = unit(
            pg.host,
            pg.port,
            [b.pushgateway, f"--web.listen-address={_listen(stack, pg.host, pg.port)}"],
        )
    return services


def monitoring_stack_data(
    stack: Stack, paths: MonitoringPaths, binaries: Binaries | None = None
) -> dict[str, Any]:
    """A stack document of the monitoring units alone, deployed by the ordinary deploy engine."""
    services = monitoring_units(stack, paths, binaries)
    used = {s["host"] for s in services.values()}
    return {
        "version": stack.version,
        "stack": monitoring_stack_name(stack),
        "hosts": {h: stack.hosts[h].model_dump(mode="json") for h in sorted(used)},
        "services": services,
    }


def component_urls(stack: Stack) -> dict[str, str]:
    """component -> its base URL."""
    mon = _monitoring(stack)
    out: dict[str, str] = {}
    for component in COMPONENTS:
        spec = getattr(mon, component)
        if spec is not None:
            out[component] = f"http://{netloc(host_address(stack, spec.host), spec.port)}"
    return out


# --------------------------------------------------------------------------- files


@dataclass(frozen=True)
class MonitoringFile:
    path: str
    content: str
    mode: int = 0o644


def header() -> str:
    return (
        f"# Rendered by hxp {__version__} from {GENERATOR} (template version {GENERATOR_VERSION})"
    )


def to_yaml(doc: Mapping[str, Any]) -> str:
    body = yaml.safe_dump(dict(doc), sort_keys=False, default_flow_style=False, width=1000)
    return f"{header()}\n{body}"


def config_files(
    stack: Stack, secrets_dir: str = "secrets", inline_secrets: Mapping[str, str] | None = None
) -> list[MonitoringFile]:
    """Prometheus config, rule files and (when configured) alertmanager.yml."""
    files = [MonitoringFile(PROMETHEUS_CONFIG, to_yaml(prometheus_config(stack)))]
    files += [MonitoringFile(p, to_yaml(doc)) for p, doc in rule_files(stack).items()]
    mon = _monitoring(stack)
    if mon.alertmanager is not None:
        files.append(
            MonitoringFile(
                ALERTMANAGER_CONFIG,
                to_yaml(alertmanager_config(stack, secrets_dir, inline_secrets)),
                0o600,
            )
        )
    return files


def rule_expressions(stack: Stack) -> list[tuple[str, str]]:
    """(where, expression) of every recording and alerting rule, for the query lint."""
    out: list[tuple[str, str]] = []
    for r in recording_rules(stack):
        out.append((f"{RECORDING_RULES}: {r.record}", r.expr))
    for i, a in enumerate(alert_rules(stack)):
        out.append((f"{ALERT_RULES}: {a.name} (#{i})", a.expr))
    return out


def recorded_series(stack: Stack) -> set[str]:
    return {r.record for r in recording_rules(stack)}


def expected_jobs(stack: Stack) -> list[str]:
    return [j.name for j in scrape_jobs(stack)]


def all_alert_names(stack: Stack) -> list[str]:
    return sorted({a.name for a in alert_rules(stack)})


def dashboard_files(stack: Stack, dashboards_path: str | None = None) -> list[MonitoringFile]:
    """Dashboard JSON (hxp.dashboards) plus the datasource and dashboard-provider files."""
    try:
        from hxp.dashboards import build_dashboard, dashboard_specs, datasource_uid
    except ImportError as exc:  # pragma: no cover - the extra is part of dev
        raise StackValidationError(
            [
                Issue(
                    f"Grafana dashboards need grafana-foundation-sdk ({exc}); install "
                    "'hxp-orchestration[monitoring]'",
                    "monitoring",
                )
            ]
        ) from None
    uid = datasource_uid(stack)
    files = [
        MonitoringFile(
            f"{DASHBOARDS_DIR}/{spec.uid}.json",
            json.dumps(build_dashboard(spec, uid), indent=2, sort_keys=True) + "\n",
        )
        for spec in dashboard_specs(stack)
    ]
    datasource = {
        "apiVersion": 1,
        "datasources": [
            {
                "name": f"hxp {stack.stack}",
                "uid": uid,
                "type": "prometheus",
                "access": "proxy",
                "url": component_urls(stack)["prometheus"],
                "isDefault": False,
                "editable": False,
                "jsonData": {"timeInterval": format_duration(_prometheus(stack).scrape_interval)},
            }
        ],
    }
    provider = {
        "apiVersion": 1,
        "providers": [
            {
                "name": f"hxp-{stack.stack}",
                "folder": f"hxp {stack.stack}",
                "type": "file",
                "disableDeletion": False,
                "allowUiUpdates": False,
                "updateIntervalSeconds": 30,
                "options": {
                    "path": dashboards_path or f"/var/lib/grafana/dashboards/hxp-{stack.stack}"
                },
            }
        ],
    }
    files.append(MonitoringFile(GRAFANA_DATASOURCE, to_yaml(datasource)))
    files.append(MonitoringFile(GRAFANA_PROVIDER, to_yaml(provider)))
    return files


def monitoring_files(
    stack: Stack,
    secrets_dir: str = "secrets",
    inline_secrets: Mapping[str, str] | None = None,
    dashboards_path: str | None = None,
) -> list[MonitoringFile]:
    """Everything `hxp render --target monitoring` writes and `deploy_monitoring` installs."""
    return [
        *config_files(stack, secrets_dir, inline_secrets),
        *dashboard_files(stack, dashboards_path),
    ]


def lint_files(stack: Stack, files: list[MonitoringFile]) -> list[str]:
    """The query lint over the rules of `stack` and the dashboards among `files`, against the
    vLLM releases the models are pinned at: a model's own dashboard against its release, the
    rules and the stack-wide dashboards against all of the stack's."""
    from hxp.dashboards import dashboard_queries, dashboard_specs
    from hxp.querylint import lint_queries, stack_sources

    recorded = recorded_series(stack)
    unit_of = {spec.uid: spec.unit for spec in dashboard_specs(stack)}
    shared = rule_expressions(stack)
    per_unit: dict[str, list[tuple[str, str]]] = {}
    for board in (json.loads(f.content) for f in files if f.path.endswith(".json")):
        unit = unit_of.get(board.get("uid"))
        queries = dashboard_queries([board])
        if unit in stack.models:
            per_unit.setdefault(unit, []).extend(queries)
        else:
            shared += queries
    problems = lint_queries(shared, stack_sources(vllm_versions(stack)), recorded)
    for unit, queries in per_unit.items():
        version = stack.models[unit].vllm.version
        problems += lint_queries(queries, stack_sources([version]), recorded)
    return problems


def replica_health(targets: Iterable[tuple[str, str, str, str]]) -> tuple[list[str], list[str]]:
    """(up, down) as `job/replica` from (job, replica, health, error) of scrape targets.

    A replica is up when any of its targets is: the idle blue-green slot of a routed unit is
    scraped too, and is down by design.
    """
    health: dict[str, list[tuple[str, str]]] = {}
    for job, replica, state, error in targets:
        health.setdefault(f"{job}/{replica}", []).append((state, error))
    up = sorted(k for k, v in health.items() if any(s == "up" for s, _ in v))
    down = sorted(
        f"{k}: {v[0][0]} ({v[0][1] or 'no scrape yet'})"
        for k, v in health.items()
        if not any(s == "up" for s, _ in v)
    )
    return up, down
