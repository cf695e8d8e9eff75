"""`hxp plan`, `apply`, `rollback`, `status`, `down`, `history`: deploys (flow runs) and what
the backends and the store say about them."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from typing import Any

from hxp_cli.common import add_stack_args, add_state_arg, files, load, state_dir, use_prefect


def cmd_plan(args: argparse.Namespace) -> int:
    from hxp.plan import plan_stack

    effective = load(args)
    if args.offline:
        observed = {}
    else:
        from hxp.backends import observe_all
        from hxp.store import counted_at

        # As apply does: an autoscaled model at the autoscaler's count (hxp.autoscale).
        effective = counted_at(state_dir(args), effective)

        observed = observe_all(effective.stack, state_dir(args))
    plan = plan_stack(effective.stack, observed, effective.content_hash)
    if not args.offline:
        from hxp.io.gpus import gpu_plan_warnings

        warnings = gpu_plan_warnings(effective.stack, state_dir(args))
        plan = dataclasses.replace(plan, warnings=plan.warnings + warnings)
        from hxp.io.calibration import annotate_plan
        from hxp.sleep import plan_asleep
        from hxp.store import Store

        store = Store(state_dir(args))
        plan = annotate_plan(plan, effective.stack, store)
        plan = plan_asleep(plan, store.asleep(effective.stack.stack))
    if args.json:
        print(plan.to_json())
    else:
        print(plan.summary())
        if args.offline:
            print(
                "(--offline: nothing was observed; this is the plan for empty hosts)",
                file=sys.stderr,
            )
    return 0


def print_result(result: dict[str, Any]) -> None:
    if not result["changed"]:
        print("No changes.")
        for noop in result["plan"]["noops"]:
            print(f"  {noop['instance']:<24} {noop['reason']}")
        return
    print(f"{'unit':<20} {'revision':>8} {'seconds':>8}  actions")
    for unit, info in result["units"].items():
        actions = ", ".join(f"{i}:{k}" for i, k in info["applied"])
        print(f"{unit:<20} {info['revision'] or '-':>8} {info['seconds']:>8.2f}  {actions}")
        for line in info.get("strategy", []):  # blue-green on GPUs: surge or one at a time
            print(f"  {line}")
    print(f"Deploy #{result['deploy_id']} of stack {result['stack']} succeeded.")


def cmd_apply(args: argparse.Namespace) -> int:
    load(args)  # bad input fails here, before any server starts
    use_prefect(args)
    from flows.deploy import deploy_stack

    result = deploy_stack(
        files(args),
        overrides=args.overrides,
        units=args.units or None,
        state_dir=str(state_dir(args)),
        wait_for_lock=not args.no_wait,
        bake=not args.no_bake,
    )
    print_result(result)
    return 0


def cmd_rollback(args: argparse.Namespace) -> int:
    effective = load(args)
    use_prefect(args)
    from flows.deploy import rollback

    result = rollback(
        effective.stack.stack,
        unit=args.unit,
        to_revision=args.to,
        state_dir=str(state_dir(args)),
        wait_for_lock=not args.no_wait,
    )
    print(f"Rolled back {result['rolled_back']}.")
    print_result(result)
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from hxp.backends import observe_all
    from hxp.config import unit_config_hash
    from hxp.endpoints import address_of, endpoint, netloc
    from hxp.units import expand_units
    from hxp_cli.status import model_rows, print_models, row_dict

    effective = load(args)
    stack = effective.stack
    seen = observe_all(stack, state_dir(args))
    rows = []
    all_good = True
    for inst in expand_units(stack):
        obs = seen.get(inst.name)
        want = unit_config_hash(stack, inst.unit)
        if obs is None:
            state, config, rev, detail = "absent", "-", "-", ""
        else:
            state = "running" if obs.running else "stopped"
            config = "current" if obs.config_hash == want else "drift"
            rev, detail = str(obs.revision or "-"), obs.detail
        all_good &= state == "running" and config == "current"
        found = endpoint(inst)  # where the gateway and probes reach it
        where = netloc(*found) if found is not None else address_of(inst.host_spec)
        rows.append((inst.name, inst.host, state, config, rev, detail, where))
    extra = sorted(set(seen) - {i.name for i in expand_units(stack)})
    for name in extra:
        host = seen[name].host
        where = address_of(stack.hosts[host]) if host in stack.hosts else "-"
        rows.append((name, host, "orphan", "-", str(seen[name].revision or "-"), "", where))
    models, notes = model_rows(stack, state_dir(args), expand_units(stack), seen)
    if args.json:
        keys = ("instance", "host", "state", "config", "revision", "detail", "endpoint")
        out: list[dict[str, Any]] = [dict(zip(keys, r, strict=True)) for r in rows]
        by_name = {m.instance: row_dict(m) for m in models}
        for row in out:
            if row["instance"] in by_name:
                row["model"] = by_name[row["instance"]]
        print(json.dumps(out, indent=2))
    else:
        print(
            f"{'instance':<24} {'host':<12} {'endpoint':<21} {'state':<8} {'config':<8} "
            f"{'rev':>4}  detail"
        )
        for r in rows:
            print(f"{r[0]:<24} {r[1]:<12} {r[6]:<21} {r[2]:<8} {r[3]:<8} {r[4]:>4}  {r[5]}")
        print_models(models, notes)
    return 0 if all_good and not extra else 1


def cmd_down(args: argparse.Namespace) -> int:
    """Stop and remove every instance of the stack: a down-stack flow run."""
    stack = load(args).stack  # bad input fails here, before any server starts
    use_prefect(args)
    from flows.down import down_stack

    result = down_stack(
        files(args),
        overrides=args.overrides,
        state_dir=str(state_dir(args)),
        wait_for_lock=not args.no_wait,
    )
    for name in result["removed"]:
        print(f"removed {name}")
    for unit, why in result["not_stopped"].items():
        print(f"note: {unit} did not stop cleanly ({why}); removed all the same", file=sys.stderr)
    if result["gateway_stopped"]:
        print("stopped the gateway")
    print(
        f"Stack {stack.stack} is down."
        if result["removed"]
        else f"Stack {stack.stack}: nothing runs."
    )
    return 0


def cmd_history(args: argparse.Namespace) -> int:
    import datetime as dt

    from hxp.store import Store

    effective = load(args)
    store = Store(state_dir(args))
    stack = effective.stack.stack

    def when(t: float | None) -> str:
        return dt.datetime.fromtimestamp(t).strftime("%Y-%m-%d %H:%M:%S") if t else "-"

    if args.unit:
        parts = effective.stack.unit_names(args.unit)  # a unit on several hosts: each part
        for part in parts:
            if len(parts) > 1:
                print(f"{part}:")
            print(f"{'rev':>4}  {'status':<12} {'config':<12} {'deploy':>6}  created")
            for rev in store.revisions(stack, part):
                print(
                    f"{rev.revision:>4}  {rev.status:<12} {rev.config_hash[:12]:<12} "
                    f"{rev.deploy_id or '-':>6}  {when(rev.created_at)}"
                )
        return 0
    print(
        f"{'id':>4}  {'kind':<8} {'status':<11} {'config':<12} {'actor':<10} started"
        "              finished"
    )
    for d in store.deploys(stack, args.limit):
        result = d.result or {}
        note = ""
        if d.status == "failed" and result.get("phase") == "bake":
            note = f"  failed during bake: {result.get('failed_unit', '?')}"
        print(
            f"{d.id:>4}  {d.kind:<8} {d.status:<11} {(d.config_hash or '-')[:12]:<12} "
            f"{(d.actor or '-'):<10} {when(d.started_at)}  {when(d.finished_at)}{note}"
        )
    return 0


def register_plan(sub: Any) -> None:
    p = sub.add_parser("plan", help="what an apply would change, and why")
    add_stack_args(p)
    add_state_arg(p)
    p.add_argument("--json", action="store_true", help="stable JSON (docs/plan-format.md)")
    p.add_argument("--offline", action="store_true", help="observe nothing: plan for empty hosts")
    p.set_defaults(func=cmd_plan)


def register_apply(sub: Any) -> None:
    p = sub.add_parser("apply", help="deploy the stack (a deploy-stack flow run)")
    add_stack_args(p)
    add_state_arg(p)
    p.add_argument(
        "--unit",
        dest="units",
        action="append",
        default=[],
        metavar="UNIT",
        help="deploy only this unit (repeatable)",
    )
    p.add_argument(
        "--no-wait", action="store_true", help="fail at once if another run holds the stack's lock"
    )
    p.add_argument(
        "--no-bake",
        action="store_true",
        help="commit right after the final verification, without watching the changed "
        "instances for their bake window (deploy.bake): a revision that fails moments later "
        "stays (the supervisor still restarts it)",
    )
    p.set_defaults(func=cmd_apply)


def register_rollback(sub: Any) -> None:
    p = sub.add_parser("rollback", help="put back the last good (or a given) revision")
    add_stack_args(p)
    add_state_arg(p)
    p.add_argument("unit", nargs="?", help="the unit to roll back (default: the whole stack)")
    p.add_argument("--to", type=int, metavar="REVISION", help="the unit's revision to restore")
    p.add_argument("--no-wait", action="store_true")
    p.set_defaults(func=cmd_rollback)


def register_status(sub: Any) -> None:
    p = sub.add_parser("status", help="what each unit's backend observes")
    add_stack_args(p)
    add_state_arg(p)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_status)


def register_down(sub: Any) -> None:
    p = sub.add_parser(
        "down", help="stop (draining first) and remove every unit of the stack (a down-stack run)"
    )
    add_stack_args(p)
    add_state_arg(p)
    p.add_argument("--no-wait", action="store_true")
    p.set_defaults(func=cmd_down)


def register_history(sub: Any) -> None:
    p = sub.add_parser("history", help="deploy runs, or one unit's revisions")
    add_stack_args(p)
    add_state_arg(p)
    p.add_argument("unit", nargs="?")
    p.add_argument("--limit", type=int, default=20)
    p.set_defaults(func=cmd_history)
