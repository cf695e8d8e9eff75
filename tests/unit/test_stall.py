"""Stalled engines (issue 16, item 8): the progress layer of the health sweep and the
supervisor's answer to it. Pure functions; the live path is tests/flows/test_stall.py."""

from __future__ import annotations

from collections.abc import Iterable

import pytest

from hxp.health import Layer, LayerResult, Status, progress_result
from hxp.lifecycle import CrashPolicy, LifecycleRecord, State, supervise
from hxp.metric_names import GENERATION_TOKENS, RUNNING
from hxp.plan import ObservedUnit

WINDOW = 60.0


def sweeps(readings: Iterable[tuple[float, float, float]]) -> list[LayerResult]:
    """(time, running, tokens) readings, one sweep each, each fed the data the last left."""
    data: dict[str, float] = {}
    out = []
    for at, running, tokens in readings:
        result = progress_result("m", {RUNNING: running, GENERATION_TOKENS: tokens}, data,
                                 WINDOW, 0.01, at)  # fmt: skip
        data.update(result.data)
        out.append(result)
    return out


def test_a_stall_is_seen_within_the_window_plus_one_sweep() -> None:
    # Sweeps every 10 s; tokens move until some moment between t=20 and t=30, then stop.
    readings = [(t, 4, min(t, 25) * 100) for t in range(0, 200, 10)]
    results = sweeps(readings)
    first = next(r for r in results if r.status is Status.UNHEALTHY)
    stall_began = 25
    assert first.at - stall_began <= WINDOW + 10
    assert first.layer is Layer.PROGRESS
    assert "stalled: 4 request(s) running" in first.reason
    assert dict(first.data)["stalled"] == 1.0
    assert all(r.status is Status.HEALTHY for r in results if r.at < first.at)


def test_saturated_but_moving_is_never_stalled() -> None:
    # A full queue, every slot busy: the counter moves at every sweep, however slowly.
    results = sweeps((t, 256, t * 3) for t in range(0, 600, 5))
    assert {r.status for r in results} == {Status.HEALTHY}


def test_sweeps_slower_than_the_window_see_moving_tokens_as_progress() -> None:
    results = sweeps((t, 3, t * 10) for t in range(0, 900, 90))
    assert {r.status for r in results} == {Status.HEALTHY}


def test_idle_is_never_stalled() -> None:
    results = sweeps((t, 0, 500) for t in range(0, 600, 5))
    assert {r.status for r in results} == {Status.HEALTHY}
    assert results[-1].reason == "idle"


def test_idle_between_bursts_resets_the_clock() -> None:
    # Running without progress for 50 s, idle, then again 50 s: never a whole window.
    readings = [(t, 1, 10) for t in range(0, 55, 5)] + [(55, 0, 10)]
    readings += [(t, 1, 10) for t in range(60, 115, 5)]
    assert {r.status for r in sweeps(readings)} == {Status.HEALTHY}


def test_a_restarted_counter_is_progress_and_no_metrics_is_unknown() -> None:
    results = sweeps([(0, 1, 900), (30, 1, 900), (50, 1, 3), (85, 1, 3)])
    assert [r.status for r in results] == [Status.HEALTHY] * 4
    unknown = progress_result("m", {}, {}, WINDOW, 0.0, 1.0)
    assert unknown.status is Status.UNKNOWN
    assert dict(unknown.data)["stalled"] == 0.0


def record(state: State, **kw: object) -> LifecycleRecord:
    return LifecycleRecord("t", "chat", "chat-0", state, "", 0.0, **kw)  # type: ignore[arg-type]


def running() -> ObservedUnit:
    return ObservedUnit("chat-0", True, True, True, "h", 1, "running")


def test_the_supervisor_counts_a_stall_as_a_crash_and_restarts_it() -> None:
    policy = CrashPolicy(max_crashes=3, window=600)
    assert supervise(record(State.RUNNING), running(), 100.0, policy).kind == "ok"
    decision = supervise(record(State.RUNNING), running(), 100.0, policy, stalled=True)
    assert decision.kind == "crashed"
    assert decision.crashes == (100.0,)
    assert decision.next_restart == 100.0  # the first crash restarts at once
    assert "stalled" in decision.reason


@pytest.mark.parametrize("before", [1, 2])
def test_stalls_fall_under_the_crash_loop_guard(before: int) -> None:
    policy = CrashPolicy(max_crashes=3, window=600)
    crashes = tuple(float(t) for t in range(before))
    decision = supervise(
        record(State.RUNNING, crashes=crashes), running(), 100.0, policy, stalled=True
    )
    assert decision.kind == ("give-up" if before + 1 >= 3 else "crashed")
