"""The autoscaler's I/O around hxp.autoscale's decision: one fresh reading of every autoscaled
model's signal through the metrics aggregation, the GPUs free for more replicas, and the
action carried out through the existing machinery.

- scale out: the new count is written to the store first, then the deploy engine (the flow
  hands in flows.deploy.apply_config, which reads that count) starts the new replicas: GPUs placed
  under the host's lock, gated like any replica, put behind the gateway once ready;
- scale in: under the stack's lock, the highest-numbered replicas leave the gateway, drain
  (tasks.instances.stop_instances), stop, are removed, give their GPUs back and are forgotten.

Every decision is a store row (autoscale_decisions), an event, counted in
`hxp_autoscale_decisions_total` and reported back for the flow's artifact.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from prefect import get_run_logger

from hxp.autoscale import Decision, Room, Sample, ScaleState, decide, replicas_that_fit, with_counts
from hxp.autoscale import signal_value as compute_signal
from hxp.backends.base import Remove, UnitRef, observe_one
from hxp.config import EffectiveConfig
from hxp.gpu_alloc import explicit_gpus, host_key
from hxp.io import lifecycle as rec
from hxp.io.gpus import discover_gpus
from hxp.io.lock import stack_lock
from hxp.io.telemetry import AUTOSCALE_DECISIONS, AUTOSCALE_REPLICAS
from hxp.metrics import ModelFigures, Scrape, Target, replica_targets, wanted_families
from hxp.spec import MetricsSpec, Stack
from hxp.store import Store
from hxp.units import UnitInstance, all_slots, expand_units
from tasks.instances import RunContext, apply_step, drain_cap, stop_instances
from tasks.lifecycle import unit_instances
from tasks.metrics import Scrapes, aggregate_scrapes, observe_models, scrape_metrics


@dataclass
class Reading:
    """One aggregation's reading of every autoscaled model: a sample each."""

    samples: dict[str, Sample] = field(default_factory=dict)


def autoscaled(stack: Stack) -> list[str]:
    return sorted(m for m, spec in stack.models.items() if spec.autoscale is not None)


def counted_stack(stack: Stack, store: Store) -> Stack:
    """The stack with the autoscaler's kept replica counts (what runs)."""
    return with_counts(stack, store.autoscale_counts(stack.stack))


def read_signals(stack: Stack, state_dir: str, models: list[str]) -> Reading:
    """Scrape every replica of the stack now and aggregate (the same tasks as the
    aggregate-metrics flow, so rates and quantiles are its), then each model's sample. A model
    with a replica not answering has no usable sample (a partial reading is never acted on)."""
    spec = stack.metrics or MetricsSpec()
    started = time.monotonic()
    running = observe_models(stack, state_dir)
    targets, down = replica_targets(stack, running)
    live = [t for t in targets if t.name not in down]
    scraped = scrape_metrics(
        stack.stack, live, wanted_families(spec), spec.scrape_timeout, spec.max_concurrency
    ).by_target
    now = time.time()
    for name in down:
        scraped[name] = Scrape(now, None, "not running (backend)")
    result = aggregate_scrapes(stack, targets, Scrapes(scraped), state_dir, started)
    figures = {f.model: f for f in result.figures if f.model}
    reading = Reading()
    for model in models:
        reading.samples[model] = _sample(stack, model, targets, scraped, figures.get(model))
    return reading


def _sample(
    stack: Stack,
    model: str,
    targets: list[Target],
    scraped: dict[str, Scrape],
    fig: ModelFigures | None,
) -> Sample:
    auto = stack.models[model].autoscale
    assert auto is not None
    mine = [t for t in targets if t.model == model]
    pages = [scraped[t.name] for t in mine if t.name in scraped]
    missing = [
        f"{t.name} ({scraped[t.name].error if t.name in scraped else 'not scraped'})"
        for t in mine
        if t.name not in scraped or scraped[t.name].page is None
    ]
    at = min((p.at for p in pages), default=0.0)
    if missing or fig is None:
        return Sample(None, at, len(mine) - len(missing), f"not answering: {', '.join(missing)}")
    value = compute_signal(
        auto,
        fig.waiting,
        fig.kv_mean,
        fig.ttft.get(0.95),
        fig.up,
        fig.windows == fig.up and fig.up > 0,
    )
    in_flight = None if fig.waiting is None else fig.waiting + (fig.running or 0.0)
    return Sample(
        value, at, fig.up, in_flight=in_flight, slots=stack.models[model].vllm.max_num_seqs
    )


def room_for(stack: Stack, state_dir: str, model: str, current: int) -> Room:
    """How many of the model's replicas above `current` the GPUs hold now: the host's GPUs as
    discovered, the store's reservations and the GPUs other models list, each new replica
    checked by the calculator (hxp.gpu_alloc)."""
    spec = stack.models[model]
    assert spec.autoscale is not None
    gpu_count = spec.gpus_per_replica()
    if gpu_count == 0:
        return Room(None)
    top = with_counts(stack, {model: spec.autoscale.max_replicas})
    new = expand_units(top, {model})[current:]
    if not new:
        return Room(0, "at max_replicas")
    host = stack.hosts[spec.host]
    key = host_key(spec.host, host)
    same = [h for h, hs in stack.hosts.items() if host_key(h, hs) == key]
    found = discover_gpus(spec.host, host, None, state_dir)
    held = Store(state_dir).reservations(key)
    return replicas_that_fit(
        spec,
        gpu_count,
        found.devices,
        held,
        stack.stack,
        [i.name for i in new],
        f"models.{model}",
        key,
        explicit_gpus(stack.models, same, model),
    )


def decide_model(stack: Stack, state_dir: str, model: str, sample: Sample, now: float) -> Decision:
    """The decision for one model from its sample and its kept state (not yet acted on)."""
    store = Store(state_dir)
    spec = stack.models[model]
    auto = spec.autoscale
    assert auto is not None
    kept = store.autoscale_states(stack.stack).get(model)
    state = (
        ScaleState(
            int(kept["replicas"]), kept["above_since"], kept["below_since"], kept["last_action_at"]
        )
        if kept is not None
        else ScaleState(spec.replicas)
    )
    asleep = asleep_replicas(store, stack.stack, model)
    room = (
        room_for(stack, state_dir, model, state.replicas)
        if sample.value is not None and not asleep
        else Room(0)
    )
    return decide(model, auto, state, sample, now, room, asleep)


def asleep_replicas(store: Store, stack: str, model: str) -> int:
    """How many of the model's replicas `hxp sleep` holds (the lifecycle says `sleeping`)."""
    return sum(1 for unit in store.asleep(stack).values() if unit == model)


#: The deploy engine as the flow hands it in: (effective config, units, state dir) -> summary.
Deploy = Callable[[EffectiveConfig, list[str], str], dict[str, Any]]


def act(effective: EffectiveConfig, state_dir: str, decision: Decision, deploy: Deploy) -> str:
    """Carry a decision out and record it (store row, event, metric); what happened. A scale
    up runs `deploy` (the deploy engine) for the model."""
    stack = effective.stack
    store = Store(state_dir)
    outcome = "no change"
    new = decision.state
    if decision.action == "scale_up":
        outcome = _scale_up(effective, state_dir, decision, deploy)
    elif decision.action == "scale_down":
        outcome = _scale_down(counted_stack(stack, store), state_dir, decision)
    if outcome.startswith("failed"):
        # Keep the old count; the cooldown still runs so that a failing start is not retried
        # on every pass.
        new = dataclasses.replace(new, replicas=decision.current)
    store.save_autoscale_state(
        stack.stack,
        decision.model,
        new.replicas,
        new.above_since,
        new.below_since,
        new.last_action_at,
    )
    store.add_autoscale_decision(
        stack.stack,
        decision.model,
        decision.action,
        decision.current,
        decision.desired,
        decision.value,
        decision.reason,
        outcome,
    )
    if decision.action != "hold" and not _still_sleeping(store, stack.stack, decision):
        store.add_event(
            stack.stack, f"autoscale-{decision.action}", f"{decision.line()} [{outcome}]",
            decision.model,
        )  # fmt: skip
    AUTOSCALE_DECISIONS.labels(stack.stack, decision.model, decision.action).inc()
    AUTOSCALE_REPLICAS.labels(stack.stack, decision.model).set(new.replicas)
    return outcome


def _still_sleeping(store: Store, stack: str, decision: Decision) -> bool:
    """A `sleeping` decision after another: one event when the hold begins, not one a pass."""
    if decision.action != "sleeping":
        return False
    rows = store.autoscale_decisions(stack, decision.model)
    return len(rows) >= 2 and rows[-2]["action"] == "sleeping"


def _scale_up(
    effective: EffectiveConfig, state_dir: str, decision: Decision, deploy: Deploy
) -> str:
    """The new count in the store, then the deploy engine (`deploy`: flows.deploy.apply_config
    of the model, handed in by the flow) starts the missing replicas."""
    stack = effective.stack
    store = Store(state_dir)
    kept = store.autoscale_states(stack.stack).get(decision.model, {})
    store.save_autoscale_state(
        stack.stack,
        decision.model,
        decision.desired,
        None,
        None,
        decision.state.last_action_at,
    )
    try:
        result = deploy(effective, [decision.model], state_dir)
    except Exception as exc:
        store.save_autoscale_state(
            stack.stack,
            decision.model,
            decision.current,
            kept.get("above_since"),
            kept.get("below_since"),
            decision.state.last_action_at,
        )
        get_run_logger().error("%s: scale up failed: %s", decision.model, exc)
        return f"failed: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"
    return f"started by deploy #{result.get('deploy_id')}, ready and behind the gateway"


def _scale_down(stack: Stack, state_dir: str, decision: Decision) -> str:
    """Under the stack's lock: the replicas above the new count leave the gateway, drain,
    stop, are removed and give their GPUs back; then the new count is kept."""
    model = decision.model
    holder = f"autoscaler scale-in of {stack.stack}/{model}"
    with stack_lock(state_dir, stack.stack, holder):
        now_stack = with_counts(stack, {model: decision.current})
        ctx = RunContext(now_stack, state_dir)
        backend = ctx.backend(now_stack.models[model].host)
        observed = {}
        for inst in all_slots(now_stack, model):
            seen = observe_one(backend, inst)
            if seen is not None:
                observed[inst.name] = seen
        live = unit_instances(now_stack, model, observed)
        victims = [i for i in live if i.replica >= decision.desired]
        # The count first: an apply from now on keeps it (and would remove what is left).
        Store(state_dir).save_autoscale_state(
            stack.stack, model, decision.desired, None, None, decision.state.last_action_at
        )
        done = stop_instances(
            ctx,
            backend,
            model,
            victims,
            observed,
            drain=True,
            cap=drain_cap(now_stack),
            reason=f"autoscaler: {decision.reason}",
        )
        for inst in victims:
            _remove(ctx, backend, inst)
    return "; ".join(f"{k}: {v}" for k, v in sorted(done.items())) or "nothing ran"


def _remove(ctx: RunContext, backend: Any, inst: UnitInstance) -> None:
    store = ctx.store()
    apply_step(ctx, backend, inst.unit, inst.name, Remove(UnitRef.of(inst)), "remove", False)
    store.release(ctx.stack.stack, inst.name)
    rec.forget(store, ctx.stack.stack, inst.unit, inst.name, "autoscaler: scaled in")


__all__ = [
    "Deploy",
    "Reading",
    "act",
    "asleep_replicas",
    "autoscaled",
    "counted_stack",
    "decide_model",
    "read_signals",
    "room_for",
]
