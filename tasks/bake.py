"""The bake task: after a deploy's final verification, watch every instance it started for its
unit's bake window (hxp.bake) before the deploy commits.

Every changed instance is watched at once, each until its own window ends: the backend is
asked whether it still runs (and whether it restarted by itself) about twice a second, its
checks run every health interval (a check fails after `health.retries` failures in a row, as
the supervisor counts), and a model's served name must still answer a one-token completion (a
model that stops answering has stalled). The first failure ends the watch; the
deploy rolls back like any other failure.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from functools import partial

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from hxp.backends import observe_all
from hxp.backends.base import UnitRef
from hxp.bake import BakeFailure, bake_pause, bake_seconds
from hxp.endpoints import base_url, reach_health
from hxp.errors import FailureClass
from hxp.health import ProbeResult
from hxp.io.probes import probe, probe_model_api
from hxp.spec import HealthSpec, ModelSpec
from hxp.units import UnitInstance, all_slots
from tasks.instances import LOG_LINES, RunContext, UnitOutcome


@dataclass
class _Watched:
    outcome: UnitOutcome
    inst: UnitInstance
    window: float
    restarts: int | None  # the backend's own restart count when the window opened
    next_check: float = 0.0  # seconds into the window of the next health check


def _watched(ctx: RunContext, outcomes: list[UnitOutcome]) -> list[_Watched]:
    """Every instance a changed unit runs as this deploy's revision (old blue-green slots are
    leaving and not watched), with its window; units whose window is 0 are left out."""
    out: list[_Watched] = []
    for outcome in outcomes:
        slots = {u.name: u for u in all_slots(ctx.stack, outcome.unit)}
        for instance, kind in outcome.applied:
            if kind.on_old_slot or instance not in slots:
                continue
            inst = slots[instance]
            window = bake_seconds(ctx.stack, outcome.unit, inst.health)
            if window > 0:
                out.append(_Watched(outcome, inst, window, None))
    return out


def _look(ctx: RunContext, watched: list[_Watched], elapsed: float) -> BakeFailure | None:
    """One look at every instance still inside its window: each host observed once, the due
    checks side by side (30 instances checked over SSH one after another took longer than
    the window); the first failure in `watched` order is the one reported."""
    seen = observe_all(ctx.stack, ctx.state_dir, hosts={w.outcome.host for w in watched})
    due: list[_Watched] = []
    for w in watched:
        if elapsed >= w.window and w.next_check > 0:
            continue  # its window has passed (and it was looked at inside it)
        obs = seen.get(w.inst.name)
        name = w.inst.name
        if obs is None or not obs.running:
            detail = obs.detail if obs is not None else "gone"
            return BakeFailure(name, elapsed, "crashed", f"it stopped running ({detail})")
        if w.restarts is None:
            w.restarts = obs.restarts
        elif obs.restarts is not None and obs.restarts > w.restarts:
            return BakeFailure(
                name,
                elapsed,
                "restarted",
                f"it crashed and was restarted {obs.restarts - w.restarts} time(s) ({obs.detail})",
            )
        if elapsed < w.next_check:
            continue
        interval = w.inst.health.interval if w.inst.health is not None else w.window
        w.next_check = max(elapsed, 1e-6) + interval
        if w.inst.health is not None:
            due.append(w)
    if not due:
        return None

    async def check_all() -> list[BakeFailure | None]:
        return list(await asyncio.gather(*(_check(w, elapsed) for w in due)))

    return next((f for f in asyncio.run(check_all()) if f is not None), None)


async def _check(w: _Watched, elapsed: float) -> BakeFailure | None:
    """The instance's checks (on its host, as verify runs them); a model also answers a
    completion, else it stalled."""
    health = w.inst.health
    assert health is not None
    checks = reach_health(health, w.inst.host_spec)
    assert checks is not None
    result = await _checked(health, partial(probe, checks, w.inst.host_spec))
    if not result.ok:
        why = f"{result.check} failed {health.retries} time(s) in a row: {result.reason}"
        return BakeFailure(w.inst.name, elapsed, "check", why)
    if isinstance(w.inst.spec, ModelSpec):
        served = w.inst.spec.served_name or w.inst.unit
        timeout = max(health.timeout, 5.0)
        base = base_url(w.inst, dict(w.inst.ports)["http"])
        answer = await _checked(health, partial(probe_model_api, base, served, timeout))
        if not answer.ok:
            return BakeFailure(
                w.inst.name, elapsed, "stalled", f"{answer.check} stalled: {answer.reason}"
            )
    return None


async def _checked(health: HealthSpec, check: Callable[[], Awaitable[ProbeResult]]) -> ProbeResult:
    """A check as the supervisor counts it: failed only after `health.retries` failures in a
    row (a moment apart), so one slow answer on a busy host fails nothing."""
    result = await check()
    for _ in range(health.retries - 1):
        if result.ok:
            break
        await asyncio.sleep(min(health.interval, 0.5))
        result = await check()
    return result


@task(name="bake", task_run_name="bake-{ctx.stack.stack}", cache_policy=NO_CACHE)
def bake_units(ctx: RunContext, outcomes: list[UnitOutcome]) -> UnitOutcome | None:
    """Watch every changed instance for its unit's bake window; the outcome of the first unit
    that failed inside it (FailureClass.BAKE, the reason saying "failed during bake"), or None
    when every window passed."""
    logger = get_run_logger()
    watched = _watched(ctx, outcomes)
    if not watched:
        return None
    longest = max(w.window for w in watched)
    logger.info(
        "baking %d instance(s) for up to %.1fs: %s",
        len(watched),
        longest,
        ", ".join(f"{w.inst.name} {w.window:g}s" for w in watched),
    )
    start = time.monotonic()
    while True:
        elapsed = time.monotonic() - start
        failure = _look(ctx, watched, elapsed)
        if failure is not None:
            return _failed(ctx, watched, failure)
        if elapsed >= longest:
            break
        left = [w for w in watched if elapsed < w.window]
        pause = min(bake_pause(w.inst.health, w.window - elapsed) for w in left) if left else 0
        time.sleep(max(pause, 0.01))
    for outcome in {id(w.outcome): w.outcome for w in watched}.values():
        ctx.event("baked", f"{outcome.unit}: healthy through its bake window", outcome.unit)
    logger.info("bake passed after %.1fs", time.monotonic() - start)
    return None


def _failed(ctx: RunContext, watched: list[_Watched], failure: BakeFailure) -> UnitOutcome:
    w = next(w for w in watched if w.inst.name == failure.instance)
    outcome = w.outcome
    outcome.ok = False
    outcome.failed(FailureClass.BAKE, str(failure))
    outcome.check = failure.what
    outcome.logs = ctx.backend(outcome.host).logs(UnitRef.of(w.inst), LOG_LINES)
    ctx.event("unit-failed", outcome.reason, outcome.unit)
    get_run_logger().error("%s", outcome.reason)
    return outcome


__all__ = ["bake_units"]
