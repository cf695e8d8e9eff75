"""`autoscale`: one autoscaler pass over a stack's autoscaled models (schedule it every
`autoscale.interval`): fresh metrics through the aggregation, a decision per model
(hxp.autoscale: hysteresis, cooldown, bounds, staleness, GPU room) and the action through the
deploy engine (scale out) or a drain through the gateway and a stop (scale in).

Each decision is an event, an autoscale_decisions row, `hxp_autoscale_*` metrics and a line of
the flow's markdown artifact with its reason.
"""

from __future__ import annotations

import time
from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact

from flows.deploy import apply_config
from flows.naming import stack_run_name
from hxp.config import EffectiveConfig
from hxp.store import counted_at
from tasks.autoscale import act, autoscaled, decide_model, read_signals
from tasks.deploy import state_dir_of
from tasks.stack import load_stack

_run_name = stack_run_name("autoscale")


def _deploy(effective: EffectiveConfig, units: list[str], state: str) -> dict[str, Any]:
    """A scale out: the deploy engine for the model (it reads the autoscaler's new count)."""
    return apply_config(effective, units, state)


@flow(name="autoscale", flow_run_name=_run_name)
def autoscale(
    stack_files: list[str] | str,
    overrides: list[str] | None = None,
    state_dir: str | None = None,
    dry_run: bool = False,
) -> dict[str, Any]:
    """Decide and act for every autoscaled model of the stack, once.

    Args:
        stack_files: Stack file(s) in merge order; a later file wins.
        overrides: `path.to.key=value` overrides applied last.
        state_dir: Where hxp keeps its store; default $HXP_STATE_DIR.
        dry_run: Decide and report, change nothing (no action, no kept state).
    """
    logger = get_run_logger()
    files = [stack_files] if isinstance(stack_files, str) else list(stack_files)
    state = state_dir_of(state_dir)
    loaded = load_stack(files, list(overrides or []))
    effective = counted_at(state, loaded)
    stack = effective.stack
    models = autoscaled(stack)
    if not models:
        logger.info("%s: no model has `autoscale`", stack.stack)
        return {"stack": stack.stack, "decisions": []}
    reading = read_signals(stack, state, models)
    rows: list[dict[str, Any]] = []
    for model in models:
        decision = decide_model(stack, state, model, reading.samples[model], time.time())
        outcome = "dry run" if dry_run else act(loaded, state, decision, _deploy)
        log = logger.warning if decision.action in ("stale", "blocked") else logger.info
        log("%s [%s]", decision.line(), outcome)
        rows.append({**decision.to_dict(), "outcome": outcome})
    create_markdown_artifact(
        key=f"autoscale-{stack.stack}",
        markdown="\n".join(
            f"- `{r['model']}` **{r['action']}** {r['current']} -> {r['desired']}: "
            f"{r['reason']} ({r['outcome']})"
            for r in rows
        ),
        description=f"autoscaler decisions for {stack.stack}",
    )
    return {"stack": stack.stack, "decisions": rows}


__all__ = ["autoscale"]
