"""The bake window: how long a deploy keeps watching a changed unit after its final
verification before it commits, and what counts as failing inside it.

Model servers and many services pass their first checks and fail moments later (out of memory
on the first real batch, a failed CUDA graph capture, a crash once a connection pool fills).
A deploy that committed at the first passed check would make such a revision the "previous
good" one. Inside the window a crash, a restart, a failed check or (for a model) a stalled
completion fails the deploy, which is rolled back like any other failure.
"""

from __future__ import annotations

from dataclasses import dataclass

from hxp.spec import HealthSpec, Stack

#: The shortest default window of a service, and how many health intervals it spans.
SERVICE_FLOOR = 5.0
#: The shortest default window of a model: a model's first real batches come later and its
#: failures (memory, graph capture) take longer to show.
MODEL_FLOOR = 30.0
INTERVALS = 2
#: A unit without checks is still watched for crashes; its "interval" for the default.
DEFAULT_INTERVAL = 5.0


def default_bake(kind: str, health: HealthSpec | None) -> float:
    """`max(2 x health interval, 5s)` for a service, `max(2 x health interval, 30s)` for a
    model (a unit without checks counts a 5s interval)."""
    interval = health.interval if health is not None else DEFAULT_INTERVAL
    floor = MODEL_FLOOR if kind == "model" else SERVICE_FLOOR
    return max(INTERVALS * interval, floor)


def bake_seconds(stack: Stack, unit: str, health: HealthSpec | None) -> float:
    """The unit's bake window: its own `bake`, else the stack's `deploy.bake`, else the default
    for its kind and checks (`health`: the checks its instances are gated with)."""
    spec = stack.unit(unit)
    if spec.bake is not None:
        return spec.bake
    if stack.deploy is not None and stack.deploy.bake is not None:
        return stack.deploy.bake
    return default_bake("model" if unit in stack.models else "service", health)


def bake_pause(health: HealthSpec | None, left: float) -> float:
    """How long to wait before the next look at a baking instance: its health interval, at
    most half a second (a crash is seen within that), never past the window's end."""
    interval = health.interval if health is not None else DEFAULT_INTERVAL
    return max(0.0, min(interval, 0.5, left))


@dataclass(frozen=True)
class BakeFailure:
    """Why an instance failed inside its bake window, and after how long."""

    instance: str
    after: float
    what: str  # crashed | restarted | check | stalled
    reason: str

    def __str__(self) -> str:
        return f"{self.instance} failed during bake after {self.after:.1f}s: {self.reason}"
