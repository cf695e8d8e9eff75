"""`down-stack` and `down-monitoring`: take a whole stack off its hosts.

The runbook they replace: lock the stack; bring the recorded states in line with what runs;
stop each unit once everything that depends on it has stopped (out of the gateway, in-flight
requests drained, stopped: the tasks of stop-stack); remove every instance the backends still
hold, those of units no longer in the stack included (the deploy's remove task: GPU
reservations released, lifecycle record dropped); stop the gateway.
"""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact
from prefect.task_runners import ThreadPoolTaskRunner
from prefect.utilities.annotations import quote

from flows.lifecycle import stop_in_reverse
from flows.naming import run_holder, stack_run_name
from flows.scheduling import MAX_PARALLEL_UNITS
from hxp.config import Document, build_config
from hxp.errors import LifecycleError
from hxp.graph import DependencyGraph
from hxp.io.fleet_lock import run_lock
from hxp.io.monitoring import find_binaries
from hxp.monitoring import MonitoringPaths, monitoring_stack_data
from hxp.spec import Stack
from hxp.store import counted_at
from hxp.units import expand_units
from tasks.deploy import observe_stack, remove_instance, state_dir_of
from tasks.instances import RunContext
from tasks.lifecycle import (
    UnitResult,
    lifecycle_context,
    reconcile_stack,
    stop_gateway,
)
from tasks.monitoring import monitoring_root
from tasks.stack import load_stack


def _take_down(
    ctx: RunContext, drain: bool, drain_timeout: float | None, holder: str, wait: bool
) -> dict[str, Any]:
    """Everything of `ctx.stack` off its hosts, under the stack's lock."""
    logger = get_run_logger()
    stack = ctx.stack
    graph = DependencyGraph(stack.dependencies())
    with run_lock(ctx.state_dir, stack.stack, holder, wait=wait, on_wait=logger.info):
        reconcile_stack(quote(ctx))
        # A unit that would not stop is removed all the same, below.
        run = stop_in_reverse(ctx, sorted(stack.units()), drain, drain_timeout)
        stopped = {u: r.done for u, r in run.done if isinstance(r, UnitResult)}
        not_stopped = {u: f"{type(e).__name__}: {e}" for u, e in run.failed}
        # Whatever the backends still hold goes, dependents first; instances of units the
        # stack no longer has (orphans) before all others.
        rank = {u: i for i, u in enumerate(graph.reverse_order())}
        unit_of = {inst.name: inst.unit for inst in expand_units(stack)}
        seen = observe_stack(stack, ctx.state_dir)
        order = sorted(seen.values(), key=lambda o: rank.get(unit_of.get(o.name, ""), -1))
        removed: list[str] = []
        failed: dict[str, str] = {}
        for obs in order:
            try:
                removed.append(remove_instance(quote(ctx), obs.name, obs.host))
            except Exception as exc:
                failed[obs.name] = f"{type(exc).__name__}: {exc}"
        gateway_stopped = False
        if stack.gateway is not None and not failed:
            gateway_stopped = stop_gateway(quote(ctx))
        ctx.store().add_event(stack.stack, "down", f"removed {len(removed)} instance(s)")
    lines = [f"down of stack {stack.stack}: {'FAILED' if failed else 'ok'}"]
    lines += [f"  removed {name}" for name in removed]
    lines += [f"  NOT removed {name}: {why}" for name, why in failed.items()]
    lines += [f"  {unit} did not stop cleanly: {why}" for unit, why in not_stopped.items()]
    if gateway_stopped:
        lines.append("  stopped the gateway")
    create_markdown_artifact(
        key=f"down-{stack.stack}",
        markdown="```\n" + "\n".join(lines) + "\n```",
        description=f"down of {stack.stack}",
    )
    if failed:
        raise LifecycleError("\n".join(lines))
    return {
        "stack": stack.stack,
        "removed": removed,
        "stopped": stopped,
        "not_stopped": not_stopped,
        "gateway_stopped": gateway_stopped,
    }


@flow(
    name="down-stack",
    flow_run_name=stack_run_name("down"),
    task_runner=ThreadPoolTaskRunner(MAX_PARALLEL_UNITS),
)
def down_stack(
    stack_files: list[str] | str,
    overrides: list[str] | None = None,
    state_dir: str | None = None,
    drain: bool = True,
    drain_timeout: float | None = None,
    wait_for_lock: bool = True,
) -> dict[str, Any]:
    """Stop and remove every instance of a stack in reverse dependency order, then the gateway.

    Args:
        stack_files: Stack file(s) in merge order; a later file wins.
        overrides: `path.to.key=value` overrides applied last.
        state_dir: Where hxp keeps its store and process state; default $HXP_STATE_DIR.
        drain: Let in-flight requests finish before stopping (vLLM: until
            num_requests_running is 0, or the cap).
        drain_timeout: The drain cap in seconds; default the gateway's drain_timeout.
        wait_for_lock: Wait for another run on the same stack (else fail fast).
    """
    files = [stack_files] if isinstance(stack_files, str) else list(stack_files)
    state = state_dir_of(state_dir)
    stack = counted_at(state, load_stack(files, list(overrides or []))).stack
    ctx = lifecycle_context(stack, state)
    return _take_down(ctx, drain, drain_timeout, run_holder("down"), wait_for_lock)


def monitoring_units(stack: Stack, state_dir: str) -> Stack:
    """The stack of a stack's Prometheus, Alertmanager and Pushgateway units."""
    paths = MonitoringPaths(str(monitoring_root(state_dir, stack)))
    data = monitoring_stack_data(stack, paths, find_binaries())
    return build_config([Document(f"monitoring of stack {stack.stack}", data)]).stack


@flow(name="down-monitoring", flow_run_name=stack_run_name("down", "-monitoring"))
def down_monitoring(
    stack_files: list[str] | str,
    overrides: list[str] | None = None,
    state_dir: str | None = None,
    wait_for_lock: bool = True,
) -> dict[str, Any]:
    """Stop and remove a stack's monitoring units (Prometheus, Alertmanager, Pushgateway).

    Args:
        stack_files: Stack file(s) in merge order; a later file wins.
        overrides: `path.to.key=value` overrides applied last.
        state_dir: Where hxp keeps its store, process state and monitoring files.
        wait_for_lock: Wait for another run on the monitoring units (else fail fast).
    """
    files = [stack_files] if isinstance(stack_files, str) else list(stack_files)
    stack = load_stack(files, list(overrides or [])).stack
    state = state_dir_of(state_dir)
    ctx = lifecycle_context(monitoring_units(stack, state), state)
    return _take_down(ctx, False, None, run_holder("down"), wait_for_lock)


__all__ = ["down_monitoring", "down_stack", "monitoring_units"]
