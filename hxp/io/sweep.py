"""One health sweep, step by step, without Prefect: observe, probe, settle, reroute, publish.

flows/health.py runs each step as a Prefect task; `hxp health` calls `sweep_stack`, which runs
the same steps in a row. Every decision comes from hxp.health; these functions only fetch,
store and apply.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hxp.backends import stack_backends
from hxp.config import EffectiveConfig, load_config_cached
from hxp.errors import BackendError, LockedError
from hxp.health import (
    InstanceChecks,
    InstanceHealth,
    LayerResult,
    Replica,
    RouteDecision,
    Status,
    SweepReport,
    SweepSettings,
    UnitRecord,
    evaluate_sweep,
    health_rows,
    plan_checks,
    plan_route,
)
from hxp.plan import ObservedUnit
from hxp.spec import Stack
from hxp.store import Store
from hxp.units import UnitInstance, expand_units

PUSH_JOB = "hxp-health"


@dataclass(frozen=True)
class Observation:
    """What the backends said: instances by name, and hosts that could not be asked (why)."""

    units: dict[str, ObservedUnit] | None
    blind: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Probed:
    """What one sweep saw: the backends' view, the checks and their results, and the state the
    last sweep left (read once, for the synthetic layer and for damping)."""

    observation: Observation
    checks: list[InstanceChecks]
    results: list[LayerResult]
    previous: dict[str, InstanceHealth]
    previous_units: dict[str, UnitRecord]
    # Addressed hosts checked for reachability: host -> (address, why not, or "" if it answered)
    reach: dict[str, tuple[str, str]] = field(default_factory=dict)


_LOADED_MAX = 8


def load_stack_cached(files: Sequence[str], overrides: Sequence[str] = ()) -> EffectiveConfig:
    """load_config, remembered by the files' contents (hxp.config.load_config_cached): a
    process that sweeps the same stack every minute parses it once (a 1,000-unit file takes
    ~0.7 s), and again when it changes."""
    return load_config_cached(list(files), {}, list(overrides))


_EXPANDED: dict[int, tuple[Stack, list[UnitInstance]]] = {}


def _expanded(stack: Stack) -> list[UnitInstance]:
    """expand_units, remembered for the stack objects load_stack_cached hands out again."""
    hit = _EXPANDED.get(id(stack))
    if hit is not None and hit[0] is stack:
        return hit[1]
    if len(_EXPANDED) >= _LOADED_MAX:
        _EXPANDED.pop(next(iter(_EXPANDED)))
    instances = expand_units(stack)
    _EXPANDED[id(stack)] = (stack, instances)  # the reference keeps the id from being reused
    return instances


def observe(
    stack: Stack,
    state_dir: str | Path,
    settings: SweepSettings,
    skip: Mapping[str, str] | None = None,
) -> Observation:
    """Every instance the stack's backends run; a host whose backend fails is `blind` (its
    instances get an unknown backend layer) instead of failing the sweep. Hosts in `skip`
    (host -> why: those that did not answer a connect) are not asked at all, and blind: a
    backend call to a dead host would wait for its own, longer, timeouts."""
    if not settings.observe:
        return Observation(None)
    skip = skip or {}
    owners = {i.name: i.host for i in _expanded(stack)}
    seen: dict[str, ObservedUnit] = {}
    blind: dict[str, str] = {}
    visited: dict[tuple[str, str, str], str] = {}
    for name, backend in stack_backends(stack, state_dir).items():
        host = stack.hosts[name]
        key = (host.backend, host.address or "local", host.container or "")
        if key in visited:
            if visited[key] in blind:
                blind[name] = blind[visited[key]]
            continue
        visited[key] = name
        if name in skip:
            blind[name] = f"not asked: {skip[name]}"
            continue
        try:
            found = backend.observe(stack.stack)
        except BackendError as exc:
            blind[name] = str(exc)
            continue
        for instance, unit in found.items():
            owner = unit.host or owners.get(instance, name)
            seen[instance] = ObservedUnit(**{**unit.__dict__, "host": owner})
    return Observation(seen, blind)


async def probe(
    stack: Stack,
    state_dir: str | Path,
    observation: Observation,
    settings: SweepSettings,
    reach: Mapping[str, tuple[str, str]] | None = None,
) -> Probed:
    """Plan the checks (hxp.health.plan_checks) and run them all concurrently."""
    from hxp.io.probes import run_checks

    store = Store(state_dir)
    previous, previous_units = store.health_state(stack.stack)
    checks = plan_checks(
        stack, observation.units, observation.blind, _expanded(stack), asleep_of(store, stack)
    )
    data = {name: dict(i.data) for name, i in previous.items()}
    results = await run_checks(checks, stack.hosts, data, settings)
    return Probed(observation, checks, results, previous, previous_units, dict(reach or {}))


def asleep_of(store: Store, stack: Stack) -> set[str]:
    """The stack's instances recorded asleep (`hxp sleep`): not failed, and not the sweep's
    to put back behind the gateway."""
    return set(store.asleep(stack.stack))


def reach(stack: Stack, settings: SweepSettings) -> dict[str, tuple[str, str]]:
    """Connect to the sshd of every addressed host that runs a unit of the stack, at once,
    each under `settings.host_timeout` (hxp.io.reach): host -> (address, why not or "")."""
    from hxp.io.reach import reach_hosts

    used = {i.host for i in _expanded(stack)}
    answers = reach_hosts(stack, used, settings.host_timeout)
    return {h: (r.address, r.reason) for h, r in answers.items()}


async def check(stack: Stack, state_dir: str | Path, settings: SweepSettings) -> Probed:
    """Connect to every addressed host, observe the ones that answered (the backends' calls
    block: in a thread), then probe every instance."""
    import asyncio

    reached = await asyncio.to_thread(reach, stack, settings)
    dead = {h: why for h, (_, why) in reached.items() if why}
    observation = await asyncio.to_thread(observe, stack, state_dir, settings, dead)
    return await probe(stack, state_dir, observation, settings, reached)


def settle(
    stack: Stack,
    state_dir: str | Path,
    probed: Probed,
    settings: SweepSettings,
    now: float | None = None,
) -> SweepReport:
    """Combine layers, replicas and dependencies, damp against the last sweep's state, and
    store the result with one event per transition (the store's events table)."""
    observation = probed.observation
    report = evaluate_sweep(
        stack,
        probed.checks,
        probed.results,
        observation.units,
        probed.previous,
        probed.previous_units,
        settings,
        time.time() if now is None else now,
        observation.blind,
        probed.reach,
    )
    events = [
        (
            t.unit,
            "health",
            f"{t.before.value if t.before else 'new'} -> {t.after.value}: {t.reason}",
        )
        for t in report.transitions
    ]
    Store(state_dir).save_health(stack.stack, report.instances, report.units, events)
    for h in report.unreachable:
        report.notes.append(f"host {h.host} ({h.address}) unreachable: {h.reason}")
    for host, why in sorted(observation.blind.items()):
        report.notes.append(f"host {host}: backend not observed: {why}")
    return report


def reroute(
    stack: Stack, state_dir: str | Path, report: SweepReport
) -> tuple[list[RouteDecision], list[str]]:
    """Take unhealthy replicas out of the gateway, put recovered ones back (hxp.health.
    plan_route), under the stack's lock: a running deploy owns the upstreams, so a sweep that
    cannot take the lock at once leaves them alone. Returns the decisions and notes."""
    if stack.gateway is None or not stack.gateway.routes:
        return [], []
    from hxp.io.gateway import stack_gateway
    from hxp.io.lock import stack_lock

    gateway = stack_gateway(stack, state_dir)
    try:
        running = gateway.running  # a remote gateway: one command on its host
    except BackendError as exc:
        return [], [f"gateway: {exc}: upstreams left alone this sweep"]
    if not running:
        return [], ["the gateway is not running: upstreams left alone"]
    units = {u.unit: u for u in report.units}
    store = Store(state_dir)
    asleep = asleep_of(store, stack)

    def decide(live: Mapping[str, Sequence[str]]) -> list[RouteDecision]:
        out = []
        for unit in sorted(stack.gateway.routes if stack.gateway else ()):
            if unit not in units:
                continue
            replicas = [
                Replica(i.instance, i.server, i.status, i.ejected)
                for i in units[unit].replicas
                if i.server is not None and i.instance not in asleep
            ]
            out.append(plan_route(unit, live.get(unit, []), replicas))
        return out

    decisions = decide(gateway.servers())
    notes = [f"ALERT {d.unit}: {d.alert}" for d in decisions if d.alert]
    if any(d.changed for d in decisions):
        try:
            with stack_lock(state_dir, stack.stack, "health sweep", wait=False):
                decisions = decide(gateway.servers())  # again, under the lock
                for d in decisions:
                    if d.changed:  # in before out: the upstream is never left empty
                        gateway.add(d.unit, *(p for p in d.after if p not in d.before))
                        gateway.remove(d.unit, *(p for p in d.before if p not in d.after))
        except (LockedError, BackendError) as exc:
            why = "upstreams left alone this sweep"
            notes.append(f"{exc}: {why}" if isinstance(exc, LockedError) else f"gateway: {exc}")
            kept = [RouteDecision(d.unit, d.before, d.before, alert=d.alert) for d in decisions]
            return kept, notes
        store.set_ejected(stack.stack, [i for d in decisions for i in d.removed], True)
        store.set_ejected(stack.stack, [i for d in decisions for i in d.restored], False)
    # A deploy may have put an ejected replica back itself: it is no longer ours to restore.
    back = [
        i.instance
        for d in decisions
        for i in units[d.unit].replicas
        if i.ejected and i.server in d.after and i.instance not in d.removed
    ]
    store.set_ejected(stack.stack, back, False)
    return decisions, notes


# ---------------------------------------------------------------- metrics

_SET: dict[str, dict[tuple[str, str, str], Any]] = {}


def record_metrics(report: SweepReport) -> None:
    """hxp_unit_health{stack,unit,layer} (each layer's worst over the unit's replicas, and
    layer="composite") and the sweep's duration, in the shared registry."""
    from hxp.io.telemetry import HEALTH_VALUE, SWEEP_SECONDS, UNIT_HEALTH

    # The children of the last sweep by label set: labels() validates and locks each time
    # (~5 us; 2,000+ series for 1,000 units).
    before = _SET.get(report.stack, {})
    now: dict[tuple[str, str, str], Any] = {}
    for unit in report.units:
        layers = {**unit.layers(), "composite": unit.status}
        for layer, status in layers.items():
            key = (report.stack, unit.unit, layer)
            child = before.get(key) or UNIT_HEALTH.labels(*key)
            child.set(HEALTH_VALUE[status.value])
            now[key] = child
    for stale in before.keys() - now.keys():
        UNIT_HEALTH.remove(*stale)
    _SET[report.stack] = now
    SWEEP_SECONDS.labels(report.stack).observe(report.seconds)


class _OneStack:
    """The shared registry's sweep metrics, limited to one stack's series (a push replaces
    the stack's whole group on the Pushgateway)."""

    def __init__(self, stack: str) -> None:
        self.stack = stack

    def collect(self) -> Iterable[Any]:
        from prometheus_client.metrics_core import Metric

        from hxp.io.telemetry import SWEEP_SECONDS, UNIT_HEALTH

        for collector in (UNIT_HEALTH, SWEEP_SECONDS):
            for family in collector.collect():
                mine = Metric(family.name, family.documentation, family.type, family.unit)
                mine.samples = [s for s in family.samples if s.labels.get("stack") == self.stack]
                yield mine


def push_metrics(stack: str, url: str, timeout: float | None = None) -> None:
    """PUT the stack's sweep metrics to the Pushgateway (job=hxp-health, stack=<stack>);
    the URL comes from hxp.io.telemetry.pushgateway_url."""
    from prometheus_client import CollectorRegistry, push_to_gateway

    from hxp.io.telemetry import PUSH_TIMEOUT

    registry = CollectorRegistry()
    registry.register(_OneStack(stack))
    push_to_gateway(
        url,
        job=PUSH_JOB,
        grouping_key={"stack": stack},
        registry=registry,
        timeout=PUSH_TIMEOUT if timeout is None else timeout,
    )


# ---------------------------------------------------------------- the whole sweep


def sweep_stack(
    stack: Stack,
    state_dir: str | Path,
    settings: SweepSettings,
    reroute_gateway: bool = True,
    pushgateway: str | None = None,
) -> SweepReport:
    """Every step of a sweep in a row, without Prefect (what `hxp health` runs)."""
    import asyncio

    started = time.monotonic()
    got: list[Probed] = []

    async def main() -> None:  # returns None: see below
        got.append(await check(stack, state_dir, settings))

    # asyncio.run's main task returns nothing: on the way out, CPython 3.11 formats the repr
    # of its own SIGINT handler, which holds the task and so the task's result (a Probed of
    # every check: ~20 ms for 1,000 instances).
    asyncio.run(main())
    probed = got[0]
    report = settle(stack, state_dir, probed, settings)
    if reroute_gateway:
        report.routes, notes = reroute(stack, state_dir, report)
        report.notes.extend(notes)
    report.seconds = time.monotonic() - started
    record_metrics(report)
    if pushgateway:
        try:
            push_metrics(stack.stack, pushgateway)
        except OSError as exc:
            report.notes.append(f"pushgateway {pushgateway}: {exc}")
    return report


# ---------------------------------------------------------------- the table

_STYLE = {
    Status.HEALTHY: "green",
    Status.DEGRADED: "yellow",
    Status.UNHEALTHY: "bold red",
    Status.UNKNOWN: "magenta",
}


def health_table(report: SweepReport) -> Any:
    """The composite table as a rich Table (rich is imported only here)."""
    from rich.table import Table
    from rich.text import Text

    table = Table(
        title=f"stack {report.stack}: {report.status.value} ({report.seconds:.2f}s)",
        title_justify="left",
    )
    for column in ("unit", "instance", "status", "layers", "ms", "reason"):
        table.add_column(column, overflow="fold", no_wrap=column in ("unit", "status"))
    for row in health_rows(report):
        status = Status(row["status"])
        table.add_row(
            row["unit"],
            row["instance"],
            Text(row["status"], style=_STYLE[status]),
            row["layers"],
            row["latency_ms"],
            row["reason"],
        )
    return table
