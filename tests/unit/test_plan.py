"""Plan: desired vs observed, a typed action or a reason for every unit instance."""

from __future__ import annotations

import json
from pathlib import Path

from hxp.config import load_config, unit_config_hash
from hxp.plan import ActionKind, ObservedUnit, plan_stack

DEMO = Path(__file__).parents[2] / "examples" / "demo" / "stack.yaml"


def observed_all(cfg_stack, running: bool = True) -> dict[str, ObservedUnit]:  # type: ignore[no-untyped-def]
    from hxp.units import expand_units

    return {
        u.name: ObservedUnit(
            u.name, exists=True, running=running, config_hash=unit_config_hash(cfg_stack, u.unit)
        )
        for u in expand_units(cfg_stack)
    }


def test_empty_host_creates_everything_in_dependency_order() -> None:
    cfg = load_config([DEMO])
    plan = plan_stack(cfg.stack, {}, cfg.content_hash)
    assert [a.instance for a in plan.actions] == [
        "store",
        "cache",
        "api-0",
        "api-1",
        "chat-0",
        "chat-1",
    ]
    assert {a.kind for a in plan.actions} == {ActionKind.CREATE}
    assert plan.changes


def test_second_apply_changes_nothing_and_says_why() -> None:
    cfg = load_config([DEMO])
    plan = plan_stack(cfg.stack, observed_all(cfg.stack), cfg.content_hash)
    assert not plan.changes
    assert [n.reason for n in plan.noops] == ["running, config hash unchanged"] * 6
    assert "No changes" in plan.summary()


def test_changed_unit_is_updated_and_others_left_alone() -> None:
    cfg = load_config([DEMO])
    before = observed_all(cfg.stack)
    changed = load_config([DEMO], overrides=["services.cache.env.MODE=fast"])
    plan = plan_stack(changed.stack, before, changed.content_hash)
    assert [(a.instance, a.kind) for a in plan.actions] == [("cache", ActionKind.UPDATE)]
    assert "config hash" in plan.actions[0].reason
    assert {n.instance for n in plan.noops} == {"store", "api-0", "api-1", "chat-0", "chat-1"}


def test_stopped_unit_is_started_and_orphan_removed() -> None:
    cfg = load_config([DEMO])
    seen = observed_all(cfg.stack)
    seen["store"] = ObservedUnit("store", True, False, None, seen["store"].config_hash)
    seen["old-worker"] = ObservedUnit("old-worker", True, True, True, "abc")
    plan = plan_stack(cfg.stack, seen, cfg.content_hash)
    kinds = {a.instance: a.kind for a in plan.actions}
    assert kinds == {"store": ActionKind.START, "old-worker": ActionKind.REMOVE}


def test_plan_json_is_stable() -> None:
    cfg = load_config([DEMO])
    plan = plan_stack(cfg.stack, {}, cfg.content_hash)
    data = json.loads(plan.to_json())
    assert set(data) == {"format", "stack", "config_hash", "order", "changes", "actions", "noops"}
    assert data["format"] == 1
    assert set(data["actions"][0]) == {
        "unit",
        "instance",
        "host",
        "kind",
        "reason",
        "config_hash",
        "replaces",
    }
    assert plan.to_json() == plan_stack(cfg.stack, {}, cfg.content_hash).to_json()


def test_a_leftover_slot_that_a_replace_starts_again_is_not_removed_afterwards() -> None:
    """Both slots of a routed replica exist, neither at the wanted config (a switch cut short):
    the replace goes into the leftover slot, creating it anew, so the plan must not also
    remove that slot after the deploy (it would remove the replica it just deployed)."""
    cfg = load_config([DEMO])
    observed = observed_all(cfg.stack)
    observed["chat-0"] = ObservedUnit("chat-0", exists=True, running=True, config_hash="old")
    observed["chat-0-g"] = ObservedUnit("chat-0-g", exists=True, running=True, config_hash="half")
    plan = plan_stack(cfg.stack, observed, cfg.content_hash)
    assert [(a.kind, a.instance, a.replaces) for a in plan.actions] == [
        (ActionKind.REPLACE, "chat-0-g", "chat-0")
    ]
    # A leftover that the replace does not go into is still removed, last.
    observed["chat-0"] = ObservedUnit("chat-0", exists=True, running=False, config_hash="old")
    observed["chat-0-g"] = ObservedUnit(
        "chat-0-g", exists=True, running=True, config_hash=unit_config_hash(cfg.stack, "chat")
    )
    plan = plan_stack(cfg.stack, observed, cfg.content_hash)
    assert [(a.kind, a.instance) for a in plan.actions] == [(ActionKind.REMOVE, "chat-0")]
