"""Sleep and wake a model's replicas (vLLM sleep mode), one Prefect task per model.

sleep: every replica out of the gateway, its in-flight requests drained (as a stop drains),
then `POST /sleep?level=N`, `/is_sleeping` must say true; recorded `sleeping`, with what it
freed beside its GPU reservation (hxp.sleep).
wake: `POST /wake_up`, `/is_sleeping` must say false, one completion must succeed; only then
recorded `running` and put back behind the gateway. A replica that fails its wake is recorded
`failed` and stays out of the gateway.
"""

from __future__ import annotations

import time

from prefect import task
from prefect.cache_policies import NO_CACHE

from hxp.backends import observe_all
from hxp.calibration import calibration_key
from hxp.errors import HxpError, LifecycleError, SleepCallError
from hxp.gpu_alloc import host_key
from hxp.io import lifecycle as rec
from hxp.io import sleep as api
from hxp.io.gpus import discover_gpus
from hxp.lifecycle import State
from hxp.sleep import SleepLevel, SleepRelease, sleep_release, sleeping_model
from hxp.units import UnitInstance
from tasks.instances import (
    RunContext,
    drain_all,
    drain_cap,
    fail,
    report_drain,
    route_add,
    route_remove,
    state_of,
)
from tasks.lifecycle import UnitResult, unit_instances


def _finished(result: UnitResult, started: float, what: str) -> UnitResult:
    """Close a sleep's or wake's result; a model with no replica to act on is an error."""
    result.ok = not result.failed
    result.seconds = time.monotonic() - started
    if not result.done and not result.failed:
        raise LifecycleError(f"{result.unit}: no running replica to {what}")
    return result


def _replicas(ctx: RunContext, unit: str) -> list[UnitInstance]:
    """The model's running replicas (whichever blue-green slot runs)."""
    observed = observe_all(ctx.stack, ctx.state_dir)
    return [
        inst
        for inst in unit_instances(ctx.stack, unit, observed)
        if inst.name in observed and observed[inst.name].running
    ]


def _release(ctx: RunContext, inst: UnitInstance, level: SleepLevel) -> SleepRelease:
    """What `inst` frees at `level`: its GPUs (listed, or reserved for it), their memory as
    discovered, and the KV cache vLLM measured for it when the store has that."""
    store = ctx.store()
    spec = sleeping_model(ctx.stack, inst.unit)
    gpus = inst.gpus
    if gpus is None:
        key = host_key(inst.host, inst.host_spec)
        gpus = tuple(
            sorted(
                r.gpu_index
                for r in store.reservations(key)
                if r.stack == ctx.stack.stack and r.instance == inst.name
            )
        )
    totals: dict[int, int] = {}
    if gpus:
        try:
            found = discover_gpus(inst.host, inst.host_spec, state_dir=ctx.state_dir)
            totals = {d.index: d.total_bytes for d in found.devices}
        except HxpError:  # the host did not answer: the replica sleeps all the same
            totals = {}
    key_ = calibration_key(inst)
    measured = store.kv_calibration(key_) if key_ is not None else None
    return sleep_release(
        spec, level, gpus, totals, measured.available_kv_bytes if measured else None
    )


@task(name="sleep-model", task_run_name="sleep-{unit}", cache_policy=NO_CACHE)
def sleep_unit(
    ctx: RunContext, unit: str, level: int = 1, drain_timeout: float | None = None
) -> UnitResult:
    """Every running replica of `unit` out of the gateway, drained, then asleep at `level`."""
    started = time.monotonic()
    sleeping_model(ctx.stack, unit)
    chosen = SleepLevel(level)
    store = ctx.store()
    stack = ctx.stack.stack
    result = UnitResult(unit)
    awake: list[UnitInstance] = []
    for inst in _replicas(ctx, unit):
        current = state_of(store, stack, inst.name)
        if current is State.SLEEPING:
            result.done[inst.name] = "already asleep"
        elif current in (State.RUNNING, State.DEGRADED):
            awake.append(inst)
        else:
            result.failed[inst.name] = f"is {current.value}: only a serving replica sleeps"
    # Out of the gateway first (all of the model's replicas in one edit), then drained.
    route_remove(ctx, unit, *awake)
    why = f"sleep requested (level {int(chosen)})"
    for inst in awake:
        rec.record(store, stack, unit, inst.name, State.DRAINING, why)
    drained = dict(
        zip(
            [i.name for i in awake],
            drain_all(awake, drain_cap(ctx.stack, drain_timeout)),
            strict=True,
        )
    )
    for inst in awake:
        report_drain(ctx, unit, inst.name, drained[inst.name])
        try:
            api.put_to_sleep(inst, int(chosen))
            if not api.is_sleeping(inst):
                raise SleepCallError(f"{inst.name}: /sleep answered, but /is_sleeping says false")
        except SleepCallError as exc:
            # Still awake: it goes back to serving (in the gateway again).
            rec.record(store, stack, unit, inst.name, State.RUNNING, f"sleep failed: {exc}")
            route_add(ctx, unit, inst)
            result.failed[inst.name] = f"sleep failed, back behind the gateway: {exc}"
            continue
        release = _release(ctx, inst, chosen)
        store.record_sleep(stack, unit, inst.name, inst.host, release.to_dict())
        rec.record(store, stack, unit, inst.name, State.SLEEPING, why)
        ctx.event("sleep", f"{inst.name}: asleep, {release.explain()}", unit)
        result.done[inst.name] = f"asleep ({drained[inst.name]}); {release.explain()}"
    return _finished(result, started, "put to sleep")


@task(name="wake-model", task_run_name="wake-{unit}", cache_policy=NO_CACHE)
def wake_unit(ctx: RunContext, unit: str) -> UnitResult:
    """Every sleeping replica of `unit` awake, a completion served, then behind the gateway."""
    started = time.monotonic()
    spec = sleeping_model(ctx.stack, unit)
    store = ctx.store()
    stack = ctx.stack.stack
    result = UnitResult(unit)
    health = spec.health
    tries = health.retries if health is not None else 3
    pause = health.interval if health is not None else 2.0
    timeout = max(health.timeout if health is not None else 5.0, 5.0)
    asleep = store.sleeping(stack)
    for inst in _replicas(ctx, unit):
        current = state_of(store, stack, inst.name)
        if current is not State.SLEEPING:
            result.done[inst.name] = f"not asleep ({current.value}): left as it is"
            continue
        level = asleep.get(inst.name, {}).get("level", SleepLevel.OFFLOAD_WEIGHTS)
        rec.record(store, stack, unit, inst.name, State.STARTING, "wake requested")
        try:
            api.wake_up(inst)
            if api.is_sleeping(inst):
                raise SleepCallError(f"{inst.name}: /wake_up answered, but /is_sleeping says true")
            if level == SleepLevel.DISCARD_ALL:  # the weights are gone: load them again
                api.reload_weights(inst)
            served = api.serves_completion(inst, tries, pause, timeout)
        except SleepCallError as exc:
            store.clear_sleep(stack, inst.name)
            error = fail(ctx, unit, inst.name, f"wake failed, left out of the gateway: {exc}")
            result.failed[inst.name] = str(error)
            continue
        store.clear_sleep(stack, inst.name)
        rec.record(store, stack, unit, inst.name, State.RUNNING, f"awake: {served}")
        route_add(ctx, unit, inst)  # only now: a completion succeeded
        ctx.event("wake", f"{inst.name}: awake ({served}), back behind the gateway", unit)
        result.done[inst.name] = f"awake ({served}), back behind the gateway"
    return _finished(result, started, "wake")


__all__ = ["sleep_unit", "wake_unit"]
