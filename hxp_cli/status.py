"""`hxp status`'s models table: per model instance, its GPUs, the model and revision it serves,
the KV cache and concurrency the calculator predicts for it, whether the gateway routes to it,
and its health as the last sweep saw it. Read-only: the store, the gateway's state, the HF cache.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class ModelRow:
    instance: str
    model: str
    gpus: str  # "0,1", or "-" when none are listed or reserved
    revision: str  # the model's Hugging Face revision, "main" when the stack names none
    kv_tokens: int | None  # predicted per replica (hxp.resources); None: no prediction
    concurrency: float | None  # requests of max_model_len at once
    gateway: str  # "in", "out" (routed unit, not in the upstream now), "-" (not routed)
    health: str  # the last sweep's status; "not swept" before any; "down" if not running;
    # "sleeping" while `hxp sleep` holds it; "crashed" if it crashed asleep and its backend
    # restarted it (awake, out of the gateway) before the supervisor's pass


def _predictions(stack: Any, notes: list[str]) -> dict[str, tuple[int, float]]:
    from hxp.errors import InputError
    from hxp_cli.fit import fit_stack_model

    out: dict[str, tuple[int, float]] = {}
    for name, spec in sorted(stack.models.items()):
        if spec.engine == "simulator" and not spec.simulator_gpus:
            notes.append(f"{name}: a simulator without GPUs, no KV cache to predict")
            continue
        try:
            fitted = fit_stack_model(stack, name).result
        except InputError as exc:
            notes.append(f"{name}: no prediction: {str(exc).splitlines()[0]}")
            continue
        out[name] = (fitted.kv_cache_tokens, fitted.max_concurrency)
    return out


def model_rows(
    stack: Any, state: Path, instances: list[Any], seen: dict[str, Any]
) -> tuple[list[ModelRow], list[str]]:
    """One row per model instance of `instances` (expanded units), and notes for the reader."""
    from hxp.endpoints import server
    from hxp.io.upstreams import live_upstreams
    from hxp.lifecycle import SLEEP_LOST, lost_sleep
    from hxp.store import Store

    models = [i for i in instances if i.unit in stack.models]
    if not models:
        return [], []
    notes: list[str] = []
    predicted = _predictions(stack, notes)
    store = Store(state)
    reserved: dict[str, list[int]] = {}
    for r in store.reservations():
        if r.stack == stack.stack:
            reserved.setdefault(r.instance, []).append(r.gpu_index)
    swept, _units = store.health_state(stack.stack)
    asleep = store.sleeping(stack.stack)
    states = store.lifecycle(stack.stack)
    live = live_upstreams(state, stack.stack)
    rows = []
    for inst in models:
        spec = stack.models[inst.unit]
        gpus = inst.gpus if inst.gpus is not None else tuple(sorted(reserved.get(inst.name, ())))
        kv, conc = predicted.get(inst.unit, (None, None))
        routed = stack.gateway is not None and inst.unit in stack.gateway.routes
        gateway = "-"
        if routed:
            gateway = "in" if server(inst) in live.get(inst.unit, ()) else "out"
        obs = seen.get(inst.name)
        record = swept.get(inst.name)
        if obs is None or not obs.running:
            health = "down"
            if inst.name in asleep:
                notes.append(f"{inst.name}: crashed while asleep ({SLEEP_LOST}; hxp supervise)")
        elif lost_sleep(states.get(inst.name), obs):
            health = "crashed"
            notes.append(
                f"{inst.name}: crashed while asleep and restarted by its backend, out of the "
                f"gateway until the supervisor's next pass ({SLEEP_LOST}; hxp supervise)"
            )
        elif inst.name in asleep:
            health = "sleeping"
            freed = asleep[inst.name].get("freed_bytes_per_gpu")
            notes.append(
                f"{inst.name}: asleep at level {asleep[inst.name]['level']} (hxp wake), "
                + (
                    f"{freed / 2**30:.2f} GiB freed per GPU"
                    if freed is not None
                    else "freed memory unknown"
                )
            )
        elif record is None:
            health = "not swept"
        else:
            health = str(record.status)
        rows.append(
            ModelRow(
                inst.name,
                spec.model,
                ",".join(map(str, gpus)) or "-",
                spec.revision or "main",
                kv,
                conc,
                gateway,
                health,
            )
        )
    return rows, notes


def print_models(rows: list[ModelRow], notes: list[str]) -> None:
    if not rows:
        return
    print()
    print(
        f"{'model instance':<24} {'gpus':<8} {'revision':<12} {'kv tokens':>11} "
        f"{'concurrency':>11}  {'gateway':<7} {'health':<10} model"
    )
    for r in rows:
        kv = f"{r.kv_tokens:,}" if r.kv_tokens is not None else "-"
        conc = f"{r.concurrency:.1f}x" if r.concurrency is not None else "-"
        print(
            f"{r.instance:<24} {r.gpus:<8} {r.revision[:12]:<12} {kv:>11} {conc:>11}  "
            f"{r.gateway:<7} {r.health:<10} {r.model}"
        )
    for note in notes:
        print(f"  note: {note}")


def row_dict(row: ModelRow) -> dict[str, Any]:
    return {k: v for k, v in asdict(row).items() if k != "instance"}
