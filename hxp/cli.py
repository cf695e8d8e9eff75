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


def _state_dir(args: argparse.Namespace) -> Path:
    from hxp.store import default_state_dir

    return Path(args.state_dir) if getattr(args, "state_dir", None) else default_state_dir()


def cmd_plan(args: argparse.Namespace) -> int:
    from hxp.plan import plan_stack

    effective = _load(args)
    if args.offline:
        observed = {}
    else:
        from hxp.backends import observe_all

        observed = observe_all(effective.stack, _state_dir(args))
    plan = plan_stack(effective.stack, observed, effective.content_hash)
    if not args.offline:
        from hxp.io.calibration import annotate_plan
        from hxp.store import Store

        plan = annotate_plan(plan, effective.stack, Store(_state_dir(args)))
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


def _quiet_prefect_tracebacks(debug: bool) -> None:
    """Prefect logs a flow's exception with its traceback; operators get the message only."""
    import logging

    class _NoTraceback(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            record.exc_info = None
            record.exc_text = None
            return True

    if debug:
        return
    loggers = [logging.getLogger()] + [
        logger
        for logger in logging.Logger.manager.loggerDict.values()
        if isinstance(logger, logging.Logger)
    ]
    for logger in loggers:
        for handler in logger.handlers:
            if not any(isinstance(f, _NoTraceback) for f in handler.filters):
                handler.addFilter(_NoTraceback())


def _prefect(args: argparse.Namespace) -> None:
    from hxp.io.prefect_server import ensure_api

    url = ensure_api(_state_dir(args))
    print(f"Prefect API: {url}", file=sys.stderr)
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    import prefect  # noqa: F401 - sets up Prefect's logging
    from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY, temporary_settings

    # A CLI run is watched by its operator and its store closes interrupted deploys: the flow
    # heartbeat (about 1 s per run, PREFECT.md) buys nothing here. Workers keep it.
    temporary_settings(updates={PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}).__enter__()
    from prefect.logging.configuration import setup_logging

    setup_logging()  # configure now, so the filter below lands on the handlers in use
    _quiet_prefect_tracebacks(args.debug)


def _print_result(result: dict[str, Any]) -> None:
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
    _load(args)  # bad input fails here, before any server starts
    _prefect(args)
    from flows.deploy import deploy_stack

    result = deploy_stack(
        _files(args),
        overrides=args.overrides,
        units=args.units or None,
        state_dir=str(_state_dir(args)),
        wait_for_lock=not args.no_wait,
    )
    _print_result(result)
    return 0


def _monitoring_down(stack: Any, state: Path) -> int:
    from hxp.backends import backend_for
    from hxp.backends.base import Remove, UnitRef
    from hxp.io.monitoring import find_binaries
    from hxp.monitoring import MonitoringPaths, monitoring_stack_data, monitoring_stack_name

    name = monitoring_stack_name(stack)
    paths = MonitoringPaths(str(state / "monitoring" / stack.stack))
    data = monitoring_stack_data(stack, paths, find_binaries())
    for host in data["hosts"]:
        backend = backend_for(host, stack.hosts[host], state)
        for instance in sorted(backend.observe(name)):
            backend.apply(Remove(UnitRef(name, instance, instance)))
            print(f"removed {name}/{instance}")
    return 0


def cmd_monitoring(args: argparse.Namespace) -> int:
    effective = _load(args)
    if effective.stack.monitoring is None or effective.stack.monitoring.prometheus is None:
        raise InputError("monitoring.prometheus: required to deploy monitoring")
    if args.down:
        return _monitoring_down(effective.stack, _state_dir(args))
    _prefect(args)
    from flows.monitoring import deploy_monitoring

    result = deploy_monitoring(
        _files(args),
        overrides=args.overrides,
        state_dir=str(_state_dir(args)),
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


def cmd_rollback(args: argparse.Namespace) -> int:
    effective = _load(args)
    _prefect(args)
    from flows.deploy import rollback

    result = rollback(
        effective.stack.stack,
        unit=args.unit,
        to_revision=args.to,
        state_dir=str(_state_dir(args)),
        wait_for_lock=not args.no_wait,
    )
    print(f"Rolled back {result['rolled_back']}.")
    _print_result(result)
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from hxp.backends import observe_all
    from hxp.config import unit_config_hash
    from hxp.units import expand_units

    effective = _load(args)
    stack = effective.stack
    seen = observe_all(stack, _state_dir(args))
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
        rows.append((inst.name, inst.host, state, config, rev, detail))
    extra = sorted(set(seen) - {i.name for i in expand_units(stack)})
    for name in extra:
        rows.append((name, seen[name].host, "orphan", "-", str(seen[name].revision or "-"), ""))
    if args.json:
        keys = ("instance", "host", "state", "config", "revision", "detail")
        print(json.dumps([dict(zip(keys, r, strict=True)) for r in rows], indent=2))
    else:
        print(f"{'instance':<24} {'host':<12} {'state':<8} {'config':<8} {'rev':>4}  detail")
        for r in rows:
            print(f"{r[0]:<24} {r[1]:<12} {r[2]:<8} {r[3]:<8} {r[4]:>4}  {r[5]}")
    return 0 if all_good and not extra else 1


def cmd_down(args: argparse.Namespace) -> int:
    from hxp.backends import observe_all, stack_backends
    from hxp.backends.base import Remove, UnitRef
    from hxp.graph import DependencyGraph
    from hxp.io.lock import stack_lock
    from hxp.store import Store
    from hxp.units import expand_units

    effective = _load(args)
    stack = effective.stack
    state = _state_dir(args)
    backends = stack_backends(stack, state)
    with stack_lock(state, stack.stack, f"hxp down (pid {os.getpid()})", wait=not args.no_wait):
        seen = observe_all(stack, state)
        order = DependencyGraph(stack.dependencies()).reverse_order()
        rank = {u: i for i, u in enumerate(order)}
        unit_of = {inst.name: inst.unit for inst in expand_units(stack)}
        instances = sorted(seen.values(), key=lambda o: rank.get(unit_of.get(o.name, ""), -1))
        for obs in instances:
            unit = unit_of.get(obs.name, obs.name)
            host = obs.host if obs.host in backends else next(iter(backends))
            backends[host].apply(Remove(UnitRef(stack.stack, unit, obs.name)))
            Store(state).release(stack.stack, obs.name)  # its GPU reservations, if any
            print(f"removed {obs.name}")
        if stack.gateway is not None:
            from hxp.io.gateway import NginxGateway

            if NginxGateway(state, stack.stack, stack.gateway).stop():
                print("stopped the gateway")
        Store(state).add_event(stack.stack, "down", f"removed {len(instances)} instance(s)")
    print(f"Stack {stack.stack} is down." if instances else f"Stack {stack.stack}: nothing runs.")
    return 0


def cmd_history(args: argparse.Namespace) -> int:
    import datetime as dt

    from hxp.store import Store

    effective = _load(args)
    store = Store(_state_dir(args))
    stack = effective.stack.stack

    def when(t: float | None) -> str:
        return dt.datetime.fromtimestamp(t).strftime("%Y-%m-%d %H:%M:%S") if t else "-"

    if args.unit:
        effective.stack.unit(args.unit)
        print(f"{'rev':>4}  {'status':<12} {'config':<12} {'deploy':>6}  created")
        for rev in store.revisions(stack, args.unit):
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
        print(
            f"{d.id:>4}  {d.kind:<8} {d.status:<11} {(d.config_hash or '-')[:12]:<12} "
            f"{(d.actor or '-'):<10} {when(d.started_at)}  {when(d.finished_at)}"
        )
    return 0


def cmd_server(args: argparse.Namespace) -> int:
    from hxp.io.prefect_server import server_status, start_server, stop_server

    state = _state_dir(args)
    if args.action == "start":
        started = start_server(state)
        print(f"Prefect server: {started['ui']} (API {started['url']}, log {started['log']})")
        return 0
    if args.action == "stop":
        print("stopped" if stop_server(state) else "no server was running")
        return 0
    record = server_status(state)
    print(f"running: {record['ui']}" if record else "not running")
    return 0 if record else 1


def cmd_exporter(args: argparse.Namespace) -> int:
    """Serve the orchestrator's hxp_* and fleet:* series, rebuilt from the store per scrape."""
    import signal

    from hxp.io.telemetry import make_exporter

    state = _state_dir(args)
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


def cmd_fit(args: argparse.Namespace) -> int:
    from hxp.resources import FitRequest, GpuMemory, fit, load_model_config, misfit_message

    tp = args.tensor_parallel_size
    request = FitRequest(
        config=load_model_config(args.config),
        gpus=(GpuMemory(args.gpu_memory_gib, args.gpu_free_gib, args.gpu_name),) * args.gpus,
        max_model_len=args.max_model_len,
        gpu_memory_utilization=args.gpu_memory_utilization,
        tensor_parallel_size="auto" if tp == "auto" else int(tp),
        pipeline_parallel_size=args.pipeline_parallel_size,
        dtype=args.dtype,
        quantization=args.quantization,
        kv_cache_dtype=args.kv_cache_dtype,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        vllm_version=args.vllm_version,
        enforce_eager=args.enforce_eager,
    )
    result = fit(request)
    message = misfit_message(result, request)
    if args.json:
        print(json.dumps({**result.to_dict(), "message": message}, indent=2, sort_keys=True))
    else:
        print(result.explain())
        print(message)
    return 0 if result.fits else 1


def cmd_health(args: argparse.Namespace) -> int:
    from hxp.health import SweepSettings, exit_code
    from hxp.io.sweep import health_table, sweep_stack
    from hxp.io.telemetry import pushgateway_url

    stack = _load(args).stack
    settings = SweepSettings(
        flap_threshold=args.flap_threshold,
        synthetic_window=args.synthetic_window,
        observe=not args.no_observe,
    )
    push = pushgateway_url(stack, args.pushgateway) if args.push or args.pushgateway else None

    def sweep() -> Any:
        return sweep_stack(stack, _state_dir(args), settings, args.reroute, push)

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


def _print_lifecycle(result: dict[str, Any]) -> None:
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
    _load(args)
    _prefect(args)
    from flows.lifecycle import restart_stack, start_stack, stop_stack

    common: dict[str, Any] = {
        "overrides": args.overrides,
        "units": args.units or None,
        "state_dir": str(_state_dir(args)),
        "wait_for_lock": not args.no_wait,
    }
    if args.command == "start":
        result = start_stack(_files(args), **common)
    elif args.command == "stop":
        result = stop_stack(
            _files(args), drain=not args.no_drain, drain_timeout=args.drain_timeout, **common
        )
    else:
        result = restart_stack(
            _files(args),
            rolling=args.rolling,
            max_unavailable=args.max_unavailable,
            max_fail=args.max_fail,
            surge="never" if args.no_surge else "auto",
            drain_timeout=args.drain_timeout,
            **common,
        )
    _print_lifecycle(result)
    print(f"{result['action'].capitalize()} of stack {result['stack']} succeeded.")
    return 0


def cmd_supervise(args: argparse.Namespace) -> int:
    """One supervisor pass, or one every --interval seconds with --watch."""
    _load(args)
    _prefect(args)
    from flows.lifecycle import supervise_stack

    while True:
        result = supervise_stack(
            _files(args),
            overrides=args.overrides,
            state_dir=str(_state_dir(args)),
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

    stack = _load(args).stack
    store = Store(_state_dir(args))
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


def cmd_config_watch(args: argparse.Namespace) -> int:
    """Re-validate the stack files when they change; show the reload plan and apply it."""
    from hxp.config import load_config
    from hxp.lifecycle import plan_reload
    from hxp.store import Store

    _prefect(args)
    from flows.lifecycle import reload_stack

    store = Store(_state_dir(args))
    seen: str | None = None
    while True:
        try:
            effective = load_config(_files(args), os.environ, args.overrides)
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
                        _files(args), overrides=args.overrides, state_dir=str(_state_dir(args))
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

    name = args.stack or _load(args).stack.stack
    state = _state_dir(args)
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


def _tp_arg(value: str) -> str:
    if value != "auto" and not (value.isdigit() and int(value) > 0):
        raise argparse.ArgumentTypeError(f"expected a positive integer or 'auto', got {value!r}")
    return value


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
    s = csub.add_parser("watch", help="apply stack file changes: reload, roll or deploy")
    _add_stack_args(s)
    _add_state_arg(s)
    s.add_argument("--interval", type=float, default=2.0, metavar="S", help="poll every S s")
    s.add_argument("--once", action="store_true", help="check once and exit")
    s.set_defaults(func=cmd_config_watch)
    s = csub.add_parser("restore", help="list backups of overwritten files, or put one back")
    _add_stack_args(s)
    _add_state_arg(s)
    s.add_argument("backup", nargs="?", help="the backup id to restore (default: list them)")
    s.add_argument("--stack", help="the stack's name (default: read from the stack file)")
    s.set_defaults(func=cmd_config_restore)

    p = sub.add_parser("graph", help="dependency order and what can run side by side")
    _add_stack_args(p)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_graph)

    p = sub.add_parser(
        "render",
        help="render systemd units, a Compose file, Kubernetes manifests or the monitoring files",
    )
    _add_stack_args(p)
    p.add_argument("--target", choices=["systemd", "compose", "k8s", "monitoring"], required=True)
    p.add_argument("--out", required=True, metavar="DIR", help="output directory")
    p.add_argument("--no-verify", action="store_true", help="skip the external validators")
    p.set_defaults(func=cmd_render)

    p = sub.add_parser("plan", help="what an apply would change, and why")
    _add_stack_args(p)
    _add_state_arg(p)
    p.add_argument("--json", action="store_true", help="stable JSON (docs/plan-format.md)")
    p.add_argument("--offline", action="store_true", help="observe nothing: plan for empty hosts")
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser(
        "monitoring",
        help="deploy or reload Prometheus, Alertmanager and the Pushgateway, then verify them",
    )
    _add_stack_args(p)
    _add_state_arg(p)
    p.add_argument("--verify-timeout", type=float, default=60.0, metavar="SECONDS")
    p.add_argument(
        "--down", action="store_true", help="stop and remove the monitoring units instead"
    )
    p.set_defaults(func=cmd_monitoring)

    p = sub.add_parser("apply", help="deploy the stack (a deploy-stack flow run)")
    _add_stack_args(p)
    _add_state_arg(p)
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
    p.set_defaults(func=cmd_apply)

    p = sub.add_parser("rollback", help="put back the last good (or a given) revision")
    _add_stack_args(p)
    _add_state_arg(p)
    p.add_argument("unit", nargs="?", help="the unit to roll back (default: the whole stack)")
    p.add_argument("--to", type=int, metavar="REVISION", help="the unit's revision to restore")
    p.add_argument("--no-wait", action="store_true")
    p.set_defaults(func=cmd_rollback)

    p = sub.add_parser("status", help="what each unit's backend observes")
    _add_stack_args(p)
    _add_state_arg(p)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("down", help="stop and remove every unit of the stack")
    _add_stack_args(p)
    _add_state_arg(p)
    p.add_argument("--no-wait", action="store_true")
    p.set_defaults(func=cmd_down)

    p = sub.add_parser("history", help="deploy runs, or one unit's revisions")
    _add_stack_args(p)
    _add_state_arg(p)
    p.add_argument("unit", nargs="?")
    p.add_argument("--limit", type=int, default=20)
    p.set_defaults(func=cmd_history)

    p = sub.add_parser("server", help="the local Prefect server hxp starts on demand")
    _add_state_arg(p)
    p.add_argument("action", choices=["start", "stop", "status"])
    p.set_defaults(func=cmd_server)

    p = sub.add_parser(
        "exporter",
        help="serve hxp_* and fleet:* metrics from the store (for Prometheus)",
        description="Rebuilds every series from the store on each scrape, so it stays right "
        "across orchestrator restarts. Runs until SIGTERM/SIGINT.",
    )
    _add_state_arg(p)
    p.add_argument("--port", type=int, default=9464, help="port to listen on (default 9464)")
    p.add_argument("--bind", default="127.0.0.1", metavar="ADDR", help="address (127.0.0.1)")
    p.add_argument("--stack", action="append", metavar="NAME", help="only this stack; repeatable")
    p.set_defaults(func=cmd_exporter)

    p = sub.add_parser(
        "fit",
        help="will a model fit on these GPUs under vLLM, and with how much KV cache",
        description="Exit 0 if it fits, 1 if it does not, 2 on bad input.",
    )
    p.add_argument("--config", required=True, metavar="FILE", help="the model's config.json")
    p.add_argument("--gpus", type=int, required=True, metavar="N", help="number of GPUs")
    p.add_argument(
        "--gpu-memory-gib",
        type=float,
        required=True,
        metavar="G",
        help="total memory per GPU in GiB, as torch reports it (e.g. 79.19 on an H100)",
    )
    p.add_argument("--gpu-memory-utilization", type=float, required=True, metavar="U")
    p.add_argument("--max-model-len", type=int, required=True, metavar="L")
    p.add_argument(
        "--tensor-parallel-size",
        type=_tp_arg,
        default="auto",
        metavar="T|auto",
        help="'auto' picks the smallest size that fits (default)",
    )
    p.add_argument("--pipeline-parallel-size", type=int, default=1, metavar="P")
    p.add_argument("--dtype", default="auto", metavar="D")
    p.add_argument(
        "--quantization",
        default=None,
        metavar="Q",
        help="override config.json's quantization_config (e.g. fp8)",
    )
    p.add_argument("--kv-cache-dtype", default="auto", metavar="K")
    p.add_argument("--max-num-seqs", type=int, default=None, metavar="S")
    p.add_argument("--max-num-batched-tokens", type=int, default=None, metavar="B")
    p.add_argument("--vllm-version", default="0.11.0", metavar="V")
    p.add_argument("--enforce-eager", action="store_true")
    p.add_argument(
        "--gpu-free-gib",
        type=float,
        default=None,
        metavar="F",
        help="memory free on each GPU before vLLM starts (default: all of it)",
    )
    p.add_argument(
        "--gpu-name",
        default=None,
        metavar="NAME",
        help="e.g. 'NVIDIA A100-SXM4-80GB' (vLLM's batch defaults exclude A100s)",
    )
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_fit)

    p = sub.add_parser(
        "health",
        help="check every unit now: composite health table",
        description="Exit 0 healthy, 1 degraded (or unknown), 2 unhealthy.",
    )
    _add_stack_args(p)
    _add_state_arg(p)
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

    for name, text in (
        ("start", "start a deployed stack or units in dependency order (a start-stack run)"),
        ("stop", "stop a stack or units in reverse order, draining first (stop-stack)"),
        ("restart", "restart: stop + start, or --rolling replica by replica (restart-stack)"),
    ):
        p = sub.add_parser(name, help=text)
        _add_stack_args(p)
        _add_state_arg(p)
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

    p = sub.add_parser("supervise", help="restart crashed units; give up on crash loops")
    _add_stack_args(p)
    _add_state_arg(p)
    p.add_argument("--watch", action="store_true", help="a pass every --interval seconds")
    p.add_argument("--interval", type=float, default=15.0, metavar="S")
    p.add_argument("--max-crashes", type=int, default=5, metavar="N")
    p.add_argument("--crash-window", type=float, default=600.0, metavar="S")
    p.add_argument("--backoff", type=float, default=1.0, metavar="S")
    p.set_defaults(func=cmd_supervise)

    p = sub.add_parser("states", help="recorded lifecycle state of every instance")
    _add_stack_args(p)
    _add_state_arg(p)
    p.add_argument("--events", type=int, default=10, metavar="N", help="latest N transitions")
    p.set_defaults(func=cmd_states)
    return parser


def _add_state_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--state-dir",
        metavar="DIR",
        help="store and process state (default $HXP_STATE_DIR or ~/.local/state/hxp)",
    )


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
