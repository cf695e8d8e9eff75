"""Lifecycle tasks: reconcile recorded states with the backends, start, stop (with drain),
roll a replicated unit replica by replica, reload in place, and supervise crashed units.

Every state change goes through hxp.io.lifecycle (store row, Prefect event, log line, gauge).
Decisions (legal transitions, reconciliation, crash policy, batches, surge) come from
hxp.lifecycle; these tasks only carry them out through the backend interface.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE
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
from hxp.config import unit_config_hash
from hxp.errors import BackendError, LifecycleError
from hxp.health import stalled
from hxp.io import lifecycle as rec
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
from hxp.units import UnitInstance, all_slots, expand_units, slot_instances
from tasks.gpus import surge_for
from tasks.instances import (
    RETRIES,
    RunContext,
    UnitOutcome,
    apply_step,
    drain_cap,
    fail,
    gate,
    prepare,
    retire_slot,
    retry_transient,
    route_add,
    route_remove,
    route_swap,
    routed,
    state_of,
    stop_instances,
)


@dataclass
class UnitResult:
    """What one lifecycle task did to one unit: a line per instance."""

    unit: str
    ok: bool = True
    done: dict[str, str] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0


def unit_instances(
    stack: Stack, unit: str, observed: dict[str, ObservedUnit]
) -> list[UnitInstance]:
    """The unit's live instance per replica: for a unit behind the gateway, whichever of its
    two blue-green slots exists (the running one, then the one with the stack's config)."""
    base = expand_units(stack, {unit})
    if not routed(stack, unit):
        return base
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
    for inst in all_slots(stack, unit):
        seen = observe_one(backend, inst)
        if seen is not None:
            out[inst.name] = seen
    return out


# --------------------------------------------------------------------------- reconcile


@task(name="reconcile", task_run_name="reconcile-{ctx.stack.stack}", cache_policy=NO_CACHE)
def reconcile_stack(ctx: RunContext) -> list[str]:
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
    unit_of = {i.name: i.unit for u in ctx.stack.units() for i in all_slots(ctx.stack, u)}
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
            inst = next(i for i in all_slots(ctx.stack, unit) if i.name == name)
            route_add(ctx, unit, inst)
            lines.append(f"{name}: back behind the gateway")
    return lines


# --------------------------------------------------------------------------- start and stop


def _start_instance(
    ctx: RunContext, backend: Backend, inst: UnitInstance, observed: ObservedUnit | None
) -> str:
    """stopped/failed -> starting -> running (gated), then behind the gateway."""
    store = ctx.store()
    stack = ctx.stack.stack
    if observed is None or not observed.exists:
        raise fail(ctx, inst.unit, inst.name, "is not deployed on its host (run `hxp apply` first)")
    current = state_of(store, stack, inst.name)
    if observed.running and current is State.SLEEPING:
        return "asleep: left asleep (`hxp wake` serves it again)"
    store.clear_supervision(stack, inst.name)
    if observed.running and current in (State.RUNNING, State.DEGRADED):
        route_add(ctx, inst.unit, inst)
        return "already running"
    if not observed.running or current not in (State.STARTING,):
        rec.record_path(store, stack, inst.unit, inst.name, State.STARTING, "start requested")
    if not observed.running:
        apply_step(ctx, backend, inst.unit, inst.name, Start(UnitRef.of(inst)), "start")
    ready = gate(backend, inst)
    if ready is not None and ready.verdict != "ready":
        raise fail(ctx, inst.unit, inst.name, f"never became ready: {ready.explain()}")
    rec.record(store, stack, inst.unit, inst.name, State.RUNNING, "ready")
    if not observed.running:
        rec.rebaseline(store, backend, inst)
    route_add(ctx, inst.unit, inst)
    return "started, ready"


@task(
    name="start-unit",
    task_run_name="start-{unit}",
    cache_policy=NO_CACHE,
    retries=RETRIES,
    retry_delay_seconds=exponential_backoff(0.5),
    retry_condition_fn=retry_transient,
)
def start_unit(ctx: RunContext, unit: str) -> UnitResult:
    """Start every replica of a unit that is not running, each gated on readiness."""
    started = time.monotonic()
    backend = ctx.backend(ctx.stack.unit(unit).host)
    observed = _observe_unit(backend, ctx.stack, unit)
    result = UnitResult(unit)
    for inst in unit_instances(ctx.stack, unit, observed):
        result.done[inst.name] = _start_instance(ctx, backend, inst, observed.get(inst.name))
    result.seconds = time.monotonic() - started
    return result


@task(
    name="stop-unit",
    task_run_name="stop-{unit}",
    cache_policy=NO_CACHE,
    retries=RETRIES,
    retry_delay_seconds=exponential_backoff(0.5),
    retry_condition_fn=retry_transient,
)
def stop_unit(
    ctx: RunContext, unit: str, drain: bool = True, drain_timeout: float | None = None
) -> UnitResult:
    """Take every replica out of the gateway, let in-flight requests finish, stop it."""
    started = time.monotonic()
    backend = ctx.backend(ctx.stack.unit(unit).host)
    observed = observe_all(ctx.stack, ctx.state_dir)
    instances = unit_instances(ctx.stack, unit, observed)
    result = UnitResult(unit)
    result.done = stop_instances(
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
def stop_gateway(ctx: RunContext) -> bool:
    """The whole stack is stopped: stop nginx and clear what it owns (pid, temporary files)."""
    if ctx.stack.gateway is None:
        return False
    gateway = ctx.gateway()
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


def _surge_for(ctx: RunContext, inst: UnitInstance, policy: RollingPolicy) -> SurgeDecision:
    """Ask the calculator whether one more replica of this unit fits now."""
    return surge_for(ctx.stack, ctx.state_dir, inst, policy.surge)


def _other_slot(stack: Stack, inst: UnitInstance) -> UnitInstance:
    slot = 0 if inst.slot else 1
    return slot_instances(stack, inst.unit, slot)[inst.replica]


def _secrets_and_gpus(
    ctx: RunContext, unit: str, inst: UnitInstance, kind: ActionKind, want: str
) -> tuple[dict[str, str], UnitInstance]:
    """The unit's secret values and (for `gpus: auto`) the GPUs of a new replica."""
    outcome = UnitOutcome(unit=unit, host=inst.host, ok=False)
    action = Action(unit, inst.name, inst.host, kind, "rolling", want)
    secrets, placed = prepare(ctx, unit, {inst.name: inst}, [action], outcome)
    return secrets, placed.get(inst.name, inst)


def _surge_replica(
    ctx: RunContext,
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
    apply_step(ctx, backend, unit, new.name, create, "create", retryable=False)
    ready = gate(backend, new)
    if ready is not None and ready.verdict != "ready":
        why = ready.explain()
        rec.record(store, stack, unit, new.name, State.FAILED, f"never became ready: {why}")
        backend.apply(Remove(UnitRef.of(new)))
        store.release(stack, new.name)
        rec.forget(store, stack, unit, new.name, "removed: failed its gate during a roll")
        return False, f"{new.name} never became ready ({why}); removed, {old.name} kept serving"
    rec.record(store, stack, unit, new.name, State.RUNNING, "ready (surge)")
    rec.rebaseline(store, backend, new)
    route_swap(ctx, unit, old, new)
    drained = retire_slot(ctx, backend, old, new, cap)
    return True, f"{old.name} -> {new.name}: surge, {drained}"


def _in_place_batch(
    ctx: RunContext,
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
    stop_instances(ctx, backend, unit, batch, observed, True, cap, why, retryable=False)
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
        apply_step(ctx, backend, unit, inst.name, action, step, retryable=False)
        ready = gate(backend, inst)
        if ready is None or ready.verdict == "ready":
            rec.record(store, stack, unit, inst.name, State.RUNNING, f"{why}: ready")
            rec.rebaseline(store, backend, inst)
            route_add(ctx, unit, inst)
            out.append((True, f"{inst.name}: in place, ready"))
            continue
        failure = ready.explain()
        rec.record(store, stack, unit, inst.name, State.FAILED, f"never became ready: {failure}")
        rec.record(store, stack, unit, inst.name, State.STARTING, "restoring")
        try:
            backend.apply(Restore(ref) if target is not None else Start(ref))
            regate = gate(backend, inst)
        except BackendError as exc:
            rec.record(store, stack, unit, inst.name, State.FAILED, f"restore failed: {exc}")
            out.append((False, f"{inst.name}: failed its gate ({failure}); restore failed: {exc}"))
            continue
        if regate is None or regate.verdict == "ready":
            rec.record(store, stack, unit, inst.name, State.RUNNING, "restored")
            rec.rebaseline(store, backend, inst)
            route_add(ctx, unit, inst)
            back = "previous version back" if target else "started again"
            out.append((False, f"{inst.name}: failed its gate ({failure}); restored: {back}"))
        else:
            rec.record(store, stack, unit, inst.name, State.FAILED, "restore never ready")
            out.append((False, f"{inst.name}: failed its gate ({failure}); restore failed too"))
    return out


@task(name="roll-unit", task_run_name="roll-{unit}", cache_policy=NO_CACHE)
def roll_unit(
    ctx: RunContext,
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
def reload_unit(ctx: RunContext, unit: str, target: RollTarget) -> UnitResult:
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
        ready = gate(backend, inst)
        if ready is not None and ready.verdict != "ready":
            result.ok = False
            result.failed[inst.name] = f"unhealthy after the reload: {ready.explain()}"
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
    ctx: RunContext,
    backend: Backend,
    inst: UnitInstance,
    record: LifecycleRecord,
    started: bool = False,
) -> str | None:
    """failed (or sleeping) -> starting -> running after a crash, gated and back behind the
    gateway; `started`: the backend restarted it already. The reason it failed, or None."""
    store = ctx.store()
    stack = ctx.stack.stack
    rec.record(store, stack, inst.unit, inst.name, State.STARTING, "supervisor restart")
    try:
        if not started:
            backend.apply(Start(UnitRef.of(inst)))
    except Exception as exc:
        rec.count_error(store, stack, inst.unit, exc)
        rec.record(store, stack, inst.unit, inst.name, State.FAILED, f"restart failed: {exc}")
        return str(exc)
    ready = gate(backend, inst)
    if ready is not None and ready.verdict != "ready":
        why = ready.explain()
        rec.record(store, stack, inst.unit, inst.name, State.FAILED, f"restart not ready: {why}")
        return why
    rec.record(store, stack, inst.unit, inst.name, State.RUNNING, "restarted by the supervisor")
    rec.rebaseline(store, backend, inst)
    route_add(ctx, inst.unit, inst)
    return None


@task(name="supervise", task_run_name="supervise-{ctx.stack.stack}", cache_policy=NO_CACHE)
def supervise_pass(ctx: RunContext, policy: CrashPolicy) -> SupervisorReport:
    """One supervisor pass: count crashes, restart with backoff, give up on a crash loop."""
    store = ctx.store()
    stack = ctx.stack.stack
    report = SupervisorReport(stack)
    observed = observe_all(ctx.stack, ctx.state_dir)
    instances = {i.name: i for u in ctx.stack.units() for i in all_slots(ctx.stack, u)}
    health = store.health_state(stack)[0]
    for name, record in sorted(store.lifecycle(stack).items()):
        inst = instances.get(name)
        if inst is None:
            continue
        seen = observed.get(name)
        now = time.time()
        # Stalled as the last sweep saw it, unless a crash was counted since that sweep (this
        # verdict was acted on already: it says nothing about the restarted process).
        swept = health.get(name)
        acted = max(record.crashes, default=0.0)
        stall = swept is not None and stalled(swept) and swept.checked_at > acted
        decision = supervise(record, seen, now, policy, stalled=stall)
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
                up = seen is not None and seen.running and not stall
                asleep = record.state is State.SLEEPING
                if asleep:  # vLLM restarts awake: say so (hxp.lifecycle.SLEEP_LOST)
                    store.add_event(stack, "sleep-lost", f"{name}: {decision.reason}", inst.unit)
                if up and asleep:  # restarted awake by its backend, out of the gateway
                    store.note_crashes(stack, name, decision.crashes, decision.restarts_seen)
                    why = _restart(ctx, backend, inst, record, started=True)
                    if why is None:
                        report.restarted.append(name)
                    else:
                        report.failed_restarts[name] = why
                    continue
                if up:  # restarted by its backend: still serving, only counted
                    store.note_crashes(stack, name, decision.crashes, decision.restarts_seen)
                    continue
                route_remove(ctx, inst.unit, inst)
                if stall:  # it runs, but makes no progress: stopped, then restarted as a crash
                    with contextlib.suppress(BackendError):
                        backend.apply(Stop(UnitRef.of(inst), float(inst.spec.stop_timeout)))
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
                route_remove(ctx, inst.unit, inst)
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


def lifecycle_context(stack: Stack, state_dir: str) -> RunContext:
    """The context of a lifecycle operation (start, stop, roll, supervise): backends and one
    store, and no deploy record."""
    return RunContext(stack, state_dir)


__all__ = [
    "RollResult",
    "RollTarget",
    "SupervisorReport",
    "UnitResult",
    "lifecycle_context",
    "reconcile_stack",
    "reload_unit",
    "roll_unit",
    "start_unit",
    "stop_gateway",
    "stop_unit",
    "supervise_pass",
    "unit_instances",
]
