"""The autoscaler end to end (issue 17): hxp-vllm-sim with its capacity model behind the real
nginx gateway, load from tests.support.loadgen, the autoscale flow run in a loop as
`hxp autoscale` runs it, time-compressed intervals (seconds instead of minutes).
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest

from hxp.backends.process import ProcessBackend
from hxp.store import Store
from tests.support.autoscale_lab import SLOTS, Autoscaler, autoscale_fleet, live_ports, wait_for
from tests.support.loadgen import BackgroundLoad
from tests.support.stacks import free_port, free_range, tear_down_fleet

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("prefect_server")]

# Compressed, yet longer than one pass takes on a busy CI machine (a scrape, an aggregation
# and a decision in a Prefect flow run: 1-3 s there).
SCALE_UP_AFTER = 4.0
INTERVAL = 2.0
SCALE_DOWN_AFTER = 6.0
# Clients in flight: 4 x one replica's slots from a closed loop on a busy machine keeps about
# 3 x its slots in flight at the replicas (each request is a new gateway connection).
LOAD = 4 * SLOTS
TIMES = {
    "interval": f"{INTERVAL}s",
    "scale_up_after": f"{SCALE_UP_AFTER}s",
    "scale_down_after": f"{SCALE_DOWN_AFTER}s",
    "cooldown": "4s",
}


def deploy(path: Path, state: Path) -> dict:  # type: ignore[type-arg]
    from flows.deploy import deploy_stack

    return deploy_stack([str(path)], state_dir=str(state))


@pytest.fixture
def fleet(tmp_path: Path):  # type: ignore[no-untyped-def]
    made: list[tuple[Path, Path, str]] = []

    def make(stack: str, **kw: object) -> tuple[Path, Path, str]:
        base, gateway = free_range(8), free_port()
        path = autoscale_fleet(
            tmp_path / f"{stack}.yaml",
            stack,
            base,
            gateway,
            **{**TIMES, **kw},  # type: ignore[arg-type]
        )
        state = tmp_path / f"state-{stack}"
        made.append((path, state, stack))
        return path, state, f"http://127.0.0.1:{gateway}"

    yield make
    for path, state, stack in made:
        tear_down_fleet(path, state, stack)


def test_load_step_scales_to_three_and_back_to_one_without_a_failed_request(fleet) -> None:  # type: ignore[no-untyped-def]
    path, state, url = fleet("as")
    first = deploy(path, state)
    assert first["changed"]
    assert sorted(ProcessBackend(state).observe("as")) == ["chat-0"]
    scaler = Autoscaler(path, state, "as", INTERVAL)

    # Idle soak with noisy metrics: light load that never queues; no scale action.
    noise = BackgroundLoad(url, "chat", 120, concurrency=2).start()
    for _ in range(6):
        scaler.once()
        time.sleep(INTERVAL)
    quiet = noise.join()
    assert quiet.failed == 0, quiet.errors
    assert scaler.actions("scale_up", "scale_down", "blocked") == []
    assert len(live_ports(state, "as", path)) == 1

    # The load step: three times one replica's slots, closed loop.
    scaler.start()
    step = time.monotonic()
    load = BackgroundLoad(url, "chat", 1500, concurrency=LOAD).start()
    reached = wait_for(lambda: len(live_ports(state, "as", path)) == 3, timeout=120)
    assert reached is not None, (scaler.passes[-3:], scaler.errors)
    # The pass that scaled up returns once its deploy is committed, just after the routes.
    assert wait_for(lambda: bool(scaler.actions("scale_up")), timeout=60) is not None
    deploy_record = next(d for d in Store(state).deploys("as") if d.id != first["deploy_id"])
    assert deploy_record.finished_at is not None
    start_s = deploy_record.finished_at - deploy_record.started_at  # a replica's gated start
    bound = SCALE_UP_AFTER + 2 * INTERVAL + start_s
    print(f"\n3 replicas serving {reached:.1f}s after the load step (bound {bound:.1f}s)")
    assert time.monotonic() - step >= SCALE_UP_AFTER  # hysteresis held it back
    assert reached <= bound + 1.0  # one more interval of slack for a pass under way
    loaded = load.join()
    assert loaded.failed == 0, loaded.errors
    assert loaded.sent == 1500
    # While loaded at 3 replicas it never scaled down (one fewer would queue).
    assert [d for d in scaler.actions("scale_down")] == []

    # Load removed: one replica at a time back to min, each drained through the gateway, a
    # trickle of requests meanwhile never fails.
    removed = time.monotonic()
    trickle = BackgroundLoad(url, "chat", 150, concurrency=1).start()
    back = wait_for(lambda: len(live_ports(state, "as", path)) == 1, timeout=90)
    scaler.stop()
    assert back is not None, (scaler.passes[-3:], scaler.errors)
    assert time.monotonic() - removed >= SCALE_DOWN_AFTER
    after = trickle.join()
    assert after.failed == 0, after.errors
    assert scaler.errors == []
    downs = scaler.actions("scale_down")
    assert [(d["current"], d["desired"]) for d in downs] == [(3, 2), (2, 1)]
    assert all("stopped (drained" in d["outcome"] for d in downs), downs
    assert sorted(ProcessBackend(state).observe("as")) in (["chat-0"], ["chat-0-g"])
    store = Store(state)
    assert store.autoscale_counts("as") == {"chat": 1}
    rows = store.autoscale_decisions("as", "chat")
    assert {r["action"] for r in rows} >= {"hold", "scale_up", "scale_down"}
    assert all(r["reason"] for r in rows)
    kinds = [e["kind"] for e in store.events("as")]
    assert "autoscale-scale_up" in kinds
    assert "autoscale-scale_down" in kinds
    assert store.reservations() == []  # no GPUs in this stack: none booked

    # apply keeps the autoscaler's count: a re-apply changes nothing.
    assert deploy(path, state)["changed"] is False


def test_gpus_for_two_replicas_stop_it_at_two_and_it_says_why(fleet, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    import hxp.io.gpus

    real = hxp.io.gpus.NvmlProbe
    monkeypatch.setattr(hxp.io.gpus, "NvmlProbe", lambda: real(NvmlWithoutDriver()))
    path, state, url = fleet("asg", gpus=2)
    deploy(path, state)
    scaler = Autoscaler(path, state, "asg", INTERVAL).start()
    load = BackgroundLoad(url, "chat", 1200, concurrency=LOAD).start()
    two = wait_for(lambda: len(live_ports(state, "asg", path)) == 2, timeout=120)
    assert two is not None, (scaler.passes[-3:], scaler.errors)
    blocked = wait_for(lambda: bool(scaler.actions("blocked")), timeout=30)
    result = load.join()
    scaler.stop()
    assert blocked is not None, scaler.passes[-3:]
    assert result.failed == 0, result.errors
    assert scaler.errors == []
    assert len(live_ports(state, "asg", path)) == 2
    capped = scaler.actions("scale_up")
    assert all(d["desired"] <= 2 for d in capped), capped
    assert any("only 2 fit" in d["reason"] for d in capped), capped
    reason = scaler.actions("blocked")[0]["reason"]
    assert "no GPU room" in reason, reason
    held = Store(state).reservations()
    assert len({(r.host, r.gpu_index) for r in held}) == len(held) == 2  # none booked twice
    events = [e["message"] for e in Store(state).events("asg") if e["kind"] == "autoscale-blocked"]
    assert events
    assert "no GPU room" in events[0]


def test_stale_metrics_take_no_action_and_say_so(fleet) -> None:  # type: ignore[no-untyped-def]
    path, state, _ = fleet("ass")
    deploy(path, state)
    scaler = Autoscaler(path, state, "ass", INTERVAL)
    scaler.once()
    # The replica stops answering behind hxp's back (a hung or killed server).
    sup = json.loads(
        (ProcessBackend(state).root / "ass" / "chat-0" / "supervisor.json").read_text()
    )
    pid = int(sup["child_pid"])
    os.kill(pid, signal.SIGSTOP)
    try:
        decisions = scaler.once()
    finally:
        os.kill(pid, signal.SIGCONT)
    assert [d["action"] for d in decisions] == ["stale"]
    assert "not acting on stale metrics" in decisions[0]["reason"]
    assert decisions[0]["desired"] == decisions[0]["current"] == 1
    events = [e for e in Store(state).events("ass") if e["kind"] == "autoscale-stale"]
    assert events
    assert "stale" in events[0]["message"]
    assert len(live_ports(state, "ass", path)) == 1


class NvmlLibraryNotFound(Exception):
    """What pynvml raises from nvmlInit on a machine without the NVIDIA driver."""


class NvmlWithoutDriver:
    """TEST DOUBLE of the pynvml module on a machine without an NVIDIA driver: nvmlInit fails
    as pynvml's does, so discovery uses the GPUs the host declares, on any test machine."""

    def nvmlInit(self) -> None:
        raise NvmlLibraryNotFound("NVML Shared Library Not Found")

    def nvmlShutdown(self) -> None:  # pragma: no cover - never initialised
        pass


def _running(state: Path, stack: str) -> list[str]:
    observed = ProcessBackend(state).observe(stack)
    return sorted(name for name, unit in observed.items() if unit.running)


def test_every_run_that_acts_on_what_runs_takes_the_autoscaled_count(fleet) -> None:  # type: ignore[no-untyped-def]
    """An autoscaled model runs the autoscaler's count, not the stack's `replicas` (1 here):
    the health sweep keeps all of its replicas in the gateway, stop and start reach all of
    them, and down removes all of them (each took the declared count before)."""
    from flows.down import down_stack
    from flows.health import run_health_sweep
    from flows.lifecycle import start_stack, stop_stack

    path, state, _url = fleet("counted")
    Store(state).save_autoscale_state("counted", "chat", 3, None, None, time.time())
    deploy(path, state)
    three = _running(state, "counted")
    assert len(three) == 3, three
    assert len(live_ports(state, "counted", path)) == 3

    run_health_sweep([str(path)], state_dir=str(state))
    assert len(live_ports(state, "counted", path)) == 3  # the sweep routes all three

    stop_stack([str(path)], state_dir=str(state), drain=False)
    assert _running(state, "counted") == []
    start_stack([str(path)], state_dir=str(state))
    assert _running(state, "counted") == three

    down_stack([str(path)], state_dir=str(state), drain=False)
    assert ProcessBackend(state).observe("counted") == {}


def test_a_sleeping_model_is_held_and_a_wake_resumes_from_its_count(fleet) -> None:  # type: ignore[no-untyped-def]
    """Asleep, the model gets no traffic, so its metrics look idle: the autoscaler must not
    scale it in (nor start awake replicas of it); each pass says `sleeping`, one event says
    the hold began, the decisions counter counts it. A wake resumes from the count it had."""
    from flows.lifecycle import sleep_model, wake_model
    from hxp.io.telemetry import AUTOSCALE_DECISIONS
    from hxp.lifecycle import State

    path, state, _url = fleet("asz", sleep_mode=True)
    Store(state).save_autoscale_state("asz", "chat", 2, None, None, time.time() - 60)
    deploy(path, state)
    assert len(_running(state, "asz")) == 2
    assert sleep_model(str(path), "chat", state_dir=str(state))["ok"]
    counted = AUTOSCALE_DECISIONS.labels("asz", "chat", "sleeping")
    before = counted._value.get()
    scaler = Autoscaler(path, state, "asz", INTERVAL)
    held_from = time.monotonic()
    # Past scale_down_after and the cooldown, and at least four passes (slow on a busy machine).
    while len(scaler.passes) < 4 or time.monotonic() - held_from < SCALE_DOWN_AFTER + 2 * INTERVAL:
        scaler.once()
        time.sleep(INTERVAL)
    decisions = [d for _, ds in scaler.passes for d in ds]
    assert len(decisions) >= 4
    assert {d["action"] for d in decisions} == {"sleeping"}, decisions
    assert all((d["current"], d["desired"]) == (2, 2) for d in decisions)
    assert all(d["reason"].startswith("sleeping:") for d in decisions)
    assert "hxp wake chat" in decisions[0]["reason"]
    assert counted._value.get() - before == len(decisions)
    store = Store(state)
    assert store.autoscale_counts("asz") == {"chat": 2}
    assert len(_running(state, "asz")) == 2
    rows = store.lifecycle("asz")
    assert [rows[n].state for n in sorted(rows)] == [State.SLEEPING, State.SLEEPING]
    events = [e for e in store.events("asz") if e["kind"] == "autoscale-sleeping"]
    assert len(events) == 1, events  # when the hold began, not one per pass
    assert {r["action"] for r in store.autoscale_decisions("asz", "chat")} == {"sleeping"}

    # Awake again: autoscaling resumes from 2, its timers started afresh (no scale-in yet).
    assert wake_model(str(path), "chat", state_dir=str(state))["ok"]
    resumed = scaler.once()
    assert [(d["action"], d["current"]) for d in resumed] == [("hold", 2)], resumed
    assert len(live_ports(state, "asz", path)) == 2


@pytest.mark.parametrize(
    ("stack", "target", "args", "signal"),
    [
        # 64 KV tokens: the 4 slots' requests (16 tokens each, one prefix block) fill it.
        ("askv", "kv_cache_usage", ("--kv-cache-tokens", "64"), "mean KV-cache use"),
        # 250 ms prefill; 4 x the slots in flight wait about 3 services: TTFT p95 near 1 s.
        ("astt", "ttft_p95", (), "TTFT p95"),
    ],
    ids=["kv", "ttft"],
)
def test_kv_and_ttft_targets_scale_out_under_load_and_back_in_when_idle(  # type: ignore[no-untyped-def]
    fleet, stack: str, target: str, args: tuple[str, ...], signal: str
) -> None:
    import threading

    path, state, url = fleet(stack, target=target, threshold=0.5, simulator_args=args)
    deploy(path, state)
    scaler = Autoscaler(path, state, stack, INTERVAL).start()
    done = threading.Event()
    load = BackgroundLoad(url, "chat", 200, concurrency=LOAD, until=done).start()
    more = wait_for(lambda: len(live_ports(state, stack, path)) >= 2, timeout=120)
    # The pass that scaled up returns once its deploy is committed, just after the routes.
    wait_for(lambda: bool(scaler.actions("scale_up")), timeout=60)
    done.set()
    loaded = load.join()
    assert more is not None, (scaler.passes[-3:], scaler.errors)
    assert loaded.failed == 0, loaded.errors
    ups = scaler.actions("scale_up")
    assert ups, scaler.passes[-3:]
    assert ups[0]["reason"].startswith(f"{signal} "), ups[0]
    assert ups[0]["value"] > 0.5
    assert ups[0]["current"] == 1

    # Idle: back to min_replicas, one drained replica at a time.
    back = wait_for(lambda: len(live_ports(state, stack, path)) == 1, timeout=120)
    scaler.stop()
    assert back is not None, (scaler.passes[-3:], scaler.errors)
    assert scaler.errors == []
    downs = scaler.actions("scale_down")
    assert downs
    assert all(signal in d["reason"] and "stopped (drained" in d["outcome"] for d in downs), downs
    assert Store(state).autoscale_counts(stack) == {"chat": 1}
