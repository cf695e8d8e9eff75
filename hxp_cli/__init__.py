"""`hxp`: the operator's command line. Exit 0 on success, 2 on invalid input, 1 on failure.

A client of the flows and the core, outside the pure core: it reads the store, and changes
hosts only by running flows (each command that does runs one flow run on the Prefect server
of hxp.io.prefect_server). One module per command group, each with its own small parsers.
It never imports Prefect for commands that do not run flows, so those answer fast.
"""

from __future__ import annotations

import argparse
import errno
import os
import sys
import time
import traceback
from collections.abc import Sequence

from hxp import __version__
from hxp.errors import HxpError, InputError
from hxp_cli import (
    autoscale,
    chaos,
    config,
    deploy,
    fit,
    lifecycle,
    monitoring,
    runner,
    server,
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hxp", description="Deploy and run fleets of vLLM model servers and their services."
    )
    parser.add_argument("--version", action="version", version=f"hxp {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for register in (
        config.register_validate,
        config.register_config,
        config.register_graph,
        config.register_render,
        deploy.register_plan,
        monitoring.register_monitoring,
        deploy.register_apply,
        deploy.register_rollback,
        deploy.register_status,
        deploy.register_down,
        deploy.register_history,
        server.register_server,
        server.register_urls,
        monitoring.register_exporter,
        fit.register_fit,
        monitoring.register_health,
        lifecycle.register_lifecycle,
        lifecycle.register_sleep,
        lifecycle.register_supervise,
        lifecycle.register_states,
        autoscale.register_autoscale,
        chaos.register_chaos,
    ):
        register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.hxp_argv = list(sys.argv[1:] if argv is None else argv)
    debug = args.debug or os.environ.get("HXP_DEBUG") == "1"
    started = time.monotonic()
    try:
        code: int = args.func(args)
    except runner.Delegated as done:  # the warm runner ran it, with this process's stdio
        return done.code
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
        if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:  # not a bug: the disk
            print(
                f"error: no space left on the disk of {exc.filename or 'a file hxp writes'}: "
                "free space there and run it again",
                file=sys.stderr,
            )
            return 1
        print(
            f"internal error: {type(exc).__name__}: {exc} (run with --debug for the traceback)",
            file=sys.stderr,
        )
        return 1
    if debug:
        print(f"done in {time.monotonic() - started:.3f}s", file=sys.stderr)
    return code


__all__ = ["build_parser", "main"]
