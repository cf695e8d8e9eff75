"""`hxp chaos`: a seeded fault campaign against `hxp apply` on a stack (hxp.chaos, flows/chaos.py).

Every run injects one fault into a new revision of one service (or into the orchestrator), then
checks the invariants; the stack's services are replaced by fault revisions of
hxp.io.chaos_unit as the campaign goes, so run it on a test stack, never on one that serves."""

from __future__ import annotations

import argparse
import os
import random
import sys
from pathlib import Path
from typing import Any

from hxp.errors import InputError
from hxp_cli.common import add_state_arg, state_dir, use_prefect


def cmd_chaos(args: argparse.Namespace) -> int:
    from hxp.chaos import parse_replay, render_table

    if args.runs < 1:
        raise InputError(f"--runs {args.runs}: must be 1 or more")
    only = None
    seed = args.seed if args.seed is not None else random.randrange(1, 10**6)  # noqa: S311
    if args.replay:
        try:
            seed, only = parse_replay(args.replay)
        except ValueError as exc:
            raise InputError(str(exc)) from None
    stack_file = Path(args.file)
    if not stack_file.is_file():
        raise InputError(f"-f {stack_file}: no such file")
    from hxp.config import load_config

    stack = load_config([stack_file], {}).stack  # bad input fails here, before anything starts
    for name, host in stack.hosts.items():
        if host.backend != args.backend:
            raise InputError(
                f"--backend {args.backend}: host {name} of {stack_file} uses backend "
                f"{host.backend} (hosts.{name}.backend)"
            )
    if not args.debug:  # one line per run: the deploys' own failure logs are expected ones
        os.environ.setdefault("PREFECT_LOGGING_LEVEL", "CRITICAL")
    use_prefect(args)
    from flows.chaos import Campaign, run_campaign, write_artifact

    campaign = Campaign(stack_file, state_dir(args), args.backend)
    print(f"chaos: seed {seed}, {1 if only is not None else args.runs} run(s), {args.backend}")
    try:
        results = run_campaign(campaign, seed, args.runs, only)
    finally:
        if not args.keep:
            campaign.teardown()
    table = render_table(results, f"Seed {seed}, backend {args.backend}, {len(results)} runs.\n")
    print(table)
    if args.out:
        write_artifact(Path(args.out), seed, args.backend, results)
        print(f"results: {args.out}", file=sys.stderr)
    return 0 if all(r.consistent for r in results) else 1


def register_chaos(sub: Any) -> None:
    p = sub.add_parser(
        "chaos", help="a seeded fault campaign against apply on a test stack (its services change)"
    )
    p.add_argument("-f", "--file", required=True, metavar="FILE", help="the test stack")
    add_state_arg(p)
    p.add_argument("--runs", type=int, default=30)
    p.add_argument("--seed", type=int, help="default: a random one, printed")
    p.add_argument("--backend", choices=["process", "docker", "systemd"], default="process")
    p.add_argument("--replay", metavar="SEED:RUN", help="repeat one run of a campaign")
    p.add_argument("--out", metavar="FILE", help="write the results as JSON")
    p.add_argument("--keep", action="store_true", help="leave the stack running afterwards")
    p.set_defaults(func=cmd_chaos)
