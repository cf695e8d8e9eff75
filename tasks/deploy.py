"""Deploy tasks: observe, apply one unit and gate it on readiness, roll one unit back.

Each task does one kind of side effect through the backend interface and never decides what
to change: the plan (hxp.plan) did that.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.tasks import exponential_backoff

from hxp.backends import observe_all
from hxp.backends.base import (
    Backend,
    Commit,
    Create,
    Remove,
    Restore,
    Start,
    UnitRef,
    Update,
    observe_one,
)
from hxp.endpoints import reach_health
from hxp.errors import BackendError, FailureClass, GpuAllocationError, HxpError
from hxp.gpu_alloc import host_key
from hxp.health import ProbeResult, ReadinessGate
from hxp.io import calibration, lifecycle
from hxp.io.probes import probe
from hxp.lifecycle import State, SurgeDecision
from hxp.plan import Action, ActionKind, ObservedUnit, StepKind
from hxp.spec import Stack
from hxp.store import Revision, default_state_dir
from hxp.units import UnitInstance, all_slots
from tasks.gpus import allocate_unit_gpus, surge_for
from tasks.instances import (
    LOG_LINES,
    RETRIES,
    RunContext,
    UnitDeployError,
    UnitOutcome,
    drain_all,
    drain_cap,
    gate,
    prepare,
    retire_slot,
    retry_transient,
    route_add,
    route_remove,
    route_server,
    route_swap,
    routed,
    routed_now,
    stop_instances,
)
from tasks.secrets import default_resolver, resolve_unit_secrets


@task(name="observe", task_run_name="observe-{stack.stack}", cache_policy=NO_CACHE)
def observe_stack(stack: Stack, state_dir: str) -> dict[str, ObservedUnit]:
    """Ask every host's backend what it runs of this stack."""
    return observe_all(stack, state_dir)


@task(
    name="deploy-unit",
    task_run_name="deploy-{unit}@{host}",
    cache_policy=NO_CACHE,
    retries=RETRIES,
    retry_delay_seconds=exponential_backoff(1),
    retry_condition_fn=retry_transient,
)
def apply_unit(ctx: RunContext, unit: str, host: str, actions: list[Action]) -> UnitOutcome:
    """Apply one unit's actions instance by instance, each gated on readiness.

    Whatever fails after a step was taken reaches the flow as a UnitDeployError carrying the
    steps, so the rollback undoes them (an old slot already retired comes back); only a
    transient backend error before any step is left for Prefect to retry."""
    started = time.monotonic()
    outcome = UnitOutcome(unit=unit, host=host, ok=False)
    try:
        return _apply_unit(ctx, unit, host, actions, outcome, started)
    except UnitDeployError:
        raise
    except Exception as exc:
        if not outcome.applied or (isinstance(exc, BackendError) and exc.transient):
            raise
        outcome.failed(
            FailureClass.OTHER,
            f"unexpected error after {len(outcome.applied)} step(s): {type(exc).__name__}: {exc}",
        )
        outcome.seconds = time.monotonic() - started
        ctx.event("unit-failed", outcome.reason, unit)
        raise UnitDeployError(outcome) from exc


def _apply_unit(
    ctx: RunContext,
    unit: str,
    host: str,
    actions: list[Action],
    outcome: UnitOutcome,
    started: float,
) -> UnitOutcome:
    logger = get_run_logger()
    store = ctx.store()
    backend = ctx.backend(host)
    instances = {u.name: u for u in all_slots(ctx.stack, unit)}
    # A blue-green replace on GPUs asks for room beside the old slot first; its new slot gets
    # its GPUs when it starts. One replica without room is refused before anything changes.
    on_gpus = {
        a.instance
        for a in actions
        if a.kind is ActionKind.REPLACE and instances[a.instance].gpu_count
    }
    decided = {
        a.instance: _decide_replace(ctx, a, instances, outcome)
        for a in actions
        if a.instance in on_gpus and ctx.stack.unit(unit).replicas == 1
    }
    secrets, placed = prepare(ctx, unit, instances, actions, outcome, defer=on_gpus)
    instances.update(placed)
    changes_version = any(
        a.kind in (ActionKind.CREATE, ActionKind.UPDATE, ActionKind.REPLACE) for a in actions
    )
    if changes_version:
        outcome.revision = store.record_revision(
            ctx.stack.stack,
            unit,
            actions[0].config_hash,
            ctx.snapshot_hash,
            ctx.deploy_id,
            ctx.stack.unit(unit).model_dump(mode="json"),
        )
    revision = outcome.revision or 0
    for action in actions:
        if action.instance in on_gpus:
            decision = decided.get(action.instance) or _decide_replace(
                ctx, action, instances, outcome
            )
            if not decision.surge:
                _replace_one_at_a_time(ctx, backend, action, instances, outcome, revision, secrets)
                continue
            instances[action.instance] = _place(ctx, action, instances, outcome)
        inst = instances[action.instance] = calibration.pin(store, instances[action.instance])
        ref = UnitRef.of(inst)
        # Recorded before the attempt: a half-done create or update is rolled back too.
        outcome.applied.append((action.instance, StepKind.of(action.kind)))
        try:
            match action.kind:
                case ActionKind.CREATE:
                    backend.apply(Create(inst, action.config_hash, revision, secrets))
                case ActionKind.UPDATE:
                    backend.apply(Update(inst, action.config_hash, revision, secrets))
                case ActionKind.START:
                    backend.apply(Start(ref))
                case ActionKind.REPLACE:  # the new slot starts beside the old one
                    backend.apply(Create(inst, action.config_hash, revision, secrets))
                case ActionKind.REMOVE:  # pragma: no cover - orphans go through remove_instance
                    backend.apply(Remove(ref))
        except BackendError as exc:
            if exc.transient:
                raise  # Prefect retries the task; actions are idempotent
            outcome.failed(
                FailureClass.APPLY, f"{action.kind.value} {action.instance} failed: {exc}"
            )
            outcome.logs = backend.logs(ref, LOG_LINES, since="start")
            outcome.seconds = time.monotonic() - started
            ctx.event("unit-failed", outcome.reason, unit)
            raise UnitDeployError(outcome) from exc
        logger.info(
            "%s: %s (%s); waiting for readiness", action.instance, action.kind.value, action.reason
        )
        ready = gate(backend, inst)
        if ready is not None and ready.verdict != "ready":
            outcome.failed(*_not_ready(ctx, backend, inst, ready))
            outcome.check = ready.last.check if ready.last else ""
            outcome.logs = backend.logs(ref, LOG_LINES, since="start")
            outcome.seconds = time.monotonic() - started
            ctx.event("unit-failed", outcome.reason, unit)
            raise UnitDeployError(outcome)
        ctx.event("unit-ready", f"{action.instance}: {action.kind.value}, ready", unit)
        lifecycle.mark_deployed(store, ctx.stack.stack, unit, action.instance, action.kind.value)
        lifecycle.rebaseline(store, backend, inst)
        calibration.note_start(store, backend, inst, ctx.deploy_id)
        if routed(ctx.stack, unit):
            _route(ctx, backend, action, inst, instances, outcome)
    if outcome.revision is not None:
        store.set_revision_status(ctx.stack.stack, unit, outcome.revision, "ready")
    outcome.ok = True
    outcome.seconds = time.monotonic() - started
    return outcome


def _not_ready(
    ctx: RunContext, backend: Backend, inst: UnitInstance, ready: ReadinessGate
) -> tuple[FailureClass, str]:
    """Why an instance failed its gate: it stopped (crashed), or it never became ready."""
    seen = backend.observe(ctx.stack.stack).get(inst.name)
    if seen is not None and not seen.running:
        return FailureClass.CRASHED, f"{inst.name} is not running ({seen.detail})"
    return FailureClass.READINESS, f"{inst.name} never became ready: {ready.explain()}"


# --------------------------------------------------------------------------- blue-green on GPUs


def replace_refusal(stack: Stack, action: Action, decision: SurgeDecision) -> str:
    """Why a single-replica model cannot be replaced blue-green: its new slot must start beside
    the old one, and the host has no GPU room for it (every GPU and its memory named)."""
    spec = stack.models[action.unit]
    if spec.gpus != "auto":
        why = (
            f"its GPUs are listed explicitly ({', '.join(map(str, spec.gpus))}), so the new slot "
            "would need the GPUs the old one holds"
        )
    else:
        why = "there is no spare GPU memory for it"
    detail = decision.detail or decision.reason
    return (
        f"models.{action.unit}: refusing to replace {action.replaces} (model {spec.model}) "
        f"blue-green: the new revision starts as {action.instance} beside it on host "
        f"{spec.host!r}, and {why}: {detail}. With one replica nothing else would serve while "
        "it is replaced, so nothing was changed; free GPU memory on the host, or run two or "
        "more replicas (then they are replaced one at a time)"
    )


def _strategy_line(action: Action, decision: SurgeDecision) -> str:
    if decision.surge:
        return (
            f"{action.replaces} -> {action.instance}: surge: {decision.reason}; the new slot "
            "starts beside the old one"
        )
    return (
        f"{action.replaces} -> {action.instance}: one at a time: "
        f"{decision.detail or decision.reason}; {action.replaces} leaves the gateway and stops "
        "first while the other replicas serve"
    )


def _decide_replace(
    ctx: RunContext, action: Action, instances: dict[str, UnitInstance], outcome: UnitOutcome
) -> SurgeDecision:
    """May the new slot of a model on GPUs start beside the old one (surge: spare GPUs pass
    the calculator's start check), or must the old one give its GPUs back first (one at a
    time)? Logged, kept in the outcome and recorded as a store event. A single replica
    without room is refused here: UnitDeployError, nothing changed."""
    decision = surge_for(ctx.stack, ctx.state_dir, instances[action.instance])
    if not decision.surge and ctx.stack.unit(action.unit).replicas == 1:
        outcome.failed(FailureClass.RESOURCES, replace_refusal(ctx.stack, action, decision))
        ctx.event("blue-green-refused", outcome.reason, action.unit)
        raise UnitDeployError(outcome)
    line = _strategy_line(action, decision)
    get_run_logger().info("%s", line)
    outcome.strategy.append(line)
    ctx.event("blue-green-strategy", line, action.unit)
    return decision


def _place(
    ctx: RunContext, action: Action, instances: dict[str, UnitInstance], outcome: UnitOutcome
) -> UnitInstance:
    """GPUs for a new blue-green slot (`gpus: auto`), chosen and reserved as it starts."""
    try:
        placement = allocate_unit_gpus(
            ctx.stack,
            ctx.state_dir,
            action.unit,
            instances,
            [action.instance],
            ctx.label,
        )
    except GpuAllocationError as exc:
        outcome.failed(FailureClass.RESOURCES, str(exc))
        ctx.event("unit-failed", outcome.reason, action.unit)
        raise UnitDeployError(outcome) from None
    if placement.note:
        get_run_logger().warning("%s: %s", action.unit, placement.note)
    inst = placement.instances.get(action.instance, instances[action.instance])
    get_run_logger().info("%s: GPUs %s", inst.name, ",".join(map(str, inst.gpus or ())))
    return inst


def _replace_one_at_a_time(
    ctx: RunContext,
    backend: Backend,
    action: Action,
    instances: dict[str, UnitInstance],
    outcome: UnitOutcome,
    revision: int,
    secrets: dict[str, str],
) -> None:
    """No GPU room beside the old slot: it leaves the gateway, drains and stops, giving its GPUs
    back; the new slot starts on them, is gated and takes its place behind the gateway. The old
    slot stays stopped until the deploy commits (then it is removed), so a rollback only has to
    start it again. A new slot that fails brings the old one back (started, gated, behind the
    gateway) and the unit fails saying why; the other replicas serve throughout."""
    store = ctx.store()
    stack = ctx.stack.stack
    unit = action.unit
    # The old slot as its own revision defines it: drained on its port, gated by its own check
    # (and served name) if it has to come back.
    old, new = _old_slot(ctx, backend, action, instances), instances[action.instance]
    why = f"replaced one at a time by {new.name}"
    outcome.applied.append((old.name, StepKind.WITHDRAWN))
    failure = ""
    failure_class = FailureClass.APPLY
    try:
        observed = observe_one(backend, old)
        seen = {old.name: observed} if observed is not None else {}
        stopped = stop_instances(
            ctx, backend, unit, [old], seen, True, drain_cap(ctx.stack), why, retryable=False
        )
        released = store.release(stack, old.name)
        outcome.withdrawn_gpus[old.name] = sorted(r.gpu_index for r in released)
        new = instances[new.name] = calibration.pin(store, _place(ctx, action, instances, outcome))
        outcome.applied.append((new.name, StepKind.REPLACE))
        backend.apply(Create(new, action.config_hash, revision, secrets))
        get_run_logger().info("%s: replace (%s); waiting for readiness", new.name, action.reason)
        ready = gate(backend, new)
        if ready is not None and ready.verdict != "ready":
            failure_class, failure = _not_ready(ctx, backend, new, ready)
            outcome.check = ready.last.check if ready.last else ""
            outcome.logs = backend.logs(UnitRef.of(new), LOG_LINES, since="start")
    except UnitDeployError:
        failure_class, failure = outcome.failure, outcome.reason
    except Exception as exc:  # whatever stopped it, the old slot must come back
        failure = f"{action.kind.value} {new.name} failed: {exc}"
    if failure:
        back = _bring_back(ctx, backend, old, new.name, outcome)
        # This replica is as it was: nothing of it is left for a rollback to undo.
        outcome.applied = [step for step in outcome.applied if step[0] not in (old.name, new.name)]
        outcome.failed(failure_class, f"{failure}; {back}")
        ctx.event("unit-failed", outcome.reason, unit)
        raise UnitDeployError(outcome)
    ctx.event("unit-ready", f"{new.name}: replace, ready", unit)
    lifecycle.mark_deployed(store, stack, unit, new.name, "replace")
    lifecycle.rebaseline(store, backend, new)
    calibration.note_start(store, backend, new, ctx.deploy_id)
    route_add(ctx, unit, new)
    ctx.event(
        "blue-green",
        f"{old.name} -> {new.name}: one at a time, {stopped.get(old.name, 'stopped')}",
        unit,
    )


@dataclass(frozen=True)
class EarlierVersion:
    """A unit as an earlier revision had it: what a rollback, or a replace that gives up, puts
    back. `slots` are its instances as that revision defined them (ports, health check, served
    name), from `stack`; no slots (and no stack) when nothing on record has the unit."""

    revision: Revision | None
    stack: Stack | None
    slots: dict[str, UnitInstance]


def earlier_version(
    ctx: RunContext, unit: str, previous: Stack | None = None, revision: int | None = None
) -> EarlierVersion:
    """Revision `revision` of `unit` (by default its last good one), its instances defined as
    in the snapshot that revision was deployed from; without that snapshot, as `previous`
    (the stack as last deployed) defines them."""
    store = ctx.store()
    revisions = store.revisions(ctx.stack.stack, unit) if revision is not None else []
    rev = next((r for r in revisions if r.revision == revision), None)
    rev = rev or store.last_good(ctx.stack.stack, unit)
    source: Stack | None = None
    snapshot = store.snapshot(rev.snapshot_hash) if rev is not None else None
    if snapshot is not None:
        try:
            source = snapshot.restore()
        except ValueError:  # a snapshot the current schema no longer reads
            source = None
    for candidate in (source, previous):
        if candidate is not None and unit in candidate.units():
            return EarlierVersion(rev, candidate, {u.name: u for u in all_slots(candidate, unit)})
    return EarlierVersion(rev, None, {})


def _old_slot(
    ctx: RunContext, backend: Backend, action: Action, instances: dict[str, UnitInstance]
) -> UnitInstance:
    """The slot a replace takes over from, as the revision it runs defined it (its ports, its
    check, its served name); the new config's definition when nothing on record has it."""
    current = instances[action.replaces]
    try:
        seen = observe_one(backend, current)
    except BackendError:
        seen = None
    earlier = earlier_version(ctx, action.unit, revision=seen.revision if seen else None)
    return earlier.slots.get(action.replaces, current)


def _recreate(
    ctx: RunContext, backend: Backend, inst: UnitInstance, earlier: EarlierVersion
) -> UnitInstance:
    """Create a slot again as an earlier revision defined it: GPUs placed again (`gpus: auto`),
    secrets resolved, that revision's config hash and number. HxpError when it cannot (any
    GPUs it got are released again)."""
    source = earlier.stack or ctx.stack
    rev = earlier.revision
    back = inst
    try:
        if inst.gpu_count:
            placed = allocate_unit_gpus(
                source,
                ctx.state_dir,
                inst.unit,
                {inst.name: inst},
                [inst.name],
                f"rollback of {ctx.label}",
            )
            back = placed.instances.get(inst.name, inst)
        secrets = (
            resolve_unit_secrets(inst.spec, default_resolver(ctx.state_dir), inst.field_path)
            if inst.spec.secret_env
            else {}
        )
        backend.apply(
            Create(back, rev.config_hash if rev else "", rev.revision if rev else 0, secrets)
        )
    except HxpError:
        ctx.store().release(ctx.stack.stack, inst.name)
        raise
    return back


def _bring_back(
    ctx: RunContext,
    backend: Backend,
    old: UnitInstance,
    new_name: str | None,
    outcome: UnitOutcome,
    earlier: EarlierVersion | None = None,
) -> str:
    """Put an old slot that a one-at-a-time replace stopped back in service: the new slot (if
    any) removed and its GPUs released, the old one's GPUs reserved again, started (created
    again as `earlier` defines it, if it is gone), gated as its own revision defines it (`old`)
    and back behind the gateway. A line saying how it went."""
    store = ctx.store()
    stack = ctx.stack.stack
    unit = old.unit
    try:
        if new_name is not None and new_name != old.name:
            backend.apply(Remove(UnitRef(stack, unit, new_name)))
            store.release(stack, new_name)
            lifecycle.forget(store, stack, unit, new_name, f"removed: {old.name} comes back")
        lifecycle.record_path(store, stack, unit, old.name, State.STARTING, "restoring")
        gpus = outcome.withdrawn_gpus.get(old.name)
        if observe_one(backend, old) is None:  # removed meanwhile: created again
            old = _recreate(ctx, backend, old, earlier or earlier_version(ctx, unit))
        else:
            if gpus:
                spec = ctx.stack.unit(unit)
                key = host_key(spec.host, ctx.stack.hosts[spec.host])
                store.reserve(key, stack, old.name, gpus)
            backend.apply(Start(UnitRef.of(old)))
        ready = gate(backend, old)
    except Exception as exc:
        lifecycle.record_path(store, stack, unit, old.name, State.FAILED, f"restore: {exc}")
        return f"{old.name} could NOT be restored: {exc}"
    if ready is not None and ready.verdict != "ready":
        lifecycle.record(store, stack, unit, old.name, State.FAILED, "restore never ready")
        return f"{old.name} started again but is NOT ready: {ready.explain()}"
    lifecycle.record(store, stack, unit, old.name, State.RUNNING, "restored")
    lifecycle.rebaseline(store, backend, old)
    route_add(ctx, unit, old)
    return f"{old.name} restored and back behind the gateway"


def _route(
    ctx: RunContext,
    backend: Backend,
    action: Action,
    inst: UnitInstance,
    instances: dict[str, UnitInstance],
    outcome: UnitOutcome,
) -> None:
    """Put a ready instance behind the gateway; for blue-green, switch the traffic from the
    old slot and retire it."""
    logger = get_run_logger()
    if action.kind is not ActionKind.REPLACE:
        route_add(ctx, inst.unit, inst)
        return
    old = _old_slot(ctx, backend, action, instances)
    route_swap(ctx, inst.unit, old, inst)
    outcome.applied.append((old.name, StepKind.SWITCHED))
    logger.info("%s: traffic switched to %s; draining", old.name, inst.name)
    drained = retire_slot(ctx, backend, old, inst, drain_cap(ctx.stack))
    logger.info("%s: %s", old.name, drained)
    outcome.applied.append((old.name, StepKind.RETIRED))
    ctx.event("blue-green", f"{old.name} -> {inst.name}: {drained}", inst.unit)


@task(
    name="blue-green-room", task_run_name="blue-green-room-{ctx.stack.stack}", cache_policy=NO_CACHE
)
def replace_refusals(ctx: RunContext, actions: list[Action]) -> dict[str, str]:
    """Before anything of the stack changes: every single-replica model on GPUs whose
    blue-green replace has no GPU room beside its old slot (unit -> why, the memory named)."""
    refused: dict[str, str] = {}
    for action in actions:
        if action.kind is not ActionKind.REPLACE or action.unit in refused:
            continue
        if ctx.stack.unit(action.unit).replicas != 1:
            continue
        inst = {u.name: u for u in all_slots(ctx.stack, action.unit)}[action.instance]
        if not inst.gpu_count:
            continue
        decision = surge_for(ctx.stack, ctx.state_dir, inst)
        if not decision.surge:
            refused[action.unit] = replace_refusal(ctx.stack, action, decision)
            ctx.event("blue-green-refused", refused[action.unit], action.unit)
    return refused


def agent_hosts_elsewhere(stack: Stack, here: Iterable[str]) -> set[str]:
    """The agent hosts (process backend, a work pool) that are not `here`: their processes
    are local to their own machine, so only the deploy part run there can see them."""
    mine = set(here)
    return {
        name
        for name, host in stack.hosts.items()
        if host.backend == "process" and host.work_pool is not None and name not in mine
    }


@task(name="gateway", task_run_name="gateway-{ctx.stack.stack}", cache_policy=NO_CACHE)
def sync_gateway(ctx: RunContext, here: Iterable[str] | None = None) -> dict[str, list[str]]:
    """Point the gateway at the routed instances that run now (starting nginx if needed).

    `here`: the hosts this run deploys (a part of a dispatched deploy). The instances of
    another agent host cannot be seen from here: they keep their place in the gateway as it
    is (that host's own part, or the health sweep, decides it). A gateway on another agent
    host is left to that host's part (this machine is not where it runs)."""
    if ctx.stack.gateway is None:
        return {}
    elsewhere = set() if here is None else agent_hosts_elsewhere(ctx.stack, here)
    if ctx.stack.gateway.host in elsewhere:
        return {}  # nginx runs on another agent host: only that host's part can drive it
    seen = observe_all(
        ctx.stack, ctx.state_dir, hosts=[h for h in sorted(ctx.stack.hosts) if h not in elsewhere]
    )
    # A replica asleep (`hxp sleep`) runs, but serves nothing until `hxp wake` puts it back.
    asleep = ctx.store().asleep(ctx.stack.stack)
    live: dict[str, list[str]] = {}
    unseen: dict[str, set[str]] = {}
    for unit in ctx.stack.gateway.routes:
        slots = all_slots(ctx.stack, unit)
        live[unit] = sorted(
            route_server(i)
            for i in slots
            if i.host not in elsewhere
            and i.name in seen
            and seen[i.name].running
            and i.name not in asleep
        )
        unseen[unit] = {route_server(i) for i in slots if i.host in elsewhere}
    return ctx.gateway().apply(live, keep=lambda unit, server: server in unseen.get(unit, ()))


@task(name="verify", task_run_name="verify-{ctx.stack.stack}", cache_policy=NO_CACHE)
def verify_units(ctx: RunContext, outcomes: list[UnitOutcome]) -> UnitOutcome | None:
    """Before committing: is every changed instance still running and healthy?

    Each touched host is observed once and every check runs side by side (a 30-unit deploy
    over SSH was verified one unit at a time: a host listing and a check per unit, 50 s);
    the first failure in the order of `outcomes` is the one reported.
    """
    seen = observe_all(ctx.stack, ctx.state_dir, hosts={o.host for o in outcomes})
    todo: list[tuple[UnitOutcome, str, UnitInstance]] = []
    for outcome in outcomes:
        instances = {u.name: u for u in all_slots(ctx.stack, outcome.unit)}
        for instance, kind in outcome.applied:
            if not kind.on_old_slot:  # an old slot of a blue-green replace is not checked
                todo.append((outcome, instance, instances[instance]))

    async def check_all() -> list[ProbeResult | None]:
        async def one(inst: UnitInstance) -> ProbeResult | None:
            obs = seen.get(inst.name)
            if obs is None or not obs.running or inst.health is None:
                return None
            checks = reach_health(inst.health, inst.host_spec)
            assert checks is not None
            return await probe(checks, inst.host_spec)

        return list(await asyncio.gather(*(one(inst) for _, _, inst in todo)))

    results = asyncio.run(check_all()) if todo else []
    for (outcome, instance, inst), result in zip(todo, results, strict=True):
        obs = seen.get(instance)
        reason = ""
        failure = FailureClass.VERIFY
        if obs is None or not obs.running:
            reason = f"{instance} stopped after it was ready ({obs.detail if obs else 'gone'})"
            failure = FailureClass.CRASHED
        elif result is not None and not result.ok:
            reason = f"{instance} was ready, then {result.check} failed: {result.reason}"
        if reason:
            outcome.ok = False
            outcome.failed(failure, reason)
            backend = ctx.backend(outcome.host)
            outcome.logs = backend.logs(UnitRef.of(inst), LOG_LINES, since="start")
            return outcome
    return None


@task(name="remove", task_run_name="remove-{instance}@{host}", cache_policy=NO_CACHE)
def remove_instance(ctx: RunContext, instance: str, host: str) -> str:
    """Stop and delete an instance that is no longer in the stack."""
    hosts = ctx.stack.hosts
    backend = ctx.backend(host if host in hosts else next(iter(hosts)))
    backend.apply(Remove(UnitRef(ctx.stack.stack, instance, instance)))
    ctx.store().release(ctx.stack.stack, instance)  # its GPU reservations, if any
    ctx.event("removed", instance, instance)
    lifecycle.forget(ctx.store(), ctx.stack.stack, instance, instance, "no longer in the stack")
    return instance


@task(name="commit", task_run_name="commit-{outcome.unit}", cache_policy=NO_CACHE)
def commit_unit(ctx: RunContext, outcome: UnitOutcome) -> None:
    """The deploy succeeded: mark the revision good and drop the kept previous versions."""
    backend = ctx.backend(outcome.host)
    for instance, kind in outcome.applied:
        ref = UnitRef(ctx.stack.stack, outcome.unit, instance)
        if kind == StepKind.UPDATE:
            backend.apply(Commit(ref))
        elif kind == StepKind.WITHDRAWN:  # an old slot a one-at-a-time replace stopped: now it goes
            backend.apply(Remove(ref))
            lifecycle.forget(ctx.store(), ctx.stack.stack, outcome.unit, instance, "replaced")
    if outcome.revision is not None:
        ctx.store().set_revision_status(ctx.stack.stack, outcome.unit, outcome.revision, "good")


@task(
    name="rollback-unit",
    task_run_name="rollback-{outcome.unit}@{outcome.host}",
    cache_policy=NO_CACHE,
)
def rollback_unit(ctx: RunContext, outcome: UnitOutcome, previous: Stack | None) -> list[str]:
    """Undo what a deploy did to one unit: restore updated instances, remove created ones."""
    backend = ctx.backend(outcome.host)
    store = ctx.store()
    done: list[str] = []
    # What comes back is the unit's last good revision, as that revision defined it.
    earlier = earlier_version(ctx, outcome.unit, previous)
    old = earlier.slots
    new = {u.name: u for u in all_slots(ctx.stack, outcome.unit)}
    for instance, kind in reversed(outcome.applied):
        ref = UnitRef(ctx.stack.stack, outcome.unit, instance)
        if kind.on_old_slot or kind == StepKind.REPLACE:
            done.extend(_undo_blue_green(ctx, backend, kind, instance, earlier, new, outcome))
        elif kind == StepKind.CREATE:
            if instance in new:
                route_remove(ctx, outcome.unit, new[instance])
            backend.apply(Remove(ref))
            store.release(ctx.stack.stack, instance)
            done.append(f"{instance}: removed (created by this deploy)")
        elif kind == StepKind.UPDATE:
            try:
                backend.apply(Restore(ref))
            except BackendError as exc:
                good = store.last_good(ctx.stack.stack, outcome.unit)
                seen = backend.observe(ctx.stack.stack).get(instance)
                if good is not None and seen is not None and seen.config_hash == good.config_hash:
                    # The update failed before it replaced anything.
                    state = "running" if seen.running else "NOT running"
                    done.append(f"{instance}: unchanged at revision {good.revision}, {state}")
                    continue
                if good is not None:
                    done.append(f"{instance}: could NOT be restored: {exc}")
                    continue
                backend.apply(Remove(ref))  # never had a good version: nothing to go back to
                store.release(ctx.stack.stack, instance)
                done.append(f"{instance}: removed (no earlier good version)")
                continue
            ready = gate(backend, old[instance]) if instance in old else None
            if ready is not None and ready.verdict != "ready":
                done.append(f"{instance}: restored but NOT healthy: {ready.explain()}")
            else:
                # Started afresh: the backend's restart counter is the supervisor's baseline.
                restored = old.get(instance) or new.get(instance)
                if restored is not None:
                    lifecycle.rebaseline(store, backend, restored)
                    seen = observe_one(backend, restored)  # the cheapest look (one instance)
                else:
                    seen = backend.observe(ctx.stack.stack).get(instance)
                rev = seen.revision if seen else None
                done.append(f"{instance}: restored revision {rev}, healthy")
    if outcome.revision is not None:
        store.set_revision_status(ctx.stack.stack, outcome.unit, outcome.revision, "rolled-back")
    for line in done:
        ctx.event("rolled-back", line, outcome.unit)
    return done


def _new_slot_of(
    instance: str, outcome: UnitOutcome, slots: Mapping[str, UnitInstance]
) -> UnitInstance | None:
    """The new slot this deploy started for the replica whose old slot is `instance`: each
    replica has its own (the other slot of the same replica)."""
    me = slots.get(instance)
    if me is None:
        return None
    started = [slots.get(n) for n, k in outcome.applied if k == StepKind.REPLACE]
    mine = [s for s in started if s is not None and s.replica == me.replica and s.name != instance]
    return mine[0] if mine else None


def _undo_blue_green(
    ctx: RunContext,
    backend: Backend,
    kind: StepKind,
    instance: str,
    earlier: EarlierVersion,
    new: dict[str, UnitInstance],
    outcome: UnitOutcome,
) -> list[str]:
    """Reverse one step of a blue-green replace (steps are undone newest first). An old slot
    that comes back is created, gated and routed as its own revision (`earlier`) defines it,
    in place of its own replica's new slot."""
    old = earlier.slots
    target = _new_slot_of(instance, outcome, new)
    if kind == StepKind.RETIRED:  # the old slot was stopped: bring its previous version back
        if instance not in old:
            return [f"{instance}: cannot come back (no earlier good configuration)"]
        try:
            back = _recreate(ctx, backend, old[instance], earlier)
        except HxpError as exc:
            return [f"{instance}: cannot come back: {exc}"]
        ready = gate(backend, back)
        if ready is not None and ready.verdict != "ready":
            return [f"{instance}: restarted but NOT healthy: {ready.explain()}"]
        store = ctx.store()
        lifecycle.record_path(
            store, ctx.stack.stack, outcome.unit, instance, State.RUNNING, "restored by a rollback"
        )
        lifecycle.rebaseline(store, backend, back)
        route_swap(ctx, outcome.unit, target, back)
        return [f"{instance}: previous version restarted and back behind the gateway"]
    if kind == StepKind.WITHDRAWN:  # stopped for a one-at-a-time replace (its new slot is gone now)
        inst = old.get(instance) or new.get(instance)
        if inst is None:  # pragma: no cover - the slot names of a unit do not change
            return [f"{instance}: cannot come back (unknown slot)"]
        return [_bring_back(ctx, backend, inst, None, outcome, earlier)]
    if kind == StepKind.SWITCHED:
        seen = observe_one(backend, old[instance]) if instance in old else None
        if seen is None or not seen.running:  # it did not come back: not behind the gateway
            return [f"{instance}: not running, so not switched back"]
        route_swap(ctx, outcome.unit, target, old[instance])
        return [f"{instance}: traffic switched back"]
    # The new slot: out of the gateway (if it got there) and drained, then removed, its GPUs
    # released.
    if instance in new:
        serving = routed_now(ctx, outcome.unit, new[instance])
        route_remove(ctx, outcome.unit, new[instance])
        if serving:
            drain_all([new[instance]], drain_cap(ctx.stack))
    backend.apply(Remove(UnitRef(ctx.stack.stack, outcome.unit, instance)))
    ctx.store().release(ctx.stack.stack, instance)
    lifecycle.forget(ctx.store(), ctx.stack.stack, outcome.unit, instance, "rolled back")
    return [f"{instance}: new slot removed; the old one kept serving"]


def interrupted_steps(
    ctx: RunContext, unit: str, actions: Sequence[Mapping[str, Any]]
) -> list[tuple[str, StepKind]]:
    """What a run that died during a blue-green deploy of a routed unit did to it, as the steps
    rollback_unit undoes: from the plan the run recorded (which slot served, which one it
    started) and what the unit's host runs now. A new slot that exists is removed. An old slot
    that still runs stays (or goes back) behind the gateway before its new slot goes; one that
    is gone is created again (as its last good revision defined it) before its new slot goes;
    one that was stopped to make room comes back after its new slot is gone (it may hold the
    GPUs). A replica created by the run is removed."""
    seen = ctx.backend(ctx.stack.unit(unit).host).observe(ctx.stack.stack)
    steps: list[tuple[str, StepKind]] = []
    for action in actions:
        if action.get("unit") != unit:
            continue
        name = str(action.get("instance"))
        if action.get("kind") == ActionKind.CREATE.value and name in seen:
            steps.append((name, StepKind.CREATE))
        elif action.get("kind") == ActionKind.REPLACE.value:
            started = [(name, StepKind.REPLACE)] if name in seen else []
            replaced = str(action.get("replaces"))
            before = seen.get(replaced)
            if before is not None and before.running:
                steps += [*started, (replaced, StepKind.SWITCHED)]
            elif before is not None:
                steps += [(replaced, StepKind.RETIRED), *started]
            else:
                steps += [*started, (replaced, StepKind.RETIRED)]
    return steps


def state_dir_of(state_dir: str | Path | None) -> str:
    return str(Path(state_dir) if state_dir else default_state_dir())


__all__ = [
    "EarlierVersion",
    "apply_unit",
    "commit_unit",
    "earlier_version",
    "interrupted_steps",
    "observe_stack",
    "remove_instance",
    "replace_refusal",
    "replace_refusals",
    "rollback_unit",
    "state_dir_of",
]
