"""The orchestrator's own Prometheus metrics: one registry, every name under `hxp_`.

Flows record into these; `hxp exporter` serves them (rebuilt from the store) and batch flows
push them to the Pushgateway. Aggregated fleet series (the metrics flow) use `fleet:`; the
`vllm:` prefix is never reused.
"""

from __future__ import annotations

import math
import sqlite3
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from hxp import metric_names as names
from hxp.endpoints import host_address, netloc
from hxp.spec import Stack
from hxp.store import DeployRecord, Revision, Store

REGISTRY = CollectorRegistry(auto_describe=True)


def _counter_of(family: names.Family) -> Counter:
    return Counter(family.registered, family.help, list(family.labels), registry=REGISTRY)


def _gauge_of(family: names.Family) -> Gauge:
    return Gauge(family.name, family.help, list(family.labels), registry=REGISTRY)


def _histogram_of(family: names.Family, buckets: Sequence[float]) -> Histogram:
    return Histogram(
        family.name, family.help, list(family.labels), buckets=buckets, registry=REGISTRY
    )


# The families and their help texts are hxp.metric_names.HXP's (the query lint reads the same
# table); the bucket bounds are decided here.
DEPLOYS = _counter_of(names.HXP_DEPLOYS)
DEPLOY_SECONDS = _histogram_of(
    names.HXP_DEPLOY_SECONDS, (0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600, 1800)
)
UNIT_DEPLOY_SECONDS = _histogram_of(
    names.HXP_UNIT_DEPLOY_SECONDS, (0.1, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600)
)
ROLLBACKS = _counter_of(names.HXP_ROLLBACKS)
UNIT_HEALTH = _gauge_of(names.HXP_UNIT_HEALTH)
LIFECYCLE_STATE = _gauge_of(names.HXP_LIFECYCLE_STATE)
SWEEP_SECONDS = _histogram_of(names.HXP_SWEEP_SECONDS, (0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30))
AGGREGATION_SECONDS = _histogram_of(
    names.HXP_AGGREGATION_SECONDS, (0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30)
)
ERRORS = _counter_of(names.HXP_ERRORS)

HEALTH_VALUE = {"healthy": 1.0, "degraded": 0.5, "unhealthy": 0.0, "unknown": -1.0}
AGGREGATED_AT = _gauge_of(names.HXP_AGGREGATED_AT)
AUTOSCALE_DECISIONS = _counter_of(names.HXP_AUTOSCALE_DECISIONS)
AUTOSCALE_REPLICAS = _gauge_of(names.HXP_AUTOSCALE_REPLICAS)

# ---------------------------------------------------------------------------------------------
# Everything below derives the series from the store, so `hxp exporter` and the Pushgateway
# pushes stay right across orchestrator restarts (a CLI run is one process per deploy: its
# in-process counters would start from zero each time). Flows still count into REGISTRY as
# things happen, for a long-lived process that serves REGISTRY itself.
# ---------------------------------------------------------------------------------------------

PUSH_JOB = "hxp"
PUSH_TIMEOUT = 5.0
#: Which families each batch flow pushes (grouping key job=hxp, stack, flow): a family lives in
#: one group per stack, so no series is pushed twice.
FLOW_GROUPS = ("deploy", "aggregate-metrics", "health")
HEALTH_MAX_AGE = 900.0  # a unit's last sweep older than this is reported unknown (-1)
FLEET_MAX_AGE = 900.0  # fleet series older than this are not served


@dataclass(frozen=True)
class DeployFacts:
    """What one finished deploy run counts for: outcome, duration, units, rollbacks, error."""

    stack: str
    kind: str
    outcome: str
    seconds: float
    started_at: float
    units: tuple[tuple[str, str, float], ...] = ()  # (unit, outcome, seconds)
    rollbacks: tuple[tuple[str, str], ...] = ()  # (unit, reason class)
    error_class: str | None = None


def deploy_facts(record: DeployRecord, rolled_back: Iterable[str] = ()) -> DeployFacts | None:
    """The facts of a finished deploy record (None while it runs); `rolled_back`: the units
    its rollback restored (the store's `rolled-back` events)."""
    from hxp.metrics import error_class, recorded_failure_class

    if record.finished_at is None or record.status == "running":
        return None
    result = record.result or {}
    seconds = max(0.0, record.finished_at - record.started_at)
    base = {"stack": record.stack, "kind": record.kind, "seconds": seconds}
    units: list[tuple[str, str, float]] = []
    restored = sorted(set(rolled_back))
    if record.status == "succeeded":
        changed = result.get("changes", True)
        for unit, info in sorted((result.get("units") or {}).items()):
            units.append((unit, "succeeded", float(info.get("seconds") or 0.0)))
        manual = tuple((u, "manual") for u, _, _ in units) if record.kind == "rollback" else ()
        return DeployFacts(
            **base,  # type: ignore[arg-type]
            outcome="succeeded" if changed else "no-change",
            started_at=record.started_at,
            units=tuple(units),
            rollbacks=manual,
        )
    if record.status == "interrupted":
        return DeployFacts(
            **base,  # type: ignore[arg-type]
            outcome="interrupted",
            started_at=record.started_at,
            rollbacks=tuple((u, "interrupted") for u in restored),
            error_class="transient",
        )
    reason_class = recorded_failure_class(result)
    failed = result.get("failed_unit")
    if failed:
        units.append((str(failed), "failed", float(result.get("seconds") or 0.0)))
    for unit, secs in sorted((result.get("units") or {}).items()):
        if unit != failed:
            units.append((unit, "rolled-back", float(secs or 0.0)))
    return DeployFacts(
        **base,  # type: ignore[arg-type]
        outcome="failed",
        started_at=record.started_at,
        units=tuple(units),
        rollbacks=tuple((u, reason_class) for u in restored),
        error_class=error_class(reason_class),
    )


def record_deploy(store: Store, stack: str, deploy_id: int) -> None:
    """Count a deploy that just finished into REGISTRY (called where deploy flows end)."""
    record = next((d for d in store.deploys(stack, 50) if d.id == deploy_id), None)
    if record is None:
        return
    rolled = [u for d, u, _, _ in store.event_units(stack, ["rolled-back"]) if d == deploy_id]
    facts = deploy_facts(record, rolled)
    if facts is None:
        return
    DEPLOYS.labels(stack, facts.kind, facts.outcome).inc()
    DEPLOY_SECONDS.labels(stack, facts.kind).observe(facts.seconds)
    for unit, outcome, seconds in facts.units:
        UNIT_DEPLOY_SECONDS.labels(stack, unit, outcome).observe(seconds)
    for unit, reason in facts.rollbacks:
        ROLLBACKS.labels(stack, unit, reason).inc()
    if facts.error_class is not None:
        ERRORS.labels(stack, "deploy", facts.error_class).inc()
    for unit, state in lifecycle(store, stack).items():
        for name in _lifecycle_states():
            LIFECYCLE_STATE.labels(stack, unit, name).set(1.0 if name == state else 0.0)


def record_aggregation(stack: str, seconds: float, errors: Iterable[tuple[str, str, int]]) -> None:
    """Count an aggregation run into REGISTRY: duration, finish time, (where, class, n) errors."""
    AGGREGATION_SECONDS.labels(stack).observe(seconds)
    AGGREGATED_AT.labels(stack).set(time.time())
    for where, error_class, n in errors:
        ERRORS.labels(stack, where, error_class).inc(n)


def _lifecycle_states() -> tuple[str, ...]:
    from hxp.lifecycle import STATES
    from hxp.metrics import LIFECYCLE_STATES

    return (*LIFECYCLE_STATES, *(s.value for s in STATES if s.value not in LIFECYCLE_STATES))


def lifecycle(store: Store, stack: str) -> dict[str, str]:
    """unit -> lifecycle state, from its newest revision and later stop/remove events."""
    from hxp.metrics import lifecycle_state

    newest: dict[str, Revision] = {}
    good: set[str] = set()
    for rev in store.revisions(stack):
        newest[rev.unit] = rev  # ordered by unit, revision
        if rev.status == "good":
            good.add(rev.unit)
    events = store.event_units(stack, ["down", "removed", "stopped", "started"])
    snapshot = store.latest_snapshot(stack)
    declared: set[str] | None = None
    if snapshot is not None:
        declared = set(snapshot.config.get("services") or {}) | set(
            snapshot.config.get("models") or {}
        )
    out: dict[str, str] = {}
    for unit, rev in newest.items():
        later = [k for _, u, k, at in events if u in ("", unit) and at >= rev.created_at]
        state = lifecycle_state(rev.status, unit in good, later[-1] if later else None)
        if declared is not None and unit not in declared and state == "running":
            state = "removed"
        out[unit] = state
    # The lifecycle state machine (start/stop/restart/supervise), where it has records, wins.
    from hxp.lifecycle import unit_state

    recorded: dict[str, list[Any]] = {}
    for record in store.lifecycle(stack).values():
        recorded.setdefault(record.unit, []).append(record.state)
    out.update({unit: unit_state(states).value for unit, states in recorded.items()})
    return out


def _shape(metric: Any) -> tuple[str, str, tuple[str, ...]]:
    # prometheus-client keeps a metric's definition in these attributes; reading them keeps
    # one definition per family (above) for the live registry and the store rebuild alike.
    return metric._name, metric._documentation, tuple(metric._labelnames)


def _bounds(metric: Histogram) -> list[float]:
    return list(metric._upper_bounds)


def finite_bounds(metric: Histogram) -> list[float]:
    """A histogram's bucket bounds without +Inf."""
    return [b for b in _bounds(metric) if b != math.inf]


def _le(bound: float) -> str:
    return "+Inf" if bound == math.inf else repr(float(bound))


def _histogram(
    metric: Histogram, observations: dict[tuple[str, ...], list[float]]
) -> HistogramMetricFamily:
    name, doc, labels = _shape(metric)
    family = HistogramMetricFamily(name, doc, labels=list(labels))
    bounds = _bounds(metric)
    for values, seen in sorted(observations.items()):
        buckets = [(_le(b), float(sum(1 for s in seen if s <= b))) for b in bounds]
        family.add_metric(list(values), buckets, sum(seen))
    return family


class StoreCollector(Collector):
    """The orchestrator's series rebuilt from the store on every collect (scrape or push)."""

    def __init__(
        self,
        state_dir: str | Path,
        stacks: Sequence[str] | None = None,
        groups: Sequence[str] = FLOW_GROUPS,
        fleet_max_age: float = FLEET_MAX_AGE,
        health_max_age: float = HEALTH_MAX_AGE,
    ) -> None:
        self.state_dir = Path(state_dir)
        self.stacks = list(stacks) if stacks is not None else None
        self.groups = set(groups)
        self.fleet_max_age = fleet_max_age
        self.health_max_age = health_max_age

    def describe(self) -> list[Metric]:
        return []  # nothing to check at registration: the store may not exist yet

    def collect(self) -> Iterator[Metric]:
        store = Store(self.state_dir)
        stacks = self.stacks if self.stacks is not None else store.stacks()
        if "deploy" in self.groups:
            yield from self._deploys(store, stacks)
        if "health" in self.groups:
            yield from self._health(store, stacks)
        if "aggregate-metrics" in self.groups:
            yield from self._aggregations(store, stacks)
        yield from self._errors(store, stacks)
        yield from self._autoscale(store, stacks)

    def _autoscale(self, store: Store, stacks: Sequence[str]) -> Iterator[Metric]:
        decisions: dict[tuple[str, ...], list[float]] = {}
        name, doc, labels = _shape(AUTOSCALE_REPLICAS)
        replicas = GaugeMetricFamily(name, doc, labels=list(labels))
        for stack in stacks:
            for row in store.autoscale_decision_totals(stack):
                decisions[(stack, row["model"], row["action"])] = [
                    float(row["count"]),
                    row["first_at"],
                ]
            for model, count in sorted(store.autoscale_counts(stack).items()):
                replicas.add_metric([stack, model], float(count))
        yield _counter(AUTOSCALE_DECISIONS, decisions)
        yield replicas

    def _deploys(self, store: Store, stacks: Sequence[str]) -> Iterator[Metric]:
        runs: dict[tuple[str, ...], list[float]] = {}  # labels -> [count, created]
        seconds: dict[tuple[str, ...], list[float]] = {}
        unit_seconds: dict[tuple[str, ...], list[float]] = {}
        rollbacks: dict[tuple[str, ...], list[float]] = {}
        states: dict[tuple[str, str], str] = {}
        for stack in stacks:
            rolled: dict[int, list[str]] = {}
            for deploy_id, unit, _, _ in store.event_units(stack, ["rolled-back"]):
                if deploy_id is not None:
                    rolled.setdefault(deploy_id, []).append(unit)
            for record in reversed(store.deploys(stack, 10**9)):
                facts = deploy_facts(record, rolled.get(record.id, ()))
                if facts is None:
                    continue
                _count(runs, (stack, facts.kind, facts.outcome), facts.started_at)
                seconds.setdefault((stack, facts.kind), []).append(facts.seconds)
                for unit, outcome, secs in facts.units:
                    unit_seconds.setdefault((stack, unit, outcome), []).append(secs)
                for unit, reason in facts.rollbacks:
                    _count(rollbacks, (stack, unit, reason), facts.started_at)
            for unit, state in lifecycle(store, stack).items():
                states[(stack, unit)] = state
        yield _counter(DEPLOYS, runs)
        yield _histogram(DEPLOY_SECONDS, seconds)
        yield _histogram(UNIT_DEPLOY_SECONDS, unit_seconds)
        yield _counter(ROLLBACKS, rollbacks)
        name, doc, labels = _shape(LIFECYCLE_STATE)
        family = GaugeMetricFamily(name, doc, labels=list(labels))
        for (stack, unit), state in sorted(states.items()):
            for candidate in _lifecycle_states():
                family.add_metric([stack, unit, candidate], 1.0 if candidate == state else 0.0)
        yield family

    def _health(self, store: Store, stacks: Sequence[str]) -> Iterator[Metric]:
        name, doc, labels = _shape(UNIT_HEALTH)
        family = GaugeMetricFamily(name, doc, labels=list(labels))
        now = time.time()
        reader: Any = getattr(store, "health_state", None)  # the health sweep's tables
        for stack in stacks if callable(reader) else ():
            try:
                units = reader(stack)[1]
            except sqlite3.Error:  # no health table in this store yet
                break
            for unit, record in sorted(units.items()):
                status = str(getattr(record.status, "value", record.status))
                stale = now - float(record.checked_at) > self.health_max_age
                value = HEALTH_VALUE["unknown"] if stale else HEALTH_VALUE.get(status, -1.0)
                family.add_metric([stack, unit, "composite"], value)
        yield family

    def _aggregations(self, store: Store, stacks: Sequence[str]) -> Iterator[Metric]:
        now = time.time()
        name, doc, labels = _shape(AGGREGATION_SECONDS)
        durations = HistogramMetricFamily(name, doc, labels=list(labels))
        name, doc, labels = _shape(AGGREGATED_AT)
        finished = GaugeMetricFamily(name, doc, labels=list(labels))
        fleet: dict[str, Metric] = {}
        for stack in stacks:
            state = store.aggregation_state(stack)
            if state is None:
                continue
            bounds = _bounds(AGGREGATION_SECONDS)
            counts = {**state["seconds_buckets"], math.inf: state["runs"]}
            buckets = [(_le(b), float(counts.get(b, 0))) for b in bounds]
            durations.add_metric([stack], buckets, state["seconds_sum"])
            finished.add_metric([stack], state["at"])
            if now - state["at"] > self.fleet_max_age:
                continue
            for sample_name, sample_labels, value in state["samples"]:
                if sample_name not in fleet:
                    help_text = names.FLEET_SERIES.get(sample_name, names.DECLARED_SERIES_HELP)
                    fleet[sample_name] = Metric(sample_name, help_text, "gauge")
                fleet[sample_name].add_sample(sample_name, dict(sample_labels), float(value))
        yield durations
        yield finished
        yield from (fleet[n] for n in sorted(fleet))

    def _errors(self, store: Store, stacks: Sequence[str]) -> Iterator[Metric]:
        counts: dict[tuple[str, ...], list[float]] = {}
        for stack in stacks:
            if "deploy" in self.groups:
                for record in reversed(store.deploys(stack, 10**9)):
                    facts = deploy_facts(record)
                    if facts is not None and facts.error_class is not None:
                        _count(counts, (stack, "deploy", facts.error_class), facts.started_at)
                kinds = [f"lifecycle-error-{c}" for c in ("transient", "permanent", "input")]
                for _, _, kind, at in store.event_units(stack, kinds):
                    _count(counts, (stack, "lifecycle", kind.rsplit("-", 1)[1]), at)
            state = store.aggregation_state(stack) if "aggregate-metrics" in self.groups else None
            if state is None:
                continue
            for key, n in state["errors"].items():
                where, error_class = key.split("|", 1)
                entry = counts.setdefault((stack, where, error_class), [0.0, state["at"]])
                entry[0] += n
        yield _counter(ERRORS, counts)


def _count(table: dict[tuple[str, ...], list[float]], key: tuple[str, ...], at: float) -> None:
    entry = table.setdefault(key, [0.0, at])
    entry[0] += 1
    entry[1] = min(entry[1], at)


def _counter(metric: Counter, counts: dict[tuple[str, ...], list[float]]) -> CounterMetricFamily:
    name, doc, labels = _shape(metric)
    family = CounterMetricFamily(name, doc, labels=list(labels))
    for values, (n, created) in sorted(counts.items()):
        family.add_metric(list(values), n, created=created)
    return family


def store_registry(
    state_dir: str | Path,
    stacks: Sequence[str] | None = None,
    groups: Sequence[str] = FLOW_GROUPS,
) -> CollectorRegistry:
    """A registry whose every collect reads the store (what `hxp exporter` serves)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(StoreCollector(state_dir, stacks, groups))
    return registry


def pushgateway_url(stack: Stack, override: str | None = None) -> str | None:
    """A flow parameter's URL, else the stack's monitoring.pushgateway, else None."""
    if override:
        return override.rstrip("/")
    pg = stack.monitoring.pushgateway if stack.monitoring is not None else None
    if pg is None:
        return None
    return f"http://{netloc(host_address(stack, pg.host), pg.port)}"


def push_group(
    url: str, state_dir: str | Path, stack: str, flow: str, timeout: float = PUSH_TIMEOUT
) -> None:
    """PUT one stack's series of one flow group (job=hxp, stack, flow) to a Pushgateway.

    PUT replaces the group, so series that disappeared (a removed model) go with it; the
    values are the store's cumulative ones, so a push never moves a counter backwards.
    """
    from prometheus_client import push_to_gateway

    if flow not in FLOW_GROUPS:
        raise ValueError(f"unknown flow group {flow!r}; one of {FLOW_GROUPS}")
    registry = store_registry(state_dir, [stack], [flow])
    push_to_gateway(
        url,
        job=PUSH_JOB,
        grouping_key={"stack": stack, "flow": flow},
        registry=registry,
        timeout=timeout,
    )


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


class _ThreadingWSGIServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True


TEXT_FORMAT = "text/plain; version=0.0.4; charset=utf-8"


def exporter_app(registry: CollectorRegistry) -> Callable[..., Iterable[bytes]]:
    """WSGI app: the registry in the text format 0.0.4, whatever the Accept header says.

    prometheus-client's own app answers Prometheus (which prefers OpenMetrics) in OpenMetrics,
    and its OpenMetrics writer (0.26) turns the colons of sample names into underscores:
    `fleet:request_rate` would arrive as `fleet_request_rate`.
    """
    from prometheus_client.exposition import generate_latest

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        try:
            body = generate_latest(registry)
        except Exception as exc:  # the store is unreadable: a failed scrape, said why
            message = f"hxp exporter: {type(exc).__name__}: {exc}\n".encode()
            start_response("500 Internal Server Error", [("Content-Type", "text/plain")])
            return [message]
        headers = [("Content-Type", TEXT_FORMAT), ("Content-Length", str(len(body)))]
        start_response("200 OK", headers)
        return [b"" if environ.get("REQUEST_METHOD") == "HEAD" else body]

    return app


def make_exporter(
    state_dir: str | Path, port: int, bind: str = "127.0.0.1", stacks: Sequence[str] | None = None
) -> WSGIServer:
    """An HTTP server answering every path with the store's series (serve_forever to run)."""
    Store(state_dir)  # fail now, with a clear error, if the state directory is unusable
    app = exporter_app(store_registry(state_dir, stacks))
    return make_server(bind, port, app, _ThreadingWSGIServer, handler_class=_QuietHandler)
