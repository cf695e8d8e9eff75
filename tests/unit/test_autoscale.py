"""The autoscaler's pure decision (hxp.autoscale) as tables and timelines, its stack format,
the GPU room it asks the calculator for, and how apply keeps its count."""

from __future__ import annotations

import itertools
import random
from typing import Any

import pytest

from hxp.autoscale import (
    Room,
    Sample,
    ScaleState,
    decide,
    replicas_that_fit,
    signal_value,
    with_counts,
)
from hxp.config import unit_config_hash
from hxp.errors import StackValidationError
from hxp.gpu_alloc import GIB, GpuInfo, Reservation
from hxp.spec import AutoscaleSpec, ModelSpec
from hxp.units import expand_units
from tests.support.render_data import stack_from_data

SPEC = AutoscaleSpec(
    min_replicas=1,
    max_replicas=3,
    target="queue_per_replica",
    threshold=4.0,
    scale_up_after=10.0,
    scale_down_after=30.0,
    cooldown=20.0,
    interval=5.0,
)
FREE = Room(None)


def run(
    values: list[float | None],
    start: int = 1,
    room: Room = FREE,
    spec: AutoscaleSpec = SPEC,
    step: float = 5.0,
) -> list[tuple[float, str, int]]:
    """Feed one sample per `step` seconds (queue per replica given as the total); the actions
    taken (time, action, new count)."""
    state = ScaleState(start)
    out = []
    for n, v in enumerate(values):
        now = 1000.0 + n * step
        value = None if v is None else v / state.replicas
        d = decide("m", spec, state, Sample(value, now - 0.5, state.replicas), now, room)
        if d.action in ("scale_up", "scale_down", "blocked", "stale"):
            out.append((now - 1000.0, d.action, d.desired))
        state = d.state
    return out


# --------------------------------------------------------------------------- one decision

CASES: list[tuple[str, ScaleState, float | None, float, str, int]] = [
    # (what, state, signal, sample age, action, desired)
    ("idle at min stays", ScaleState(1), 0.0, 1.0, "hold", 1),
    ("above but not long enough", ScaleState(1, above_since=995.0), 9.0, 1.0, "hold", 1),
    ("above long enough: to what the signal asks", ScaleState(1, 985.0), 9.0, 1.0, "scale_up", 3),
    ("just above: one more", ScaleState(2, 985.0), 4.5, 1.0, "scale_up", 3),
    ("far above: capped at max", ScaleState(1, 985.0), 100.0, 1.0, "scale_up", 3),
    ("at max: hold", ScaleState(3, 900.0), 100.0, 1.0, "hold", 3),
    ("cooldown holds a ready scale up", ScaleState(1, 900.0, None, 990.0), 9.0, 1.0, "hold", 1),
    ("low long enough: one fewer", ScaleState(3, None, 960.0), 0.5, 1.0, "scale_down", 2),
    ("low, not long enough", ScaleState(3, None, 980.0), 0.5, 1.0, "hold", 3),
    ("would be too high on one fewer", ScaleState(2, None, 900.0), 1.5, 1.0, "hold", 2),
    ("cooldown holds a ready scale down", ScaleState(3, None, 900.0, 985.0), 0.0, 1.0, "hold", 3),
    ("old sample: stale", ScaleState(1, 900.0), 9.0, 10.5, "stale", 1),
    ("no value: stale", ScaleState(1, 900.0), None, 1.0, "stale", 1),
    ("below min: brought up at once", ScaleState(0), 0.0, 1.0, "scale_up", 1),
    ("above max (stack changed): down at once", ScaleState(5), 0.0, 1.0, "scale_down", 3),
]


@pytest.mark.parametrize(("what", "state", "value", "age", "action", "desired"), CASES)
def test_decision_table(
    what: str, state: ScaleState, value: float | None, age: float, action: str, desired: int
) -> None:
    d = decide("m", SPEC, state, Sample(value, 1000.0 - age, state.replicas), 1000.0, FREE)
    assert (d.action, d.desired) == (action, desired), f"{what}: {d.line()}"
    assert d.reason


def test_a_stale_sample_says_so_and_restarts_the_hysteresis() -> None:
    d = decide("m", SPEC, ScaleState(1, 900.0, 900.0), Sample(9.0, 980.0, 1), 1000.0, FREE)
    assert d.action == "stale"
    assert "stale" in d.reason
    assert "20.0s old" in d.reason
    assert "10s" in d.reason
    assert (d.state.above_since, d.state.below_since) == (None, None)
    problem = Sample(None, 999.0, 1, "not answering: m-1 (connection refused)")
    d = decide("m", SPEC, ScaleState(2), problem, 1000.0, FREE)
    assert d.action == "stale"
    assert "m-1 (connection refused)" in d.reason


def test_a_queue_target_with_known_slots_scales_down_only_when_one_fewer_would_not_queue() -> None:
    old = ScaleState(3, None, 900.0)
    # no queue, but 3 x 4 slots busy: on two replicas 6 each > half of 4 slots -> hold
    busy = Sample(0.0, 999.0, 3, in_flight=12.0, slots=4)
    assert decide("m", SPEC, old, busy, 1000.0, FREE).action == "hold"
    quiet = Sample(0.0, 999.0, 3, in_flight=3.0, slots=4)
    assert decide("m", SPEC, old, quiet, 1000.0, FREE).action == "scale_down"
    unknown = Sample(0.0, 999.0, 3, in_flight=12.0)  # slots unknown: the queue alone decides
    assert decide("m", SPEC, old, unknown, 1000.0, FREE).action == "scale_down"


def test_a_queue_target_with_known_slots_scales_up_to_hold_what_is_in_flight() -> None:
    spec = SPEC.model_copy(update={"max_replicas": 5})
    state = ScaleState(1, 900.0)
    # 4 slots busy and 5 waiting (just above the threshold 4): the queue alone asks for 2,
    # the 9 requests in flight need 3 replicas of 4 slots
    sample = Sample(5.0, 999.0, 1, in_flight=9.0, slots=4)
    assert decide("m", spec, state, sample, 1000.0, FREE).desired == 3
    assert decide("m", spec, state, Sample(5.0, 999.0, 1), 1000.0, FREE).desired == 2


def test_no_gpu_room_blocks_and_says_why() -> None:
    room = Room(0, "GPU 0: taken by s/other")
    d = decide("m", SPEC, ScaleState(2, 900.0), Sample(9.0, 999.0, 2), 1000.0, room)
    assert (d.action, d.desired) == ("blocked", 2)
    assert "no GPU room: GPU 0: taken by s/other" in d.reason


def test_partial_room_stops_at_what_fits_and_says_why() -> None:
    room = Room(1, "GPU 2: taken by s/other")
    d = decide("m", SPEC, ScaleState(1, 900.0), Sample(50.0, 999.0, 1), 1000.0, room)
    assert (d.action, d.desired) == ("scale_up", 2)
    assert "only 2 fit: GPU 2: taken by s/other" in d.reason


# --------------------------------------------------------------------------- timelines


def test_load_step_scales_up_after_scale_up_after_and_back_down_after_scale_down_after() -> None:
    load = [0.0] * 4 + [30.0] * 10 + [0.0] * 20
    actions = run(load)
    # the step at t=20: above from t=20, held 10s at t=30 -> up to max at once
    assert actions[0] == (30.0, "scale_up", 3)
    downs = [a for a in actions if a[1] == "scale_down"]
    # load gone at t=70: low from 70, held 30s at 100 (cooldown long over) -> 2; the timer
    # starts over after an action: low from 105, held 30s at 135 -> 1
    assert downs == [(100.0, "scale_down", 2), (135.0, "scale_down", 1)]


def test_noisy_idle_soak_takes_no_action() -> None:
    rng = random.Random(7)
    # noise around half the threshold of one replica, with single spikes above it
    noise = [max(0.0, rng.gauss(2.0, 1.0)) for _ in range(500)]
    for i in range(0, 500, 37):
        noise[i] = 9.0  # a spike, shorter than scale_up_after
    assert run(noise) == []


def test_flapping_signal_never_acts_inside_the_cooldown() -> None:
    load = ([30.0] * 3 + [0.0] * 7) * 20
    actions = [a for a in run(load, start=2) if a[1] in ("scale_up", "scale_down")]
    assert len(actions) >= 2
    for (t0, _, _), (t1, _, _) in itertools.pairwise(actions):
        assert t1 - t0 >= SPEC.cooldown


def test_every_count_stays_within_bounds_and_the_room() -> None:
    rng = random.Random(3)
    for trial in range(200):
        room = Room(rng.choice([None, 0, 1, 2]), "limited")
        spec = AutoscaleSpec(
            min_replicas=rng.randint(1, 2),
            max_replicas=rng.randint(2, 5),
            target="queue_per_replica",
            threshold=rng.uniform(0.5, 8),
            scale_up_after=rng.choice([0.0, 5.0, 20.0]),
            scale_down_after=rng.choice([0.0, 10.0]),
            cooldown=rng.choice([0.0, 10.0]),
            interval=5.0,
        )
        state = ScaleState(spec.min_replicas)
        for n in range(60):
            now = 1000.0 + 5 * n
            value = rng.choice([None, 0.0, rng.uniform(0, 20)])
            d = decide("m", spec, state, Sample(value, now - 1, 1), now, room)
            assert spec.min_replicas <= d.desired <= spec.max_replicas, (trial, d.line())
            if d.desired > d.current and room.more is not None:
                assert d.desired - d.current <= room.more, (trial, d.line())
            if value is None:
                assert not d.changes
            state = d.state


def test_signal_values() -> None:
    kv = SPEC.model_copy(update={"target": "kv_cache_usage", "threshold": 0.8})
    ttft = SPEC.model_copy(update={"target": "ttft_p95", "threshold": 2.0})
    assert signal_value(SPEC, 9.0, 0.5, 1.0, 3, True) == 3.0
    assert signal_value(kv, 9.0, 0.5, 1.0, 3, True) == 0.5
    assert signal_value(ttft, 9.0, 0.5, 1.5, 3, True) == 1.5
    assert signal_value(ttft, 9.0, 0.5, None, 3, True) == 0.0  # a window, no request: idle
    assert signal_value(ttft, 9.0, 0.5, None, 3, False) is None  # no window yet


# --------------------------------------------------------------------------- the stack format


def _stack(autoscale: dict[str, Any] | None, **model: Any) -> Any:
    data: dict[str, Any] = {
        "stack": "s",
        "hosts": {"gpu": {"backend": "process"}},
        "models": {
            "m": {"host": "gpu", "model": "org/m", "engine": "simulator", "port": 9000, **model}
        },
    }
    if autoscale is not None:
        data["models"]["m"]["autoscale"] = autoscale
    return stack_from_data(data)


AUTO = {"max_replicas": 3, "target": "queue_per_replica", "threshold": 4}


@pytest.mark.parametrize(
    ("bad", "field"),
    [
        ({**AUTO, "min_replicas": 4}, "autoscale: min_replicas (4) is above max_replicas (3)"),
        ({**AUTO, "target": "cpu"}, "models.m.autoscale.target"),
        ({"max_replicas": 3, "threshold": 4}, "models.m.autoscale.target: required"),
        ({**AUTO, "threshold": 0}, "models.m.autoscale.threshold"),
        ({**AUTO, "target": "kv_cache_usage", "threshold": 1.5}, "KV-cache use is 0-1"),
        ({**AUTO, "cooldown": "soon"}, "models.m.autoscale.cooldown"),
        ({**AUTO, "scale_up_after": -1}, "models.m.autoscale.scale_up_after"),
        ({**AUTO, "replicas_max": 3}, "models.m.autoscale.replicas_max: unknown key"),
    ],
)
def test_bad_autoscale_settings_name_the_field(bad: dict[str, Any], field: str) -> None:
    with pytest.raises(StackValidationError) as err:
        _stack(bad)
    assert field in str(err.value)


def test_autoscale_needs_auto_gpus() -> None:
    with pytest.raises(StackValidationError) as err:
        _stack(AUTO, gpus=[0, 1])
    assert "autoscale: needs `gpus: auto`" in str(err.value)


def test_names_and_ports_stay_put_as_the_count_changes() -> None:
    stack = _stack({**AUTO, "min_replicas": 1})
    one = expand_units(with_counts(stack, {"m": 1}), {"m"})
    three = expand_units(with_counts(stack, {"m": 3}), {"m"})
    assert [i.name for i in one] == ["m-0"]
    assert [(i.name, dict(i.ports)["http"]) for i in three] == [
        ("m-0", 9000),
        ("m-1", 9001),
        ("m-2", 9002),
    ]
    assert one[0].argv == three[0].argv


def test_the_autoscalers_count_is_kept_within_bounds_and_changes_no_unit_hash() -> None:
    stack = _stack(AUTO, replicas=2)
    assert stack.models["m"].replicas == 2  # the first count
    assert with_counts(stack, {"m": 9}).models["m"].replicas == 3
    assert with_counts(stack, {"m": 0}).models["m"].replicas == 1
    assert with_counts(stack, {}).models["m"].replicas == 2
    assert unit_config_hash(with_counts(stack, {"m": 1}), "m") == unit_config_hash(
        with_counts(stack, {"m": 3}), "m"
    )
    plain = _stack(None, replicas=2)
    assert with_counts(plain, {"m": 1}) is plain  # a model without autoscale is left alone
    # autoscale settings at their absence keep the old hash (no fleet-wide restart on upgrade)
    other = _stack(None, replicas=2)
    assert unit_config_hash(plain, "m") == unit_config_hash(other, "m")


# --------------------------------------------------------------------------- GPU room


def _gpu(index: int, free_gib: float) -> GpuInfo:
    return GpuInfo(index=index, total_bytes=80 * GIB, free_bytes=int(free_gib * GIB))


def test_room_counts_only_gpus_the_calculator_passes_and_nobody_holds() -> None:
    model = ModelSpec.model_validate({"host": "gpu", "model": "org/m"})
    devices = [_gpu(0, 80), _gpu(1, 80), _gpu(2, 5), _gpu(3, 80)]
    held = [
        Reservation("local", 0, "s", "m-0"),
        Reservation("local", 3, "other", "x"),
    ]
    room = replicas_that_fit(model, 1, devices, held, "s", ["m-1", "m-2"], "models.m", "local")
    assert room.more == 1  # GPU 1; GPU 2 too full for the calculator, GPU 3 someone else's
    assert "GPU" in room.why
    assert (
        replicas_that_fit(model, 0, devices, held, "s", ["m-1"], "models.m", "local").more is None
    )


def test_hxp_autoscale_parses_once_and_json() -> None:
    from hxp_cli import build_parser

    args = build_parser().parse_args(["autoscale", "-f", "s.yaml", "--once", "--json"])
    assert (args.once, args.json, args.dry_run, args.interval) == (True, True, False, None)
    assert args.func.__name__ == "cmd_autoscale"


def test_a_bad_autoscale_field_is_exit_2_naming_it(tmp_path: Any, capsys: Any) -> None:
    from hxp_cli import main

    path = tmp_path / "s.yaml"
    path.write_text(
        "stack: s\nhosts: {h: {backend: process}}\nmodels:\n  m:\n    host: h\n"
        "    model: org/m\n    autoscale: {max_replicas: 2, target: queue, threshold: 1}\n"
    )
    assert main(["autoscale", "-f", str(path), "--once"]) == 2
    err = capsys.readouterr().err
    assert "models.m.autoscale.target" in err
    assert "Traceback" not in err


def test_the_exporter_serves_decisions_and_the_chosen_count_from_the_store(tmp_path: Any) -> None:
    from prometheus_client import generate_latest

    from hxp.io.telemetry import store_registry
    from hxp.store import Store

    store = Store(tmp_path)
    store.save_autoscale_state("s", "m", 3, None, None, 100.0)
    for action in ("hold", "hold", "scale_up"):
        store.add_autoscale_decision("s", "m", action, 1, 3, 9.0, "why")
    text = generate_latest(store_registry(tmp_path, ["s"])).decode()
    assert 'hxp_autoscale_decisions_total{action="hold",model="m",stack="s"} 2.0' in text
    assert 'hxp_autoscale_decisions_total{action="scale_up",model="m",stack="s"} 1.0' in text
    assert 'hxp_autoscale_replicas{model="m",stack="s"} 3.0' in text
    assert store.autoscale_counts("s") == {"m": 3}
    assert [r["reason"] for r in store.autoscale_decisions("s", "m")] == ["why"] * 3


def test_decision_rows_are_pruned_and_the_counters_keep_counting(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    import sqlite3

    from prometheus_client import generate_latest

    from hxp import store as store_module
    from hxp.io.telemetry import store_registry

    store = store_module.Store(tmp_path)
    # a store written before the totals existed: its rows count when the first total is made
    with sqlite3.connect(tmp_path / "hxp.sqlite3") as db:
        db.executemany(
            "INSERT INTO autoscale_decisions (stack, model, action, current, desired, value,"
            " reason, at) VALUES ('s', 'm', 'hold', 1, 1, 0, 'old', ?)",
            [(100.0 + i,) for i in range(3)],
        )
    monkeypatch.setattr(store_module, "AUTOSCALE_DECISIONS_KEPT", 5)
    for i in range(12):
        store.add_autoscale_decision("s", "m", "hold", 1, 1, 0.0, f"pass {i}")
    store.add_autoscale_decision("s", "other", "scale_up", 1, 2, 3.0, "load")
    kept = store.autoscale_decisions("s", "m")
    assert [r["reason"] for r in kept] == [f"pass {i}" for i in range(7, 12)]  # the last 5
    assert [r["reason"] for r in store.autoscale_decisions("s", "other")] == ["load"]
    text = generate_latest(store_registry(tmp_path, ["s"])).decode()
    assert 'hxp_autoscale_decisions_total{action="hold",model="m",stack="s"} 15.0' in text
    assert 'hxp_autoscale_decisions_total{action="scale_up",model="other",stack="s"} 1.0' in text
    assert 'hxp_autoscale_decisions_created{action="hold",model="m",stack="s"} 100.0' in text


@pytest.mark.parametrize(
    ("value", "replicas"),
    [
        (0.0, 2),  # idle (no traffic reaches a sleeping model): would scale in
        (9.0, 1),  # loaded: would scale out
        (None, 2),  # no signal: would be stale
        (0.0, 5),  # outside [min, max]: would be brought back
    ],
    ids=["idle", "loaded", "no-signal", "out-of-bounds"],
)
def test_a_sleeping_model_is_held_at_its_count_and_timers_start_over(
    value: float | None, replicas: int
) -> None:
    state = ScaleState(replicas, 900.0, 900.0, None)
    d = decide("m", SPEC, state, Sample(value, 999.5, replicas), 1000.0, FREE, asleep=1)
    assert (d.action, d.current, d.desired, d.changes) == ("sleeping", replicas, replicas, False)
    assert d.reason.startswith("sleeping:")
    assert "hxp wake m" in d.reason
    assert d.state == ScaleState(replicas, None, None, None)
    # Woken (asleep=0): the next decision starts from the kept count with fresh timers.
    woke = decide("m", SPEC, d.state, Sample(0.0, 1004.5, replicas), 1005.0, FREE)
    assert woke.current == replicas
    assert woke.action != "sleeping"
