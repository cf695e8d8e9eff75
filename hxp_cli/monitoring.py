"""`hxp monitoring`, `health`, `exporter`: Prometheus and its companions, health sweeps, and
hxp's own series."""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

from hxp.errors import HxpError, InputError
from hxp_cli.common import add_stack_args, add_state_arg, files, load, state_dir, use_prefect


def monitoring_down(args: argparse.Namespace) -> int:
    """Stop and remove the stack's monitoring units: a down-monitoring flow run."""
    use_prefect(args)
    from flows.down import down_monitoring

    result = down_monitoring(files(args), overrides=args.overrides, state_dir=str(state_dir(args)))
    for name in result["removed"]:
        print(f"removed {result['stack']}/{name}")
    return 0


def cmd_monitoring(args: argparse.Namespace) -> int:
    effective = load(args)
    if effective.stack.monitoring is None or effective.stack.monitoring.prometheus is None:
        raise InputError("monitoring.prometheus: required to deploy monitoring")
    if args.down:
        return monitoring_down(args)
    use_prefect(args)
    from flows.monitoring import deploy_monitoring

    result = deploy_monitoring(
        files(args),
        overrides=args.overrides,
        state_dir=str(state_dir(args)),
        verify_timeout=args.verify_timeout,
    )
    changed = ", ".join(result["changed_files"]) or "no config changes"
    print(
        f"Monitoring of {result['stack']}: {changed}; reloaded: "
        f"{', '.join(result['reloaded']) or 'nothing'}"
    )
    print(f"{len(result['targets_up'])} target(s) up, {len(result['rule_groups'])} rule group(s)")
    for component, url in result["urls"].items():
        print(f"{component}: {url}")
    return 0


def cmd_health(args: argparse.Namespace) -> int:
    from hxp.health import SweepSettings, exit_code
    from hxp.io.sweep import health_table, sweep_stack
    from hxp.io.telemetry import pushgateway_url

    stack = load(args).stack
    settings = SweepSettings(
        flap_threshold=args.flap_threshold,
        synthetic_window=args.synthetic_window,
        observe=not args.no_observe,
        host_timeout=args.host_timeout,
    )
    push = pushgateway_url(stack, args.pushgateway) if args.push or args.pushgateway else None

    def sweep() -> Any:
        return sweep_stack(stack, state_dir(args), settings, args.reroute, push)

    if args.json:
        report = sweep()
        print(json.dumps(report.to_dict(), indent=2))
        return exit_code(report.status)
    from rich.console import Console

    console = Console()
    report = sweep()
    if not args.watch:
        console.print(health_table(report))
        for note in report.notes:
            console.print(f"note: {note}", style="yellow")
        return exit_code(report.status)
    from rich.live import Live

    try:
        with Live(health_table(report), console=console, auto_refresh=False) as live:
            while True:
                time.sleep(args.interval)
                report = sweep()
                live.update(health_table(report), refresh=True)
    except KeyboardInterrupt:
        pass
    return exit_code(report.status)


def cmd_exporter(args: argparse.Namespace) -> int:
    """Serve the orchestrator's hxp_* and fleet:* series, rebuilt from the store per scrape."""
    import signal

    from hxp.io.telemetry import make_exporter

    state = state_dir(args)
    try:
        server = make_exporter(state, args.port, args.bind, args.stack or None)
    except OSError as exc:
        raise HxpError(f"cannot listen on {args.bind}:{args.port}: {exc.strerror}") from exc

    def stop(*_: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    url = f"http://{args.bind}:{server.server_address[1]}/metrics"
    print(f"hxp exporter: {url} (store {state})", file=sys.stderr, flush=True)
    try:
        server.serve_forever(poll_interval=0.5)
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


def register_monitoring(sub: Any) -> None:
    p = sub.add_parser(
        "monitoring",
        help="deploy or reload Prometheus, Alertmanager and the Pushgateway, then verify them",
    )
    add_stack_args(p)
    add_state_arg(p)
    p.add_argument("--verify-timeout", type=float, default=60.0, metavar="SECONDS")
    p.add_argument(
        "--down", action="store_true", help="stop and remove the monitoring units instead"
    )
    p.set_defaults(func=cmd_monitoring)


def register_health(sub: Any) -> None:
    p = sub.add_parser(
        "health",
        help="check every unit now: composite health table",
        description="Exit 0 healthy, 1 degraded (or unknown), 2 unhealthy.",
    )
    add_stack_args(p)
    add_state_arg(p)
    p.add_argument("--watch", action="store_true", help="sweep again every --interval seconds")
    p.add_argument("--interval", type=float, default=5.0, metavar="S")
    p.add_argument(
        "--flap-threshold",
        type=int,
        default=2,
        metavar="N",
        help="consecutive sweeps that must agree before a state changes (default 2)",
    )
    p.add_argument(
        "--synthetic-window",
        type=float,
        default=300.0,
        metavar="S",
        help="real traffic this recent skips the synthetic completion (default 300)",
    )
    p.add_argument("--no-observe", action="store_true", help="skip the backend layer")
    p.add_argument(
        "--host-timeout",
        type=float,
        default=2.0,
        metavar="SECONDS",
        help="each addressed host's reachability connect (its sshd); default 2",
    )
    p.add_argument(
        "--reroute",
        action="store_true",
        help="also take unhealthy replicas out of the gateway (as the flow does)",
    )
    p.add_argument(
        "--push",
        action="store_true",
        help="push hxp_unit_health to the stack's monitoring.pushgateway",
    )
    p.add_argument("--pushgateway", metavar="URL", help="push hxp_unit_health to this URL")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_health)


def register_exporter(sub: Any) -> None:
    p = sub.add_parser(
        "exporter",
        help="serve hxp_* and fleet:* metrics from the store (for Prometheus)",
        description="Rebuilds every series from the store on each scrape, so it stays right "
        "across orchestrator restarts. Runs until SIGTERM/SIGINT.",
    )
    add_state_arg(p)
    p.add_argument("--port", type=int, default=9464, help="port to listen on (default 9464)")
    p.add_argument("--bind", default="127.0.0.1", metavar="ADDR", help="address (127.0.0.1)")
    p.add_argument("--stack", action="append", metavar="NAME", help="only this stack; repeatable")
    p.set_defaults(func=cmd_exporter)
