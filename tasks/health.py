"""Health-sweep tasks: a handful per sweep, each fanning out inside (a Prefect task per
endpoint would cost tens of milliseconds each, PREFECT.md). The steps live in hxp.io.sweep,
shared with `hxp health`; decisions come from hxp.health.

Callers pass the stack and the steps' results wrapped in `prefect.utilities.annotations.quote`:
Prefect otherwise walks every parameter looking for futures, which costs ~0.4 s per task for a
1,000-unit stack. The tasks receive the plain values."""

from __future__ import annotations

from prefect import task
from prefect.cache_policies import NO_CACHE

from hxp.health import RouteDecision, SweepReport, SweepSettings
from hxp.io import sweep
from hxp.io.sweep import Probed
from hxp.spec import Stack


@task(name="check-health", task_run_name="check-{stack.stack}", cache_policy=NO_CACHE)
async def check_health(stack: Stack, state_dir: str, settings: SweepSettings) -> Probed:
    """Ask every host's backend what it runs (a failing host is reported, not fatal), then run
    every check of every instance concurrently, each network call under its own timeout."""
    return await sweep.check(stack, state_dir, settings)


@task(name="record-health", task_run_name="record-{stack.stack}", cache_policy=NO_CACHE)
async def record_health(
    stack: Stack, state_dir: str, probed: Probed, settings: SweepSettings
) -> SweepReport:
    """Compose, damp against the last sweep, and store the result and its transitions.

    Async like the flow, so Prefect runs it on the flow's loop and client (a sync task in an
    async flow costs a client of its own)."""
    return sweep.settle(stack, state_dir, probed, settings)


@task(name="reroute-gateway", task_run_name="reroute-{stack.stack}", cache_policy=NO_CACHE)
def reroute_gateway(
    stack: Stack, state_dir: str, report: SweepReport
) -> tuple[list[RouteDecision], list[str]]:
    """Unhealthy replicas out of the gateway, recovered ones back in (never the last one)."""
    return sweep.reroute(stack, state_dir, report)


@task(
    name="push-health-metrics",
    task_run_name="push-{stack}",
    cache_policy=NO_CACHE,
    retries=2,
    retry_delay_seconds=1,
)
def push_health_metrics(stack: str, url: str) -> None:
    """PUT hxp_unit_health of this stack to the Pushgateway (job=hxp-health, stack=...)."""
    sweep.push_metrics(stack, url)


__all__ = [
    "check_health",
    "push_health_metrics",
    "record_health",
    "reroute_gateway",
]
