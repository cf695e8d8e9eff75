"""Lifecycle tasks: reconcile recorded states with the backends, start, stop (with drain),
roll a replicated unit replica by replica, reload in place, and supervise crashed units.

Every state change goes through hxp.io.lifecycle (store row, Prefect event, log line, gauge).
Decisions (legal transitions, reconciliation, crash policy, batches, surge) come from
hxp.lifecycle; these tasks only carry them out through the backend interface.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.runtime import task_run
from prefect.tasks import exponential_backoff

from hxp.backends import observe_all
from hxp.backends.base import (
    Backend,
    Commit,
    Create,
    Reload,
    Reloader,
    Remove,
    Restore,
    Start,
    Stop,
    UnitRef,
    Update,
    observe_one,
)
from hxp.errors import BackendError, LifecycleError, classify_error
from hxp.io import lifecycle as rec
from hxp.io.probes import wait_drained
from hxp.lifecycle import (
    CrashPolicy,
    LifecycleRecord,
    RollingPolicy,
    State,
    SurgeDecision,
    reconcile,
    rolling_batches,
    supervise,
)
from hxp.plan import Action, ActionKind, ObservedUnit
from hxp.spec import Stack
from hxp.store import Store
from hxp.units import UnitInstance, expand_units, slot_instances
from tasks.deploy import (
    DeployContext,
    UnitOutcome,
    _all_slots,
    _gate,
    _prepare,
    gateway_of,
    route_port,
)

RETRIES = 2
DRAIN_DEFAULT = 30.0


def retry_transient(task: Any, task_run: Any, state: Any) -> bool:
    """Prefect retry condition: only a failure classified transient is retried."""
    try:
        state.result()
    except Exception as exc:
        return classify_error(exc) == "transient"
    return False


def _final_attempt() -> bool:
    return int(task_run.run_count or 1) > RETRIES


@dataclass
class UnitResult:
    """What one lifecycle task did to one unit: a line per instance."""

    unit: str
    ok: bool = True
    done: dict[str, str] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0


def routed(stack: Stack, unit: str) -> bool:
    return stack.gateway is not None and unit in stack.gateway.routes


def unit_instances(
    stack: Stack, unit: str, observed: dict[str, ObservedUnit]
) -> list[UnitInstance]:
    """The unit's live instance per replica: for a unit behind the gateway, whichever of its
    two blue-green slots exists (the running one, then the one with the stack's config)."""
    base = expand_units(stack, {unit})
    if not routed(stack, unit):
        return base
    from hxp.config import unit_config_hash

    want = unit_config_hash(stack, unit)
    other = slot_instances(stack, unit, 1)
    out = []
    for a, b in zip(base, other, strict=True):
        candidates = [i for i in (a, b) if i.name in observed and observed[i.name].exists]
        candidates.sort(
            key=lambda i: (not observed[i.name].running, observed[i.name].config_hash != want)
        )
        out.append(candidates[0] if candidates else a)
    return out


def _observe_unit(backend: Backend, stack: Stack, unit: str) -> dict[str, ObservedUnit]:
    """What the backend sees of one unit's instances (both slots), without listing the stack."""
    out = {}
    for inst in _all_slots(stack, unit):
        seen = observe_one(backend, inst)
        if seen is not None:
            out[inst.name] = seen
    return out


def _state(store: Store, stack: str, instance: str) -> State:
    rows = store.lifecycle(stack)
    return rows[instance].state if instance in rows else State.STOPPED


def _gateway_remove(ctx: DeployContext, unit: str, ports: Iterable[int]) -> None:
    if not routed(ctx.stack, unit):
        return
    gateway_of(ctx).remove(unit, *ports)


def _gateway_add(
    ctx: DeployContext, unit: str, ports: Iterable[int], drop: int | None = None
) -> None:
    if not routed(ctx.stack, unit):
        return
    gateway = gateway_of(ctx)
    if drop is None:
        gateway.add(unit, *ports)
    else:
        (port,) = ports
        gateway.swap(unit, drop, port)


def _drain_all(instances: Sequence[UnitInstance], cap: float) -> list[str]:
    """Wait, concurrently, until each instance (already out of the gateway) has finished its
    in-flight requests: vLLM's num_requests_running + waiting = 0, or the cap."""

    async def drain() -> list[str]:
        return list(await asyncio.gather(*(wait_drained(i, cap) for i in instances)))

    return asyncio.run(drain()) if instances else []


def drain_cap(stack: Stack, override: float | None = None) -> float:
    if override is not None:
        return override
    return stack.gateway.drain_timeout if stack.gateway is not None else DRAIN_DEFAULT


def _fail(
    ctx: DeployContext, unit: str, instance: str, reason: str, exc: BaseException | None = None
) -> LifecycleError:
    store = ctx.store()
    rows = store.lifecycle(ctx.stack.stack)
    current = rows[instance].state if instance in rows else State.STOPPED
    if current is State.STOPPED:  # failed before it moved: it stays stopped, the log says why
        rec.logger().warning("%s: %s", instance, reason)
    elif current is not State.FAILED:
        rec.record(store, ctx.stack.stack, unit, instance, State.FAILED, reason)
    counted = rec.count_error(store, ctx.stack.stack, unit, exc) if exc is not None else None
    # The instance has failed: nothing retries it any more (bad input stays `input`).
    return LifecycleError(f"{unit}: {reason}", "input" if counted == "input" else "permanent")


def _apply(
    ctx: DeployContext,
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
        if error_class == "transient" and retryable and not _final_attempt():
            rec.count_error(ctx.store(), ctx.stack.stack, unit, exc)
            raise
        raise _fail(ctx, unit, instance, f"{step} failed ({error_class}): {exc}", exc) from exc


# --------------------------------------------------------------------------- reconcile


@task(name="reconcile", task_run_name="reconcile-{ctx.stack.stack}", cache_policy=NO_CACHE)
def reconcile_stack(ctx: DeployContext) -> list[str]:
    """Bring the recorded states in line with what the backends run now (after an
    orchestrator restart, or anything done outside hxp)."""
    store = ctx.store()
    stack = ctx.stack.stack
    observed = observe_all(ctx.stack, ctx.state_dir)
    rows = store.lifecycle(stack)
    try:
        health = {k: v.status.value for k, v in store.health_state(stack)[0].items()}
    except Exception:  # no sweep has run against this store yet
        health = {}
    unit_of = {i.name: i.unit for u in ctx.stack.units() for i in _all_slots(ctx.stack, u)}
    lines: list[str] = []
    for name in sorted(set(rows) | {n for n in observed if n in unit_of}):
        unit = rows[name].unit if name in rows else unit_of[name]
        decision = reconcile(name, rows.get(name), observed.get(name), health.get(name))
        if decision is None:
            continue
        if decision.forget:
            rec.forget(store, stack, unit, name, decision.reason)
            lines.append(f"{name}: forgotten ({decision.reason})")
            continue
        rec.walk(store, stack, unit, name, decision.path, f"reconciled: {decision.reason}")
        lines.append(f"{name}: {' -> '.join(s.value for s in decision.path)} ({decision.reason})")
        if decision.back_in_gateway and routed(ctx.stack, unit):
            inst = next(i for i in _all_slots(ctx.stack, unit) if i.name == name)
            _gateway_add(ctx, unit, [route_port(inst)])
            lines.append(f"{name}: back behind the gateway")
    return lines


# --------------------------------------------------------------------------- start and stop


def _start_instance(
    ctx: DeployContext, backend: Backend, inst: UnitInstance, observed: ObservedUnit | None
) -> str:
    """stopped/failed -> starting -> running (gated), then behind the gateway."""
    store = ctx.store()
    stack = ctx.stack.stack
    if observed is None or not observed.exists:
        raise _fail(
            ctx, inst.unit, inst.name, "is not deployed on its host (run `hxp apply` first)"
        )
    store.clear_supervision(stack, inst.name)
    current = _state(store, stack, inst.name)
    if observed.running and current in (State.RUNNING, State.DEGRADED):
        _gateway_add(ctx, inst.unit, [route_port(inst)])
        return "already running"
    if not observed.running or current not in (State.STARTING,):
        rec.record_path(store, stack, inst.unit, inst.name, State.STARTING, "start requested")
    if not observed.running:
        _apply(ctx, backend, inst.unit, inst.name, Start(UnitRef.of(inst)), "start")
    gate = _gate(backend, inst)
    if gate is not None and gate.verdict != "ready":
        raise _fail(ctx, inst.unit, inst.name, f"never became ready: {gate.explain()}")
    rec.record(store, stack, inst.unit, inst.name, State.RUNNING, "ready")
    if not observed.running:
        rec.rebaseline(store, backend, inst)
    _gateway_add(ctx, inst.unit, [route_port(inst)])
    return "started, ready"


@task(
    name="start-unit",
    task_run_name="start-{unit}",
    cache_policy=NO_CACHE,
    retries=RETRIES,
    retry_delay_seconds=exponential_backoff(0.5),
    retry_condition_fn=retry_transient,
)
def start_unit(ctx: DeployContext, unit: str) -> UnitResult:
    """Start every replica of a unit that is not running, each gated on readiness."""
    started = time.monotonic()
    backend = ctx.backend(ctx.stack.unit(unit).host)
    observed = _observe_unit(backend, ctx.stack, unit)
    result = UnitResult(unit)
    for inst in unit_instances(ctx.stack, unit, observed):
        result.done[inst.name] = _start_instance(ctx, backend, inst, observed.get(inst.name))
    result.seconds = time.monotonic() - started
    return result


def _stop_instances(
    ctx: DeployContext,
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
        current = _state(store, stack, inst.name)
        if seen is None or not seen.exists:
            done[inst.name] = "not deployed"
            continue
        if not seen.running and current is State.STOPPED:
            done[inst.name] = "already stopped"
            continue
        live.append(inst)
    _gateway_remove(ctx, unit, [route_port(i) for i in live])
    draining = []
    for inst in live:
        current = _state(store, stack, inst.name)
        if current in (State.RUNNING, State.DEGRADED):
            rec.record(store, stack, unit, inst.name, State.DRAINING, reason)
            draining.append(inst)
    # Only traffic the gateway sends, or a model's queue, is worth waiting for; any other
    # service finishes its in-flight requests on SIGTERM within its stop_timeout.
    waits = [i for i in draining if drain and (routed(ctx.stack, unit) or i.kind == "model")]
    drained = dict(zip([i.name for i in waits], _drain_all(waits, cap), strict=True))
    for inst in draining:
        drained.setdefault(inst.name, "no gateway traffic to drain" if drain else "not drained")
    for inst in live:
        rec.record_path(store, stack, unit, inst.name, State.STOPPING, reason)
        grace = float(inst.spec.stop_timeout)
        stop = Stop(UnitRef.of(inst), grace)
        _apply(ctx, backend, unit, inst.name, stop, "stop", retryable)
        rec.record(store, stack, unit, inst.name, State.STOPPED, reason)
        done[inst.name] = f"stopped ({drained.get(inst.name, 'was not serving')})"
    return done


@task(
    name="stop-unit",
    task_run_name="stop-{unit}",
    cache_policy=NO_CACHE,
    retries=RETRIES,
    retry_delay_seconds=exponential_backoff(0.5),
    retry_condition_fn=retry_transient,
)
def stop_unit(
    ctx: DeployContext, unit: str, drain: bool = True, drain_timeout: float | None = None
) -> UnitResult:
    """Take every replica out of the gateway, let in-flight requests finish, stop it."""
    started = time.monotonic()
    backend = ctx.backend(ctx.stack.unit(unit).host)
    observed = observe_all(ctx.stack, ctx.state_dir)
    instances = unit_instances(ctx.stack, unit, observed)
    result = UnitResult(unit)
    result.done = _stop_instances(
        ctx,
        backend,
        unit,
        instances,
        observed,
        drain,
        drain_cap(ctx.stack, drain_timeout),
        "stop requested",
    )
    result.seconds = time.monotonic() - started
    return result


@task(name="stop-gateway", task_run_name="stop-gateway-{ctx.stack.stack}", cache_policy=NO_CACHE)
def stop_gateway(ctx: DeployContext) -> bool:
    """The whole stack is stopped: stop nginx and clear what it owns (pid, temporary files)."""
    if ctx.stack.gateway is None:
        return False
    gateway = gateway_of(ctx)
    stopped = gateway.stop()
    gateway.clear()
    return stopped


# --------------------------------------------------------------------------- rolling


@dataclass(frozen=True)
class RollTarget:
    """A rolling update: the version the replicas move to (None in a roll: restart as is)."""

    config_hash: str
    revision: int


@dataclass
class RollResult:
    unit: str
    ok: bool = True
    steps: list[str] = field(default_factory=list)
    failures: int = 0
    surged: int = 0
    in_place: int = 0
    seconds: float = 0.0
    stopped_early: bool = False


def _surge_for(ctx: DeployContext, inst: UnitInstance, policy: RollingPolicy) -> SurgeDecision:
    """Ask the calculator whether one more replica of this unit fits now."""
    from tasks.gpus import surge_for

    return surge_for(ctx.stack, ctx.state_dir, inst, policy.surge)


def _other_slot(stack: Stack, inst: UnitInstance) -> UnitInstance:
    slot = 0 if inst.slot else 1
    return slot_instances(stack, inst.unit, slot)[inst.replica]


def _secrets_and_gpus(
    ctx: DeployContext, unit: str, inst: UnitInstance, kind: ActionKind, want: str
) -> tuple[dict[str, str], UnitInstance]:
    """The unit's secret values and (for `gpus: auto`) the GPUs of a new replica."""
    outcome = UnitOutcome(unit=unit, host=inst.host, ok=False)
    action = Action(unit, inst.name, inst.host, kind, "rolling", want)
    secrets, placed = _prepare(ctx, unit, {inst.name: inst}, [action], outcome)
    return secrets, placed.get(inst.name, inst)


def _surge_replica(
    ctx: DeployContext,
    backend: Backend,
    old: UnitInstance,
    target: RollTarget | None,
    observed: ObservedUnit | None,
    cap: float,
) -> tuple[bool, str]:
    """Start the replica's other slot beside it, gate it, switch traffic, drain and remove
    the old one. A new slot that fails its gate is removed; the old one never stopped."""
    store = ctx.store()
    stack = ctx.stack.stack
    unit = old.unit
    want = target.config_hash if target else (observed.config_hash if observed else "") or ""
    revision = target.revision if target else (observed.revision if observed else 0) or 0
    secrets, new = _secrets_and_gpus(
        ctx, unit, _other_slot(ctx.stack, old), ActionKind.REPLACE, want
    )
    rec.record_path(store, stack, unit, new.name, State.STARTING, "surge: new replica first")
    create = Create(new, want, revision, secrets)
    _apply(ctx, backend, unit, new.name, create, "create", retryable=False)
    gate = _gate(backend, new)
    if gate is not None and gate.verdict != "ready":
        why = gate.explain()
        rec.record(store, stack, unit, new.name, State.FAILED, f"never became ready: {why}")
        backend.apply(Remove(UnitRef.of(new)))
        store.release(stack, new.name)
        rec.forget(store, stack, unit, new.name, "removed: failed its gate during a roll")
        return False, f"{new.name} never became ready ({why}); removed, {old.name} kept serving"
    rec.record(store, stack, unit, new.name, State.RUNNING, "ready (surge)")
    rec.rebaseline(store, backend, new)
    _gateway_add(ctx, unit, [route_port(new)], drop=route_port(old))
    rec.record(store, stack, unit, old.name, State.DRAINING, f"replaced by {new.name}")
    drained = _drain_all([old], cap)[0]
    rec.record(store, stack, unit, old.name, State.STOPPING, f"replaced by {new.name}")
    _apply(ctx, backend, unit, old.name, Remove(UnitRef.of(old)), "remove", retryable=False)
    store.release(stack, old.name)
    rec.record(store, stack, unit, old.name, State.STOPPED, f"replaced by {new.name}")
    rec.forget(store, stack, unit, old.name, f"replaced by {new.name}")
    return True, f"{old.name} -> {new.name}: surge, {drained}"


def _in_place_batch(
    ctx: DeployContext,
    backend: Backend,
    batch: Sequence[UnitInstance],
    target: RollTarget | None,
    observed: dict[str, ObservedUnit],
    cap: float,
) -> list[tuple[bool, str]]:
    """Out of the gateway together, drained, restarted (or updated) in place, gated, back in.
    A replica that fails its gate is restored (the kept previous version after an update,
    one more start after a restart)."""
    store = ctx.store()
    stack = ctx.stack.stack
    unit = batch[0].unit
    why = "rolling update" if target else "rolling restart"
    _stop_instances(ctx, backend, unit, batch, observed, True, cap, why, retryable=False)
    out: list[tuple[bool, str]] = []
    for inst in batch:
        ref = UnitRef.of(inst)
        rec.record(store, stack, unit, inst.name, State.STARTING, why)
        if target is not None:
            secrets, placed = _secrets_and_gpus(
                ctx, unit, inst, ActionKind.UPDATE, target.config_hash
            )
            action: Any = Update(placed, target.config_hash, target.revision, secrets)
        else:
            action = Start(ref)
        step = "update" if target else "start"
        _apply(ctx, backend, unit, inst.name, action, step, retryable=False)
        gate = _gate(backend, inst)
        if gate is None or gate.verdict == "ready":
            rec.record(store, stack, unit, inst.name, State.RUNNING, f"{why}: ready")
            rec.rebaseline(store, backend, inst)
            _gateway_add(ctx, unit, [route_port(inst)])
            out.append((True, f"{inst.name}: in place, ready"))
            continue
        failure = gate.explain()
        rec.record(store, stack, unit, inst.name, State.FAILED, f"never became ready: {failure}")
        rec.record(store, stack, unit, inst.name, State.STARTING, "restoring")
        try:
            backend.apply(Restore(ref) if target is not None else Start(ref))
            regate = _gate(backend, inst)
        except BackendError as exc:
            rec.record(store, stack, unit, inst.name, State.FAILED, f"restore failed: {exc}")
            out.append((False, f"{inst.name}: failed its gate ({failure}); restore failed: {exc}"))
            continue
        if regate is None or regate.verdict == "ready":
            rec.record(store, stack, unit, inst.name, State.RUNNING, "restored")
            rec.rebaseline(store, backend, inst)
            _gateway_add(ctx, unit, [route_port(inst)])
            back = "previous version back" if target else "started again"
            out.append((False, f"{inst.name}: failed its gate ({failure}); restored: {back}"))
        else:
            rec.record(store, stack, unit, inst.name, State.FAILED, "restore never ready")
            out.append((False, f"{inst.name}: failed its gate ({failure}); restore failed too"))
    return out


@task(name="roll-unit", task_run_name="roll-{unit}", cache_policy=NO_CACHE)
def roll_unit(
    ctx: DeployContext,
    unit: str,
    policy: RollingPolicy,
    target: RollTarget | None = None,
    drain_timeout: float | None = None,
) -> RollResult:
    """Restart (or update to `target`) a unit replica by replica while the others serve:
    surge where spare GPU memory fits (per the calculator), else in place `max_unavailable`
    at a time; stop after more than `max_fail` replicas failed their gate (each restored)."""
    started = time.monotonic()
    log = rec.logger()
    backend = ctx.backend(ctx.stack.unit(unit).host)
    cap = drain_cap(ctx.stack, drain_timeout)
    observed = observe_all(ctx.stack, ctx.state_dir)
    replicas = unit_instances(ctx.stack, unit, observed)
    missing = [i.name for i in replicas if i.name not in observed or not observed[i.name].exists]
    if missing:
        raise LifecycleError(f"{unit}: {', '.join(missing)} not deployed (run `hxp apply` first)")
    result = RollResult(unit)
    queue = list(replicas)
    batch_size = len(rolling_batches([i.name for i in replicas], policy.max_unavailable)[0])
    from hxp.config import unit_config_hash

    running_hash = {observed[i.name].config_hash for i in replicas}
    drift = target is None and running_hash != {unit_config_hash(ctx.stack, unit)}
    while queue:
        decision = _surge_for(ctx, queue[0], policy)
        if decision.surge and drift:
            decision = SurgeDecision(
                False, "what runs differs from the stack file: restarting it as it is, in place"
            )
        if decision.surge:
            batch = [queue.pop(0)]
            log.info("%s: %s", batch[0].name, decision.reason)
            ok, line = _surge_replica(
                ctx, backend, batch[0], target, observed.get(batch[0].name), cap
            )
            outcomes = [(ok, line)]
            result.surged += 1
        else:
            batch = queue[:batch_size]
            del queue[:batch_size]
            log.info("%s: %s", ", ".join(i.name for i in batch), decision.reason)
            outcomes = _in_place_batch(ctx, backend, batch, target, observed, cap)
            result.in_place += len(batch)
        for ok, line in outcomes:
            result.steps.append(line)
            if ok:
                log.info("%s", line)
            else:
                log.warning("%s", line)
                result.failures += 1
        if result.failures > policy.max_fail:
            result.ok = False
            result.stopped_early = bool(queue)
            if queue:
                result.steps.append(
                    f"roll stopped after {result.failures} failed replica(s) "
                    f"(max_fail {policy.max_fail}); not rolled: {', '.join(i.name for i in queue)}"
                )
            break
        observed = observe_all(ctx.stack, ctx.state_dir)
    if target is not None and result.ok:
        for inst in unit_instances(ctx.stack, unit, observe_all(ctx.stack, ctx.state_dir)):
            with contextlib.suppress(BackendError):
                backend.apply(Commit(UnitRef.of(inst)))
    result.ok = result.ok and result.failures == 0
    result.seconds = time.monotonic() - started
    return result


# --------------------------------------------------------------------------- reload


@task(name="reload-unit", task_run_name="reload-{unit}", cache_policy=NO_CACHE)
def reload_unit(ctx: DeployContext, unit: str, target: RollTarget) -> UnitResult:
    """New config files and the unit's reload signal/command, replica by replica; no restart.
    A backend that cannot reload raises, and the caller rolls the unit instead."""
    started = time.monotonic()
    backend = ctx.backend(ctx.stack.unit(unit).host)
    if not isinstance(backend, Reloader):
        raise LifecycleError(f"{unit}: the {backend.kind} backend cannot reload in place")
    observed = observe_all(ctx.stack, ctx.state_dir)
    result = UnitResult(unit)
    for inst in unit_instances(ctx.stack, unit, observed):
        backend.reload(Reload(inst, target.config_hash, target.revision))
        result.done[inst.name] = "reloaded"
        ctx.store().add_event(ctx.stack.stack, "reloaded", f"{inst.name}: config reloaded", unit)
        gate = _gate(backend, inst)
        if gate is not None and gate.verdict != "ready":
            result.ok = False
            result.failed[inst.name] = f"unhealthy after the reload: {gate.explain()}"
            break
    result.seconds = time.monotonic() - started
    return result


# --------------------------------------------------------------------------- supervision


@dataclass
class SupervisorReport:
    stack: str
    restarted: list[str] = field(default_factory=list)
    crashed: list[str] = field(default_factory=list)
    waiting: dict[str, float] = field(default_factory=dict)
    gave_up: list[str] = field(default_factory=list)
    failed_restarts: dict[str, str] = field(default_factory=dict)
    reconciled: list[str] = field(default_factory=list)


def _restart(
    ctx: DeployContext, backend: Backend, inst: UnitInstance, record: LifecycleRecord
) -> str | None:
    """failed -> starting -> running after a crash; the reason it failed, or None."""
    store = ctx.store()
    stack = ctx.stack.stack
    rec.record(store, stack, inst.unit, inst.name, State.STARTING, "supervisor restart")
    try:
        backend.apply(Start(UnitRef.of(inst)))
    except Exception as exc:
        rec.count_error(store, stack, inst.unit, exc)
        rec.record(store, stack, inst.unit, inst.name, State.FAILED, f"restart failed: {exc}")
        return str(exc)
    gate = _gate(backend, inst)
    if gate is not None and gate.verdict != "ready":
        why = gate.explain()
        rec.record(store, stack, inst.unit, inst.name, State.FAILED, f"restart not ready: {why}")
        return why
    rec.record(store, stack, inst.unit, inst.name, State.RUNNING, "restarted by the supervisor")
    rec.rebaseline(store, backend, inst)
    _gateway_add(ctx, inst.unit, [route_port(inst)])
    return None


@task(name="supervise", task_run_name="supervise-{ctx.stack.stack}", cache_policy=NO_CACHE)
def supervise_pass(ctx: DeployContext, policy: CrashPolicy) -> SupervisorReport:
    """One supervisor pass: count crashes, restart with backoff, give up on a crash loop."""
    store = ctx.store()
    stack = ctx.stack.stack
    report = SupervisorReport(stack)
    observed = observe_all(ctx.stack, ctx.state_dir)
    instances = {i.name: i for u in ctx.stack.units() for i in _all_slots(ctx.stack, u)}
    for name, record in sorted(store.lifecycle(stack).items()):
        inst = instances.get(name)
        if inst is None:
            continue
        seen = observed.get(name)
        now = time.time()
        decision = supervise(record, seen, now, policy)
        backend = ctx.backend(inst.host)
        match decision.kind:
            case "ok":
                if (decision.crashes, decision.restarts_seen) != (
                    record.crashes,
                    record.restarts_seen,
                ):
                    store.note_crashes(
                        stack, name, decision.crashes, decision.restarts_seen, record.next_restart
                    )
            case "wait":
                store.note_crashes(
                    stack, name, decision.crashes, decision.restarts_seen, decision.next_restart
                )
                report.waiting[name] = (decision.next_restart or now) - now
            case "crashed":
                report.crashed.append(name)
                store.add_event(stack, "crash", f"{name}: {decision.reason}", inst.unit)
                rec.emit(
                    "hxp.supervisor.crash", stack, inst.unit, name, {"reason": decision.reason}
                )
                rec.count_error(store, stack, inst.unit, BackendError(decision.reason, unit=name))
                up = seen is not None and seen.running
                if up:  # restarted by its backend: still serving, only counted
                    store.note_crashes(stack, name, decision.crashes, decision.restarts_seen)
                    continue
                _gateway_remove(ctx, inst.unit, [route_port(inst)])
                rec.record(
                    store,
                    stack,
                    inst.unit,
                    name,
                    State.FAILED,
                    decision.reason,
                    crashes=decision.crashes,
                    next_restart=decision.next_restart,
                )
                store.note_crashes(
                    stack, name, decision.crashes, decision.restarts_seen, decision.next_restart
                )
                if (decision.next_restart or now) <= now:
                    why = _restart(ctx, backend, inst, record)
                    if why is None:
                        report.restarted.append(name)
                    else:
                        report.failed_restarts[name] = why
                else:
                    report.waiting[name] = (decision.next_restart or now) - now
            case "restart":
                why = _restart(ctx, backend, inst, record)
                if why is None:
                    report.restarted.append(name)
                else:
                    report.failed_restarts[name] = why
            case "give-up":
                report.gave_up.append(name)
                _gateway_remove(ctx, inst.unit, [route_port(inst)])
                with contextlib.suppress(BackendError):  # end the backend's own restarts too
                    backend.apply(Stop(UnitRef.of(inst), float(inst.spec.stop_timeout)))
                rec.count_error(store, stack, inst.unit, BackendError(decision.reason, unit=name))
                rec.record(
                    store,
                    stack,
                    inst.unit,
                    name,
                    State.FAILED,
                    decision.reason,
                    held=True,
                    crashes=decision.crashes,
                )
                store.note_crashes(stack, name, decision.crashes, decision.restarts_seen, None)
                rec.alert(
                    store, stack, inst.unit, name, "hxp.supervisor.crash-loop", decision.reason
                )
    return report


def lifecycle_context(stack: Stack, state_dir: str) -> DeployContext:
    """Lifecycle runs share the deploy's context (backends, store); they record no deploy."""
    return DeployContext(stack, state_dir, 0, "")


__all__ = [
    "RollResult",
    "RollTarget",
    "SupervisorReport",
    "UnitResult",
    "lifecycle_context",
    "reconcile_stack",
    "reload_unit",
    "retry_transient",
    "roll_unit",
    "start_unit",
    "stop_gateway",
    "stop_unit",
    "supervise_pass",
    "unit_instances",
]
