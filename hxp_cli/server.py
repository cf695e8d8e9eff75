"""`hxp server start|stop|status`: the local Prefect server hxp's flow runs go to."""

from __future__ import annotations

import argparse
from typing import Any

from hxp_cli import runner
from hxp_cli.common import add_stack_args, add_state_arg, load, state_dir


def cmd_server(args: argparse.Namespace) -> int:
    from hxp.io.prefect_server import runner_status, server_status, start_server, stop_server

    state = state_dir(args)
    if args.action == "start":
        started = start_server(state)
        print(f"Prefect server: {started['ui']} (API {started['url']}, log {started['log']})")
        runner.ensure_runner(state)  # flow commands then skip Prefect's imports (hxp_cli.runner)
        return 0
    if args.action == "stop":
        print("stopped" if stop_server(state) else "no server was running")
        return 0
    record = server_status(state)
    print(f"running: {record['ui']}" if record else "not running")
    warm = runner_status(state)
    if record:
        print(f"warm runner: pid {warm['pid']}" if warm else "warm runner: not running")
    return 0 if record else 1


def register_server(sub: Any) -> None:
    p = sub.add_parser("server", help="the local Prefect server hxp starts on demand")
    add_state_arg(p)
    p.add_argument("action", choices=["start", "stop", "status"])
    p.set_defaults(func=cmd_server)


def cmd_urls(args: argparse.Namespace) -> int:
    """Where to look: the Prefect UI and the last deploy's flow run, the gateway, monitoring."""
    from hxp.io.prefect_server import ui_url
    from hxp.monitoring import component_urls, host_address
    from hxp.spec import ModelSpec
    from hxp.store import Store

    stack = load(args).stack
    rows: list[tuple[str, str]] = []
    ui = ui_url(state_dir(args))
    rows.append(("Prefect UI", ui or "no Prefect server runs (hxp server start)"))
    deploys = [d for d in Store(state_dir(args)).deploys(stack.stack, 50) if d.kind == "deploy"]
    changed = [d for d in deploys if (d.result or {}).get("changes")]
    last = next(iter(changed or deploys), None)
    if ui and last is not None and last.flow_run_id:
        rows.append((f"  deploy #{last.id}", f"{ui.rstrip('/')}/runs/flow-run/{last.flow_run_id}"))
    if stack.gateway is not None:
        address = stack.gateway.bind
        if address in ("0.0.0.0", "::"):  # noqa: S104 - reading the bind address, not binding
            address = host_address(stack, stack.gateway.host)
        for unit, port in stack.gateway.routes.items():
            spec = stack.unit(unit)
            model = isinstance(spec, ModelSpec)
            url = f"http://{address}:{port}/" + ("v1" if model else "")
            if model and spec.engine == "simulator":
                url += " (hxp-vllm-sim, a development double)"
            rows.append((f"Gateway {unit}", url))
    if stack.monitoring is not None:
        for component, url in component_urls(stack).items():
            rows.append((component.capitalize(), url))
    width = max(len(label) for label, _ in rows)
    for label, value in rows:
        print(f"{label + ':':<{width + 1}} {value}")
    return 0


def register_urls(sub: Any) -> None:
    p = sub.add_parser(
        "urls", help="where to look: the Prefect UI and the last deploy's run, gateway, monitoring"
    )
    add_stack_args(p)
    add_state_arg(p)
    p.set_defaults(func=cmd_urls)
