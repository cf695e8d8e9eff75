"""The ready-set loop every graph-shaped flow shares (deploy, start, stop, rolling restart).

A unit's task is submitted the moment its own dependencies are done (never level by level);
after the first failure nothing new is submitted, the tasks already running finish, and the
units that were waiting on the failed one are reported as skipped.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from prefect.futures import PrefectFuture, as_completed

from hxp.graph import ReadyScheduler

T = TypeVar("T")

#: Units deployed, started, stopped or rolled back side by side at most, per flow run: each
#: mostly waits on its readiness gate, drain or SSH round trips, not on this machine's CPU.
MAX_PARALLEL_UNITS = 32


@dataclass
class GraphRun(Generic[T]):
    """What a ready-set run ended with, each list in completion order."""

    done: list[tuple[str, T]] = field(default_factory=list)
    failed: list[tuple[str, BaseException]] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    not_started: list[str] = field(default_factory=list)


def run_ready_set(
    scheduler: ReadyScheduler,
    submit: Callable[[str], PrefectFuture[T]],
    *,
    stop_on_failure: bool = True,
) -> GraphRun[T]:
    """Submit `submit(unit)` for each unit as soon as the scheduler hands it out; wait for all.

    A task whose future fails (its exception comes back) counts as failed; with
    `stop_on_failure` no further unit starts after it.
    """
    running: dict[PrefectFuture[T], str] = {}
    run: GraphRun[T] = GraphRun()

    def start(units: list[str]) -> None:
        for unit in units:
            running[submit(unit)] = unit

    start(scheduler.take_ready())
    while running:
        future = next(iter(as_completed(list(running))))
        unit = running.pop(future)
        result: Any = future.result(raise_on_failure=False)
        if isinstance(result, BaseException):
            run.skipped.extend(scheduler.mark_failed(unit))
            run.failed.append((unit, result))
            continue
        run.done.append((unit, result))
        ready = scheduler.mark_done(unit)
        if run.failed and stop_on_failure:
            run.not_started.extend(ready)
        else:
            start(ready)
    return run
