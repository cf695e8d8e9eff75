"""Flow run names: `<action>-<stack>[-<unit>+<unit>]`, the one place every flow names its runs.

The stack's name comes from its files (parsed once per process: `load_config_cached`, which the
run's own load task hits again); a file that does not parse names the run after the file, so
that a run that will fail on bad input still gets a readable name.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from prefect.runtime import flow_run

from hxp.config import load_config_cached
from hxp.errors import HxpError


def run_stack_name() -> str:
    """The stack the current flow run works on, from its `stack_files` and `overrides`."""
    params = flow_run.parameters
    files = params.get("stack_files") or ["stack.yaml"]
    files = [files] if isinstance(files, str) else list(files)
    try:
        return load_config_cached(files, {}, list(params.get("overrides") or [])).stack.stack
    except HxpError:
        return Path(str(files[0])).name


def run_units() -> list[str]:
    """The units the current run is limited to (`units`, or the one `service` or `model`),
    else []."""
    params = flow_run.parameters
    one = params.get("service") or params.get("model")
    return list(params.get("units") or ([one] if one else []))


def stack_run_name(action: str | None = None, suffix: str = "") -> Callable[[], str]:
    """A `flow_run_name` callable: `<action>-<stack><suffix>`, plus `-<units>` when the run is
    limited to some units. Without `action`, the flow's name less `-stack` / `-service`
    (`stop-service` runs are `stop-<stack>-<unit>`)."""

    def name() -> str:
        verb = action or (flow_run.flow_name or "run").removesuffix("-stack").removesuffix(
            "-service"
        )
        units = run_units()
        return f"{verb}-{run_stack_name()}{suffix}" + (f"-{'+'.join(units)}" if units else "")

    return name


def run_holder(action: str) -> str:
    """Who holds a stack's lock, as a waiting run says it: `<action> flow run <name>`."""
    return f"{action} flow run {flow_run.name or flow_run.id or 'ad hoc'}"
