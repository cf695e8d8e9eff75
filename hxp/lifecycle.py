"""Lifecycle decisions (pure): the per-instance state machine, reconciliation with what a
backend observes, crash-loop policy, rolling-restart batches and the GPU-aware surge choice,
and which configuration changes a reload can apply without a restart.

Flows and tasks carry these decisions out; nothing here touches a host.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Literal

from hxp.errors import IllegalTransitionError
from hxp.gpu_alloc import GIB, GpuInfo, Reservation
from hxp.plan import ObservedUnit
from hxp.resources import GpuMemory, start_refusal
from hxp.spec import ModelSpec, ServiceSpec, Stack


class State(StrEnum):
    """Where one unit instance is in its life."""

    STOPPED = "stopped"
    STARTING = "starting"
    RUNNING = "running"
    DEGRADED = "degraded"
    DRAINING = "draining"
    STOPPING = "stopping"
    FAILED = "failed"
    # Deliberately asleep (`hxp sleep`): the process runs, out of the gateway, its GPU memory
    # freed (hxp.sleep). Last: the shortest paths between the other states never pass here.
    SLEEPING = "sleeping"


STATES: tuple[State, ...] = tuple(State)

#: The only moves the state machine allows. `stopped -> starting -> running <-> degraded ->
#: draining -> stopping -> stopped`, plus `failed` (a start that fails its gate, a crash, a
#: stop that fails) from which a unit is started again or cleaned up. A drain that is
#: abandoned (the roll stopped, the orchestrator came back) returns to `running`.
TRANSITIONS: Mapping[State, frozenset[State]] = {
    State.STOPPED: frozenset({State.STARTING}),
    State.STARTING: frozenset({State.RUNNING, State.DEGRADED, State.FAILED, State.STOPPING}),
    State.RUNNING: frozenset({State.DEGRADED, State.DRAINING, State.FAILED}),
    State.DEGRADED: frozenset({State.RUNNING, State.DRAINING, State.FAILED}),
    State.DRAINING: frozenset({State.STOPPING, State.RUNNING, State.FAILED, State.SLEEPING}),
    State.STOPPING: frozenset({State.STOPPED, State.FAILED}),
    State.FAILED: frozenset({State.STARTING, State.STOPPING, State.STOPPED}),
    # A wake goes through `starting` (gated on a completion before the gateway takes it back).
    State.SLEEPING: frozenset({State.STARTING, State.STOPPING, State.FAILED}),
}

#: The state of an instance the store has no record of.
INITIAL = State.STOPPED


def allowed(current: State) -> list[State]:
    """The states `current` may move to, in declaration order."""
    return [s for s in STATES if s in TRANSITIONS[current]]


def check_transition(instance: str, current: State, target: State) -> None:
    """Raise IllegalTransitionError unless `current -> target` is an edge of the machine."""
    if target not in TRANSITIONS[current]:
        raise IllegalTransitionError(instance, current.value, target.value, allowed(current))


def path_between(current: State, target: State) -> list[State]:
    """The shortest legal sequence of states after `current` that ends in `target` ([] when
    already there), never passing through `failed` on the way. Reconciliation walks it so
    every recorded step is a legal transition."""
    if current == target:
        return []
    previous: dict[State, State] = {}
    queue = deque([current])
    while queue:
        node = queue.popleft()
        for nxt in allowed(node):
            if nxt in previous or nxt == current or (nxt is State.FAILED and nxt != target):
                continue
            previous[nxt] = node
            if nxt == target:
                path = [nxt]
                while previous[path[-1]] != current:
                    path.append(previous[path[-1]])
                return list(reversed(path))
            queue.append(nxt)
    raise AssertionError(f"no path {current} -> {target}")  # pragma: no cover - table is joined


def event_name(state: State) -> str:
    """The Prefect event every transition into `state` emits."""
    return f"hxp.lifecycle.{state.value}"


@dataclass(frozen=True)
class LifecycleRecord:
    """One instance's persisted lifecycle: its state, why, since when, and crash bookkeeping."""

    stack: str
    unit: str
    instance: str
    state: State
    reason: str
    since: float
    crashes: tuple[float, ...] = ()  # when each crash in the current window was seen
    restarts_seen: int | None = None  # the backend's own restart counter at the last look
    next_restart: float | None = None  # when the supervisor may start it again (backoff)
    held: bool = False  # crash loop: the supervisor leaves it alone until started by hand


@dataclass(frozen=True)
class Transition:
    """One recorded move, as the store wrote it (for the event, the log line and metrics)."""

    stack: str
    unit: str
    instance: str
    previous: State
    state: State
    reason: str
    at: float

    def message(self) -> str:
        return f"{self.instance}: {self.previous.value} -> {self.state.value} ({self.reason})"


def unit_state(states: Iterable[State]) -> State:
    """A unit's state from its instances': all alike is that state; some serving while others
    are not is `degraded`; otherwise the least advanced of the rest."""
    seen = list(states)
    if not seen:
        return State.STOPPED
    kinds = set(seen)
    if len(kinds) == 1:
        return seen[0]
    serving = kinds & {State.RUNNING, State.DEGRADED}
    if serving:
        return State.DEGRADED
    for state in (
        State.FAILED,
        State.STARTING,
        State.DRAINING,
        State.STOPPING,
        State.STOPPED,
    ):
        if state in kinds:
            return state
    return seen[0]  # pragma: no cover


# --------------------------------------------------------------------------- reconciliation


@dataclass(frozen=True)
class Reconciliation:
    """What the store should say about an instance after looking at the backend."""

    instance: str
    path: tuple[State, ...]  # legal steps from the stored state ([] = already right)
    reason: str
    forget: bool = False  # the instance no longer exists: drop its record
    back_in_gateway: bool = False  # an interrupted drain: it serves, so it goes back in


def reconcile(
    instance: str,
    stored: LifecycleRecord | None,
    observed: ObservedUnit | None,
    health: str | None = None,
) -> Reconciliation | None:
    """Reconcile a stored state with what the backend sees after an orchestrator restart (or
    between two passes). None: nothing to record. Crashes (`running` or `sleeping` but not
    running) are the supervisor's (see `supervise`), so this leaves them alone.

    `health` is the health sweep's word for the instance, when it has one.
    """
    current = stored.state if stored is not None else INITIAL
    if observed is None or not observed.exists:
        if stored is None:
            return None
        return Reconciliation(instance, (), "no longer exists on its host", forget=True)
    up = observed.running
    if up and current is State.SLEEPING:
        return None  # asleep on purpose: neither failed nor back to serving
    if up:
        want = State.DEGRADED if health in ("unhealthy", "degraded") else State.RUNNING
        if current in (State.RUNNING, State.DEGRADED):
            if current == want or health in (None, "unknown"):
                return None
            word = "unhealthy" if want is State.DEGRADED else "healthy again"
            return Reconciliation(instance, tuple(path_between(current, want)), f"health: {word}")
        if current is State.DRAINING:
            return Reconciliation(
                instance,
                (State.RUNNING,),
                "an interrupted drain: still running, so it goes back to serving",
                back_in_gateway=True,
            )
        if current is State.STARTING:
            return Reconciliation(
                instance, (want,), "an interrupted start: observed running afterwards"
            )
        if current is State.FAILED and stored is not None and stored.held:
            return None  # a crash loop given up on: only the operator clears it
        return Reconciliation(
            instance,
            tuple(path_between(current, want)),
            f"observed running while recorded {current.value}",
        )
    # Not running.
    if current in (State.STOPPED, State.FAILED):
        return None
    if current in (State.RUNNING, State.DEGRADED):
        return None  # a crash: the supervisor counts it and decides
    if current is State.STARTING:
        return Reconciliation(
            instance, (State.FAILED,), f"an interrupted start: not running ({observed.detail})"
        )
    if current is State.SLEEPING:
        return None  # asleep and gone: a crash like a serving one's, the supervisor's
    return Reconciliation(
        instance,
        tuple(path_between(current, State.STOPPED)),
        f"an interrupted stop: observed stopped ({observed.detail})",
    )


# --------------------------------------------------------------------------- supervision


@dataclass(frozen=True)
class CrashPolicy:
    """How the supervisor treats crashes: restart with exponential backoff, give up after
    `max_crashes` within `window` seconds."""

    max_crashes: int = 5
    window: float = 600.0
    backoff: float = 1.0
    backoff_max: float = 60.0


@dataclass(frozen=True)
class SupervisorDecision:
    """One instance's verdict in a supervisor pass."""

    kind: Literal["ok", "crashed", "restart", "wait", "give-up"]
    reason: str
    crashes: tuple[float, ...] = ()
    next_restart: float | None = None
    restarts_seen: int | None = None


#: What a crash of a sleeping replica means: vLLM always starts awake, so the restarted
#: replica is awake; it is gated and serves again, and the operator is told.
SLEEP_LOST = "it was asleep: vLLM restarts awake, so it serves again (hxp sleep to put it back)"


def lost_sleep(stored: LifecycleRecord | None, observed: ObservedUnit | None) -> bool:
    """A replica recorded asleep whose backend restarted it by itself since (its restart
    counter moved): it runs awake, out of the gateway, until the supervisor's next pass."""
    if stored is None or stored.state is not State.SLEEPING or observed is None:
        return False
    if not observed.running or observed.restarts is None or stored.restarts_seen is None:
        return False
    return observed.restarts != stored.restarts_seen


def restart_delay(crashes_in_window: int, policy: CrashPolicy) -> float:
    """Seconds to wait before restarting after the n-th crash in the window: 0 after the
    first (the supervisor restarts it within the same pass), then backoff x 2^(n-2)."""
    if crashes_in_window <= 1:
        return 0.0
    return float(min(policy.backoff * 2 ** (crashes_in_window - 2), policy.backoff_max))


def supervise(
    stored: LifecycleRecord,
    observed: ObservedUnit | None,
    now: float,
    policy: CrashPolicy,
    stalled: bool = False,
) -> SupervisorDecision:
    """Decide what a supervisor pass does with one instance the store says should serve.

    A crash is a `running`/`degraded`/`sleeping` instance that is not running, one whose backend
    restarted it by itself (its restart counter went up), or one that runs but is `stalled`
    (the health sweep saw requests running and no token generated for its stall window: the
    caller stops it). Crashes older than the window are forgotten; reaching `max_crashes` in
    the window gives up (crash loop).
    """
    recent = tuple(t for t in stored.crashes if now - t <= policy.window)
    seen_restarts = observed.restarts if observed is not None else None
    new_crashes = 0
    if seen_restarts is not None and stored.restarts_seen is not None:
        if seen_restarts >= stored.restarts_seen:
            new_crashes = seen_restarts - stored.restarts_seen
        else:  # the counter went back: started afresh, and each restart since is a crash
            new_crashes = seen_restarts
    baseline = seen_restarts if seen_restarts is not None else stored.restarts_seen
    up = observed is not None and observed.exists and observed.running and not stalled
    asleep = stored.state is State.SLEEPING
    serving = asleep or stored.state in (State.RUNNING, State.DEGRADED)
    if serving and not up:
        new_crashes = max(new_crashes, 1)
    if stored.state is State.FAILED and not stored.held:
        if up:
            return SupervisorDecision("ok", "running again", recent, None, baseline)
        due = stored.next_restart if stored.next_restart is not None else now
        if now >= due:
            return SupervisorDecision(
                "restart", f"crash {len(recent)} of {policy.max_crashes}", recent, None, baseline
            )
        return SupervisorDecision(
            "wait", f"restart due in {due - now:.1f}s (backoff)", recent, due, baseline
        )
    if not serving or new_crashes == 0:
        return SupervisorDecision("ok", "", recent, stored.next_restart, baseline)
    crashes = (*recent, *([now] * new_crashes))
    detail = observed.detail if observed is not None else "gone"
    if stalled:
        detail = "stalled: requests running, no token generated for its stall window"
    if asleep:
        detail = f"{detail}; {SLEEP_LOST}"
    if len(crashes) >= policy.max_crashes:
        return SupervisorDecision(
            "give-up",
            f"crash loop: {len(crashes)} crashes within {policy.window:.0f}s "
            f"(limit {policy.max_crashes}); supervision stopped ({detail})",
            crashes,
            None,
            baseline,
        )
    if up:  # the backend already restarted it itself
        return SupervisorDecision(
            "crashed",
            f"crashed and was restarted by its backend ({detail})",
            crashes,
            None,
            baseline,
        )
    delay = restart_delay(len(crashes), policy)
    return SupervisorDecision(
        "crashed",
        f"crashed ({detail}); crash {len(crashes)} of {policy.max_crashes}, "
        f"restart in {delay:.1f}s",
        crashes,
        now + delay,
        baseline,
    )


# --------------------------------------------------------------------------- rolling restarts


@dataclass(frozen=True)
class RollingPolicy:
    """How a rolling restart or update moves through a unit's replicas.

    `max_unavailable`: replicas taken out of service at once when restarting in place (always
    leaving one serving when there are two or more). `max_fail`: replicas that may fail their
    gate (each is restored) before the roll stops; 0 stops at the first. `surge`: `auto` starts
    the new replica first when spare GPU memory fits it, `never` always restarts in place.
    """

    max_unavailable: int = 1
    max_fail: int = 0
    surge: Literal["auto", "never"] = "auto"


def rolling_batches(replicas: Sequence[str], max_unavailable: int) -> list[list[str]]:
    """Replicas grouped into batches taken out together; one always keeps serving."""
    if not replicas:
        return []
    size = max(1, max_unavailable)
    if len(replicas) > 1:
        size = min(size, len(replicas) - 1)
    return [list(replicas[i : i + size]) for i in range(0, len(replicas), size)]


@dataclass(frozen=True)
class SurgeDecision:
    """Start the new replica beside the old one (`surge`), or replace it in place."""

    surge: bool
    reason: str
    gpus: tuple[int, ...] = ()
    # Without surge on GPUs: what the new replica needs and what each GPU of the host has
    # (free memory, or who holds it), for a message of the caller's own.
    detail: str = ""


def _spare(
    devices: Sequence[GpuInfo], reservations: Iterable[Reservation], skip: Iterable[int] = ()
) -> list[tuple[GpuInfo, GpuMemory]]:
    """Every GPU nobody holds, with what it has free (declared GPUs: all of it)."""
    taken = {r.gpu_index for r in reservations} | set(skip)
    out = []
    for d in sorted(devices, key=lambda g: g.index):
        if d.index in taken:
            continue
        free = d.free_bytes if d.free_bytes is not None else d.total_bytes
        out.append((d, GpuMemory(total_gib=d.total_bytes / GIB, free_gib=free / GIB, name=d.name)))
    return out


def surge_decision(
    spec: ServiceSpec | ModelSpec,
    gpu_count: int,
    devices: Sequence[GpuInfo],
    reservations: Iterable[Reservation],
    listed_elsewhere: Iterable[int] = (),
    mode: Literal["auto", "never"] = "auto",
    routed: bool = True,
) -> SurgeDecision:
    """Whether one more replica fits beside the running ones.

    Surge needs a second port slot (units behind the gateway have one) and, for a model on
    GPUs, `gpu_count` GPUs that nobody holds and that pass the calculator's start check
    (free memory at least `gpu_memory_utilization` x total, room for the CUDA context).
    """
    if mode == "never":
        return SurgeDecision(False, "surge disabled: one replica at a time, in place")
    if not routed:
        return SurgeDecision(False, "not behind the gateway: no second slot to surge into")
    if gpu_count == 0 or not isinstance(spec, ModelSpec):
        return SurgeDecision(True, "needs no GPU: the new replica starts beside the old one")
    reservations = list(reservations)
    listed_elsewhere = list(listed_elsewhere)
    if spec.gpus != "auto":
        return SurgeDecision(
            False,
            "GPUs are listed explicitly: the new replica needs the old one's GPUs",
            detail=_gpu_report(spec, gpu_count, devices, reservations, listed_elsewhere, {}),
        )
    util = spec.vllm.gpu_memory_utilization
    fits: list[int] = []
    refused: dict[int, str] = {}
    for device, memory in _spare(devices, reservations, listed_elsewhere):
        why = start_refusal(memory, util, gpu_count)
        if why is None:
            fits.append(device.index)
        else:
            refused[device.index] = f"GPU {device.index}: {why}"
    if len(fits) >= gpu_count:
        chosen = tuple(fits[:gpu_count])
        return SurgeDecision(
            True,
            f"spare GPU memory fits one more replica on GPU {','.join(map(str, chosen))}",
            chosen,
        )
    detail = "; ".join(refused.values()) or "every GPU is held by a replica"
    return SurgeDecision(
        False,
        f"no spare GPU memory for one more replica ({len(fits)} of {gpu_count} GPU(s) fit: "
        f"{detail}); restarting one at a time while the others serve",
        detail=_gpu_report(spec, gpu_count, devices, reservations, listed_elsewhere, refused),
    )


def _gpu_report(
    spec: ModelSpec,
    gpu_count: int,
    devices: Sequence[GpuInfo],
    reservations: Sequence[Reservation],
    listed_elsewhere: Sequence[int],
    refused: Mapping[int, str],
) -> str:
    """What one more replica needs, and every GPU of the host: who holds it, or why its free
    memory does not fit (the calculator's start check)."""
    util = spec.vllm.gpu_memory_utilization
    holders = {r.gpu_index: r.owner for r in reservations}
    own = set(spec.gpus) if spec.gpus != "auto" else set()
    lines = dict(refused)
    for d in sorted(devices, key=lambda g: g.index):
        if d.index in lines:
            continue
        total = d.total_bytes / GIB
        free = f"{d.free_bytes / GIB:.2f} GiB free" if d.free_bytes is not None else "free unknown"
        who = holders.get(d.index)
        if who is not None:
            lines[d.index] = f"GPU {d.index}: held by {who} ({total:.2f} GiB, {free})"
        elif d.index in own:
            lines[d.index] = f"GPU {d.index}: listed for this model ({total:.2f} GiB, {free})"
        elif d.index in listed_elsewhere:
            lines[d.index] = f"GPU {d.index}: listed by another model ({total:.2f} GiB, {free})"
    needs = max((d.total_bytes / GIB * util for d in devices), default=0.0)
    head = (
        f"one more replica needs {gpu_count} GPU(s) with {needs:.2f} GiB free on each "
        f"(gpu_memory_utilization {util:g} x total)"
        if devices
        else f"one more replica needs {gpu_count} GPU(s), and the host has none"
    )
    return "; ".join([head, *(lines[i] for i in sorted(lines))])


# --------------------------------------------------------------------------- hot reload


class ReloadKind(StrEnum):
    NOOP = "noop"
    RELOAD = "reload"  # new config files + the unit's reload signal/command; no restart
    ROLL = "roll"  # anything else about a unit that stays: the rolling path
    DEPLOY = "deploy"  # the unit is new or gone: a deploy creates or removes it


@dataclass(frozen=True)
class UnitChange:
    unit: str
    kind: ReloadKind
    reason: str
    fields: tuple[str, ...] = ()


@dataclass(frozen=True)
class ReloadPlan:
    """What a changed stack file needs, unit by unit, plus the gateway and monitoring."""

    stack: str
    units: tuple[UnitChange, ...] = ()
    gateway: bool = False
    monitoring: bool = False
    other: tuple[str, ...] = ()  # top-level sections that changed and need no action here

    @property
    def changes(self) -> bool:
        return self.gateway or self.monitoring or any(c.kind != ReloadKind.NOOP for c in self.units)

    def summary(self) -> str:
        lines = [f"Reload plan for stack {self.stack}:"]
        for c in self.units:
            if c.kind is not ReloadKind.NOOP:
                lines.append(f"  {c.kind.value:<7} {c.unit:<24} {c.reason}")
        if self.gateway:
            lines.append(f"  {'reload':<7} {'gateway':<24} nginx upstreams/listeners (SIGHUP)")
        if self.monitoring:
            lines.append(f"  {'reload':<7} {'monitoring':<24} Prometheus/Alertmanager config")
        for section in self.other:
            lines.append(f"  {'note':<7} {section:<24} changed; takes effect on the next run")
        if not self.changes:
            lines.append("  No changes.")
        return "\n".join(lines)


#: Fields a reload can apply to a running service that declares `reload:`.
RELOADABLE_FIELDS = frozenset({"config_files"})


def _differing(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    return sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))


def plan_reload(old: Stack, new: Stack) -> ReloadPlan:
    """Compare the applied stack with a changed one: reload what can be, roll the rest."""
    changes: list[UnitChange] = []
    old_units, new_units = old.units(), new.units()
    for unit in sorted(set(old_units) | set(new_units)):
        if unit not in new_units:
            changes.append(UnitChange(unit, ReloadKind.DEPLOY, "removed from the stack"))
            continue
        if unit not in old_units:
            changes.append(UnitChange(unit, ReloadKind.DEPLOY, "new in the stack"))
            continue
        before = old_units[unit].model_dump(mode="json")
        after = new_units[unit].model_dump(mode="json")
        host_changed = old.hosts.get(old_units[unit].host) != new.hosts.get(new_units[unit].host)
        fields = _differing(before, after) + (["host"] if host_changed else [])
        if not fields:
            changes.append(UnitChange(unit, ReloadKind.NOOP, "unchanged"))
            continue
        spec = new_units[unit]
        reload = spec.reload if isinstance(spec, ServiceSpec) else None
        if reload is not None and set(fields) <= RELOADABLE_FIELDS:
            how = f"signal {reload.signal}" if reload.signal else "its reload command"
            changes.append(
                UnitChange(
                    unit, ReloadKind.RELOAD, f"{', '.join(fields)} changed: {how}", tuple(fields)
                )
            )
            continue
        why = ", ".join(fields)
        if reload is not None:
            why += " (only config_files can be reloaded)"
        changes.append(UnitChange(unit, ReloadKind.ROLL, f"{why} changed", tuple(fields)))
    top_old = old.model_dump(mode="json")
    top_new = new.model_dump(mode="json")
    top = _differing(
        {k: v for k, v in top_old.items() if k not in ("services", "models", "hosts")},
        {k: v for k, v in top_new.items() if k not in ("services", "models", "hosts")},
    )
    return ReloadPlan(
        stack=new.stack,
        units=tuple(changes),
        gateway="gateway" in top,
        monitoring="monitoring" in top,
        other=tuple(t for t in top if t not in ("gateway", "monitoring")),
    )


@dataclass(frozen=True)
class LifecycleSummary:
    """What a lifecycle flow did, per instance, for its result and the CLI."""

    stack: str
    action: str
    done: dict[str, str] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.failed


__all__ = [
    "INITIAL",
    "RELOADABLE_FIELDS",
    "SLEEP_LOST",
    "STATES",
    "TRANSITIONS",
    "CrashPolicy",
    "LifecycleRecord",
    "LifecycleSummary",
    "Reconciliation",
    "ReloadKind",
    "ReloadPlan",
    "RollingPolicy",
    "State",
    "SupervisorDecision",
    "SurgeDecision",
    "Transition",
    "UnitChange",
    "allowed",
    "check_transition",
    "event_name",
    "lost_sleep",
    "path_between",
    "plan_reload",
    "reconcile",
    "restart_delay",
    "rolling_batches",
    "supervise",
    "surge_decision",
    "unit_state",
]
