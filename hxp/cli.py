"""`hxp`: the operator's command line. Exit 0 on success, 2 on invalid input, 1 on failure.

It never imports Prefect for commands that do not run flows, so it answers fast.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hxp import __version__
from hxp.errors import HxpError, InputError

DEFAULT_FILE = "stack.yaml"


def _add_stack_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "-f",
        "--file",
        dest="files",
        action="append",
        metavar="FILE",
        help="stack file; repeat for overlays, a later file wins "
        f"(default: $HXP_STACK_FILE or ./{DEFAULT_FILE})",
    )
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="PATH=VALUE",
        help="override one value after files and HXP__ variables, e.g. services.cache.replicas=2",
    )


def _files(args: argparse.Namespace) -> list[str]:
    if args.files:
        return list(args.files)
    env = os.environ.get("HXP_STACK_FILE")
    if env:
        return env.split(os.pathsep)
    return [DEFAULT_FILE]


def _load(args: argparse.Namespace) -> Any:
    from hxp.config import load_config

    effective = load_config(_files(args), os.environ, args.overrides)
    for notice in effective.notices:
        print(f"notice: {notice}", file=sys.stderr)
    return effective


def cmd_validate(args: argparse.Namespace) -> int:
    from hxp.graph import DependencyGraph
    from hxp.units import expand_units

    effective = _load(args)
    stack = effective.stack
    DependencyGraph(stack.dependencies())
    expand_units(stack)
    print(
        f"{', '.join(effective.sources)}: stack {stack.stack!r} is valid: "
        f"{len(stack.hosts)} host(s), {len(stack.services)} service(s), "
        f"{len(stack.models)} model(s); config {effective.content_hash[:12]}"
    )
    return 0


def cmd_config_show(args: argparse.Namespace) -> int:
    from hxp.config import dump_stack_yaml

    effective = _load(args)
    if args.json:
        out: dict[str, Any] = {
            "config": effective.stack.model_dump(mode="json"),
            "content_hash": effective.content_hash,
            "sources": list(effective.sources),
        }
        if args.provenance:
            out["provenance"] = [
                {"path": p, "value": v, "origin": o} for p, v, o in effective.provenance_rows()
            ]
        print(json.dumps(out, indent=2, sort_keys=True))
    elif args.provenance:
        rows = effective.provenance_rows()
        width = max((len(p) for p, _, _ in rows), default=0)
        for path, value, origin in rows:
            print(f"{path:<{width}}  {json.dumps(value)}  # {origin}")
    else:
        print(f"# content hash {effective.content_hash}")
        print(dump_stack_yaml(effective.stack.model_dump(mode="json", exclude_none=True)), end="")
    return 0


def cmd_config_migrate(args: argparse.Namespace) -> int:
    from hxp.config import dump_stack_yaml, read_document
    from hxp.spec import CURRENT_VERSION

    for name in _files(args):
        doc = read_document(name)
        if not doc.notices:
            print(f"{name}: already at format version {CURRENT_VERSION}", file=sys.stderr)
            continue
        text = dump_stack_yaml(doc.data)
        if args.dry_run:
            print(text, end="")
            continue
        path = Path(name)
        backup = path.with_name(path.name + ".bak")
        backup.write_bytes(path.read_bytes())
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(text)
        tmp.replace(path)
        for notice in doc.notices:
            print(f"notice: {notice}", file=sys.stderr)
        print(f"{name}: rewritten at format version {CURRENT_VERSION} (original kept as {backup})")
    return 0


def cmd_graph(args: argparse.Namespace) -> int:
    from hxp.graph import DependencyGraph

    effective = _load(args)
    graph = DependencyGraph(effective.stack.dependencies())
    if args.json:
        print(
            json.dumps(
                {
                    "order": graph.order(),
                    "stop_order": graph.reverse_order(),
                    "levels": graph.levels(),
                    "depends_on": {u: list(graph.dependencies(u)) for u in graph.units},
                },
                indent=2,
                sort_keys=True,
            )
        )
        return 0
    print(f"Start order ({len(graph.units)} units):")
    for unit in graph.order():
        deps = graph.dependencies(unit)
        after = f"  after {', '.join(sorted(deps))}" if deps else ""
        print(f"  {unit}{after}")
    print("Can run side by side (each unit also starts as soon as its own dependencies are ready):")
    for i, level in enumerate(graph.levels()):
        print(f"  {i}: {', '.join(level)}")
    print(f"Stop order: {', '.join(graph.reverse_order())}")
    return 0


def cmd_render(args: argparse.Namespace) -> int:
    from hxp.render import render_stack, write_files

    effective = _load(args)
    files = render_stack(effective.stack, args.target)
    out = Path(args.out)
    written = write_files(files, out)
    for path in written:
        print(f"wrote {path}")
    if args.no_verify:
        return 0
    from hxp.errors import OutputCheckError
    from hxp.io.validators import check_rendered

    results = check_rendered(files, args.target)
    problems: list[str] = []
    for r in results:
        if r.skipped:
            print(f"skipped {r.check}: {r.skipped}", file=sys.stderr)
        elif r.ok:
            extra = ""
            if r.details:
                extra = " (exposure " + ", ".join(f"{v:.1f}" for v in r.details.values()) + ")"
            print(f"passed {r.check}{extra}")
        else:
            problems.extend(f"{r.check}: {p}" for p in r.problems)
    if problems:
        if any("is not executable" in p for p in problems):
            problems.append(
                "hint: programs are looked up on this machine; check on the target host "
                "or render with --no-verify"
            )
        raise OutputCheckError(problems)
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    from hxp.plan import plan_stack

    effective = _load(args)
    plan = plan_stack(effective.stack, {}, effective.content_hash)
    if args.json:
        print(plan.to_json())
    else:
        print(plan.summary())
        print(
            "(no backend was observed: this is the plan for an empty host)",
            file=sys.stderr,
        )
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hxp", description="Deploy and run fleets of vLLM model servers and their services."
    )
    parser.add_argument("--version", action="version", version=f"hxp {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("validate", help="validate stack files")
    _add_stack_args(p)
    p.set_defaults(func=cmd_validate)

    p = sub.add_parser("config", help="show or migrate the effective configuration")
    csub = p.add_subparsers(dest="config_command", required=True, metavar="SUBCOMMAND")
    s = csub.add_parser("show", help="print the effective configuration")
    _add_stack_args(s)
    s.add_argument("--provenance", action="store_true", help="where each value came from")
    s.add_argument("--json", action="store_true", help="machine-readable output")
    s.set_defaults(func=cmd_config_show)
    s = csub.add_parser("migrate", help="rewrite stack files at the current format version")
    _add_stack_args(s)
    s.add_argument("--dry-run", action="store_true", help="print the migrated file instead")
    s.set_defaults(func=cmd_config_migrate)

    p = sub.add_parser("graph", help="dependency order and what can run side by side")
    _add_stack_args(p)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_graph)

    p = sub.add_parser(
        "render", help="render systemd units, a Compose file or Kubernetes manifests"
    )
    _add_stack_args(p)
    p.add_argument("--target", choices=["systemd", "compose", "k8s"], required=True)
    p.add_argument("--out", required=True, metavar="DIR", help="output directory")
    p.add_argument("--no-verify", action="store_true", help="skip the external validators")
    p.set_defaults(func=cmd_render)

    p = sub.add_parser("plan", help="what an apply would change, and why")
    _add_stack_args(p)
    p.add_argument("--json", action="store_true", help="stable JSON (docs/plan-format.md)")
    p.set_defaults(func=cmd_plan)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    debug = args.debug or os.environ.get("HXP_DEBUG") == "1"
    started = time.monotonic()
    try:
        code: int = args.func(args)
    except InputError as exc:
        if debug:
            traceback.print_exc()
        print("error: " + str(exc).replace("\n", "\nerror: "), file=sys.stderr)
        return exc.exit_code
    except HxpError as exc:
        if debug:
            traceback.print_exc()
        print("error: " + str(exc).replace("\n", "\nerror: "), file=sys.stderr)
        return exc.exit_code
    except BrokenPipeError:  # output piped into `head` and friends
        sys.stderr.close()
        return 0
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # an hxp bug: say so, without a traceback unless asked
        if debug:
            traceback.print_exc()
        print(
            f"internal error: {type(exc).__name__}: {exc} (run with --debug for the traceback)",
            file=sys.stderr,
        )
        return 1
    if debug:
        print(f"done in {time.monotonic() - started:.3f}s", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
