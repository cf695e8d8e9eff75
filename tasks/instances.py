"""Operations on unit instances that deploys and lifecycle operations share: the run context,
a unit's outcome, the readiness gate, secrets and GPUs before a start, gateway routes, drain,
stop, retiring a replaced slot, and the one retry rule of their tasks.

tasks.deploy and tasks.lifecycle build on this module and never on each other. Nothing here
decides what to change (hxp.plan and hxp.lifecycle do); it carries a decision out through the
backend interface, the store and the gateway.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from typing import Any

from prefect import get_run_logger
from prefect.runtime import task_run

from hxp.backends import backend_for
from hxp.backends.base import Backend, Remove, Stop, UnitRef, observe_one
from hxp.endpoints import base_url, reach_health, server
from hxp.errors import (
    DeployError,
    FailureClass,
    GpuAllocationError,
    LifecycleError,
    SecretError,
    classify_error,
)
from hxp.health import ReadinessGate
from hxp.io import lifecycle as rec
from hxp.io.gateway import NginxGateway, stack_gateway
from hxp.io.probes import DrainResult, probe_model_api, wait_drained, wait_ready
from hxp.lifecycle import State
from hxp.plan import Action, ActionKind, ObservedUnit, StepKind
from hxp.spec import HealthSpec, ModelSpec, Stack
from hxp.store import Store
from hxp.units import UnitInstance
from tasks.gpus import allocate_unit_gpus
from tasks.secrets import default_resolver, resolve_unit_secrets

#: Prefect retries of an instance task (a transient failure only: retry_transient).
RETRIES = 2
#: How long a unit without checks must stay up to count as started.
SETTLE_SECONDS = 0.5
#: The drain cap of a stack without a gateway (a model's queue still drains).
DRAIN_DEFAULT = 30.0
#: Log lines kept with a failed unit.
LOG_LINES = 20


# --------------------------------------------------------------------------- the run


class _OneStore:
    """The store of one run, opened on first use (by whichever thread comes first)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._store: Store | None = None

    def get(self, state_dir: str) -> Store:
        with self._lock:
            if self._store is None:
                self._store = Store(state_dir)
            return self._store


@dataclass(frozen=True)
class RunContext:
    """What every task of one run shares: the stack, the state directory, one store (one
    SQLite connection per thread, opened once) and, for a run that has a deploy record (a
    deploy, a rollback, a config reload), that record's id and snapshot. A lifecycle operation
    (start, stop, roll, supervise) has no deploy record: `deploy_id` is None."""

    stack: Stack
    state_dir: str
    deploy_id: int | None = None
    snapshot_hash: str = ""
    _stores: _OneStore = field(default_factory=_OneStore, repr=False, compare=False)

    @property
    def is_deploy(self) -> bool:
        """Whether this run belongs to a deploy record (else: a lifecycle operation)."""
        return self.deploy_id is not None

    @property
    def label(self) -> str:
        """The run in words, for GPU reservations and messages."""
        if self.deploy_id is not None:
            return f"deploy #{self.deploy_id} of {self.stack.stack}"
        return f"lifecycle operation on {self.stack.stack}"

    def backend(self, host: str) -> Backend:
        return backend_for(host, self.stack.hosts[host], self.state_dir)

    def store(self) -> Store:
        """The run's store, opened on first use and kept (each thread gets its own
        connection from it, opened once)."""
        return self._stores.get(self.state_dir)

    def gateway(self) -> NginxGateway:
        assert self.stack.gateway is not None
        return stack_gateway(self.stack, self.state_dir)

    def event(self, kind: str, message: str, unit: str | None = None) -> None:
        """A store event of this run (tied to its deploy record, if it has one)."""
        self.store().add_event(self.stack.stack, kind, message, unit, self.deploy_id)


# --------------------------------------------------------------------------- a unit's outcome


@dataclass
class UnitOutcome:
    """What happened to one unit in a deploy: the steps taken and how it ended."""

    unit: str
    host: str
    ok: bool
    revision: int | None = None
    applied: list[tuple[str, StepKind]] = field(default_factory=list)  # (instance, step)
    reason: str = ""
    failure: FailureClass = FailureClass.OTHER  # what kind of failure `reason` describes
    check: str = ""
    logs: list[str] = field(default_factory=list)
    seconds: float = 0.0
    # Blue-green on GPUs: how each replica was replaced (surge or one at a time) and why.
    strategy: list[str] = field(default_factory=list)
    # GPUs an old slot gave back when it stopped for a one-at-a-time replace (to take back).
    withdrawn_gpus: dict[str, list[int]] = field(default_factory=dict)

    def __post_init__(self) -> None:  # steps given as words (a stored plan): typed
        self.applied = [(instance, StepKind(kind)) for instance, kind in self.applied]

    def failed(self, failure: FailureClass, reason: str) -> None:
        self.failure = failure
        self.reason = reason


class UnitDeployError(DeployError):
    """One unit failed to apply or to become ready; carries its outcome for the rollback."""

    def __init__(self, outcome: UnitOutcome) -> None:
        self.outcome = outcome
        super().__init__(f"{outcome.unit}@{outcome.host}: {outcome.reason}")


# --------------------------------------------------------------------------- retries


def retry_transient(task: Any, task_run: Any, state: Any) -> bool:
    """Prefect retry condition of every instance task: only a failure classified transient
    (hxp.errors.classify_error) is retried, never a unit failure that carries the steps it
    already took (the rollback undoes those)."""
    try:
        state.result()
    except UnitDeployError:
        return False
    except Exception as exc:
        return classify_error(exc) == "transient"
    return False


def final_attempt() -> bool:
    """Whether the running task has no Prefect retry left."""
    return int(task_run.run_count or 1) > RETRIES


# --------------------------------------------------------------------------- readiness


def gate(backend: Backend, unit: UnitInstance) -> ReadinessGate | None:
    """Wait for the unit's checks; a unit without checks must at least stay up a moment."""
    if unit.health is None:
        time.sleep(SETTLE_SECONDS)
        seen = observe_one(backend, unit)
        if seen is not None and seen.running:
            return None
        stayed = ReadinessGate(HealthSpec(command=["true"]))
        stayed.give_up(f"stopped within {SETTLE_SECONDS}s ({seen.detail if seen else 'gone'})")
        return stayed

    def running() -> bool:
        seen = observe_one(backend, unit)
        return seen is not None and seen.running

    checks = reach_health(unit.health, unit.host_spec)
    assert checks is not None
    ready = asyncio.run(wait_ready(checks, running, unit.host_spec))
    if ready.verdict == "ready" and unit.kind == "model":
        _model_api_gate(ready, unit)
    return ready


def _model_api_gate(ready: ReadinessGate, unit: UnitInstance) -> None:
    """After /health: the served name is listed and a one-token completion works."""
    assert isinstance(unit.spec, ModelSpec)
    assert unit.health is not None
    served = unit.spec.served_name or unit.unit
    base = base_url(unit, dict(unit.ports)["http"])
    for attempt in range(unit.health.retries):
        result = asyncio.run(probe_model_api(base, served, max(unit.health.timeout, 5.0)))
        if result.ok:
            return
        if attempt + 1 < unit.health.retries:
            time.sleep(unit.health.interval)
    ready.give_up(f"{result.check}: {result.reason}")


# --------------------------------------------------------------------------- before a start

_STARTS_NEW = (ActionKind.CREATE, ActionKind.UPDATE, ActionKind.REPLACE)


def prepare(
    ctx: RunContext,
    unit: str,
    instances: dict[str, UnitInstance],
    actions: list[Action],
    outcome: UnitOutcome,
    defer: Collection[str] = (),
) -> tuple[dict[str, str], dict[str, UnitInstance]]:
    """Before any change: the unit's secret values, and GPUs for `gpus: auto` models (both only
    for actions that start a new version; GPUs of the instances in `defer` are placed later,
    when each starts). A missing secret or no GPU room: UnitDeployError, nothing changed."""
    spec = ctx.stack.unit(unit)
    field_path = f"{'models' if unit in ctx.stack.models else 'services'}.{unit}"
    starting = [a.instance for a in actions if a.kind in _STARTS_NEW]
    try:
        secrets = (
            resolve_unit_secrets(spec, default_resolver(ctx.state_dir), field_path)
            if spec.secret_env and starting
            else {}
        )
        placement = allocate_unit_gpus(
            ctx.stack,
            ctx.state_dir,
            unit,
            instances,
            [n for n in starting if n not in defer],
            ctx.label,
        )
    except SecretError as exc:
        outcome.failed(FailureClass.SECRET, str(exc))
        ctx.event("unit-failed", outcome.reason, unit)
        raise UnitDeployError(outcome) from None
    except GpuAllocationError as exc:
        outcome.failed(FailureClass.RESOURCES, str(exc))
        ctx.event("unit-failed", outcome.reason, unit)
        raise UnitDeployError(outcome) from None
    if placement.note:
        get_run_logger().warning("%s: %s", unit, placement.note)
    for name, inst in placement.instances.items():
        get_run_logger().info("%s: GPUs %s", name, ",".join(map(str, inst.gpus or ())))
    return secrets, placement.instances


# --------------------------------------------------------------------------- gateway routes


def routed(stack: Stack, unit: str) -> bool:
    return stack.gateway is not None and unit in stack.gateway.routes


def route_port(inst: UnitInstance) -> int:
    """The port the gateway sends a routed unit's traffic to (a routed unit has ports)."""
    port = inst.route_port
    assert port is not None, f"{inst.name} is routed but declares no port"
    return port


def route_server(inst: UnitInstance) -> str:
    """Where the gateway sends a routed unit's traffic: its host's `address:port`."""
    return server(inst)


def route_add(ctx: RunContext, unit: str, *instances: UnitInstance) -> None:
    """Put instances behind the unit's route (nothing for a unit the gateway does not route)."""
    if routed(ctx.stack, unit):
        ctx.gateway().add(unit, *(route_server(i) for i in instances))


def route_remove(ctx: RunContext, unit: str, *instances: UnitInstance) -> None:
    """Take instances out of the unit's route (nothing for a unit the gateway does not route)."""
    if routed(ctx.stack, unit):
        ctx.gateway().remove(unit, *(route_server(i) for i in instances))


def route_swap(
    ctx: RunContext, unit: str, old: UnitInstance | None, new: UnitInstance | None
) -> None:
    """Put `new` in place of `old` behind the unit's route in one gateway edit (either may be
    None; nothing for a unit the gateway does not route)."""
    if routed(ctx.stack, unit):
        ctx.gateway().swap(
            unit,
            route_server(old) if old is not None else None,
            route_server(new) if new is not None else None,
        )


def routed_now(ctx: RunContext, unit: str, inst: UnitInstance) -> bool:
    """Whether the gateway sends the unit's traffic to `inst` now."""
    if not routed(ctx.stack, unit):
        return False
    return route_server(inst) in ctx.gateway().servers().get(unit, [])


# --------------------------------------------------------------------------- state and steps


def state_of(store: Store, stack: str, instance: str) -> State:
    """An instance's recorded lifecycle state (stopped when nothing is recorded)."""
    rows = store.lifecycle(stack)
    return rows[instance].state if instance in rows else State.STOPPED


def fail(
    ctx: RunContext, unit: str, instance: str, reason: str, exc: BaseException | None = None
) -> LifecycleError:
    """The instance has failed: recorded `failed` (or left stopped, if it never moved), the
    error counted; the error to raise (bad input stays `input`, nothing retries it)."""
    store = ctx.store()
    current = state_of(store, ctx.stack.stack, instance)
    if current is State.STOPPED:  # failed before it moved: it stays stopped, the log says why
        rec.logger().warning("%s: %s", instance, reason)
    elif current is not State.FAILED:
        rec.record(store, ctx.stack.stack, unit, instance, State.FAILED, reason)
    counted = rec.count_error(store, ctx.stack.stack, unit, exc) if exc is not None else None
    return LifecycleError(f"{unit}: {reason}", "input" if counted == "input" else "permanent")


def apply_step(
    ctx: RunContext,
    backend: Backend,
    unit: str,
    instance: str,
    action: Any,
    step: str,
    retryable: bool = True,
) -> None:
    """One backend action; a transient failure is re-raised for Prefect to retry (the state
    stays where it is, the action is idempotent), anything else fails the instance."""
    try:
        backend.apply(action)
    except Exception as exc:
        error_class = classify_error(exc)
        if error_class == "transient" and retryable and not final_attempt():
            rec.count_error(ctx.store(), ctx.stack.stack, unit, exc)
            raise
        raise fail(ctx, unit, instance, f"{step} failed ({error_class}): {exc}", exc) from exc


# --------------------------------------------------------------------------- drain and stop


def drain_cap(stack: Stack, override: float | None = None) -> float:
    """How long a drain may wait: the override, else the gateway's drain_timeout."""
    if override is not None:
        return override
    return stack.gateway.drain_timeout if stack.gateway is not None else DRAIN_DEFAULT


def drain_all(instances: Sequence[UnitInstance], cap: float) -> list[str]:
    """Wait, concurrently, until each instance (already out of the gateway) has finished its
    in-flight requests: vLLM's num_requests_running + waiting = 0, or the cap."""

    async def drain() -> list[str]:
        return list(await asyncio.gather(*(wait_drained(i, cap) for i in instances)))

    return asyncio.run(drain()) if instances else []


def report_drain(ctx: RunContext, unit: str, instance: str, drained: str) -> None:
    """Say it when a drain did not end with nothing in flight: requests the stop cuts (the
    cap was reached) or an unknown count (no drain metric): a warning and a `drain-cut` or
    `drain-unknown` event of the run."""
    cut = getattr(drained, "cut", 0)
    if cut == 0 or not isinstance(drained, DrainResult):
        return
    kind = "drain-unknown" if cut is None else "drain-cut"
    get_run_logger().warning("%s: %s", instance, drained)
    ctx.event(kind, f"{instance}: {drained}", unit)


def stop_instances(
    ctx: RunContext,
    backend: Backend,
    unit: str,
    instances: Sequence[UnitInstance],
    observed: dict[str, ObservedUnit],
    drain: bool,
    cap: float,
    reason: str,
    retryable: bool = True,
) -> dict[str, str]:
    """running -> draining (out of the gateway, in-flight requests finish) -> stopping ->
    stopped, for a batch of one unit's instances together."""
    store = ctx.store()
    stack = ctx.stack.stack
    done: dict[str, str] = {}
    live = []
    for inst in instances:
        seen = observed.get(inst.name)
        current = state_of(store, stack, inst.name)
        if seen is None or not seen.exists:
            done[inst.name] = "not deployed"
            continue
        if not seen.running and current is State.STOPPED:
            done[inst.name] = "already stopped"
            continue
        live.append(inst)
    route_remove(ctx, unit, *live)
    draining = []
    for inst in live:
        current = state_of(store, stack, inst.name)
        if current in (State.RUNNING, State.DEGRADED):
            rec.record(store, stack, unit, inst.name, State.DRAINING, reason)
            draining.append(inst)
    # Only traffic the gateway sends, or a model's queue, is worth waiting for; any other
    # service finishes its in-flight requests on SIGTERM within its stop_timeout.
    waits = [i for i in draining if drain and (routed(ctx.stack, unit) or i.kind == "model")]
    drained = dict(zip([i.name for i in waits], drain_all(waits, cap), strict=True))
    for name, result in drained.items():
        report_drain(ctx, unit, name, result)
    for inst in draining:
        drained.setdefault(inst.name, "no gateway traffic to drain" if drain else "not drained")
    for inst in live:
        rec.record_path(store, stack, unit, inst.name, State.STOPPING, reason)
        stop = Stop(UnitRef.of(inst), float(inst.spec.stop_timeout))
        apply_step(ctx, backend, unit, inst.name, stop, "stop", retryable)
        rec.record(store, stack, unit, inst.name, State.STOPPED, reason)
        done[inst.name] = f"stopped ({drained.get(inst.name, 'was not serving')})"
    return done


# --------------------------------------------------------------------------- replacing a replica


def retire_slot(
    ctx: RunContext, backend: Backend, old: UnitInstance, new: UnitInstance, cap: float
) -> str:
    """The second half of replacing a replica by a new slot that is ready and already takes
    its traffic (route_swap): the old slot drains, is removed, gives its GPUs back and is
    forgotten, its states recorded on the way (draining, stopping, stopped). A line saying how
    the drain went; a failed remove fails the old slot (LifecycleError)."""
    store = ctx.store()
    stack = ctx.stack.stack
    unit = old.unit
    why = f"replaced by {new.name}"
    if state_of(store, stack, old.name) in (State.RUNNING, State.DEGRADED):
        rec.record(store, stack, unit, old.name, State.DRAINING, why)
    drained = drain_all([old], cap)[0]
    report_drain(ctx, unit, old.name, drained)
    rec.record_path(store, stack, unit, old.name, State.STOPPING, why)
    apply_step(ctx, backend, unit, old.name, Remove(UnitRef.of(old)), "remove", retryable=False)
    store.release(stack, old.name)  # its GPU reservations, if any
    rec.record(store, stack, unit, old.name, State.STOPPED, why)
    rec.forget(store, stack, unit, old.name, why)
    return drained


__all__ = [
    "DRAIN_DEFAULT",
    "LOG_LINES",
    "RETRIES",
    "SETTLE_SECONDS",
    "RunContext",
    "UnitDeployError",
    "UnitOutcome",
    "apply_step",
    "drain_all",
    "drain_cap",
    "fail",
    "final_attempt",
    "gate",
    "prepare",
    "report_drain",
    "retire_slot",
    "retry_transient",
    "route_add",
    "route_port",
    "route_remove",
    "route_server",
    "route_swap",
    "routed",
    "routed_now",
    "state_of",
    "stop_instances",
]
