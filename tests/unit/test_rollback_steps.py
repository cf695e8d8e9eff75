"""Which rollback steps a blue-green deploy that died mid-run leaves (tasks.deploy), read from
the plan it recorded and what the host runs; and each replica's own new slot."""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import pytest

from hxp.config import load_config
from hxp.plan import ObservedUnit

DEMO = Path(__file__).parents[2] / "examples" / "demo" / "stack.yaml"


class _Seen:
    """A backend that only observes: the instances given, as given."""

    kind: ClassVar[str] = "fake"

    def __init__(self, seen: dict[str, ObservedUnit]) -> None:
        self.seen = seen

    def observe(self, stack: str) -> dict[str, ObservedUnit]:
        return self.seen

    def apply(self, action: object) -> None:  # pragma: no cover - never called
        raise AssertionError(action)


def _up(name: str, running: bool = True) -> ObservedUnit:
    return ObservedUnit(name, exists=True, running=running)


def _replace(instance: str, replaces: str) -> dict[str, Any]:
    return {"unit": "chat", "instance": instance, "kind": "replace", "replaces": replaces}


def test_steps_follow_what_each_replica_was_left_as(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import tasks.instances
    from tasks.deploy import interrupted_steps
    from tasks.instances import RunContext

    stack = load_config([DEMO]).stack
    seen = {
        # chat-0 moved: its old slot retired (gone), the new one serving.
        "chat-0-g": _up("chat-0-g"),
        # chat-1 stopped to give its GPU to chat-1-g, which was starting.
        "chat-1": _up("chat-1", running=False),
        "chat-1-g": _up("chat-1-g"),
        # api-0 (another unit) is not chat's business.
        "api-0": _up("api-0"),
    }
    monkeypatch.setattr(tasks.instances, "backend_for", lambda *a: _Seen(seen))
    ctx = RunContext(stack, str(tmp_path), 7, "")
    actions = [
        _replace("chat-0-g", "chat-0"),
        _replace("chat-1-g", "chat-1"),
        {"unit": "api", "instance": "api-0", "kind": "update"},
    ]
    # Undone newest first: chat-1-g goes before chat-1 comes back on its GPU; chat-0 comes
    # back before chat-0-g goes.
    assert interrupted_steps(ctx, "chat", actions) == [
        ("chat-0-g", "replace"),
        ("chat-0", "retired"),
        ("chat-1", "retired"),
        ("chat-1-g", "replace"),
    ]
    # Killed before the new slots existed: the old ones only go (back) behind the gateway.
    seen.clear()
    seen.update({"chat-0": _up("chat-0"), "chat-1": _up("chat-1")})
    assert interrupted_steps(ctx, "chat", actions) == [
        ("chat-0", "switched"),
        ("chat-1", "switched"),
    ]


def test_each_replica_gets_its_own_new_slot() -> None:
    from hxp.units import all_slots
    from tasks.deploy import _new_slot_of
    from tasks.instances import UnitOutcome

    stack = load_config([DEMO]).stack
    slots = {u.name: u for u in all_slots(stack, "chat")}
    outcome = UnitOutcome(
        unit="chat",
        host="local",
        ok=False,
        applied=[
            ("chat-0-g", "replace"),
            ("chat-0", "switched"),
            ("chat-0", "retired"),
            ("chat-1-g", "replace"),
            ("chat-1", "switched"),
            ("chat-1", "retired"),
        ],
    )
    assert [
        getattr(_new_slot_of(n, outcome, slots), "name", None) for n in ("chat-0", "chat-1")
    ] == [
        "chat-0-g",
        "chat-1-g",
    ]
