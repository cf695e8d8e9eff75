"""`deploy-stack` and `deploy-service`: load, observe, plan, apply in dependency order, gate on
readiness, record the revision; on any failure, a compensating subflow puts the previous
version back and the run ends failed with a summary naming the unit, the check and its log.
"""

from __future__ import annotations

import getpass
from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.runtime import flow_run
from prefect.task_runners import ThreadPoolTaskRunner

from flows.scheduling import run_ready_set
from hxp.config import ConfigSnapshot, Document, EffectiveConfig, build_config, load_config
from hxp.errors import DeployError, HxpError
from hxp.graph import DependencyGraph
from hxp.io.lock import stack_lock
from hxp.io.telemetry import pushgateway_url, record_deploy
from hxp.plan import Action, ActionKind, Plan, plan_stack
from hxp.spec import Stack
from hxp.store import Store
from hxp.units import expand_units
from tasks.deploy import (
    DeployContext,
    UnitDeployError,
    UnitOutcome,
    apply_unit,
    commit_unit,
    observe_stack,
    remove_instance,
    rollback_unit,
    state_dir_of,
    sync_gateway,
    verify_units,
)
from tasks.metrics import push_metrics
from tasks.stack import load_stack

MAX_PARALLEL_UNITS = 8


def _publish(store: Store, stack: Stack, deploy_id: int, state: str) -> None:
    """Count a finished deploy in the shared registry; push the stack's deploy series."""
    record_deploy(store, stack.stack, deploy_id)
    url = pushgateway_url(stack)
    if url is not None:
        try:
            push_metrics(url, state, stack.stack, "deploy")
        except Exception as exc:  # a monitoring outage must not fail a deploy
            get_run_logger().warning("push to %s failed: %s", url, exc)


def _run_name() -> str:
    """`deploy-<stack>` (plus the units when only some are deployed)."""
    params = flow_run.parameters
    files = params.get("stack_files") or ["stack.yaml"]
    files = [files] if isinstance(files, str) else list(files)
    units = params.get("units") or ([params["service"]] if params.get("service") else [])
    try:
        name = load_config(files, {}, list(params.get("overrides") or [])).stack.stack
    except HxpError:
        name = files[0].rsplit("/", 1)[-1]
    return f"deploy-{name}" + (f"-{'+'.join(units)}" if units else "")


def _finish_interrupted(store: Store, stack: Stack, state: str) -> list[str]:
    """Roll back what deploys killed mid-run (orchestrator crash) left unverified.

    Their rollback never ran; it runs now, before anything new is planned, so an unverified
    version never becomes the "previous" one a later rollback would restore.
    """
    lines: list[str] = []
    previous_snapshot = store.latest_snapshot(stack.stack)
    previous = previous_snapshot.restore() if previous_snapshot else None
    for record in store.unfinished_deploys(stack.stack):
        outcomes = []
        for rev in store.revisions(stack.stack):
            if rev.deploy_id != record.id or rev.status not in ("applied", "ready"):
                continue
            source = previous if previous and rev.unit in previous.units() else stack
            if rev.unit not in source.units():
                continue
            instances = [u.name for u in expand_units(source, {rev.unit})]
            outcomes.append(
                UnitOutcome(
                    unit=rev.unit,
                    host=source.unit(rev.unit).host,
                    ok=False,
                    revision=rev.revision,
                    applied=[(i, ActionKind.UPDATE.value) for i in instances],
                    reason="interrupted",
                )
            )
        ctx = DeployContext(stack, state, record.id, record.config_hash or "")
        done = rollback_deploy(ctx, outcomes, previous) if outcomes else []
        store.finish_deploy(
            record.id, "interrupted", {"reason": "the orchestrator stopped", "rollback": done}
        )
        record_deploy(store, stack.stack, record.id)
        lines.extend(f"deploy #{record.id} (interrupted): {line}" for line in done)
    return lines


def _revision_of(ctx: DeployContext, unit: str) -> int | None:
    """The revision this deploy recorded for a unit whose task died without an outcome."""
    revisions = [
        r for r in ctx.store().revisions(ctx.stack.stack, unit) if r.deploy_id == ctx.deploy_id
    ]
    return revisions[-1].revision if revisions else None


def _apply_graph(ctx: DeployContext, plan: Plan) -> tuple[list[UnitOutcome], UnitOutcome | None]:
    """Run each unit's actions as soon as its own dependencies are done; stop on a failure."""
    by_unit: dict[str, list[Action]] = {}
    for action in plan.actions:
        if action.kind is not ActionKind.REMOVE:
            by_unit.setdefault(action.unit, []).append(action)
    scheduler = DependencyGraph(ctx.stack.dependencies()).scheduler(set(by_unit))
    run = run_ready_set(
        scheduler,
        lambda unit: apply_unit.submit(ctx, unit, ctx.stack.unit(unit).host, by_unit[unit]),
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
                applied=[(a.instance, a.kind.value) for a in by_unit[unit]],
                reason=f"{type(error).__name__}: {error}",
            )
        )
        if failure is None:
            failure = outcome
        else:
            outcomes.append(outcome)
    return outcomes, failure


@flow(name="rollback-deploy", flow_run_name="rollback-{ctx.stack.stack}-deploy-{ctx.deploy_id}")
def rollback_deploy(
    ctx: DeployContext, outcomes: list[UnitOutcome], previous: Stack | None
) -> list[str]:
    """Compensate a failed deploy: in reverse dependency order, restore every unit it changed."""
    by_unit = {o.unit: o for o in outcomes if o.applied}
    lines: list[str] = []
    for unit in DependencyGraph(ctx.stack.dependencies()).reverse_order():
        if unit in by_unit:
            lines.extend(rollback_unit(ctx, by_unit[unit], previous))
    return lines


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
) -> dict[str, Any]:
    """Deploy a stack: apply what changed in dependency order, gate each unit, roll back on failure.

    Args:
        stack_files: Stack file(s) in merge order; a later file wins (paths on the worker).
        overrides: `path.to.key=value` overrides applied last, like `hxp --set`.
        units: Deploy only these units (their dependencies must already run); all when empty.
        state_dir: Where hxp keeps its store and process state; default $HXP_STATE_DIR.
        wait_for_lock: Wait for another deploy of the same stack to finish (else fail fast).
    """
    files = [stack_files] if isinstance(stack_files, str) else list(stack_files)
    effective = load_stack(files, list(overrides or []))
    return _deploy(effective, units, state_dir, wait_for_lock, "deploy")


def _deploy(
    effective: EffectiveConfig,
    units: list[str] | None,
    state_dir: str | None,
    wait_for_lock: bool,
    kind: str,
) -> dict[str, Any]:
    logger = get_run_logger()
    stack = effective.stack
    only = set(units) if units else None
    if only:
        for unit in only:
            stack.unit(unit)
    state = state_dir_of(state_dir)
    store = Store(state)
    run_id = str(flow_run.id) if flow_run.id else None
    holder = f"deploy flow run {flow_run.name or run_id or 'ad hoc'}"
    with stack_lock(state, stack.stack, holder, wait=wait_for_lock, on_wait=logger.info):
        for line in _finish_interrupted(store, stack, state):
            logger.warning(line)
        observed = observe_stack(stack, state)
        plan = plan_stack(stack, observed, effective.content_hash, only)
        deploy_id = store.begin_deploy(
            stack.stack, kind, effective.content_hash, plan.to_dict(), getpass.getuser(), run_id
        )
        create_markdown_artifact(
            key=f"plan-{stack.stack}",
            markdown=f"# Plan for `{stack.stack}`\n\n```\n{plan.summary()}\n```",
            description=f"deploy #{deploy_id} plan",
        )
        for line in plan.summary().splitlines():
            logger.info(line)
        if not plan.changes:
            store.finish_deploy(deploy_id, "succeeded", {"changes": False})
            _publish(store, stack, deploy_id, state)
            return {
                "stack": stack.stack,
                "deploy_id": deploy_id,
                "changed": False,
                "status": "succeeded",
                "units": {},
                "plan": plan.to_dict(),
            }
        previous_snapshot = store.latest_snapshot(stack.stack)
        previous = previous_snapshot.restore() if previous_snapshot else None
        store.save_snapshot(ConfigSnapshot.of(effective))
        ctx = DeployContext(stack, state, deploy_id, effective.content_hash)
        if stack.gateway is not None:
            sync_gateway(ctx)  # nginx up, pointing at what runs now
        outcomes, failure = _apply_graph(ctx, plan)
        if failure is None and outcomes:
            failure = verify_units(ctx, outcomes)
            if failure is not None:
                outcomes = [o for o in outcomes if o.unit != failure.unit]
        if failure is not None:
            logger.error("unit %s failed: %s; rolling back", failure.unit, failure.reason)
            rollback = rollback_deploy(ctx, [*outcomes, failure], previous)
            summary = _summary(stack.stack, failure, rollback)
            store.finish_deploy(
                deploy_id,
                "failed",
                {
                    "failed_unit": failure.unit,
                    "reason": failure.reason,
                    "check": failure.check,
                    "logs": failure.logs,
                    "rollback": rollback,
                    "seconds": round(failure.seconds, 3),
                    "units": {o.unit: round(o.seconds, 3) for o in outcomes},
                },
            )
            _publish(store, stack, deploy_id, state)
            create_markdown_artifact(
                key=f"deploy-{stack.stack}",
                markdown=f"```\n{summary}\n```",
                description=f"deploy #{deploy_id} failed and was rolled back",
            )
            raise DeployError(summary)
        for action in plan.actions:
            if action.kind is ActionKind.REMOVE:
                remove_instance(ctx, action.instance, action.host)
        for outcome in outcomes:
            commit_unit(ctx, outcome)
        if stack.gateway is not None:
            sync_gateway(ctx)
        result = {
            o.unit: {"revision": o.revision, "applied": o.applied, "seconds": round(o.seconds, 3)}
            for o in outcomes
        }
        store.finish_deploy(deploy_id, "succeeded", {"changes": True, "units": result})
        _publish(store, stack, deploy_id, state)
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
) -> dict[str, Any]:
    """Deploy one service or model of a stack (its dependencies must already be running).

    Args:
        stack_files: Stack file(s) in merge order; a later file wins.
        service: The unit (service or model name) to deploy.
        overrides: `path.to.key=value` overrides applied last (e.g. a new image from CI).
        state_dir: Where hxp keeps its store and process state; default $HXP_STATE_DIR.
        wait_for_lock: Wait for another deploy of the same stack to finish (else fail fast).
    """
    files = [stack_files] if isinstance(stack_files, str) else list(stack_files)
    effective = load_stack(files, list(overrides or []))
    return _deploy(effective, [service], state_dir, wait_for_lock, "deploy")


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
    result = _deploy(effective, [unit] if unit else None, state, wait_for_lock, "rollback")
    return {**result, "rolled_back": why}
