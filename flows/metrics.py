"""`aggregate-metrics`: scrape every model replica's /metrics, compute per-model and fleet-wide
rates, latency quantiles and saturation, publish them as `fleet:*` series (Pushgateway and
`hxp exporter`) and a table artifact, and report dead targets and misnamed metrics.

Run it on a schedule (every 15-60 s): rates are the increase since the previous run, whose
scrape the store keeps per target.
"""

from __future__ import annotations

import time
from typing import Any, Literal

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from flows.naming import stack_run_name
from hxp.io.telemetry import pushgateway_url
from hxp.metrics import Scrape, replica_targets, summarize, wanted_families
from hxp.spec import MetricsSpec
from hxp.store import counted_at
from tasks.deploy import state_dir_of
from tasks.metrics import Scrapes, aggregate_scrapes, observe_models, push_metrics, scrape_metrics
from tasks.stack import load_stack

_run_name = stack_run_name("aggregate-metrics")


@flow(name="aggregate-metrics", flow_run_name=_run_name)
def aggregate_metrics(
    stack_files: list[str] | str,
    overrides: list[str] | None = None,
    state_dir: str | None = None,
    pushgateway: str | None = None,
    observe: bool = True,
    client: Literal["raw", "httpx"] = "raw",
) -> dict[str, Any]:
    """Aggregate the fleet's vLLM metrics into `fleet:*` series.

    Args:
        stack_files: Stack file(s) in merge order; a later file wins.
        overrides: `path.to.key=value` overrides applied last.
        state_dir: Where hxp keeps its store (the previous scrapes); default $HXP_STATE_DIR.
        pushgateway: Push the fleet series to this Pushgateway URL; default the stack's
            monitoring.pushgateway (none: only the store, for `hxp exporter`).
        observe: Ask the backends which replicas run (off: scrape every declared replica).
        client: HTTP client for the scrapes: raw asyncio streams (fast) or httpx.
    """
    started = time.monotonic()
    logger = get_run_logger()
    files = [stack_files] if isinstance(stack_files, str) else list(stack_files)
    state = state_dir_of(state_dir)
    stack = counted_at(state, load_stack(files, list(overrides or []))).stack
    spec = stack.metrics or MetricsSpec()
    running = observe_models(stack, state) if observe else None
    targets, down = replica_targets(stack, running)
    live = [t for t in targets if t.name not in down]
    scrapes = scrape_metrics(
        stack.stack,
        live,
        wanted_families(spec),
        spec.scrape_timeout,
        spec.max_concurrency,
        client,
    ).by_target
    now = time.time()
    for name in down:
        scrapes[name] = Scrape(now, None, "not running (backend)")
    result = aggregate_scrapes(stack, targets, Scrapes(scrapes), state, started)
    issues = summarize(result.issues)
    for issue in issues:
        log = logger.info if issue.severity == "info" else logger.warning
        log("%s", issue)
    create_table_artifact(
        key=f"metrics-{stack.stack}",
        table=[f.row() for f in result.figures],
        description=f"fleet metrics of {stack.stack}: {len(targets)} target(s)",
    )
    problems = [i for i in issues if i.severity != "info"]
    if problems:
        create_markdown_artifact(
            key=f"metrics-issues-{stack.stack}",
            markdown="\n".join(f"- {i}" for i in problems),
            description=f"{len(problems)} metrics issue(s) in {stack.stack}",
        )
    url = pushgateway_url(stack, pushgateway)
    pushed = False
    if url is not None:
        try:
            pushed = push_metrics(url, state, stack.stack, "aggregate-metrics")
        except Exception as exc:  # a monitoring outage must not fail the aggregation
            logger.warning("push to %s failed: %s", url, exc)
    fleet = result.figures[-1]
    return {
        "stack": stack.stack,
        "targets": len(targets),
        "up": fleet.up,
        "down": sorted(t.name for t in targets if t.name not in result.baselines),
        "models": {f.model: f.row() for f in result.figures if f.model},
        "fleet": fleet.row(),
        "samples": len(result.samples),
        "issues": [str(i) for i in issues],
        "pushed": pushed,
        "seconds": round(time.monotonic() - started, 3),
    }
