"""`hxp autoscale [--once] [--json]`: autoscaler passes (the autoscale flow)."""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

from hxp_cli.common import add_stack_args, add_state_arg, files, load, state_dir, use_prefect


def _print(result: dict[str, Any], as_json: bool) -> None:
    if as_json:
        print(json.dumps(result, sort_keys=True), flush=True)
        return
    if not result["decisions"]:
        print(f"{result['stack']}: no model has `autoscale`", flush=True)
    for d in result["decisions"]:
        print(
            f"{d['model']}: {d['action']} {d['current']} -> {d['desired']}: {d['reason']}"
            f" [{d['outcome']}]",
            flush=True,
        )


def cmd_autoscale(args: argparse.Namespace) -> int:
    """One autoscaler pass with --once, else one every --interval seconds (default: the
    smallest `autoscale.interval` of the stack's models)."""
    stack = load(args).stack
    intervals = [m.autoscale.interval for m in stack.models.values() if m.autoscale is not None]
    interval = args.interval or (min(intervals) if intervals else 15.0)
    use_prefect(args)
    from flows.autoscale import autoscale

    while True:
        started = time.monotonic()
        result = autoscale(
            files(args),
            overrides=args.overrides,
            state_dir=str(state_dir(args)),
            dry_run=args.dry_run,
        )
        _print(result, args.json)
        if args.once:
            return 0
        time.sleep(max(0.0, interval - (time.monotonic() - started)))


def register_autoscale(sub: Any) -> None:
    p = sub.add_parser("autoscale", help="scale autoscaled models on fresh metrics (autoscale)")
    add_stack_args(p)
    add_state_arg(p)
    p.add_argument("--once", action="store_true", help="one pass, then exit")
    p.add_argument("--json", action="store_true", help="each pass's decisions as one JSON line")
    p.add_argument("--dry-run", action="store_true", help="decide and report, change nothing")
    p.add_argument(
        "--interval", type=float, metavar="S", help="seconds between passes (default: the models')"
    )
    p.set_defaults(func=cmd_autoscale)
