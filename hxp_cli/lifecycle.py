"""`hxp start|stop|restart`, `sleep|wake`, `supervise`, `states`: the lifecycle flows and the
recorded states."""

from __future__ import annotations

import argparse
import time
from typing import Any

from hxp_cli.common import add_stack_args, add_state_arg, files, load, state_dir, use_prefect


def print_lifecycle(result: dict[str, Any]) -> None:
    for unit, info in result.get("units", {}).items():
        lines = info.get("steps") or [f"{i}: {what}" for i, what in info["instances"].items()]
        print(f"{unit} ({info['seconds']:.2f}s)")
        for line in lines:
            print(f"  {line}")
    for line in result.get("reconciled", []):
        print(f"reconciled {line}")
    states = result.get("states", {})
    if states:
        print("states: " + ", ".join(f"{n}={s}" for n, s in states.items()))


def cmd_lifecycle(args: argparse.Namespace) -> int:
    """hxp start | stop | restart: the lifecycle flows."""
    load(args)
    use_prefect(args)
    from flows.lifecycle import restart_stack, start_stack, stop_stack

    common: dict[str, Any] = {
        "overrides": args.overrides,
        "units": args.units or None,
        "state_dir": str(state_dir(args)),
        "wait_for_lock": not args.no_wait,
    }
    if args.command == "start":
        result = start_stack(files(args), **common)
    elif args.command == "stop":
        result = stop_stack(
            files(args), drain=not args.no_drain, drain_timeout=args.drain_timeout, **common
        )
    else:
        result = restart_stack(
            files(args),
            rolling=args.rolling,
            max_unavailable=args.max_unavailable,
            max_fail=args.max_fail,
            surge="never" if args.no_surge else "auto",
            drain_timeout=args.drain_timeout,
            **common,
        )
    print_lifecycle(result)
    print(f"{result['action'].capitalize()} of stack {result['stack']} succeeded.")
    return 0


def cmd_sleep(args: argparse.Namespace) -> int:
    """hxp sleep | wake MODEL: the sleep-model and wake-model flows."""
    from hxp.sleep import sleeping_model

    stack = load(args).stack
    sleeping_model(stack, args.model)  # not opted in: exit 2 naming the field, nothing done
    use_prefect(args)
    from flows.lifecycle import sleep_model, wake_model

    common: dict[str, Any] = {
        "overrides": args.overrides,
        "state_dir": str(state_dir(args)),
        "wait_for_lock": not args.no_wait,
    }
    if args.command == "sleep":
        result = sleep_model(
            files(args), args.model, level=args.level, drain_timeout=args.drain_timeout, **common
        )
    else:
        result = wake_model(files(args), args.model, **common)
    print_lifecycle(result)
    print(f"{result['action'].capitalize()} of {args.model} in stack {result['stack']} succeeded.")
    return 0


def cmd_supervise(args: argparse.Namespace) -> int:
    """One supervisor pass, or one every --interval seconds with --watch."""
    load(args)
    use_prefect(args)
    from flows.lifecycle import supervise_stack

    while True:
        result = supervise_stack(
            files(args),
            overrides=args.overrides,
            state_dir=str(state_dir(args)),
            max_crashes=args.max_crashes,
            crash_window=args.crash_window,
            backoff=args.backoff,
        )
        for key in ("reconciled", "crashed", "restarted", "gave_up"):
            for name in result.get(key, []):
                print(f"{key.replace('_', ' ')}: {name}")
        for name, why in result.get("failed_restarts", {}).items():
            print(f"restart failed: {name}: {why}")
        if not args.watch:
            return 1 if result.get("gave_up") else 0
        time.sleep(args.interval)


def cmd_states(args: argparse.Namespace) -> int:
    """The recorded lifecycle state of every instance, and the latest transitions."""
    from hxp.store import Store

    stack = load(args).stack
    store = Store(state_dir(args))
    rows = store.lifecycle(stack.stack)
    print(f"{'instance':<24} {'unit':<16} {'state':<9} since     reason")
    for name, r in sorted(rows.items()):
        since = time.strftime("%H:%M:%S", time.localtime(r.since))
        held = " [held: crash loop]" if r.held else ""
        print(f"{name:<24} {r.unit:<16} {r.state.value:<9} {since}  {r.reason}{held}")
    events = [e for e in store.events(stack.stack) if e["kind"] in ("lifecycle", "alert")]
    if events and args.events:
        print("\nlatest transitions:")
        for e in events[-args.events :]:
            at = time.strftime("%H:%M:%S", time.localtime(e["at"]))
            print(f"  {at} {e['message']}")
    return 0


def register_lifecycle(sub: Any) -> None:
    for name, text in (
        ("start", "start a deployed stack or units in dependency order (a start-stack run)"),
        ("stop", "stop a stack or units in reverse order, draining first (stop-stack)"),
        ("restart", "restart: stop + start, or --rolling replica by replica (restart-stack)"),
    ):
        p = sub.add_parser(name, help=text)
        add_stack_args(p)
        add_state_arg(p)
        p.add_argument("units", nargs="*", metavar="UNIT", help="only these units")
        p.add_argument("--no-wait", action="store_true", help="fail if the stack is locked")
        if name != "start":
            p.add_argument("--drain-timeout", type=float, metavar="S", help="cap of the drain")
        if name == "stop":
            p.add_argument("--no-drain", action="store_true", help="stop without draining")
        if name == "restart":
            p.add_argument("--rolling", action="store_true", help="replica by replica")
            p.add_argument("--max-unavailable", type=int, default=1, metavar="N")
            p.add_argument("--max-fail", type=int, default=0, metavar="N")
            p.add_argument("--no-surge", action="store_true", help="always restart in place")
        p.set_defaults(func=cmd_lifecycle)


def register_sleep(sub: Any) -> None:
    for name, text in (
        ("sleep", "free a model's GPU memory, out of the gateway first (a sleep-model run)"),
        ("wake", "wake a sleeping model; back in the gateway once it serves (wake-model)"),
    ):
        p = sub.add_parser(name, help=text)
        add_stack_args(p)
        add_state_arg(p)
        p.add_argument("model", metavar="MODEL", help="a model with sleep_mode: true")
        p.add_argument("--no-wait", action="store_true", help="fail if the stack is locked")
        if name == "sleep":
            p.add_argument(
                "--level",
                type=int,
                choices=(1, 2),
                default=1,
                help="1: weights to CPU RAM, KV cache discarded (default); 2: both discarded",
            )
            p.add_argument("--drain-timeout", type=float, metavar="S", help="cap of the drain")
        p.set_defaults(func=cmd_sleep)


def register_supervise(sub: Any) -> None:
    p = sub.add_parser("supervise", help="restart crashed units; give up on crash loops")
    add_stack_args(p)
    add_state_arg(p)
    p.add_argument("--watch", action="store_true", help="a pass every --interval seconds")
    p.add_argument("--interval", type=float, default=15.0, metavar="S")
    p.add_argument("--max-crashes", type=int, default=5, metavar="N")
    p.add_argument("--crash-window", type=float, default=600.0, metavar="S")
    p.add_argument("--backoff", type=float, default=1.0, metavar="S")
    p.set_defaults(func=cmd_supervise)


def register_states(sub: Any) -> None:
    p = sub.add_parser("states", help="recorded lifecycle state of every instance")
    add_stack_args(p)
    add_state_arg(p)
    p.add_argument("--events", type=int, default=10, metavar="N", help="latest N transitions")
    p.set_defaults(func=cmd_states)
