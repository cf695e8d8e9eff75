"""Metrics tasks: see which replicas run, scrape them all in one task, aggregate, push.

The maths lives in hxp.metrics; these only do the I/O around it. Scraping is one task that
fans out with asyncio (a Prefect task per endpoint would cost tens of milliseconds each).
"""

from __future__ import annotations

import time
from typing import Literal
from urllib.error import URLError

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from hxp.io.scrape import scrape
from hxp.io.telemetry import (
    AGGREGATION_SECONDS,
    finite_bounds,
    push_group,
    record_aggregation,
)
from hxp.metrics import Aggregation, Baseline, Scrape, Target, aggregate
from hxp.spec import Stack
from hxp.store import Store


@task(name="observe-models", task_run_name="observe-models-{stack.stack}", cache_policy=NO_CACHE)
def observe_models(stack: Stack, state_dir: str) -> set[str]:
    """The model instances the backends see running."""
    from hxp.backends import observe_all

    return {name for name, seen in observe_all(stack, state_dir).items() if seen.running}


class Scrapes:
    """Parsed pages passed between tasks as one opaque object: Prefect walks the inputs of a
    task for futures, and walking thousands of parsed samples costs more than the parse."""

    def __init__(self, by_target: dict[str, Scrape]) -> None:
        self.by_target = by_target


@task(name="scrape-metrics", task_run_name="scrape-{stack_name}", cache_policy=NO_CACHE)
def scrape_metrics(
    stack_name: str,
    targets: list[Target],
    wanted: frozenset[str],
    timeout: float,
    concurrency: int,
    client: Literal["raw", "httpx"] = "raw",
) -> Scrapes:
    """Scrape every replica's /metrics (bounded concurrency, a timeout each)."""
    return Scrapes(scrape(targets, wanted, timeout, concurrency, client))


@task(name="aggregate", task_run_name="aggregate-{stack.stack}", cache_policy=NO_CACHE)
def aggregate_scrapes(
    stack: Stack, targets: list[Target], scrapes: Scrapes, state_dir: str, started: float
) -> Aggregation:
    """Rates against the stored previous scrapes, quantiles, fleet series; store the new ones."""
    store = Store(state_dir)
    previous = {k: Baseline.from_json(v) for k, v in store.metric_baselines(stack.stack).items()}
    result = aggregate(stack, targets, scrapes.by_target, previous)
    seconds = time.monotonic() - started
    errors = {f"{where}|{cls}": n for (where, cls), n in result.errors.items()}
    store.save_aggregation(
        stack.stack,
        {name: b.to_json() for name, b in result.baselines.items()},
        [t.name for t in targets],
        [[s.name, list(s.labels), s.value] for s in result.samples],
        seconds,
        finite_bounds(AGGREGATION_SECONDS),
        errors,
    )
    record_aggregation(stack.stack, seconds, [(w, c, n) for (w, c), n in result.errors.items()])
    return result


@task(name="push-metrics", task_run_name="push-{stack}-{flow}", cache_policy=NO_CACHE)
def push_metrics(url: str, state_dir: str, stack: str, flow: str) -> bool:
    """PUT the stack's series of one flow group to the Pushgateway (job=hxp, stack, flow).

    Nothing listening there is a warning, not a failed task: the stack's first deploy runs
    before `hxp monitoring` has started its Pushgateway. True when pushed; any other error
    (a Pushgateway that answers with an error, a timeout) fails the task as before.
    """
    try:
        push_group(url, state_dir, stack, flow)
    except URLError as exc:
        if not isinstance(exc.reason, ConnectionRefusedError):
            raise
        get_run_logger().warning(
            "no Pushgateway listens on %s (not deployed yet?): %s series not pushed", url, flow
        )
        return False
    return True


__all__ = [
    "Scrapes",
    "aggregate_scrapes",
    "observe_models",
    "push_metrics",
    "scrape_metrics",
]
