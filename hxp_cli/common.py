"""What every command group shares: stack and state arguments, loading, the Prefect API."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from hxp_cli import runner

DEFAULT_FILE = "stack.yaml"

#: Settings contexts use_prefect entered for the rest of the process (kept referenced).
_ENTERED: list[Any] = []


def add_stack_args(p: argparse.ArgumentParser) -> None:
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


def add_state_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--state-dir",
        metavar="DIR",
        help="store and process state (default $HXP_STATE_DIR or ~/.local/state/hxp)",
    )


def files(args: argparse.Namespace) -> list[str]:
    if args.files:
        return list(args.files)
    env = os.environ.get("HXP_STACK_FILE")
    if env:
        return env.split(os.pathsep)
    return [DEFAULT_FILE]


def load(args: argparse.Namespace) -> Any:
    """The effective configuration of the command's stack files (notices on stderr)."""
    from hxp.config import load_config_cached

    # cached by content: a flow run this command starts reads the same files again
    effective = load_config_cached(files(args), os.environ, args.overrides)
    for notice in [] if runner.INSIDE else effective.notices:  # the caller printed them
        print(f"notice: {notice}", file=sys.stderr)
    return effective


def state_dir(args: argparse.Namespace) -> Path:
    from hxp.store import default_state_dir

    return Path(args.state_dir) if getattr(args, "state_dir", None) else default_state_dir()


def quiet_prefect_tracebacks(debug: bool) -> None:
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


def use_prefect(args: argparse.Namespace) -> str:
    """Point this process at the one Prefect server its flow runs belong on (never a temporary
    one: hxp.io.prefect_server.ensure_api) and set up Prefect's logging; the API URL.

    When the state directory's warm runner runs (hxp_cli.runner), the whole command runs
    there instead and this raises `runner.Delegated` with its exit code."""
    from hxp.io.prefect_server import ensure_api

    state = state_dir(args)
    code = runner.delegate(state, getattr(args, "hxp_argv", None) or sys.argv[1:])
    if code is not None:
        raise runner.Delegated(code)
    api = ensure_api(state)
    if api.source == "local server":
        runner.ensure_runner(state)  # the next command skips Prefect's imports
    if api.started is not None:
        print(
            f"Started the local Prefect server: {api.started['ui']} "
            f"(log {api.started['log']}; stop it with: hxp server stop)",
            file=sys.stderr,
        )
    print(f"Prefect API: {api.url} ({api.source})", file=sys.stderr)
    from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY, temporary_settings

    # A CLI run is watched by its operator and its store closes interrupted deploys: the flow
    # heartbeat (about 1 s per run, PREFECT.md) buys nothing here. Workers keep it. The
    # context stays entered for the life of the process: it must be kept referenced, since a
    # context manager that is garbage-collected exits (and the setting came back).
    heartbeat_off = temporary_settings(updates={PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None})
    heartbeat_off.__enter__()
    _ENTERED.append(heartbeat_off)
    # Prefect configures its logging once, when `prefect.main` is first imported (as the flow's
    # `from prefect import flow` would): import it now, so the filter below lands on the
    # handlers in use. Calling setup_logging() as well would configure it twice (each time
    # every setting is serialized: 0.2-0.5 s here).
    import prefect.main  # noqa: F401

    quiet_prefect_tracebacks(args.debug)
    return api.url
