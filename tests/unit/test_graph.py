"""Dependency graph: cycles named whole, orders, and ready-set scheduling without barriers."""

from __future__ import annotations

import random

import pytest

from hxp.errors import CycleError, StackValidationError, UnknownUnitError
from hxp.graph import DependencyGraph

# web needs api and cache; api needs db; cache needs nothing; db needs nothing.
DEPS = {"web": ["api", "cache"], "api": ["db"], "cache": [], "db": []}


def test_order_puts_every_unit_after_its_dependencies() -> None:
    g = DependencyGraph(DEPS)
    order = g.order()
    assert sorted(order) == sorted(DEPS)
    for unit, deps in DEPS.items():
        for dep in deps:
            assert order.index(dep) < order.index(unit)
    assert g.reverse_order() == list(reversed(order))


def test_order_is_deterministic() -> None:
    assert DependencyGraph(DEPS).order() == ["cache", "db", "api", "web"]


@pytest.mark.parametrize(
    ("deps", "cycle"),
    [
        ({"a": ["a"]}, "a -> a"),
        ({"a": ["b"], "b": ["a"]}, "a -> b -> a"),
        ({"a": ["b"], "b": ["c"], "c": ["a"], "d": ["a"]}, "a -> b -> c -> a"),
        ({"x": [], "a": ["x", "b"], "b": ["c"], "c": ["d"], "d": ["b"]}, "b -> c -> d -> b"),
    ],
)
def test_cycle_error_names_the_whole_cycle(deps: dict[str, list[str]], cycle: str) -> None:
    with pytest.raises(CycleError) as err:
        DependencyGraph(deps)
    assert str(err.value) == f"dependency cycle: {cycle}"


def test_unknown_dependency_is_an_input_error() -> None:
    with pytest.raises(StackValidationError) as err:
        DependencyGraph({"a": ["ghost"]})
    assert "a.depends_on: unknown unit 'ghost'" in str(err.value)


def test_levels_show_what_can_run_side_by_side() -> None:
    assert DependencyGraph(DEPS).levels() == [["cache", "db"], ["api"], ["web"]]


def test_closure_and_descendants() -> None:
    g = DependencyGraph(DEPS)
    assert g.closure(["api"]) == ["db", "api"]
    assert g.closure(["web"]) == ["cache", "db", "api", "web"]
    assert g.descendants("db") == ["api", "web"]
    with pytest.raises(UnknownUnitError):
        g.closure(["nope"])


def test_ready_set_from_finished_units() -> None:
    g = DependencyGraph(DEPS)
    assert g.ready(done=[]) == ["cache", "db"]
    assert g.ready(done=["db"], started=["cache"]) == ["api"]
    assert g.ready(done=["db", "api"]) == ["cache"]
    assert g.ready(done=["db", "api", "cache"]) == ["web"]


def test_scheduler_starts_a_unit_as_soon_as_its_own_dependencies_finish() -> None:
    # slow-root <- a ; fast-root <- b <- c. With level barriers, b would wait for slow-root.
    g = DependencyGraph(
        {"slow-root": [], "fast-root": [], "a": ["slow-root"], "b": ["fast-root"], "c": ["b"]}
    )
    s = g.scheduler()
    assert s.take_ready() == ["fast-root", "slow-root"]
    assert s.mark_done("fast-root") == ["b"]  # slow-root still running: b starts anyway
    assert s.mark_done("b") == ["c"]
    assert s.mark_done("c") == []
    assert s.mark_done("slow-root") == ["a"]
    assert s.mark_done("a") == []
    assert s.finished


def test_scheduler_failure_skips_dependents_only() -> None:
    s = DependencyGraph(DEPS).scheduler()
    assert s.take_ready() == ["cache", "db"]
    assert s.mark_failed("db") == ["api", "web"]
    assert s.mark_done("cache") == []
    assert s.finished
    assert s.skipped == {"api", "web"}
    assert s.failed == {"db"}


def test_scheduler_over_a_subset_treats_outside_dependencies_as_met() -> None:
    s = DependencyGraph(DEPS).scheduler(["web", "api"])
    assert s.take_ready() == ["api"]
    assert s.mark_done("api") == ["web"]


def test_scheduler_refuses_to_finish_a_unit_never_started() -> None:
    s = DependencyGraph(DEPS).scheduler()
    with pytest.raises(ValueError, match="was not started"):
        s.mark_done("web")


def test_random_dags_schedule_every_unit_after_its_dependencies() -> None:
    rng = random.Random(7)
    for _ in range(50):
        n = rng.randint(1, 60)
        names = [f"u{i}" for i in range(n)]
        deps = {
            name: rng.sample(names[:i], k=min(i, rng.randint(0, 3))) for i, name in enumerate(names)
        }
        g = DependencyGraph(deps)
        s = g.scheduler()
        finished: list[str] = []
        running = s.take_ready()
        while running:
            unit = running.pop(rng.randrange(len(running)))
            assert all(d in finished for d in deps[unit])
            finished.append(unit)
            running.extend(s.mark_done(unit))
        assert sorted(finished) == sorted(names)
