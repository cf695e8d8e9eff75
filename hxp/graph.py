"""The dependency graph of a stack's units: cycles, orders, and ready-set scheduling."""

from __future__ import annotations

import heapq
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from hxp.errors import CycleError, Issue, StackValidationError, UnknownUnitError


def find_cycle(depends_on: Mapping[str, Sequence[str]]) -> list[str] | None:
    """A cycle as `[a, b, c, a]` following depends_on edges, or None."""
    white, grey, black = 0, 1, 2
    colour = dict.fromkeys(depends_on, white)
    for root in sorted(depends_on):
        if colour[root] != white:
            continue
        stack: list[tuple[str, int]] = [(root, 0)]
        path: list[str] = [root]
        colour[root] = grey
        while stack:
            node, i = stack[-1]
            deps = sorted(d for d in depends_on[node] if d in depends_on)
            if i < len(deps):
                stack[-1] = (node, i + 1)
                nxt = deps[i]
                if colour[nxt] == grey:
                    return [*path[path.index(nxt) :], nxt]
                if colour[nxt] == white:
                    colour[nxt] = grey
                    stack.append((nxt, 0))
                    path.append(nxt)
            else:
                colour[node] = black
                stack.pop()
                path.pop()
    return None


class DependencyGraph:
    """A DAG built from `unit -> [units it depends on]`."""

    def __init__(self, depends_on: Mapping[str, Iterable[str]]) -> None:
        self._deps: dict[str, tuple[str, ...]] = {n: tuple(d) for n, d in depends_on.items()}
        missing = [
            Issue(f"unknown unit {d!r}", f"{n}.depends_on")
            for n, deps in self._deps.items()
            for d in deps
            if d not in self._deps
        ]
        if missing:
            raise StackValidationError(missing)
        self._dependents: dict[str, list[str]] = {n: [] for n in self._deps}
        for n, deps in self._deps.items():
            for d in deps:
                self._dependents[d].append(n)
        cycle = self.find_cycle()
        if cycle is not None:
            raise CycleError(cycle)
        self._order = self._topological()

    @property
    def units(self) -> list[str]:
        return sorted(self._deps)

    def dependencies(self, unit: str) -> tuple[str, ...]:
        return self._deps[self._known(unit)]

    def dependents(self, unit: str) -> tuple[str, ...]:
        return tuple(sorted(self._dependents[self._known(unit)]))

    def _known(self, unit: str) -> str:
        if unit not in self._deps:
            raise UnknownUnitError(f"unknown unit {unit!r}; the stack has {self.units}")
        return unit

    def find_cycle(self) -> list[str] | None:
        """A cycle as `[a, b, c, a]` following depends_on edges, or None."""
        return find_cycle(self._deps)

    def _topological(self) -> list[str]:
        remaining = {n: len(d) for n, d in self._deps.items()}
        heap = [n for n, c in remaining.items() if c == 0]
        heapq.heapify(heap)
        order: list[str] = []
        while heap:
            n = heapq.heappop(heap)
            order.append(n)
            for m in self._dependents[n]:
                remaining[m] -= 1
                if remaining[m] == 0:
                    heapq.heappush(heap, m)
        return order

    def order(self) -> list[str]:
        """Start order: every unit after all of its dependencies (ties broken by name)."""
        return list(self._order)

    def reverse_order(self) -> list[str]:
        """Stop order: every unit before the units it depends on."""
        return list(reversed(self._order))

    def inverted(self) -> DependencyGraph:
        """The same units with every edge turned round: scheduling over it hands out a unit
        once everything that depends on it is done (stop order, without level barriers)."""
        return DependencyGraph({n: sorted(self._dependents[n]) for n in self._deps})

    def levels(self) -> list[list[str]]:
        """Units grouped by depth: what could run side by side (for display, not scheduling)."""
        depth: dict[str, int] = {}
        for n in self._order:
            depth[n] = 1 + max((depth[d] for d in self._deps[n]), default=-1)
        out: list[list[str]] = [[] for _ in range(max(depth.values(), default=-1) + 1)]
        for n in self._order:
            out[depth[n]].append(n)
        return [sorted(level) for level in out]

    def closure(self, units: Iterable[str]) -> list[str]:
        """The units plus everything they depend on, in start order."""
        want: set[str] = set()
        todo = [self._known(u) for u in units]
        while todo:
            n = todo.pop()
            if n not in want:
                want.add(n)
                todo.extend(self._deps[n])
        return [n for n in self._order if n in want]

    def descendants(self, unit: str) -> list[str]:
        """Every unit that depends on `unit`, directly or not, in start order."""
        seen: set[str] = set()
        todo = list(self._dependents[self._known(unit)])
        while todo:
            n = todo.pop()
            if n not in seen:
                seen.add(n)
                todo.extend(self._dependents[n])
        return [n for n in self._order if n in seen]

    def ready(self, done: Iterable[str], started: Iterable[str] = ()) -> list[str]:
        """Units not yet started whose dependencies are all done: they may start now."""
        done_set, started_set = set(done), set(started)
        return [
            n
            for n in self._order
            if n not in done_set
            and n not in started_set
            and all(d in done_set for d in self._deps[n])
        ]

    def scheduler(self, units: Iterable[str] | None = None) -> ReadyScheduler:
        """A stateful ready-set scheduler over `units` (default: all)."""
        return ReadyScheduler(self, None if units is None else set(units))


@dataclass
class ReadyScheduler:
    """Hands out units the moment their own dependencies finish; no level-by-level barriers.

    Dependencies outside the scheduled subset count as already satisfied. A failed unit blocks
    its dependents, which are reported as skipped.
    """

    graph: DependencyGraph
    subset: set[str] | None = None
    done: set[str] = field(default_factory=set)
    failed: set[str] = field(default_factory=set)
    skipped: set[str] = field(default_factory=set)
    started: set[str] = field(default_factory=set)
    _pending: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        scope = set(self.graph.units) if self.subset is None else self.subset
        for unit in scope:
            self.graph._known(unit)
        self.subset = scope
        self._pending = {n: sum(1 for d in self.graph.dependencies(n) if d in scope) for n in scope}

    def take_ready(self) -> list[str]:
        """Units that may start now; each is handed out once."""
        ready = sorted(n for n, c in self._pending.items() if c == 0 and n not in self.started)
        self.started.update(ready)
        return ready

    def mark_done(self, unit: str) -> list[str]:
        """Record a finished unit; returns the units that became ready because of it."""
        self._finish(unit)
        self.done.add(unit)
        for m in self.graph.dependents(unit):
            if m in self._pending:
                self._pending[m] -= 1
        return self.take_ready()

    def mark_failed(self, unit: str) -> list[str]:
        """Record a failed unit; its dependents (transitively) are skipped and returned."""
        self._finish(unit)
        self.failed.add(unit)
        newly = [n for n in self.graph.descendants(unit) if n in self._pending]
        for n in newly:
            del self._pending[n]
        self.skipped.update(newly)
        return newly

    def _finish(self, unit: str) -> None:
        if unit not in self.started:
            raise ValueError(f"unit {unit!r} was not started")
        self._pending.pop(unit, None)

    @property
    def finished(self) -> bool:
        return not self._pending
