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
from hxp.backends.base import Backend, Commit, Create, Remove, Restore, Start, UnitRef, Update
from hxp.errors import BackendError, DeployError
from hxp.health import ReadinessGate
from hxp.io.probes import wait_ready
from hxp.plan import Action, ActionKind, ObservedUnit
from hxp.spec import HealthSpec, Stack
from hxp.store import Store
from hxp.units import UnitInstance, expand_units

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
        seen = backend.observe(unit.stack).get(unit.name)
        if seen is not None and seen.running:
            return None
        gate = ReadinessGate(HealthSpec(command=["true"]))
        gate.give_up(f"stopped within {SETTLE_SECONDS}s ({seen.detail if seen else 'gone'})")
        return gate

    def running() -> bool:
        seen = backend.observe(unit.stack).get(unit.name)
        return seen is not None and seen.running

    return asyncio.run(wait_ready(unit.health, running))


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
    instances = {u.name: u for u in expand_units(ctx.stack, {unit})}
    outcome = UnitOutcome(unit=unit, host=host, ok=False)
    changes_version = any(a.kind in (ActionKind.CREATE, ActionKind.UPDATE) for a in actions)
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
                    backend.apply(Create(inst, action.config_hash, revision))
                case ActionKind.UPDATE:
                    backend.apply(Update(inst, action.config_hash, revision))
                case ActionKind.START:
                    backend.apply(Start(ref))
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
    if outcome.revision is not None:
        store.set_revision_status(ctx.stack.stack, unit, outcome.revision, "ready")
    outcome.ok = True
    outcome.seconds = time.monotonic() - started
    return outcome


@task(name="verify", task_run_name="verify-{ctx.stack.stack}", cache_policy=NO_CACHE)
def verify_units(ctx: DeployContext, outcomes: list[UnitOutcome]) -> UnitOutcome | None:
    """Before committing: is every changed instance still running and healthy?"""
    from hxp.io.probes import probe

    for outcome in outcomes:
        backend = ctx.backend(outcome.host)
        seen = backend.observe(ctx.stack.stack)
        instances = {u.name: u for u in expand_units(ctx.stack, {outcome.unit})}
        for instance, _ in outcome.applied:
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
    ctx.store().add_event(ctx.stack.stack, "removed", instance, instance, ctx.deploy_id)
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
        {u.name: u for u in expand_units(previous, {outcome.unit})}
        if (previous is not None and outcome.unit in previous.units())
        else {}
    )
    for instance, kind in reversed(outcome.applied):
        ref = UnitRef(ctx.stack.stack, outcome.unit, instance)
        if kind == ActionKind.CREATE.value:
            backend.apply(Remove(ref))
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
