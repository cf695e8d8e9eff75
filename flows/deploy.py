"""`deploy-stack` and `deploy-service`: load, observe, plan, apply in dependency order, gate on
readiness, record the revision; on any failure, a compensating subflow puts the previous
version back and the run ends failed with a summary naming the unit, the check and its log.
"""

from __future__ import annotations

import time
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.deployments import run_deployment
from prefect.task_runners import ThreadPoolTaskRunner
from prefect.utilities.annotations import quote

from flows.naming import run_holder, stack_run_name
from flows.records import RecordKeeper, close_interrupted, deploy_record
from flows.scheduling import MAX_PARALLEL_UNITS, run_ready_set
from hxp.config import (
    ConfigSnapshot,
    Document,
    EffectiveConfig,
    build_config,
)
from hxp.endpoints import worker_absence
from hxp.errors import DeployError, FailureClass, HostUnreachableError, InputError
from hxp.graph import DependencyGraph
from hxp.io.calibration import annotate_plan
from hxp.io.fleet_lock import run_lock
from hxp.io.reach import preflight
from hxp.plan import Action, ActionKind, Plan, StepKind, plan_stack
from hxp.sleep import plan_asleep
from hxp.spec import Stack
from hxp.store import Store, counted_at
from hxp.units import expand_units
from tasks.bake import bake_units
from tasks.deploy import (
    apply_unit,
    commit_unit,
    interrupted_steps,
    observe_stack,
    remove_instance,
    replace_refusals,
    rollback_unit,
    state_dir_of,
    sync_gateway,
    verify_units,
)
from tasks.instances import RunContext, UnitDeployError, UnitOutcome
from tasks.stack import load_stack

_run_name = stack_run_name("deploy")


def _finish_interrupted(store: Store, stack: Stack, state: str) -> list[str]:
    """Roll back what deploys killed mid-run (orchestrator crash) left unverified.

    Their rollback never ran; it runs now, before anything new is planned, so an unverified
    version never becomes the "previous" one a later rollback would restore.
    """
    lines: list[str] = []
    previous = _latest_stack(store, stack.stack)
    for record in store.unfinished_deploys(stack.stack):
        done = _roll_back_record(
            store, stack, state, record.id, record.config_hash, previous, "interrupted"
        )
        close_interrupted(store, stack, record.id, done)
        lines.extend(f"deploy #{record.id} (interrupted): {line}" for line in done)
    return lines


def _roll_back_record(
    store: Store,
    stack: Stack,
    state: str,
    deploy_id: int,
    config_hash: str | None,
    previous: Stack | None,
    reason: str,
) -> list[str]:
    """Roll back every unit whose revision deploy `deploy_id` applied but never verified
    (still `applied` or `ready`): the compensating subflow, for a run that could not run it.
    A unit behind the gateway is rolled back from what the run recorded (its plan: which slot
    served, which one it started) and what runs now; any other unit's instances are restored
    as updated ones."""
    # The run's own config (it names the slots it started and their ports), else this one.
    ran = _snapshot_stack(store, config_hash) or stack
    ctx = RunContext(ran, state, deploy_id, config_hash or "")
    plan = store.deploy_plan(deploy_id) or {}
    outcomes = []
    for rev in store.revisions(stack.stack):
        if rev.deploy_id != deploy_id or rev.status not in ("applied", "ready"):
            continue
        source = previous if previous and rev.unit in previous.units() else stack
        if rev.unit not in source.units():
            continue
        if ran.gateway is not None and rev.unit in ran.gateway.routes and plan.get("actions"):
            applied = interrupted_steps(ctx, rev.unit, plan["actions"])
        else:
            instances = [u.name for u in expand_units(source, {rev.unit})]
            applied = [(i, StepKind.UPDATE) for i in instances]
        outcomes.append(
            UnitOutcome(
                unit=rev.unit,
                host=source.unit(rev.unit).host,
                ok=False,
                revision=rev.revision,
                applied=applied,
                reason=reason,
            )
        )
    return rollback_deploy(ctx, outcomes, previous) if outcomes else []


def _latest_stack(store: Store, stack: str) -> Stack | None:
    """The stack as its last succeeded deploy left it (None before the first)."""
    snapshot = store.latest_snapshot(stack)
    return snapshot.restore() if snapshot else None


def _snapshot_stack(store: Store, config_hash: str | None) -> Stack | None:
    """The stack a deploy applied, from its snapshot (None when there is none, or it no longer
    reads)."""
    snapshot = store.snapshot(config_hash) if config_hash else None
    try:
        return snapshot.restore() if snapshot is not None else None
    except ValueError:
        return None


def _fail_unexpected(record: RecordKeeper, previous: Stack | None, exc: BaseException) -> None:
    """An error no step expected, after the deploy record was begun (and left open: a unit's
    failure closes it before raising): roll back what the run changed and left unverified
    (what the next apply would do for an interrupted run) and close the record `failed` with
    the error, instead of leaving it `running`."""
    error = f"{type(exc).__name__}: {exc}"
    logger = get_run_logger()
    logger.error("deploy #%d: unexpected error: %s; rolling back what it changed", record.id, error)
    try:
        rollback = _roll_back_record(
            record.store,
            record.stack,
            record.state_dir,
            record.id,
            record.config_hash,
            previous,
            f"unexpected error: {error}",
        )
    except Exception as again:  # the record must still close; say what was not undone
        rollback = [f"rollback failed: {type(again).__name__}: {again}"]
    for line in rollback:
        logger.warning("deploy #%d: %s", record.id, line)
    record.fail(
        {
            "reason": error,
            "reason_class": FailureClass.OTHER.value,
            "unexpected": True,
            "rollback": rollback,
        },
        event=f"unexpected error: {error}",
    )


def _revision_of(ctx: RunContext, unit: str) -> int | None:
    """The revision this deploy recorded for a unit whose task died without an outcome."""
    revisions = [
        r for r in ctx.store().revisions(ctx.stack.stack, unit) if r.deploy_id == ctx.deploy_id
    ]
    return revisions[-1].revision if revisions else None


def _apply_graph(ctx: RunContext, plan: Plan) -> tuple[list[UnitOutcome], UnitOutcome | None]:
    """Run each unit's actions as soon as its own dependencies are done; stop on a failure."""
    by_unit: dict[str, list[Action]] = {}
    for action in plan.actions:
        if action.kind is not ActionKind.REMOVE:
            by_unit.setdefault(action.unit, []).append(action)
    scheduler = DependencyGraph(ctx.stack.dependencies()).scheduler(set(by_unit))
    run = run_ready_set(
        scheduler,
        # quote(): Prefect would otherwise walk the whole context looking for futures.
        lambda unit: apply_unit.submit(quote(ctx), unit, ctx.stack.unit(unit).host, by_unit[unit]),
    )
    outcomes = [outcome for _, outcome in run.done]
    failure: UnitOutcome | None = None
    for unit, error in run.failed:
        outcome = (
            error.outcome
            if isinstance(error, UnitDeployError)
            else UnitOutcome(
                unit=unit,
                host=ctx.stack.unit(unit).host,
                ok=False,
                revision=_revision_of(ctx, unit),
                applied=[(a.instance, StepKind.of(a.kind)) for a in by_unit[unit]],
                reason=f"{type(error).__name__}: {error}",
            )
        )
        if failure is None:
            failure = outcome
        else:
            outcomes.append(outcome)
    return outcomes, failure


# The parameters are typed Any for Prefect: it builds a JSON schema of every flow's parameters
# when the module is imported, and the Stack's took 0.2-0.3 s of every CLI command (this
# subflow is only ever called in-process, never from a deployment's form).
@flow(
    name="rollback-deploy",
    flow_run_name="rollback-{ctx.stack.stack}-deploy-{ctx.deploy_id}",
    task_runner=ThreadPoolTaskRunner(MAX_PARALLEL_UNITS),
)
def rollback_deploy(ctx: Any, outcomes: Any, previous: Any) -> list[str]:
    """Compensate a failed deploy: restore every unit it changed, in reverse dependency order
    on the apply's ready-set scheduler: a unit is restored once every changed unit that
    depends on it is restored; independent units side by side. A unit whose restore fails
    holds back the units it depends on (they are reported), the others are still restored,
    and the first error is raised once nothing else can run. The lines come in reverse
    dependency order (each unit's own in the order they were done).

    ctx: RunContext; outcomes: list[UnitOutcome]; previous: Stack | None."""
    return _rollback_units(ctx, outcomes, previous)


def _rollback_units(
    ctx: RunContext, outcomes: list[UnitOutcome], previous: Stack | None
) -> list[str]:
    by_unit = {o.unit: o for o in outcomes if o.applied}
    graph = DependencyGraph(ctx.stack.dependencies())
    run = run_ready_set(
        graph.inverted().scheduler(set(by_unit)),
        # quote(): Prefect would otherwise walk the context and outcomes looking for futures.
        lambda unit: rollback_unit.submit(quote(ctx), quote(by_unit[unit]), quote(previous)),
        stop_on_failure=False,
    )
    done = dict(run.done)
    lines: list[str] = []
    for unit in graph.reverse_order():
        lines.extend(done.get(unit, []))
    if run.failed:
        unit, error = run.failed[0]
        for held in run.skipped:
            get_run_logger().error("%s: not rolled back: %s's rollback failed first", held, unit)
        raise error
    return lines


def _refuse(record: RecordKeeper, refused: dict[str, str]) -> DeployError:
    """A blue-green replace that cannot fit is refused before anything changes: the record
    closes `failed` with the reason; the error the run fails with (no rollback: nothing to
    undo)."""
    unit, reason = next(iter(refused.items()))
    summary = "\n".join(
        [f"deploy of stack {record.stack.stack!r} refused; nothing was changed:"]
        + [f"  {why}" for why in refused.values()]
    )
    get_run_logger().error("%s", summary)
    record.fail(
        {
            "failed_unit": unit,
            "reason": reason,
            "reason_class": FailureClass.RESOURCES.value,  # no GPU room beside the old slot
            "refused": refused,
            "rollback": [],
        },
        summary=summary,
        what="refused before any change",
    )
    return DeployError(summary)


def _summary(stack: str, failure: UnitOutcome, rollback: list[str]) -> str:
    lines = [f"deploy of stack {stack!r} failed at {failure.unit}@{failure.host}: {failure.reason}"]
    if failure.logs:
        lines.append(f"last {len(failure.logs)} log lines of {failure.unit}:")
        lines.extend(f"  | {line}" for line in failure.logs)
    lines.append("rolled back:" if rollback else "nothing to roll back")
    lines.extend(f"  {line}" for line in rollback)
    return "\n".join(lines)


@flow(
    name="deploy-stack",
    flow_run_name=_run_name,
    task_runner=ThreadPoolTaskRunner(MAX_PARALLEL_UNITS),
)
def deploy_stack(
    stack_files: list[str] | str,
    overrides: list[str] | None = None,
    units: list[str] | None = None,
    state_dir: str | None = None,
    wait_for_lock: bool = True,
    dispatch: bool = False,
    bake: bool = True,
) -> dict[str, Any]:
    """Deploy a stack: apply what changed in dependency order, gate each unit, roll back on failure.

    Args:
        stack_files: Stack file(s) in merge order; a later file wins (paths on the worker).
        overrides: `path.to.key=value` overrides applied last, like `hxp --set`.
        units: Deploy only these units (their dependencies must already run); all when empty.
        state_dir: Where hxp keeps its store and process state; default $HXP_STATE_DIR.
        wait_for_lock: Wait for another deploy of the same stack to finish (else fail fast).
        dispatch: Multi-host: hand each host's units to the worker of the host's `work_pool`
            (a `deploy-stack/host-<pool>` run there) and wait; off deploys in this process.
        bake: Watch every changed instance for its bake window (`deploy.bake`) after the
            final verification before committing; off commits at once (the operator accepts
            that a revision which fails moments after its checks pass stays).
    """
    files = [stack_files] if isinstance(stack_files, str) else list(stack_files)
    effective = load_stack(files, list(overrides or []))
    if dispatch:
        return _dispatch(effective.stack, files, list(overrides or []), units, wait_for_lock, bake)
    return apply_config(effective, units, state_dir, wait_for_lock, bake=bake)


def _host_deployment(pool: str) -> str:
    """`deploy-stack/host-<pool>`, registered on first use with the code source of this run's
    own deployment (its pull steps), else this checkout's directory."""
    from pathlib import Path

    from prefect import get_client
    from prefect.exceptions import ObjectNotFound
    from prefect.utilities.callables import parameter_schema

    name = f"host-{pool}"
    with get_client(sync_client=True) as client:
        try:
            client.read_deployment_by_name(f"deploy-stack/{name}")
            return f"deploy-stack/{name}"
        except ObjectNotFound:
            pass
        pull_steps: list[dict[str, Any]] | None = None
        from prefect.runtime import deployment

        if deployment.id:
            pull_steps = client.read_deployment(deployment.id).pull_steps
        if not pull_steps:
            root = str(Path(__file__).resolve().parents[1])
            pull_steps = [{"prefect.deployments.steps.set_working_directory": {"directory": root}}]
        client.create_deployment(
            flow_id=client.create_flow_from_name("deploy-stack"),
            name=name,
            work_pool_name=pool,
            entrypoint="flows/deploy.py:deploy_stack",
            pull_steps=pull_steps,
            parameter_openapi_schema=parameter_schema(deploy_stack).model_dump_for_openapi(),
            tags=["hxp", f"pool:{pool}"],
            description=f"The part of a multi-host deploy that runs on work pool {pool}.",
        )
    return f"deploy-stack/{name}"


#: Seconds a host's part may stay scheduled before it counts as never picked up: a worker
#: polls every PREFECT_WORKER_QUERY_SECONDS (10 s by default), and a worker that stopped a
#: moment ago still counts as online for three heartbeats, so the preflight can pass for it.
PICKUP_WAIT = 60.0
#: Seconds between looks at a running part's work pool for a live worker.
LIVENESS_EVERY = 5.0


def await_part(run_id: Any, host: str, pool: str) -> Any:
    """Wait for a dispatched host part to end.

    - Still Scheduled after PICKUP_WAIT (no worker took it): cancelled, HostUnreachableError.
    - Taken (Pending or Running): waited for to its end (a part of many models can take long;
      its own deploy bounds each step), while the pool keeps a live worker. Every
      LIVENESS_EVERY seconds the pool's workers are read; when none is online any more
      (WORKER_MISSED_HEARTBEATS missed, Prefect's own rule), the host is taken as gone: the
      part is marked Crashed and HostUnreachableError raised. Without this a host that died
      mid-part left its run Running and the deploy waiting for ever (the part's own flow
      heartbeat comes every 180 s, and nothing marks it crashed unless an automation does)."""
    from prefect import get_client
    from prefect.client.schemas.objects import StateType
    from prefect.client.schemas.responses import SetStateStatus
    from prefect.states import Cancelled, Crashed

    started = time.monotonic()
    looked = started
    with get_client(sync_client=True) as client:
        while True:
            run = client.read_flow_run(run_id)
            state = run.state
            if state is not None and state.is_final():
                return run
            now = time.monotonic()
            if state is not None and state.type is StateType.SCHEDULED:
                if now - started >= PICKUP_WAIT:
                    why = (
                        f"no worker of work pool {pool} picked up its part in "
                        f"{PICKUP_WAIT:.0f}s (flow run {run.name} cancelled; nothing ran there)"
                    )
                    answer = client.set_flow_run_state(run_id, Cancelled(message=why))
                    if answer.status is SetStateStatus.ACCEPT:
                        raise HostUnreachableError(host, "agent", why)
                    # a worker took it at this very moment: wait for it like any other part
            elif now - looked >= LIVENESS_EVERY:
                looked = now
                gone = worker_absence(pool, pool_workers(pool), time.time())
                if gone is not None:
                    why = (
                        f"{gone} while its part ran (flow run {run.name} marked crashed; what "
                        "it changed there is reconciled by the host's next apply)"
                    )
                    answer = client.set_flow_run_state(run_id, Crashed(message=why))
                    if answer.status is SetStateStatus.ACCEPT:
                        raise HostUnreachableError(host, "agent", why)
                    # it ended at this very moment: the next read returns it
            time.sleep(1.0)


@task(name="dispatch-host", task_run_name="deploy-{label}", cache_policy=NO_CACHE)
def dispatch_host(
    deployment: str, label: str, parameters: dict[str, Any], host: str, pool: str
) -> dict[str, Any]:
    """Run one host's part of a deploy on that host's worker and wait for it to finish."""
    created: Any = run_deployment(deployment, parameters=parameters, timeout=0)
    run = await_part(created.id, host, pool)
    if run.state is None or not run.state.is_completed():
        state = run.state.name if run.state else "unknown"
        why = f"{label}: flow run {run.name} ({deployment}) ended {state}"
        if run.state is not None and run.state.is_crashed():
            why += f" (its process died: check host {host} and its worker, then apply again)"
        raise DeployError(why)
    # The result stays on the host (results are not persisted): its store has the details.
    return {"flow_run": run.name, "units": parameters.get("units") or []}


#: Seconds a dispatched deploy waits for a worker of each host's pool to be online.
WORKER_WAIT = 15.0


def pool_workers(pool: str) -> list[tuple[str, str, float | None, float | None]]:
    """The workers of a work pool as hxp.endpoints.worker_absence reads them."""
    from prefect import get_client
    from prefect.exceptions import ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            workers = client.read_workers_for_work_pool(pool)
        except ObjectNotFound:
            return []
    return [
        (
            w.name,
            str(getattr(w.status, "value", w.status)),
            w.last_heartbeat_time.timestamp() if w.last_heartbeat_time else None,
            float(w.heartbeat_interval_seconds) if w.heartbeat_interval_seconds else None,
        )
        for w in workers
    ]


def _dispatch(
    stack: Stack,
    files: list[str],
    overrides: list[str],
    units: list[str] | None,
    wait_for_lock: bool,
    bake: bool = True,
) -> dict[str, Any]:
    """Deploy host by host: each ready wave's units go, grouped by host, to the host's worker.

    Each host's part is a deploy of its own (its own store, lock and rollback on that host);
    a failed part stops the waves after it and the run fails naming the host.
    """
    logger = get_run_logger()
    wanted = set(stack.named_units(units)) if units else set(stack.units())
    pools: dict[str, str] = {}
    for unit in sorted(wanted):
        host = stack.unit(unit).host
        pool = stack.hosts[host].work_pool
        if pool is None:
            raise InputError(
                f"hosts.{host}.work_pool: required to dispatch unit {unit!r} (dispatch: true)"
            )
        pools[host] = pool
    # Every host of every part answers before any part starts: a dead host fails the deploy
    # here, before anything changed on the others. The hosts whose part goes to a worker are
    # reached through it (a worker is online for each pool); others, such as a gateway host
    # the parts drive over SSH, by a connect to their sshd (hxp.io.reach).
    checked = preflight(stack, sorted(wanted), skip=pools)
    for host, pool in sorted(pools.items()):
        deadline = time.monotonic() + WORKER_WAIT  # a worker started a moment ago
        while (why := worker_absence(pool, pool_workers(pool), time.time())) is not None:
            if time.monotonic() >= deadline:
                raise HostUnreachableError(host, stack.hosts[host].address or "agent", why)
            logger.info("host %s: %s; waiting up to %.0fs", host, why, WORKER_WAIT)
            time.sleep(1.0)
    checked = sorted({*checked, *pools})
    if checked:
        logger.info("hosts answer: %s", ", ".join(checked))
    names = {pool: _host_deployment(pool) for pool in sorted(set(pools.values()))}
    scheduler = DependencyGraph(stack.dependencies()).scheduler(wanted)
    parts: list[dict[str, Any]] = []
    ready = scheduler.take_ready()
    while ready:
        by_host: dict[str, list[str]] = {}
        for unit in ready:
            by_host.setdefault(stack.unit(unit).host, []).append(unit)
        futures = {
            host: dispatch_host.submit(
                names[pools[host]],
                f"{'+'.join(sorted(part))}@{host}",
                {
                    "stack_files": files,
                    "overrides": overrides,
                    "units": sorted(part),
                    "wait_for_lock": wait_for_lock,
                    "bake": bake,
                },
                host,
                pools[host],
            )
            for host, part in sorted(by_host.items())
        }
        failed: list[str] = []
        ready = []
        for host, future in futures.items():
            outcome: Any = future.result(raise_on_failure=False)
            if isinstance(outcome, BaseException):
                failed.append(f"{host}: {outcome}")
                for unit in by_host[host]:
                    scheduler.mark_failed(unit)
                continue
            logger.info("host %s deployed %s", host, ", ".join(sorted(by_host[host])))
            parts.append({"host": host, "pool": pools[host], **outcome})
            for unit in by_host[host]:
                ready.extend(scheduler.mark_done(unit))
        if failed:
            raise DeployError("multi-host deploy failed on " + "; ".join(failed))
    create_table_artifact(
        key=f"dispatch-{stack.stack}",
        table=[
            {
                "host": p["host"],
                "pool": p["pool"],
                "flow run": p["flow_run"],
                "units": ", ".join(sorted(p["units"])),
            }
            for p in parts
        ],
        description=f"multi-host deploy of {stack.stack}: one flow run per host and wave",
    )
    return {"stack": stack.stack, "status": "succeeded", "dispatched": parts}


def apply_config(
    effective: EffectiveConfig,
    units: list[str] | None = None,
    state_dir: str | None = None,
    wait_for_lock: bool = True,
    kind: str = "deploy",
    *,
    bake: bool = True,
) -> dict[str, Any]:
    """The deploy engine (called inside a flow run): under the stack's lock, roll back what an
    interrupted run left, plan `effective` against what runs, and apply the plan under a new
    deploy record of `kind` (`deploy`, `rollback`): in dependency order, gated, verified and
    committed, or rolled back. Only `units` (their dependencies must already run) when given.
    `bake`: watch the changed instances for their bake window before committing.
    The run's summary: `stack`, `deploy_id`, `changed`, `status`, `units`, `plan`; a failure
    raises DeployError with the summary (the record closed `failed`)."""
    logger = get_run_logger()
    stack = effective.stack
    # UnknownUnitError names a unit the stack lacks; a unit declared with `hosts:` means each
    # of its parts
    only = set(stack.named_units(units)) if units else None
    # Before anything else: every host this deploy must reach answers (a deploy that would
    # reach a dead host fails here, before it changed anything anywhere; hxp.io.reach).
    checked = preflight(stack, sorted(only) if only else None)
    if checked:
        logger.info("hosts answer: %s", ", ".join(checked))
    state = state_dir_of(state_dir)
    store = Store(state)
    # An autoscaled model runs the autoscaler's count, not the stack's `replicas` (hxp.autoscale).
    effective = counted_at(state, effective)
    stack = effective.stack
    holder = run_holder("deploy")
    with run_lock(state, stack.stack, holder, wait=wait_for_lock, on_wait=logger.info):
        for line in _finish_interrupted(store, stack, state):
            logger.warning(line)
        # quote(): else Prefect walks the whole stack twice looking for futures (0.1-0.4 s)
        observed = observe_stack(quote(stack), state)
        plan = plan_stack(stack, observed, effective.content_hash, only)
        plan = annotate_plan(plan, stack, store)  # KV cache: predicted vs measured
        plan = plan_asleep(plan, store.asleep(stack.stack))  # what it does to a sleeping one
        previous = _latest_stack(store, stack.stack)

        def unexpected(record: RecordKeeper, exc: BaseException) -> None:
            _fail_unexpected(record, previous, exc)

        with deploy_record(
            store, stack, state, kind, effective.content_hash, plan.to_dict(), on_error=unexpected
        ) as record:
            return _apply_plan(effective, record, plan, previous, bake)


def _apply_plan(
    effective: EffectiveConfig,
    record: RecordKeeper,
    plan: Plan,
    previous: Stack | None,
    bake: bool = True,
) -> dict[str, Any]:
    """Everything after the deploy record is begun (under the stack's lock): apply, gate,
    verify, bake, commit, or roll back and fail with a summary."""
    logger = get_run_logger()
    stack = effective.stack
    state = record.state_dir
    deploy_id = record.id
    create_markdown_artifact(
        key=f"plan-{stack.stack}",
        markdown=f"# Plan for `{stack.stack}`\n\n```\n{plan.summary()}\n```",
        description=f"deploy #{deploy_id} plan",
    )
    for line in plan.summary().splitlines():
        logger.info(line)
    if not plan.changes:
        record.succeed({"changes": False})
        return {
            "stack": stack.stack,
            "deploy_id": deploy_id,
            "changed": False,
            "status": "succeeded",
            "units": {},
            "plan": plan.to_dict(),
        }
    ctx = RunContext(stack, state, deploy_id, effective.content_hash)
    if any(a.kind is ActionKind.REPLACE for a in plan.actions):
        refused = replace_refusals(ctx, list(plan.actions))
        if refused:
            raise _refuse(record, refused)
    record.save_snapshot(effective)
    here = sorted({a.host for a in plan.actions})  # the other agent hosts are not seen here
    if stack.gateway is not None:
        sync_gateway(ctx, here)  # nginx up, pointing at what runs now
    outcomes, failure = _apply_graph(ctx, plan)
    if failure is None and outcomes:
        failure = verify_units(ctx, outcomes)
        if failure is None and bake:
            failure = bake_units(ctx, outcomes)
        if failure is not None:
            outcomes = [o for o in outcomes if o.unit != failure.unit]
    if failure is not None:
        baking = failure.failure is FailureClass.BAKE
        logger.error("unit %s failed: %s; rolling back", failure.unit, failure.reason)
        rollback = rollback_deploy(ctx, [*outcomes, failure], previous)
        summary = _summary(stack.stack, failure, rollback)
        record.fail(
            {
                "failed_unit": failure.unit,
                "reason": failure.reason,
                "reason_class": failure.failure.value,
                "check": failure.check,
                "logs": failure.logs,
                "rollback": rollback,
                "seconds": round(failure.seconds, 3),
                "units": {o.unit: round(o.seconds, 3) for o in outcomes},
                **({"phase": "bake"} if baking else {}),
            },
            summary=summary,
            what=("failed during bake" if baking else "failed") + " and was rolled back",
        )
        raise DeployError(summary)
    for action in plan.actions:
        if action.kind is ActionKind.REMOVE:
            remove_instance(ctx, action.instance, action.host)
    for outcome in outcomes:
        commit_unit(ctx, outcome)
    if stack.gateway is not None:
        sync_gateway(ctx, here)
    result: dict[str, dict[str, Any]] = {
        o.unit: {
            "revision": o.revision,
            "applied": o.applied,
            "seconds": round(o.seconds, 3),
            **({"strategy": o.strategy} if o.strategy else {}),
        }
        for o in outcomes
    }
    record.succeed({"changes": True, "units": result})
    create_table_artifact(
        key=f"deploy-{stack.stack}",
        table=[
            {
                "unit": u,
                "revision": r["revision"],
                "seconds": r["seconds"],
                "actions": ", ".join(f"{i}:{k}" for i, k in r["applied"]),
            }
            for u, r in result.items()
        ],
        description=f"deploy #{deploy_id} succeeded",
    )
    logger.info("stack %s deployed: %d unit(s) changed", stack.stack, len(outcomes))
    return {
        "stack": stack.stack,
        "deploy_id": deploy_id,
        "changed": True,
        "status": "succeeded",
        "units": result,
        "plan": plan.to_dict(),
    }


@flow(
    name="deploy-service",
    flow_run_name=_run_name,
    task_runner=ThreadPoolTaskRunner(MAX_PARALLEL_UNITS),
)
def deploy_service(
    stack_files: list[str] | str,
    service: str,
    overrides: list[str] | None = None,
    state_dir: str | None = None,
    wait_for_lock: bool = True,
    image: str | None = None,
    revision: str | None = None,
    version: str | None = None,
    bake: bool = True,
) -> dict[str, Any]:
    """Deploy one service or model of a stack (its dependencies must already be running).

    Args:
        stack_files: Stack file(s) in merge order; a later file wins.
        service: The unit (service or model name) to deploy.
        overrides: `path.to.key=value` overrides applied last (e.g. a new image from CI).
        state_dir: Where hxp keeps its store and process state; default $HXP_STATE_DIR.
        wait_for_lock: Wait for another deploy of the same stack to finish (else fail fast).
        image: A release's container image for the unit (CI: the `hxp.ci.release` payload).
        revision: A release's model revision (models only).
        version: The release's version, given to the unit as `HXP_RELEASE_VERSION`.
        bake: Watch the unit's new instances for its bake window before committing.
    """
    files = [stack_files] if isinstance(stack_files, str) else list(stack_files)
    extra = list(overrides or [])
    if image or revision or version:
        stack = load_stack(files, extra).stack
        extra = [*release_overrides(stack, service, image, revision, version), *extra]
    effective = load_stack(files, extra)
    return apply_config(effective, [service], state_dir, wait_for_lock, bake=bake)


def release_overrides(
    stack: Stack, unit: str, image: str | None, revision: str | None, version: str | None
) -> list[str]:
    """`--set` overrides that put a CI release (image or model revision, version) on a unit."""
    parts = stack.unit_names(unit)  # UnknownUnitError names the unit and what the stack has
    section = "models" if parts[0] in stack.models else "services"
    out = []
    if image:
        out.append(f"{section}.{unit}.image={image}")
    if revision:
        if section != "models":
            raise InputError(f"services.{unit}: a release revision applies to models only")
        out.append(f"models.{unit}.revision={revision}")
    if version:
        out.append(f"{section}.{unit}.env.HXP_RELEASE_VERSION={version}")
    return out


def _rollback_target(
    store: Store, stack: str, unit: str | None, to_revision: int | None
) -> tuple[ConfigSnapshot, str]:
    """The snapshot to go back to, and a sentence saying which and why."""
    if unit is None:
        good = [d for d in store.deploys(stack, 200) if d.status == "succeeded" and d.config_hash]
        hashes: list[str] = []
        for d in good:  # newest first; skip no-op re-applies of the same config
            if d.config_hash is not None and (not hashes or hashes[-1] != d.config_hash):
                hashes.append(d.config_hash)
        if len(hashes) < 2:
            raise DeployError(f"stack {stack!r} has no earlier good deploy to roll back to")
        snap = store.snapshot(hashes[1])
        if snap is None:  # pragma: no cover - the store keeps every applied snapshot
            raise DeployError(f"snapshot {hashes[1][:12]} is missing from the store")
        return snap, f"stack {stack} back to config {hashes[1][:12]}"
    revisions = store.revisions(stack, unit)
    if not revisions:
        raise DeployError(f"unit {unit!r} of stack {stack!r} has no recorded revisions")
    if to_revision is not None:
        chosen = [r for r in revisions if r.revision == to_revision]
        if not chosen:
            have = ", ".join(str(r.revision) for r in revisions)
            raise DeployError(f"unit {unit!r} has no revision {to_revision} (has {have})")
        target = chosen[0]
    else:
        current = revisions[-1].revision
        earlier = store.last_good(stack, unit, before=current)
        if earlier is None:
            raise DeployError(f"unit {unit!r} has no good revision before {current}")
        target = earlier
    snap = store.snapshot(target.snapshot_hash)
    if snap is None:  # pragma: no cover
        raise DeployError(f"snapshot {target.snapshot_hash[:12]} is missing from the store")
    return snap, f"{unit} back to revision {target.revision}"


@flow(
    name="rollback",
    flow_run_name="rollback-{stack}",
    task_runner=ThreadPoolTaskRunner(MAX_PARALLEL_UNITS),
)
def rollback(
    stack: str,
    unit: str | None = None,
    to_revision: int | None = None,
    state_dir: str | None = None,
    wait_for_lock: bool = True,
) -> dict[str, Any]:
    """Put back an earlier version: of one unit (its last good or a given revision) or of the stack.

    Args:
        stack: The stack's name (as in its stack file).
        unit: The unit to roll back; the whole stack (to its previous good config) when empty.
        to_revision: The unit's revision to restore; default: its last good one before now.
        state_dir: Where hxp keeps its store and process state; default $HXP_STATE_DIR.
        wait_for_lock: Wait for another deploy of the same stack to finish (else fail fast).
    """
    state = state_dir_of(state_dir)
    snapshot, why = _rollback_target(Store(state), stack, unit, to_revision)
    get_run_logger().info("rolling back %s", why)
    document = Document(f"snapshot {snapshot.content_hash[:12]}", snapshot.config)
    effective = build_config([document])
    result = apply_config(effective, [unit] if unit else None, state, wait_for_lock, "rollback")
    return {**result, "rolled_back": why}


def _reconcile_name() -> str:
    return _run_name().replace("deploy-", "reconcile-", 1)


@flow(name="finish-interrupted", flow_run_name=_reconcile_name)
def finish_interrupted(
    stack_files: list[str] | str,
    overrides: list[str] | None = None,
    state_dir: str | None = None,
    wait_for_lock: bool = True,
) -> dict[str, Any]:
    """Roll back what a deploy that died mid-run left behind (the automation on a failed or
    crashed deploy flow run runs this; the next deploy would do it first anyway).

    Args:
        stack_files: Stack file(s) in merge order; a later file wins.
        overrides: `path.to.key=value` overrides applied last.
        state_dir: Where hxp keeps its store and process state; default $HXP_STATE_DIR.
        wait_for_lock: Wait for a deploy of the same stack that still runs to finish.
    """
    logger = get_run_logger()
    files = [stack_files] if isinstance(stack_files, str) else list(stack_files)
    stack = load_stack(files, list(overrides or [])).stack
    state = state_dir_of(state_dir)
    holder = run_holder("reconcile")
    with run_lock(state, stack.stack, holder, wait=wait_for_lock, on_wait=logger.info):
        lines = _finish_interrupted(Store(state), stack, state)
    for line in lines:
        logger.warning(line)
    text = "\n".join(lines) or "no interrupted deploy: nothing to roll back"
    create_markdown_artifact(
        key=f"reconcile-{stack.stack}",
        markdown=f"```\n{text}\n```",
        description=f"interrupted deploys of {stack.stack}",
    )
    logger.info("stack %s: %s", stack.stack, text.splitlines()[0])
    return {"stack": stack.stack, "rolled_back": lines}
