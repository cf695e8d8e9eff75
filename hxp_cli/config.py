"""`hxp validate`, `config show|migrate|watch|restore`, `graph`, `render`: the stack files
and what they produce; nothing here touches a host (watch applies through reload-stack)."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from hxp.errors import HxpError, InputError
from hxp_cli.common import add_stack_args, add_state_arg, files, load, state_dir, use_prefect


def cmd_validate(args: argparse.Namespace) -> int:
    from hxp.graph import DependencyGraph
    from hxp.units import expand_units

    effective = load(args)
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

    effective = load(args)
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

    for name in files(args):
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


def cmd_config_watch(args: argparse.Namespace) -> int:
    """Re-validate the stack files when they change; show the reload plan and apply it."""
    from hxp.config import load_config
    from hxp.lifecycle import plan_reload
    from hxp.store import Store

    use_prefect(args)
    from flows.lifecycle import reload_stack

    store = Store(state_dir(args))
    seen: str | None = None
    while True:
        try:
            effective = load_config(files(args), os.environ, args.overrides)
        except InputError as exc:
            text = str(exc)
            if text != seen:
                print("error: " + text.replace("\n", "\nerror: "), file=sys.stderr)
                print("(not applied; watching for the next change)", file=sys.stderr)
                seen = text
        else:
            current = effective.content_hash
            applied = store.latest_snapshot(effective.stack.stack)
            if applied is None:
                raise InputError(f"stack {effective.stack.stack!r} was never applied: hxp apply")
            if current != applied.content_hash and current != seen:
                seen = current
                print(plan_reload(applied.restore(), effective.stack).summary())
                try:
                    result = reload_stack(
                        files(args), overrides=args.overrides, state_dir=str(state_dir(args))
                    )
                except HxpError as exc:
                    print("error: " + str(exc).replace("\n", "\nerror: "), file=sys.stderr)
                else:
                    done = ", ".join(result["reloaded"]) or "nothing"
                    print(f"reloaded: {done}; rolled: {', '.join(result['rolled']) or 'nothing'}")
        if args.once:
            return 0
        time.sleep(args.interval)


def cmd_config_restore(args: argparse.Namespace) -> int:
    """List the kept backups of overwritten files, or put one back."""
    from hxp.io.backups import list_backups, restore_backup

    name = args.stack or load(args).stack.stack
    state = state_dir(args)
    if not args.backup:
        print(f"{'backup':<26} {'when':<19} {'bytes':>7}  path (why)")
        for b in list_backups(state, name):
            when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(b.at))
            print(f"{b.id:<26} {when:<19} {b.size:>7}  {b.path} ({b.reason})")
        return 0
    try:
        chosen = restore_backup(state, name, args.backup)
    except FileNotFoundError as exc:
        raise InputError(str(exc)) from None
    print(f"restored {chosen.path} from backup {chosen.id} (the replaced file was backed up)")
    return 0


def cmd_graph(args: argparse.Namespace) -> int:
    from hxp.graph import DependencyGraph

    effective = load(args)
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

    effective = load(args)
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


def register_validate(sub: Any) -> None:
    p = sub.add_parser("validate", help="validate stack files")
    add_stack_args(p)
    p.set_defaults(func=cmd_validate)


def register_config(sub: Any) -> None:
    p = sub.add_parser("config", help="show or migrate the effective configuration")
    csub = p.add_subparsers(dest="config_command", required=True, metavar="SUBCOMMAND")
    s = csub.add_parser("show", help="print the effective configuration")
    add_stack_args(s)
    s.add_argument("--provenance", action="store_true", help="where each value came from")
    s.add_argument("--json", action="store_true", help="machine-readable output")
    s.set_defaults(func=cmd_config_show)
    s = csub.add_parser("migrate", help="rewrite stack files at the current format version")
    add_stack_args(s)
    s.add_argument("--dry-run", action="store_true", help="print the migrated file instead")
    s.set_defaults(func=cmd_config_migrate)
    s = csub.add_parser("watch", help="apply stack file changes: reload, roll or deploy")
    add_stack_args(s)
    add_state_arg(s)
    s.add_argument("--interval", type=float, default=2.0, metavar="S", help="poll every S s")
    s.add_argument("--once", action="store_true", help="check once and exit")
    s.set_defaults(func=cmd_config_watch)
    s = csub.add_parser("restore", help="list backups of overwritten files, or put one back")
    add_stack_args(s)
    add_state_arg(s)
    s.add_argument("backup", nargs="?", help="the backup id to restore (default: list them)")
    s.add_argument("--stack", help="the stack's name (default: read from the stack file)")
    s.set_defaults(func=cmd_config_restore)


def register_graph(sub: Any) -> None:
    p = sub.add_parser("graph", help="dependency order and what can run side by side")
    add_stack_args(p)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_graph)


def register_render(sub: Any) -> None:
    p = sub.add_parser(
        "render",
        help="render systemd units, a Compose file, Kubernetes manifests or the monitoring files",
    )
    add_stack_args(p)
    p.add_argument("--target", choices=["systemd", "compose", "k8s", "monitoring"], required=True)
    p.add_argument("--out", required=True, metavar="DIR", help="output directory")
    p.add_argument("--no-verify", action="store_true", help="skip the external validators")
    p.set_defaults(func=cmd_render)
