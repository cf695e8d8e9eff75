"""The autoscaler's decision: how many replicas a model should run, from one fresh sample of
its signal, the time the signal has held above or below its threshold, the cooldown, the
bounds and the GPUs free for more replicas.

Pure: reading metrics and acting (a gated start through the deploy engine, a drain through the
gateway then a stop) are tasks.autoscale's; the flow is flows.autoscale.

Rules (docs/configuration.md#autoscale):
- a sample older than two intervals, or one the aggregation could not compute (replicas not
  answering), is never acted on; the hysteresis timers start over after it;
- scale up only after the signal held above `threshold` for `scale_up_after`, to the count the
  signal asks for (at least one more, at most `max_replicas`; a queue target with known slots:
  at least enough slots for the requests in flight), and only as far as the GPUs the
  calculator and the reservations say are free;
- scale down one replica at a time, only after the signal, spread over one replica fewer,
  held below `scale_down_below` x `threshold` for `scale_down_after` (a queue target of a
  model with `vllm.max_num_seqs`: and the requests in flight, spread over one replica fewer,
  within `scale_down_below` of its slots; an empty queue alone says nothing of how near
  saturation the replicas run);
- no action within `cooldown` of the last one; a count outside [min, max] is brought back at
  once (still within the GPUs free);
- a model with a replica asleep (`hxp sleep`) is held as it is (`sleeping`): no traffic reaches
  it, so its signal says nothing, and the operator chose its state. Its count is kept and the
  timers start over, so a wake resumes autoscaling from the count it had.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from typing import Literal

from hxp.config import EffectiveConfig
from hxp.errors import GpuAllocationError
from hxp.gpu_alloc import GpuInfo, Reservation, choose_gpus
from hxp.spec import AutoscaleSpec, ModelSpec, Stack

Action = Literal["scale_up", "scale_down", "hold", "stale", "blocked", "sleeping"]
#: Every action, in the order metrics and tables list them.
ACTIONS: tuple[Action, ...] = ("scale_up", "scale_down", "hold", "stale", "blocked", "sleeping")
#: How many intervals old a sample may be and still be acted on.
STALE_INTERVALS = 2.0


@dataclass(frozen=True)
class Sample:
    """One reading of a model's signal: its value (None: none computable) at `at` (the scrape
    time), over `replicas` replicas that answered, or why it cannot be used."""

    value: float | None
    at: float
    replicas: int
    problem: str = ""
    # Requests in the model now (running + waiting, all replicas) and the slots of one
    # replica (vLLM's max_num_seqs, when the stack sets it): a queue target scales down only
    # when one replica fewer would still not queue (an empty queue alone says nothing).
    in_flight: float | None = None
    slots: int | None = None


@dataclass(frozen=True)
class ScaleState:
    """What the autoscaler keeps per model between runs (the store's autoscale row)."""

    replicas: int
    above_since: float | None = None
    below_since: float | None = None
    last_action_at: float | None = None


@dataclass(frozen=True)
class Room:
    """How many more replicas the GPUs hold (None: no limit, the model needs no GPU) and why
    no more."""

    more: int | None
    why: str = ""


@dataclass(frozen=True)
class Decision:
    model: str
    action: Action
    current: int
    desired: int
    reason: str
    value: float | None
    state: ScaleState

    @property
    def changes(self) -> bool:
        return self.desired != self.current

    def line(self) -> str:
        shown = "-" if self.value is None else f"{self.value:.3g}"
        return (
            f"{self.model}: {self.action} {self.current} -> {self.desired} "
            f"(signal {shown}): {self.reason}"
        )

    def to_dict(self) -> dict[str, object]:
        return {
            "model": self.model,
            "action": self.action,
            "current": self.current,
            "desired": self.desired,
            "value": self.value,
            "reason": self.reason,
        }


def signal_name(spec: AutoscaleSpec) -> str:
    return {
        "queue_per_replica": "waiting requests per replica",
        "kv_cache_usage": "mean KV-cache use",
        "ttft_p95": "TTFT p95 (s)",
    }[spec.target]


def signal_value(
    spec: AutoscaleSpec,
    waiting: float | None,
    kv_mean: float | None,
    ttft_p95: float | None,
    replicas: int,
    windowed: bool,
) -> float | None:
    """The signal from one aggregation's figures of the model. TTFT without a window (no
    previous scrape) has no value; a window without requests is an idle model (0)."""
    if spec.target == "queue_per_replica":
        return None if waiting is None else waiting / max(replicas, 1)
    if spec.target == "kv_cache_usage":
        return kv_mean
    if not windowed:
        return None
    return 0.0 if ttft_p95 is None else ttft_p95


def _wanted_up(spec: AutoscaleSpec, sample: Sample, value: float, current: int) -> int:
    """The count the signal asks for: as many replicas as bring it to the threshold; for a
    queue target with known slots, at least as many as hold the requests in flight (the queue
    at the current count understates what fewer replicas leave waiting)."""
    wanted = math.ceil(current * value / spec.threshold)
    if spec.target == "queue_per_replica" and sample.slots and sample.in_flight is not None:
        wanted = max(wanted, math.ceil(sample.in_flight / sample.slots))
    return min(spec.max_replicas, max(current + 1, wanted))


def _low_enough(spec: AutoscaleSpec, sample: Sample, value: float, current: int) -> bool:
    """Whether one replica fewer would still keep the signal under the scale-down line (for a
    queue target with known slots: and the requests in flight would fit their slots)."""
    if current <= 1:
        return value < spec.scale_down_below * spec.threshold
    fewer = current - 1
    spread = value if spec.target == "ttft_p95" else value * current / fewer
    if spread >= spec.scale_down_below * spec.threshold:
        return False
    if spec.target == "queue_per_replica" and sample.slots and sample.in_flight is not None:
        return sample.in_flight / fewer <= spec.scale_down_below * sample.slots
    return True


def decide(
    model: str,
    spec: AutoscaleSpec,
    state: ScaleState,
    sample: Sample,
    now: float,
    room: Room,
    asleep: int = 0,
) -> Decision:
    """The decision for one model at `now` (see the module's rules); `asleep`: how many of
    its replicas `hxp sleep` holds."""
    current = state.replicas
    age = now - sample.at
    limit = STALE_INTERVALS * spec.interval

    def out(action: Action, desired: int, reason: str, new: ScaleState) -> Decision:
        return Decision(model, action, current, desired, reason, sample.value, new)

    if asleep:
        reset = replace(state, above_since=None, below_since=None)
        why = (
            f"sleeping: {asleep} replica(s) asleep (hxp sleep); no scale action until "
            f"`hxp wake {model}`, which resumes from {current} replica(s)"
        )
        return out("sleeping", current, why, reset)

    if sample.problem or sample.value is None or age > limit:
        if sample.problem:
            why = sample.problem
        elif age > limit:
            why = f"newest sample is {age:.1f}s old (over {limit:g}s, two intervals)"
        else:
            why = f"no {signal_name(spec)} computable yet"
        reset = replace(state, above_since=None, below_since=None)
        return out("stale", current, f"not acting on stale metrics: {why}", reset)
    value = sample.value
    above = value > spec.threshold
    low = _low_enough(spec, sample, value, current)
    new = replace(
        state,
        above_since=(state.above_since if state.above_since is not None else now)
        if above
        else None,
        below_since=(state.below_since if state.below_since is not None else now) if low else None,
    )
    cooling = state.last_action_at is not None and now - state.last_action_at < spec.cooldown
    # Bounds first: a count outside [min, max] (a changed stack) is brought back at once.
    if current < spec.min_replicas or current > spec.max_replicas:
        target = min(max(current, spec.min_replicas), spec.max_replicas)
        return _act(model, spec, current, target, value, new, now, room, "outside [min, max]")
    if above:
        held = now - (new.above_since or now)
        if current >= spec.max_replicas:
            return out("hold", current, f"above threshold, at max_replicas {current}", new)
        if held < spec.scale_up_after:
            return out(
                "hold",
                current,
                f"{signal_name(spec)} {value:.3g} > {spec.threshold:g} for {held:.1f}s "
                f"of {spec.scale_up_after:g}s",
                new,
            )
        if cooling:
            return out("hold", current, _cooling(spec, state, now), new)
        target = _wanted_up(spec, sample, value, current)
        why = f"{signal_name(spec)} {value:.3g} > {spec.threshold:g} for {held:.1f}s"
        return _act(model, spec, current, target, value, new, now, room, why)
    if low and current > spec.min_replicas:
        held = now - (new.below_since or now)
        if held < spec.scale_down_after:
            return out(
                "hold",
                current,
                f"low for {held:.1f}s of {spec.scale_down_after:g}s",
                new,
            )
        if cooling:
            return out("hold", current, _cooling(spec, state, now), new)
        why = (
            f"{signal_name(spec)} {value:.3g} low enough for {current - 1} replica(s) "
            f"for {held:.1f}s"
        )
        return _act(model, spec, current, current - 1, value, new, now, room, why)
    return out("hold", current, f"{signal_name(spec)} {value:.3g} within bounds", new)


def _cooling(spec: AutoscaleSpec, state: ScaleState, now: float) -> str:
    assert state.last_action_at is not None
    left = spec.cooldown - (now - state.last_action_at)
    return f"cooldown: {left:.1f}s of {spec.cooldown:g}s left"


def _act(
    model: str,
    spec: AutoscaleSpec,
    current: int,
    target: int,
    value: float,
    state: ScaleState,
    now: float,
    room: Room,
    why: str,
) -> Decision:
    """Scale to `target`, upward only as far as the GPUs hold."""
    if target > current and room.more is not None and target - current > room.more:
        fits = current + room.more
        if fits <= current:
            return Decision(
                model, "blocked", current, current, f"{why}; no GPU room: {room.why}", value, state
            )
        why = f"{why}; only {fits} fit: {room.why}"
        target = fits
    action: Action = "scale_up" if target > current else "scale_down"
    done = ScaleState(target, None, None, now)
    return Decision(model, action, current, target, why, value, done)


def replicas_that_fit(
    model: ModelSpec,
    gpu_count: int,
    devices: Iterable[GpuInfo],
    reservations: Iterable[Reservation],
    stack: str,
    names: list[str],
    field_path: str,
    host: str,
    listed_elsewhere: Mapping[int, str] | None = None,
) -> Room:
    """How many of the replicas `names` (in order) get GPUs: each in turn chosen by the
    calculator's check (hxp.gpu_alloc.choose_gpus) beside the reservations and the ones chosen
    before it, as the deploy's placement would."""
    if gpu_count == 0:
        return Room(None)
    devices = list(devices)
    held = list(reservations)
    for n, name in enumerate(names):
        try:
            gpus = choose_gpus(
                devices, held, model, gpu_count, stack, name, field_path, listed_elsewhere
            )
        except GpuAllocationError as exc:
            return Room(n, str(exc).splitlines()[0])
        held += [Reservation(host, g, stack, name) for g in gpus]
    return Room(len(names))


def with_counts(stack: Stack, counts: Mapping[str, int]) -> Stack:
    """The stack with each autoscaled model's `replicas` set to the autoscaler's count (kept
    within [min, max]); a model without a count starts from its `replicas`, within bounds.
    What apply, the autoscaler and every flow that expands replicas work on."""
    models = {}
    changed = False
    for name, model in stack.models.items():
        if model.autoscale is None:
            models[name] = model
            continue
        a = model.autoscale
        count = min(max(counts.get(name, model.replicas), a.min_replicas), a.max_replicas)
        if count != model.replicas:
            changed = True
            model = model.model_copy(update={"replicas": count})
        models[name] = model
    return stack.model_copy(update={"models": models}) if changed else stack


def counted_config(effective: EffectiveConfig, counts: Mapping[str, int]) -> EffectiveConfig:
    """`effective` with the autoscaler's counts applied (with_counts); unchanged without any
    autoscaled model."""
    stack = with_counts(effective.stack, counts)
    return effective if stack is effective.stack else replace(effective, stack=stack)


__all__ = [
    "ACTIONS",
    "STALE_INTERVALS",
    "Action",
    "Decision",
    "Room",
    "Sample",
    "ScaleState",
    "counted_config",
    "decide",
    "replicas_that_fit",
    "signal_name",
    "signal_value",
    "with_counts",
]
