"""Lifecycle flows: `start-stack`, `stop-stack`, `restart-stack` (and their one-unit forms),
`supervise-stack` and `reload-stack`.

The runbooks they replace:
- start: lock the stack, reconcile what the store says with what runs, then start each unit
  the moment its own dependencies are ready (gated on readiness, back behind the gateway);
- stop: each unit once everything that depends on it has stopped: out of the gateway, drain
  in-flight requests, stop, clean up (the gateway too when the whole stack stops);
- restart: stop + start, or `rolling`: replica by replica while the others serve;
- supervise (scheduled): restart crashed units with backoff, give up on a crash loop;
- reload: a changed stack file is re-validated, planned and applied: reload what can be
  reloaded, roll the rest, deploy what is new or gone.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact
from prefect.task_runners import ThreadPoolTaskRunner
from prefect.utilities.annotations import quote

from flows.deploy import apply_config
from flows.monitoring import deploy_monitoring
from flows.naming import run_holder, stack_run_name
from flows.records import RecordKeeper, deploy_record
from flows.scheduling import MAX_PARALLEL_UNITS, GraphRun, run_ready_set
from hxp.config import EffectiveConfig, unit_config_hash
from hxp.errors import LifecycleError, LockedError
from hxp.graph import DependencyGraph
from hxp.io import lifecycle as rec
from hxp.io.fleet_lock import run_lock as stack_lock  # this machine, and across with a server
from hxp.io.lock import stack_lock as file_lock
from hxp.lifecycle import CrashPolicy, ReloadKind, ReloadPlan, RollingPolicy, plan_reload
from hxp.sleep import refuse_asleep, sleeping_model
from hxp.spec import Stack
from hxp.store import Store, counted_at
from tasks.deploy import state_dir_of, sync_gateway
from tasks.instances import RunContext
from tasks.lifecycle import (
    RollResult,
    RollTarget,
    UnitResult,
    lifecycle_context,
    reconcile_stack,
    reload_unit,
    roll_unit,
    start_unit,
    stop_gateway,
    stop_unit,
    supervise_pass,
)
from tasks.sleep import sleep_unit, wake_unit
from tasks.stack import load_stack

_run_name = stack_run_name()


def _load(
    stack_files: list[str] | str, overrides: list[str] | None, state_dir: str | None
) -> EffectiveConfig:
    """The stack as it runs (autoscaled models at the autoscaler's count: counted_at)."""
    files = [stack_files] if isinstance(stack_files, str) else list(stack_files)
    return counted_at(state_dir_of(state_dir), load_stack(files, list(overrides or [])))


def _selected(stack: Stack, units: list[str] | None) -> list[str]:
    if not units:
        return sorted(stack.units())
    # UnknownUnitError names the unit and what the stack has; a unit declared with `hosts:`
    # means each of its parts
    return stack.named_units(units)


def _summarise(run: GraphRun[Any], action: str) -> dict[str, Any]:
    done: dict[str, Any] = {}
    for unit, result in run.done:
        if isinstance(result, UnitResult):
            done[unit] = {"ok": result.ok, "instances": result.done, "seconds": result.seconds}
        elif isinstance(result, RollResult):
            done[unit] = {
                "ok": result.ok,
                "steps": result.steps,
                "surged": result.surged,
                "in_place": result.in_place,
                "failures": result.failures,
                "seconds": result.seconds,
            }
    failed = {unit: f"{type(e).__name__}: {e}" for unit, e in run.failed}
    for unit, info in done.items():
        if not info["ok"]:
            failed.setdefault(unit, "; ".join(info.get("steps", [])) or "failed")
    return {
        "action": action,
        "ok": not failed,
        "units": done,
        "failed": failed,
        "skipped": sorted(run.skipped + run.not_started),
    }


def _finish(ctx: RunContext, summary: dict[str, Any], reconciled: list[str]) -> dict[str, Any]:
    store = ctx.store()
    summary["stack"] = ctx.stack.stack
    summary["reconciled"] = reconciled
    rows = store.lifecycle(ctx.stack.stack)
    summary["states"] = {n: r.state.value for n, r in sorted(rows.items())}
    verdict = "ok" if summary["ok"] else "FAILED"
    lines = [f"{summary['action']} of stack {ctx.stack.stack}: {verdict}"]
    lines += [f"  {u}: {r}" for u, r in summary["failed"].items()]
    if summary["skipped"]:
        lines.append(f"  skipped (a dependency failed): {', '.join(summary['skipped'])}")
    lines += [f"  {n}: {s}" for n, s in summary["states"].items()]
    create_markdown_artifact(
        key=f"lifecycle-{ctx.stack.stack}",
        markdown="```\n" + "\n".join(lines) + "\n```",
        description=f"{summary['action']} of {ctx.stack.stack}",
    )
    for unit in ctx.stack.units():
        rec.publish_unit_state(store, ctx.stack.stack, unit)
    if not summary["ok"]:
        raise LifecycleError("\n".join(lines))
    return summary


# --------------------------------------------------------------------------- start


def _start(ctx: RunContext, units: list[str]) -> dict[str, Any]:
    graph = DependencyGraph(ctx.stack.dependencies())
    # A unit starts after its dependencies: those not named are started too when they are
    # not running (start_unit leaves a running one alone).
    wanted = graph.closure(units)
    if ctx.stack.gateway is not None:
        sync_gateway(ctx)
    # quote(): the task gets the context as it is; Prefect would otherwise walk the whole
    # stack looking for futures, twice per task run (~20 ms idle for 50 units, on every hop
    # of the critical chain).
    run = run_ready_set(graph.scheduler(wanted), lambda u: start_unit.submit(quote(ctx), u))
    return _summarise(run, "start")


@flow(
    name="start-stack",
    flow_run_name=_run_name,
    task_runner=ThreadPoolTaskRunner(MAX_PARALLEL_UNITS),
)
def start_stack(
    stack_files: list[str] | str,
    overrides: list[str] | None = None,
    units: list[str] | None = None,
    state_dir: str | None = None,
    wait_for_lock: bool = True,
) -> dict[str, Any]:
    """Start a deployed stack (or some units and what they need) in dependency order.

    Args:
        stack_files: Stack file(s) in merge order; a later file wins.
        overrides: `path.to.key=value` overrides applied last.
        units: Only these units (plus any dependency that is not running); all when empty.
        state_dir: Where hxp keeps its store and process state; default $HXP_STATE_DIR.
        wait_for_lock: Wait for another run on the same stack (else fail fast).
    """
    stack = _load(stack_files, overrides, state_dir).stack
    state = state_dir_of(state_dir)
    ctx = lifecycle_context(stack, state)
    log = get_run_logger().info
    with stack_lock(state, stack.stack, run_holder("start"), wait=wait_for_lock, on_wait=log):
        reconciled = reconcile_stack(quote(ctx))
        summary = _start(ctx, _selected(stack, units))
    return _finish(ctx, summary, reconciled)


# --------------------------------------------------------------------------- stop


def stop_in_reverse(
    ctx: RunContext, units: list[str], drain: bool, drain_timeout: float | None
) -> GraphRun[Any]:
    """Stop `units` of `ctx.stack` (draining each first) in reverse dependency order: a unit
    once every unit that depends on it has stopped, independent units side by side. A unit
    that would not stop does not keep the others running (it is in the run's `failed`)."""
    graph = DependencyGraph(ctx.stack.dependencies()).inverted()
    return run_ready_set(
        graph.scheduler(units),
        lambda u: stop_unit.submit(quote(ctx), u, drain, drain_timeout),
        stop_on_failure=False,
    )


def _stop(
    ctx: RunContext, units: list[str], drain: bool, drain_timeout: float | None
) -> dict[str, Any]:
    return _summarise(stop_in_reverse(ctx, units, drain, drain_timeout), "stop")


@flow(
    name="stop-stack",
    flow_run_name=_run_name,
    task_runner=ThreadPoolTaskRunner(MAX_PARALLEL_UNITS),
)
def stop_stack(
    stack_files: list[str] | str,
    overrides: list[str] | None = None,
    units: list[str] | None = None,
    state_dir: str | None = None,
    drain: bool = True,
    drain_timeout: float | None = None,
    wait_for_lock: bool = True,
) -> dict[str, Any]:
    """Stop a stack (or the named units) in reverse dependency order, draining each first.

    Args:
        stack_files: Stack file(s) in merge order; a later file wins.
        overrides: `path.to.key=value` overrides applied last.
        units: Only these units (a unit waits for the named units that depend on it); all
            when empty, and then the gateway stops too.
        state_dir: Where hxp keeps its store and process state; default $HXP_STATE_DIR.
        drain: Let in-flight requests finish before stopping (vLLM: until
            num_requests_running is 0, or the cap).
        drain_timeout: The drain cap in seconds; default the gateway's drain_timeout.
        wait_for_lock: Wait for another run on the same stack (else fail fast).
    """
    stack = _load(stack_files, overrides, state_dir).stack
    state = state_dir_of(state_dir)
    ctx = lifecycle_context(stack, state)
    log = get_run_logger().info
    with stack_lock(state, stack.stack, run_holder("stop"), wait=wait_for_lock, on_wait=log):
        reconciled = reconcile_stack(quote(ctx))
        summary = _stop(ctx, _selected(stack, units), drain, drain_timeout)
        if not units and summary["ok"]:
            summary["gateway_stopped"] = stop_gateway(ctx)
    return _finish(ctx, summary, reconciled)


# --------------------------------------------------------------------------- restart


def _roll(
    ctx: RunContext,
    units: list[str],
    policy: RollingPolicy,
    drain_timeout: float | None,
    targets: dict[str, RollTarget] | None = None,
) -> dict[str, Any]:
    graph = DependencyGraph(ctx.stack.dependencies())
    if ctx.stack.gateway is not None:
        sync_gateway(ctx)
    run = run_ready_set(
        graph.scheduler(units),
        lambda u: roll_unit.submit(quote(ctx), u, policy, (targets or {}).get(u), drain_timeout),
    )
    return _summarise(run, "rolling restart" if targets is None else "rolling update")


@flow(
    name="restart-stack",
    flow_run_name=_run_name,
    task_runner=ThreadPoolTaskRunner(MAX_PARALLEL_UNITS),
)
def restart_stack(
    stack_files: list[str] | str,
    overrides: list[str] | None = None,
    units: list[str] | None = None,
    state_dir: str | None = None,
    rolling: bool = False,
    max_unavailable: int = 1,
    max_fail: int = 0,
    surge: Literal["auto", "never"] = "auto",
    drain_timeout: float | None = None,
    wait_for_lock: bool = True,
) -> dict[str, Any]:
    """Restart a stack or some units: stop then start, or `rolling` replica by replica. A
    model asleep among them is refused (SleepModeError, exit 2): `hxp wake` it first.

    Args:
        stack_files: Stack file(s) in merge order; a later file wins.
        overrides: `path.to.key=value` overrides applied last.
        units: Only these units; all when empty.
        state_dir: Where hxp keeps its store and process state; default $HXP_STATE_DIR.
        rolling: Replica by replica while the others serve (units in dependency order).
        max_unavailable: Rolling in place: replicas out of service at once (one always serves).
        max_fail: Rolling: replicas that may fail their gate (each restored) before it stops.
        surge: Rolling: `auto` starts the new replica first when spare GPU memory fits it;
            `never` always restarts in place.
        drain_timeout: The drain cap in seconds; default the gateway's drain_timeout.
        wait_for_lock: Wait for another run on the same stack (else fail fast).
    """
    stack = _load(stack_files, overrides, state_dir).stack
    state = state_dir_of(state_dir)
    ctx = lifecycle_context(stack, state)
    chosen = _selected(stack, units)
    log = get_run_logger().info
    with stack_lock(state, stack.stack, run_holder("restart"), wait=wait_for_lock, on_wait=log):
        reconciled = reconcile_stack(quote(ctx))
        asleep = ctx.store().asleep(stack.stack)
        refuse_asleep("rolling restart" if rolling else "restart", chosen, asleep)
        if rolling:
            policy = RollingPolicy(max(1, max_unavailable), max(0, max_fail), surge)
            summary = _roll(ctx, chosen, policy, drain_timeout)
        else:
            stopped = _stop(ctx, chosen, True, drain_timeout)
            if not stopped["ok"]:
                summary = {**stopped, "action": "restart"}
            else:
                graph = DependencyGraph(stack.dependencies())
                run = run_ready_set(
                    graph.scheduler(chosen), lambda u: start_unit.submit(quote(ctx), u)
                )
                summary = {**_summarise(run, "restart"), "stopped": stopped["units"]}
    return _finish(ctx, summary, reconciled)


@flow(name="start-service", flow_run_name=_run_name)
def start_service(
    stack_files: list[str] | str,
    service: str,
    overrides: list[str] | None = None,
    state_dir: str | None = None,
) -> dict[str, Any]:
    """Start one unit (and any dependency of it that is not running).

    Args:
        stack_files: Stack file(s) in merge order; a later file wins.
        service: The unit (service or model) to start.
        overrides: `path.to.key=value` overrides applied last.
        state_dir: Where hxp keeps its store and process state; default $HXP_STATE_DIR.
    """
    return start_stack.fn(stack_files, overrides, [service], state_dir)


@flow(name="stop-service", flow_run_name=_run_name)
def stop_service(
    stack_files: list[str] | str,
    service: str,
    overrides: list[str] | None = None,
    state_dir: str | None = None,
    drain: bool = True,
) -> dict[str, Any]:
    """Stop one unit, draining it first.

    Args:
        stack_files: Stack file(s) in merge order; a later file wins.
        service: The unit (service or model) to stop.
        overrides: `path.to.key=value` overrides applied last.
        state_dir: Where hxp keeps its store and process state; default $HXP_STATE_DIR.
        drain: Let in-flight requests finish before stopping.
    """
    return stop_stack.fn(stack_files, overrides, [service], state_dir, drain)


@flow(name="restart-service", flow_run_name=_run_name)
def restart_service(
    stack_files: list[str] | str,
    service: str,
    overrides: list[str] | None = None,
    state_dir: str | None = None,
    rolling: bool = True,
) -> dict[str, Any]:
    """Restart one unit; rolling by default (replica by replica behind the gateway).

    Args:
        stack_files: Stack file(s) in merge order; a later file wins.
        service: The unit (service or model) to restart.
        overrides: `path.to.key=value` overrides applied last.
        state_dir: Where hxp keeps its store and process state; default $HXP_STATE_DIR.
        rolling: Replica by replica while the others serve; off stops, then starts.
    """
    return restart_stack.fn(stack_files, overrides, [service], state_dir, rolling)


# --------------------------------------------------------------------------- sleep and wake


def _model_action(
    action: str,
    stack_files: list[str] | str,
    overrides: list[str] | None,
    state_dir: str | None,
    model: str,
    wait_for_lock: bool,
    act: Callable[[RunContext], UnitResult],
) -> dict[str, Any]:
    """Sleep or wake one model that opted in: under the stack lock, after reconciling."""
    stack = _load(stack_files, overrides, state_dir).stack
    sleeping_model(stack, model)
    state = state_dir_of(state_dir)
    ctx = lifecycle_context(stack, state)
    log = get_run_logger().info
    with stack_lock(state, stack.stack, run_holder(action), wait=wait_for_lock, on_wait=log):
        reconcile_stack(quote(ctx))
        result = act(ctx)
    return _sleep_summary(ctx, action, result)


def _sleep_summary(ctx: RunContext, action: str, result: UnitResult) -> dict[str, Any]:
    summary: dict[str, Any] = {
        "action": action,
        "ok": result.ok,
        "units": {
            result.unit: {"ok": result.ok, "instances": result.done, "seconds": result.seconds}
        },
        "failed": {f"{result.unit}/{i}": why for i, why in result.failed.items()},
        "skipped": [],
        "sleeping": ctx.store().sleeping(ctx.stack.stack),
    }
    return _finish(ctx, summary, [])


@flow(name="sleep-model", flow_run_name=stack_run_name("sleep"))
def sleep_model(
    stack_files: list[str] | str,
    model: str,
    overrides: list[str] | None = None,
    state_dir: str | None = None,
    level: int = 1,
    drain_timeout: float | None = None,
    wait_for_lock: bool = True,
) -> dict[str, Any]:
    """Put a model that opted in (`sleep_mode: true`) to sleep: each replica out of the
    gateway, drained, then vLLM's `POST /sleep?level=N`; what it frees is recorded beside its
    GPU reservation.

    Args:
        stack_files: Stack file(s) in merge order; a later file wins.
        model: The model to put to sleep.
        overrides: `path.to.key=value` overrides applied last.
        state_dir: Where hxp keeps its store and process state; default $HXP_STATE_DIR.
        level: 1 offloads the weights to CPU RAM and discards the KV cache; 2 discards both.
        drain_timeout: The drain cap in seconds; default the gateway's drain_timeout.
        wait_for_lock: Wait for another run on the same stack (else fail fast).
    """
    return _model_action(
        "sleep",
        stack_files,
        overrides,
        state_dir,
        model,
        wait_for_lock,
        lambda ctx: sleep_unit(quote(ctx), model, level, drain_timeout),
    )


@flow(name="wake-model", flow_run_name=stack_run_name("wake"))
def wake_model(
    stack_files: list[str] | str,
    model: str,
    overrides: list[str] | None = None,
    state_dir: str | None = None,
    wait_for_lock: bool = True,
) -> dict[str, Any]:
    """Wake a sleeping model: vLLM's `POST /wake_up`, `/is_sleeping` false, one completion
    served, and only then each replica back behind the gateway.

    Args:
        stack_files: Stack file(s) in merge order; a later file wins.
        model: The model to wake.
        overrides: `path.to.key=value` overrides applied last.
        state_dir: Where hxp keeps its store and process state; default $HXP_STATE_DIR.
        wait_for_lock: Wait for another run on the same stack (else fail fast).
    """
    return _model_action(
        "wake",
        stack_files,
        overrides,
        state_dir,
        model,
        wait_for_lock,
        lambda ctx: wake_unit(quote(ctx), model),
    )


# --------------------------------------------------------------------------- supervise


@flow(name="supervise-stack", flow_run_name=_run_name)
def supervise_stack(
    stack_files: list[str] | str,
    overrides: list[str] | None = None,
    state_dir: str | None = None,
    max_crashes: int = 5,
    crash_window: float = 600.0,
    backoff: float = 1.0,
    backoff_max: float = 60.0,
) -> dict[str, Any]:
    """One supervisor pass (schedule it, e.g. every 15 s): restart crashed units with
    exponential backoff; after `max_crashes` within `crash_window` seconds a unit is stopped,
    marked `failed` and an alert (`hxp.supervisor.crash-loop`) goes out.

    Args:
        stack_files: Stack file(s) in merge order; a later file wins.
        overrides: `path.to.key=value` overrides applied last.
        state_dir: Where hxp keeps its store and process state; default $HXP_STATE_DIR.
        max_crashes: Crashes within the window that make a crash loop.
        crash_window: Seconds a crash counts for.
        backoff: Seconds before the second restart; doubled for each further crash.
        backoff_max: The longest wait between restarts.
    """
    stack = _load(stack_files, overrides, state_dir).stack
    state = state_dir_of(state_dir)
    ctx = lifecycle_context(stack, state)
    policy = CrashPolicy(max_crashes, crash_window, backoff, backoff_max)
    try:
        with file_lock(state, stack.stack, run_holder("supervise"), wait=False):
            reconciled = reconcile_stack(quote(ctx))
            report = supervise_pass(ctx, policy)
    except LockedError as exc:  # a deploy or restart is under way: it owns the units now
        get_run_logger().info("pass skipped: %s", exc)
        return {"stack": stack.stack, "skipped": str(exc)}
    create_markdown_artifact(
        key=f"supervise-{stack.stack}",
        markdown="\n".join(
            [
                f"- crashed: {', '.join(report.crashed) or 'none'}",
                f"- restarted: {', '.join(report.restarted) or 'none'}",
                f"- waiting (backoff): {', '.join(sorted(report.waiting)) or 'none'}",
                f"- gave up (crash loop): {', '.join(report.gave_up) or 'none'}",
                *(f"- restart of {u} failed: {why}" for u, why in report.failed_restarts.items()),
            ]
        ),
        description=f"supervisor pass over {stack.stack}",
    )
    return {
        "stack": stack.stack,
        "reconciled": reconciled,
        "restarted": report.restarted,
        "crashed": report.crashed,
        "waiting": report.waiting,
        "gave_up": report.gave_up,
        "failed_restarts": report.failed_restarts,
        "states": {n: r.state.value for n, r in sorted(ctx.store().lifecycle(stack.stack).items())},
    }


# --------------------------------------------------------------------------- reload


def _backup_applied_files(state: str, stack: str, files: list[str]) -> None:
    from hxp.io.backups import backup_file, list_backups

    for path in files:
        kept = list_backups(state, stack, path)
        try:
            current = Path(path).read_bytes()
        except OSError:
            continue
        if kept and kept[0].stored.read_bytes() == current:
            continue
        backup_file(state, stack, path, "stack file as applied by a config reload")


def _reload_units(
    store: Store, state: str, effective: EffectiveConfig, plan: ReloadPlan, policy: RollingPolicy
) -> tuple[list[str], list[str]]:
    """Under the stack's lock and a `reload` record: reload in place what can be, roll the
    other changed units, reload the gateway; the units reloaded and those rolled. A failure
    marks this run's revisions of the units not reloaded `rolled-back`, closes the record
    `failed` and propagates."""
    logger = get_run_logger()
    stack = effective.stack
    reloaded: list[str] = []
    targets: dict[str, RollTarget] = {}
    revisions: dict[str, int] = {}

    def failed(record: RecordKeeper, exc: BaseException) -> None:
        for unit, rev in revisions.items():
            if unit not in reloaded:
                record.revision_status(unit, rev, "rolled-back")
        record.fail({"reason": str(exc), "reloaded": reloaded})

    with deploy_record(
        store,
        stack,
        state,
        "reload",
        effective.content_hash,
        publish=False,
        on_error=failed,
        closes_on=BaseException,
    ) as record:
        record.save_snapshot(effective)
        ctx = RunContext(stack, state, record.id, effective.content_hash)
        reconcile_stack(ctx)
        for change in plan.units:
            if change.kind not in (ReloadKind.RELOAD, ReloadKind.ROLL):
                continue
            want = unit_config_hash(stack, change.unit)
            revisions[change.unit] = record.new_revision(
                change.unit, want, stack.unit(change.unit).model_dump(mode="json")
            )
            target = RollTarget(want, revisions[change.unit])
            if change.kind is ReloadKind.RELOAD:
                try:
                    done = reload_unit(ctx, change.unit, target)
                except Exception as exc:
                    rec.count_error(store, stack.stack, change.unit, exc)
                    logger.warning("%s: reload failed (%s); rolling it instead", change.unit, exc)
                    targets[change.unit] = target
                    continue
                if done.ok:
                    reloaded.append(change.unit)
                else:
                    logger.warning("%s: %s; rolling it instead", change.unit, done.failed)
                    targets[change.unit] = target
            else:
                targets[change.unit] = target
        rolled: dict[str, Any] = {}
        if targets:
            rolled = _roll(ctx, sorted(targets), policy, None, targets)
        if plan.gateway and stack.gateway is not None:
            from hxp.io.backups import backup_file

            backup_file(state, stack.stack, ctx.gateway().conf, "gateway config reload")
            sync_gateway(ctx)
        if rolled and not rolled["ok"]:
            raise LifecycleError(f"rolling update failed: {rolled['failed']}")
        for unit in reloaded + [u for u in targets if not rolled or u not in rolled["failed"]]:
            record.revision_status(unit, revisions[unit], "good")
        record.succeed({"changes": True, "reloaded": reloaded, "rolled": sorted(targets)})
    return reloaded, sorted(targets)


@flow(
    name="reload-stack",
    flow_run_name=_run_name,
    task_runner=ThreadPoolTaskRunner(MAX_PARALLEL_UNITS),
)
def reload_stack(
    stack_files: list[str] | str,
    overrides: list[str] | None = None,
    state_dir: str | None = None,
    max_unavailable: int = 1,
    max_fail: int = 0,
    surge: Literal["auto", "never"] = "auto",
) -> dict[str, Any]:
    """Apply a changed stack file with as little disruption as it allows: units whose only
    change is their config_files and that declare `reload:` are reloaded in place; the
    gateway's nginx and the monitoring configs are reloaded; other changed units go through
    the rolling path; new or removed units are deployed.

    Args:
        stack_files: Stack file(s) in merge order; a later file wins.
        overrides: `path.to.key=value` overrides applied last.
        state_dir: Where hxp keeps its store and process state; default $HXP_STATE_DIR.
        max_unavailable: Rolling in place: replicas out of service at once.
        max_fail: Rolling: replicas that may fail their gate before the roll stops.
        surge: Rolling: `auto` or `never` (see restart-stack).
    """
    logger = get_run_logger()
    files = [stack_files] if isinstance(stack_files, str) else list(stack_files)
    effective = _load(files, overrides, state_dir)
    stack = effective.stack
    state = state_dir_of(state_dir)
    store = Store(state)
    policy = RollingPolicy(max(1, max_unavailable), max(0, max_fail), surge)
    # Planned and recorded under the lock: a deploy that ran while this run waited for it
    # changed what the plan starts from, and would have closed a record begun before the
    # lock as an interrupted deploy.
    with stack_lock(state, stack.stack, run_holder("reload"), on_wait=logger.info):
        snapshot = store.latest_snapshot(stack.stack)
        if snapshot is None:
            raise LifecycleError(f"stack {stack.stack!r} was never deployed: run `hxp apply` first")
        plan = plan_reload(snapshot.restore(), stack)
        for line in plan.summary().splitlines():
            logger.info(line)
        rolls = [c.unit for c in plan.units if c.kind is ReloadKind.ROLL]
        otherwise = "`hxp apply` (its new revision starts awake)"
        refuse_asleep("reload", rolls, store.asleep(stack.stack), otherwise)
        create_markdown_artifact(
            key=f"reload-plan-{stack.stack}",
            markdown=f"```\n{plan.summary()}\n```",
            description="what the changed stack file needs",
        )
        result: dict[str, Any] = {
            "stack": stack.stack,
            "plan": plan.summary(),
            "changed": plan.changes,
        }
        if not plan.changes:
            return {**result, "reloaded": [], "rolled": [], "deployed": False}
        _backup_applied_files(state, stack.stack, files)
        reloaded, rolled = _reload_units(store, state, effective, plan, policy)
    deployed = any(c.kind is ReloadKind.DEPLOY for c in plan.units)
    if deployed:
        apply_config(effective, state_dir=state)
    monitoring: dict[str, Any] | None = None
    if plan.monitoring and stack.monitoring is not None and stack.monitoring.prometheus:
        from hxp.io.backups import backup_file

        root = Path(state) / "monitoring" / stack.stack
        for path in sorted(root.rglob("*.yml")) + sorted(root.rglob("*.yaml")):
            backup_file(state, stack.stack, path, "monitoring config reload")
        monitoring = deploy_monitoring(files, overrides, state)
    return {
        **result,
        "reloaded": reloaded,
        "rolled": rolled,
        "deployed": deployed,
        "monitoring": monitoring is not None,
    }


__all__ = [
    "reload_stack",
    "restart_service",
    "restart_stack",
    "sleep_model",
    "start_service",
    "start_stack",
    "stop_service",
    "stop_stack",
    "supervise_stack",
    "wake_model",
]
