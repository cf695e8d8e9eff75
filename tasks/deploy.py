"""Deploy tasks: observe, apply one unit and gate it on readiness, roll one unit back.

Each task does one kind of side effect through the backend interface and never decides what
to change: the plan (hxp.plan) did that.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.tasks import exponential_backoff

from hxp.backends import backend_for, observe_all
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
from hxp.errors import BackendError, DeployError
from hxp.health import ReadinessGate
from hxp.io import lifecycle
from hxp.io.gateway import NginxGateway
from hxp.io.probes import wait_drained, wait_ready
from hxp.plan import Action, ActionKind, ObservedUnit
from hxp.spec import HealthSpec, Stack
from hxp.store import Store
from hxp.units import UnitInstance, all_slots

LOG_LINES = 20


@dataclass(frozen=True)
class DeployContext:
    """What every task of one deploy run shares."""

    stack: Stack
    state_dir: str
    deploy_id: int
    snapshot_hash: str

    def backend(self, host: str) -> Backend:
        return backend_for(host, self.stack.hosts[host], self.state_dir)

    def store(self) -> Store:
        return Store(self.state_dir)


@dataclass
class UnitOutcome:
    """What happened to one unit in a deploy: the actions applied and how it ended."""

    unit: str
    host: str
    ok: bool
    revision: int | None = None
    applied: list[tuple[str, str]] = field(default_factory=list)  # (instance, action kind)
    reason: str = ""
    check: str = ""
    logs: list[str] = field(default_factory=list)
    seconds: float = 0.0


class UnitDeployError(DeployError):
    """One unit failed to apply or to become ready; carries its outcome for the rollback."""

    def __init__(self, outcome: UnitOutcome) -> None:
        self.outcome = outcome
        super().__init__(f"{outcome.unit}@{outcome.host}: {outcome.reason}")


def only_transient(task: Any, task_run: Any, state: Any) -> bool:
    """Retry a task only when it failed on a transient backend error."""
    try:
        state.result()
    except BackendError as exc:
        return exc.transient
    except Exception:
        return False
    return False


@task(name="observe", task_run_name="observe-{stack.stack}", cache_policy=NO_CACHE)
def observe_stack(stack: Stack, state_dir: str) -> dict[str, ObservedUnit]:
    """Ask every host's backend what it runs of this stack."""
    return observe_all(stack, state_dir)


SETTLE_SECONDS = 0.5


def _gate(backend: Backend, unit: UnitInstance) -> ReadinessGate | None:
    """Wait for the unit's checks; a unit without checks must at least stay up a moment."""
    if unit.health is None:
        time.sleep(SETTLE_SECONDS)
        seen = observe_one(backend, unit)
        if seen is not None and seen.running:
            return None
        gate = ReadinessGate(HealthSpec(command=["true"]))
        gate.give_up(f"stopped within {SETTLE_SECONDS}s ({seen.detail if seen else 'gone'})")
        return gate

    def running() -> bool:
        seen = observe_one(backend, unit)
        return seen is not None and seen.running

    gate = asyncio.run(wait_ready(unit.health, running))
    if gate.verdict == "ready" and unit.kind == "model":
        _model_api_gate(gate, unit)
    return gate


def _model_api_gate(gate: ReadinessGate, unit: UnitInstance) -> None:
    """After /health: the served name is listed and a one-token completion works."""
    from hxp.io.probes import probe_model_api
    from hxp.spec import ModelSpec

    assert isinstance(unit.spec, ModelSpec)
    assert unit.health is not None
    served = unit.spec.served_name or unit.unit
    port = dict(unit.ports)["http"]
    for attempt in range(unit.health.retries):
        result = asyncio.run(probe_model_api(port, served, max(unit.health.timeout, 5.0)))
        if result.ok:
            return
        if attempt + 1 < unit.health.retries:
            time.sleep(unit.health.interval)
    gate.give_up(f"{result.check}: {result.reason}")


_STARTS_NEW = (ActionKind.CREATE, ActionKind.UPDATE, ActionKind.REPLACE)


def _prepare(
    ctx: DeployContext,
    unit: str,
    instances: dict[str, UnitInstance],
    actions: list[Action],
    outcome: UnitOutcome,
) -> tuple[dict[str, str], dict[str, UnitInstance]]:
    """Before any change: the unit's secret values, and GPUs for `gpus: auto` models (both only
    for actions that start a new version)."""
    from hxp.errors import GpuAllocationError, SecretError
    from tasks.gpus import allocate_unit_gpus
    from tasks.secrets import default_resolver, resolve_unit_secrets

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
            starting,
            f"deploy #{ctx.deploy_id} of {ctx.stack.stack}",
        )
    except (SecretError, GpuAllocationError) as exc:
        outcome.reason = str(exc)
        ctx.store().add_event(ctx.stack.stack, "unit-failed", outcome.reason, unit, ctx.deploy_id)
        raise UnitDeployError(outcome) from None
    if placement.note:
        get_run_logger().warning("%s: %s", unit, placement.note)
    for name, inst in placement.instances.items():
        get_run_logger().info("%s: GPUs %s", name, ",".join(map(str, inst.gpus or ())))
    return secrets, placement.instances


@task(
    name="deploy-unit",
    task_run_name="deploy-{unit}@{host}",
    cache_policy=NO_CACHE,
    retries=2,
    retry_delay_seconds=exponential_backoff(1),
    retry_condition_fn=only_transient,
)
def apply_unit(ctx: DeployContext, unit: str, host: str, actions: list[Action]) -> UnitOutcome:
    """Apply one unit's actions instance by instance, each gated on readiness."""
    logger = get_run_logger()
    started = time.monotonic()
    store = ctx.store()
    backend = ctx.backend(host)
    instances = {u.name: u for u in _all_slots(ctx.stack, unit)}
    outcome = UnitOutcome(unit=unit, host=host, ok=False)
    secrets, placed = _prepare(ctx, unit, instances, actions, outcome)
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
        inst = instances[action.instance]
        ref = UnitRef.of(inst)
        # Recorded before the attempt: a half-done create or update is rolled back too.
        outcome.applied.append((action.instance, action.kind.value))
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
            outcome.reason = f"{action.kind.value} {action.instance} failed: {exc}"
            outcome.logs = backend.logs(ref, LOG_LINES)
            outcome.seconds = time.monotonic() - started
            store.add_event(ctx.stack.stack, "unit-failed", outcome.reason, unit, ctx.deploy_id)
            raise UnitDeployError(outcome) from exc
        logger.info(
            "%s: %s (%s); waiting for readiness", action.instance, action.kind.value, action.reason
        )
        gate = _gate(backend, inst)
        if gate is not None and gate.verdict != "ready":
            seen = backend.observe(ctx.stack.stack).get(inst.name)
            if seen is not None and not seen.running:
                outcome.reason = f"{inst.name} is not running ({seen.detail})"
            else:
                outcome.reason = f"{inst.name} never became ready: {gate.explain()}"
            outcome.check = gate.last.check if gate.last else ""
            outcome.logs = backend.logs(ref, LOG_LINES)
            outcome.seconds = time.monotonic() - started
            store.add_event(ctx.stack.stack, "unit-failed", outcome.reason, unit, ctx.deploy_id)
            raise UnitDeployError(outcome)
        store.add_event(
            ctx.stack.stack,
            "unit-ready",
            f"{action.instance}: {action.kind.value}, ready",
            unit,
            ctx.deploy_id,
        )
        lifecycle.mark_deployed(store, ctx.stack.stack, unit, action.instance, action.kind.value)
        if ctx.stack.gateway is not None and unit in ctx.stack.gateway.routes:
            _route(ctx, backend, action, inst, instances, outcome)
    if outcome.revision is not None:
        store.set_revision_status(ctx.stack.stack, unit, outcome.revision, "ready")
    outcome.ok = True
    outcome.seconds = time.monotonic() - started
    return outcome


_all_slots = all_slots


def route_port(inst: UnitInstance) -> int:
    """The port the gateway sends a routed unit's traffic to (a routed unit has ports)."""
    port = inst.route_port
    assert port is not None, f"{inst.name} is routed but declares no port"
    return port


def gateway_of(ctx: DeployContext) -> NginxGateway:
    assert ctx.stack.gateway is not None
    return NginxGateway(ctx.state_dir, ctx.stack.stack, ctx.stack.gateway)


def _swap(ctx: DeployContext, unit: str, remove: int | None, add: int | None) -> None:
    gateway = gateway_of(ctx)
    ports = [p for p in gateway.live().get(unit, []) if p != remove]
    if add is not None and add not in ports:
        ports.append(add)
    gateway.set_upstream(unit, ports)


def _route(
    ctx: DeployContext,
    backend: Backend,
    action: Action,
    inst: UnitInstance,
    instances: dict[str, UnitInstance],
    outcome: UnitOutcome,
) -> None:
    """Put a ready instance behind the gateway; for blue-green, retire the old slot."""
    logger = get_run_logger()
    assert ctx.stack.gateway is not None
    if action.kind is not ActionKind.REPLACE:
        _swap(ctx, inst.unit, None, route_port(inst))
        return
    old = instances[action.replaces]
    _swap(ctx, inst.unit, route_port(old), route_port(inst))
    outcome.applied.append((old.name, "switched"))
    logger.info("%s: traffic switched to %s; draining", old.name, inst.name)
    drained = asyncio.run(wait_drained(old, ctx.stack.gateway.drain_timeout))
    logger.info("%s: %s", old.name, drained)
    backend.apply(Remove(UnitRef.of(old)))
    ctx.store().release(ctx.stack.stack, old.name)  # its GPU reservations, if any
    lifecycle.forget(ctx.store(), ctx.stack.stack, inst.unit, old.name, f"retired for {inst.name}")
    outcome.applied.append((old.name, "retired"))
    ctx.store().add_event(
        ctx.stack.stack,
        "blue-green",
        f"{old.name} -> {inst.name}: {drained}",
        inst.unit,
        ctx.deploy_id,
    )


@task(name="gateway", task_run_name="gateway-{ctx.stack.stack}", cache_policy=NO_CACHE)
def sync_gateway(ctx: DeployContext) -> dict[str, list[int]]:
    """Point the gateway at the routed instances that run now (starting nginx if needed)."""
    if ctx.stack.gateway is None:
        return {}
    seen = observe_all(ctx.stack, ctx.state_dir)
    live: dict[str, list[int]] = {}
    for unit in ctx.stack.gateway.routes:
        live[unit] = sorted(
            route_port(i)
            for i in _all_slots(ctx.stack, unit)
            if i.name in seen and seen[i.name].running
        )
    gateway_of(ctx).apply(live)
    return live


@task(name="verify", task_run_name="verify-{ctx.stack.stack}", cache_policy=NO_CACHE)
def verify_units(ctx: DeployContext, outcomes: list[UnitOutcome]) -> UnitOutcome | None:
    """Before committing: is every changed instance still running and healthy?"""
    from hxp.io.probes import probe

    for outcome in outcomes:
        backend = ctx.backend(outcome.host)
        seen = backend.observe(ctx.stack.stack)
        instances = {u.name: u for u in _all_slots(ctx.stack, outcome.unit)}
        for instance, kind in outcome.applied:
            if kind in ("switched", "retired"):  # the old slot of a blue-green replace
                continue
            obs = seen.get(instance)
            inst = instances[instance]
            reason = ""
            if obs is None or not obs.running:
                reason = f"{instance} stopped after it was ready ({obs.detail if obs else 'gone'})"
            elif inst.health is not None:
                result = asyncio.run(probe(inst.health))
                if not result.ok:
                    reason = f"{instance} was ready, then {result.check} failed: {result.reason}"
            if reason:
                outcome.ok = False
                outcome.reason = reason
                outcome.logs = backend.logs(UnitRef.of(inst), LOG_LINES)
                return outcome
    return None


@task(name="remove", task_run_name="remove-{instance}@{host}", cache_policy=NO_CACHE)
def remove_instance(ctx: DeployContext, instance: str, host: str) -> str:
    """Stop and delete an instance that is no longer in the stack."""
    hosts = ctx.stack.hosts
    backend = ctx.backend(host if host in hosts else next(iter(hosts)))
    backend.apply(Remove(UnitRef(ctx.stack.stack, instance, instance)))
    ctx.store().release(ctx.stack.stack, instance)  # its GPU reservations, if any
    ctx.store().add_event(ctx.stack.stack, "removed", instance, instance, ctx.deploy_id)
    lifecycle.forget(ctx.store(), ctx.stack.stack, instance, instance, "no longer in the stack")
    return instance


@task(name="commit", task_run_name="commit-{outcome.unit}", cache_policy=NO_CACHE)
def commit_unit(ctx: DeployContext, outcome: UnitOutcome) -> None:
    """The deploy succeeded: mark the revision good and drop the kept previous versions."""
    backend = ctx.backend(outcome.host)
    for instance, kind in outcome.applied:
        if kind == ActionKind.UPDATE.value:
            backend.apply(Commit(UnitRef(ctx.stack.stack, outcome.unit, instance)))
    if outcome.revision is not None:
        ctx.store().set_revision_status(ctx.stack.stack, outcome.unit, outcome.revision, "good")


@task(
    name="rollback-unit",
    task_run_name="rollback-{outcome.unit}@{outcome.host}",
    cache_policy=NO_CACHE,
)
def rollback_unit(ctx: DeployContext, outcome: UnitOutcome, previous: Stack | None) -> list[str]:
    """Undo what a deploy did to one unit: restore updated instances, remove created ones."""
    backend = ctx.backend(outcome.host)
    store = ctx.store()
    done: list[str] = []
    old = (
        {u.name: u for u in _all_slots(previous, outcome.unit)}
        if (previous is not None and outcome.unit in previous.units())
        else {}
    )
    new = {u.name: u for u in _all_slots(ctx.stack, outcome.unit)}
    for instance, kind in reversed(outcome.applied):
        ref = UnitRef(ctx.stack.stack, outcome.unit, instance)
        if kind in ("retired", "switched", ActionKind.REPLACE.value):
            done.extend(_undo_blue_green(ctx, backend, kind, instance, old, new, outcome))
        elif kind == ActionKind.CREATE.value:
            backend.apply(Remove(ref))
            store.release(ctx.stack.stack, instance)
            done.append(f"{instance}: removed (created by this deploy)")
        elif kind == ActionKind.UPDATE.value:
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
            gate = _gate(backend, old[instance]) if instance in old else None
            if gate is not None and gate.verdict != "ready":
                done.append(f"{instance}: restored but NOT healthy: {gate.explain()}")
            else:
                seen = backend.observe(ctx.stack.stack).get(instance)
                rev = seen.revision if seen else None
                done.append(f"{instance}: restored revision {rev}, healthy")
    if outcome.revision is not None:
        store.set_revision_status(ctx.stack.stack, outcome.unit, outcome.revision, "rolled-back")
    for line in done:
        store.add_event(ctx.stack.stack, "rolled-back", line, outcome.unit, ctx.deploy_id)
    return done


def _undo_blue_green(
    ctx: DeployContext,
    backend: Backend,
    kind: str,
    instance: str,
    old: dict[str, UnitInstance],
    new: dict[str, UnitInstance],
    outcome: UnitOutcome,
) -> list[str]:
    """Reverse one step of a blue-green replace (steps are undone newest first)."""
    replaced = [i for i, k in outcome.applied if k == ActionKind.REPLACE.value]
    target = new.get(replaced[0]) if replaced else None
    if kind == "retired":  # the old slot was stopped: bring its previous version back
        if instance not in old:
            return [f"{instance}: cannot come back (no earlier good configuration)"]
        revision = ctx.store().last_good(ctx.stack.stack, outcome.unit)
        backend.apply(
            Create(
                old[instance],
                revision.config_hash if revision else "",
                revision.revision if revision else 0,
            )
        )
        gate = _gate(backend, old[instance])
        if gate is not None and gate.verdict != "ready":
            return [f"{instance}: restarted but NOT healthy: {gate.explain()}"]
        _swap(ctx, outcome.unit, route_port(target) if target else None, route_port(old[instance]))
        return [f"{instance}: previous version restarted and back behind the gateway"]
    if kind == "switched":
        if instance in old:
            _swap(
                ctx, outcome.unit, route_port(target) if target else None, route_port(old[instance])
            )
        return [f"{instance}: traffic switched back"]
    # The new slot: out of the gateway (if it got there), then removed.
    if instance in new:
        _swap(ctx, outcome.unit, route_port(new[instance]), None)
    backend.apply(Remove(UnitRef(ctx.stack.stack, outcome.unit, instance)))
    return [f"{instance}: new slot removed; the old one kept serving"]


def state_dir_of(state_dir: str | Path | None) -> str:
    from hxp.store import default_state_dir

    return str(Path(state_dir) if state_dir else default_state_dir())


__all__ = [
    "DeployContext",
    "UnitDeployError",
    "UnitOutcome",
    "apply_unit",
    "commit_unit",
    "observe_stack",
    "remove_instance",
    "rollback_unit",
    "state_dir_of",
]
