"""Recording lifecycle transitions: the store row (the source of truth), a Prefect event
`hxp.lifecycle.<state>`, a log line and the `hxp_unit_lifecycle_state` gauge, in that order.
Errors are counted by class (`hxp_errors_total{where="lifecycle"}`) the same way.

Events and metrics are best effort: an unreachable Prefect API never fails a start or stop.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from hxp.errors import classify_error
from hxp.lifecycle import STATES, State, Transition, event_name, path_between, unit_state
from hxp.store import Store

if TYPE_CHECKING:
    from hxp.backends.base import Backend
    from hxp.units import UnitInstance

LOG = logging.getLogger("hxp.lifecycle")


def logger() -> Any:
    """The run logger inside a flow or task run, else the module's logger."""
    from prefect import get_run_logger
    from prefect.exceptions import MissingContextError

    try:
        return get_run_logger()
    except MissingContextError:
        return LOG


def resource(stack: str, unit: str, instance: str) -> dict[str, str]:
    """The Prefect event resource of one instance (the unit is a related resource)."""
    return {
        "prefect.resource.id": f"hxp.instance.{stack}.{instance}",
        "prefect.resource.name": instance,
        "hxp.stack": stack,
        "hxp.unit": unit,
    }


def _related(stack: str, unit: str) -> list[dict[str, str]]:
    return [
        {
            "prefect.resource.id": f"hxp.unit.{stack}.{unit}",
            "prefect.resource.role": "unit",
            "prefect.resource.name": unit,
        }
    ]


def emit(name: str, stack: str, unit: str, instance: str, payload: dict[str, Any]) -> None:
    """Emit one Prefect event about an instance; never raises."""
    try:
        from prefect.events import emit_event

        emit_event(
            event=name,
            resource=resource(stack, unit, instance),
            related=_related(stack, unit),
            payload=payload,
        )
    except Exception as exc:  # an events outage must not stop a lifecycle step
        LOG.warning("could not emit %s for %s: %s", name, instance, exc)


def publish_unit_state(store: Store, stack: str, unit: str) -> State:
    """Set the unit's lifecycle gauge from its instances' recorded states."""
    from hxp.io.telemetry import LIFECYCLE_STATE

    states = [r.state for r in store.lifecycle(stack).values() if r.unit == unit]
    current = unit_state(states)
    for state in STATES:
        LIFECYCLE_STATE.labels(stack, unit, state.value).set(1.0 if state is current else 0.0)
    return current


def announce(store: Store, change: Transition) -> None:
    """The event, log line and gauge of a transition the store has recorded."""
    emit(
        event_name(change.state),
        change.stack,
        change.unit,
        change.instance,
        {"from": change.previous.value, "to": change.state.value, "reason": change.reason},
    )
    log = logger()
    line = "lifecycle %s"
    if change.state is State.FAILED:
        log.warning(line, change.message())
    else:
        log.info(line, change.message())
    publish_unit_state(store, change.stack, change.unit)


def record(
    store: Store,
    stack: str,
    unit: str,
    instance: str,
    target: State,
    reason: str,
    **bookkeeping: Any,
) -> Transition | None:
    """Move one instance to `target` (one legal step) and announce it."""
    change = store.transition(stack, unit, instance, target, reason, **bookkeeping)
    if change is not None:
        announce(store, change)
    return change


def record_path(
    store: Store, stack: str, unit: str, instance: str, target: State, reason: str
) -> list[Transition]:
    """Move one instance to `target` through the legal steps between (reconciliation, and a
    start from wherever the instance was)."""
    rows = store.lifecycle(stack)
    current = rows[instance].state if instance in rows else State.STOPPED
    done = []
    for step in path_between(current, target) or ([target] if instance not in rows else []):
        change = record(store, stack, unit, instance, step, reason)
        if change is not None:
            done.append(change)
    return done


def walk(
    store: Store, stack: str, unit: str, instance: str, steps: Sequence[State], reason: str
) -> list[Transition]:
    """Record a given sequence of legal steps (from hxp.lifecycle.reconcile)."""
    done = []
    for step in steps:
        change = record(store, stack, unit, instance, step, reason)
        if change is not None:
            done.append(change)
    return done


def forget(store: Store, stack: str, unit: str, instance: str, reason: str) -> None:
    """Drop the record of an instance that no longer exists, and refresh its unit's gauge."""
    recorded_unit = store.forget_lifecycle(stack, instance, reason)
    if recorded_unit is not None:
        logger().info("lifecycle %s: forgotten (%s)", instance, reason)
        publish_unit_state(store, stack, recorded_unit)


def count_error(store: Store, stack: str, unit: str | None, exc: BaseException) -> str:
    """Count a failure by class (transient, permanent, input) in the store and the registry."""
    from hxp.io.telemetry import ERRORS

    error_class = classify_error(exc)
    ERRORS.labels(stack, "lifecycle", error_class).inc()
    store.add_event(stack, f"lifecycle-error-{error_class}", f"{type(exc).__name__}: {exc}", unit)
    return error_class


def alert(store: Store, stack: str, unit: str, instance: str, name: str, message: str) -> None:
    """An operator must look: a store `alert` event, a Prefect event and an error log line."""
    store.add_event(stack, "alert", f"{instance}: {message}", unit)
    emit(name, stack, unit, instance, {"message": message})
    logger().error("ALERT %s: %s", instance, message)


def rebaseline(store: Store, backend: Backend, inst: UnitInstance) -> None:
    """hxp has just started `inst` itself (a start, an update, a restore): that resets the
    backend's own restart counter (Docker's RestartCount on a start, systemd's NRestarts, the
    process supervisor's count). The counter as it is now becomes the supervisor's baseline;
    a baseline kept from before the start would hide the crashes the backend restarts by
    itself until the counter climbed past the old value. Best effort: a failed look leaves
    the old baseline (the supervisor then notices a counter that went back)."""
    from hxp.backends.base import observe_one
    from hxp.errors import BackendError

    try:
        seen = observe_one(backend, inst)
    except BackendError as exc:
        logger().warning("%s: restart counter not read after the start: %s", inst.name, exc)
        return
    if seen is not None and seen.restarts is not None:
        store.note_restarts(inst.stack, inst.name, seen.restarts)


def mark_deployed(store: Store, stack: str, unit: str, instance: str, how: str) -> None:
    """A deploy gated an instance ready: it is `running` (any crash-loop hold is lifted)."""
    store.clear_supervision(stack, instance)
    record_path(store, stack, unit, instance, State.RUNNING, f"deployed ({how}), ready")
