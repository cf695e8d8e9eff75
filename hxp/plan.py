"""Desired vs observed -> typed actions, with a reason for every unit left alone.

Pure: observation happens in backends; this module only compares.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from typing import Any

from hxp.calibration import KvEstimate
from hxp.config import unit_config_hash
from hxp.graph import DependencyGraph
from hxp.spec import Stack
from hxp.units import UnitInstance, expand_units

PLAN_FORMAT = 1


class ActionKind(StrEnum):
    CREATE = "create"
    UPDATE = "update"
    START = "start"
    REMOVE = "remove"
    REPLACE = "replace"  # blue-green: start beside the old instance, switch, drain, stop it


class StepKind(StrEnum):
    """One step a deploy took on one instance, as its rollback undoes it: an action of the
    plan (same values as ActionKind), or what a blue-green replace did to the old slot."""

    CREATE = "create"
    UPDATE = "update"
    START = "start"
    REMOVE = "remove"
    REPLACE = "replace"  # the new slot started beside the old one
    SWITCHED = "switched"  # traffic moved from the old slot to the new one
    RETIRED = "retired"  # the old slot drained and removed
    WITHDRAWN = "withdrawn"  # the old slot stopped to give its GPUs to the new one

    @classmethod
    def of(cls, kind: ActionKind) -> StepKind:
        """The step an action of the plan is."""
        return cls(kind.value)

    @property
    def on_old_slot(self) -> bool:
        """A step of a blue-green replace taken on the slot being replaced."""
        return self in (StepKind.SWITCHED, StepKind.RETIRED, StepKind.WITHDRAWN)


@dataclass(frozen=True)
class ObservedUnit:
    """What a backend saw of one unit instance."""

    name: str
    exists: bool
    running: bool = False
    healthy: bool | None = None
    config_hash: str | None = None
    revision: int | None = None
    detail: str = ""
    host: str = ""
    restarts: int | None = None  # restarts the backend did by itself, when it counts them


@dataclass(frozen=True)
class Action:
    """One change to make to one unit instance, and why."""

    unit: str
    instance: str
    host: str
    kind: ActionKind
    reason: str
    config_hash: str
    replaces: str = ""


@dataclass(frozen=True)
class NoOp:
    """A unit instance left alone, and why."""

    unit: str
    instance: str
    reason: str


@dataclass(frozen=True)
class Plan:
    """What an apply would do, in dependency order."""

    stack: str
    config_hash: str
    order: tuple[str, ...]
    actions: tuple[Action, ...] = field(default=())
    noops: tuple[NoOp, ...] = field(default=())
    # Things the operator should know that change nothing by themselves, e.g. a host whose
    # discovered GPUs differ from its declared `gpus:` (hxp.io.gpus.gpu_plan_warnings).
    warnings: tuple[str, ...] = field(default=())
    #: Each model's KV cache, predicted and measured (hxp.calibration); filled by the deploy.
    kv_cache: tuple[KvEstimate, ...] = field(default=())

    @property
    def changes(self) -> bool:
        return bool(self.actions)

    def to_dict(self) -> dict[str, Any]:
        """The stable JSON form (docs/plan-format.md)."""
        data: dict[str, Any] = {
            "format": PLAN_FORMAT,
            "stack": self.stack,
            "config_hash": self.config_hash,
            "order": list(self.order),
            "changes": self.changes,
            "actions": [{**asdict(a), "kind": a.kind.value} for a in self.actions],
            "noops": [asdict(n) for n in self.noops],
            **({"kv_cache": [k.to_dict() for k in self.kv_cache]} if self.kv_cache else {}),
        }
        if self.warnings:
            data["warnings"] = list(self.warnings)
        return data

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    def summary(self) -> str:
        """A human-readable plan, one line per unit instance."""
        lines = [f"Plan for stack {self.stack} (config {self.config_hash[:12]}):"]
        for a in self.actions:
            lines.append(f"  {a.kind.value:<7} {a.instance:<24} {a.reason}")
        for n in self.noops:
            lines.append(f"  {'ok':<7} {n.instance:<24} {n.reason}")
        lines.extend(f"  warning: {w}" for w in self.warnings)
        for k in self.kv_cache:
            lines.append(f"  {'kv':<7} {k.unit:<24} {k.line()}")
        verdict = f"{len(self.actions)} to change" if self.changes else "No changes"
        lines.append(f"{verdict}, {len(self.noops)} unchanged.")
        return "\n".join(lines)


def _plan_routed(
    inst: UnitInstance,
    want: str,
    observed: Mapping[str, ObservedUnit],
    actions: list[Action],
    noops: list[NoOp],
    extra: list[Action],
) -> None:
    """A unit behind the gateway lives in one of two slots (`x` or `x-g`); changes go
    blue-green into the other slot."""
    slots = [o for o in (observed.get(inst.name), observed.get(f"{inst.name}-g")) if o and o.exists]
    if not slots:
        actions.append(
            Action(inst.unit, inst.name, inst.host, ActionKind.CREATE, "not deployed", want)
        )
        return
    slots.sort(key=lambda o: (o.config_hash != want, not o.running, o.name))
    live, leftovers = slots[0], slots[1:]
    replaced_into = ""
    if live.config_hash == want and live.running:
        state = "running" if live.healthy is not False else "running (unhealthy)"
        noops.append(NoOp(inst.unit, live.name, f"{state}, config hash unchanged"))
    elif live.config_hash == want:
        reason = "config hash unchanged, but not running"
        actions.append(Action(inst.unit, live.name, inst.host, ActionKind.START, reason, want))
    else:
        target = (
            inst.name if live.name.endswith("-g") and live.name != inst.name else f"{inst.name}-g"
        )
        old = (live.config_hash or "none")[:12]
        reason = f"blue-green {live.name} -> {target}: config hash {old} -> {want[:12]}"
        actions.append(
            Action(inst.unit, target, inst.host, ActionKind.REPLACE, reason, want, live.name)
        )
        replaced_into = target
    for o in leftovers:  # a second slot left behind (an interrupted switch): drop it last
        if o.name == replaced_into:  # the replace creates this slot anew: it must stay
            continue
        reason = f"leftover blue-green slot of {live.name}"
        extra.append(Action(inst.unit, o.name, inst.host, ActionKind.REMOVE, reason, ""))


def plan_stack(
    stack: Stack,
    observed: Mapping[str, ObservedUnit],
    stack_hash: str,
    only: set[str] | None = None,
) -> Plan:
    """Compare every desired unit instance with what was observed.

    `only` limits the plan to those units (and removes no orphans).
    """
    graph = DependencyGraph(stack.dependencies())
    rank = {name: i for i, name in enumerate(graph.order())}
    instances = sorted(expand_units(stack, only), key=lambda u: (rank[u.unit], u.replica))
    actions: list[Action] = []
    noops: list[NoOp] = []
    hashes = {name: unit_config_hash(stack, name) for name in stack.units()}
    routed = set(stack.gateway.routes) if stack.gateway is not None else set()
    extra: list[Action] = []
    for inst in instances:
        want = hashes[inst.unit]
        if inst.unit in routed:
            _plan_routed(inst, want, observed, actions, noops, extra)
            continue
        seen = observed.get(inst.name)
        change: tuple[ActionKind, str] | None = None
        if seen is None or not seen.exists:
            change = (ActionKind.CREATE, "not deployed")
        elif seen.config_hash != want:
            old = (seen.config_hash or "none")[:12]
            change = (ActionKind.UPDATE, f"config hash {old} -> {want[:12]}")
        elif not seen.running:
            change = (ActionKind.START, "config hash unchanged, but not running")
        if change is not None:
            actions.append(Action(inst.unit, inst.name, inst.host, change[0], change[1], want))
        else:
            state = (
                "running" if seen is None or seen.healthy is not False else "running (unhealthy)"
            )
            noops.append(NoOp(inst.unit, inst.name, f"{state}, config hash unchanged"))
    actions.extend(extra)
    desired = {i.name for i in expand_units(stack)}
    desired |= {f"{i.name}-g" for i in expand_units(stack) if i.unit in routed}
    for name in sorted(set(observed) - desired) if only is None else []:
        seen = observed[name]
        if seen.exists:
            actions.append(
                Action(name, name, seen.host, ActionKind.REMOVE, "no longer in the stack", "")
            )
    return Plan(
        stack=stack.stack,
        config_hash=stack_hash,
        order=tuple(graph.order()),
        actions=tuple(actions),
        noops=tuple(noops),
    )
