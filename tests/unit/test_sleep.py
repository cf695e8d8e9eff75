"""Sleep mode's pure parts: who may sleep, what a sleeping replica frees, its lifecycle moves,
and the store's record beside the GPU reservations."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from hxp.errors import IllegalTransitionError, SleepModeError, UnknownUnitError
from hxp.lifecycle import (
    SLEEP_LOST,
    CrashPolicy,
    LifecycleRecord,
    State,
    check_transition,
    lost_sleep,
    path_between,
    reconcile,
    supervise,
)
from hxp.plan import ObservedUnit
from hxp.resources import GIB
from hxp.sleep import SleepLevel, refuse_asleep, sleep_release, sleeping_model
from hxp.spec import ModelSpec, Stack
from hxp.store import Store


def stack(sleep_mode: bool = True) -> Stack:
    return Stack.model_validate(
        {
            "stack": "s",
            "hosts": {"gpu": {"backend": "process"}},
            "services": {"web": {"host": "gpu", "command": ["true"]}},
            "models": {
                "chat": {
                    "host": "gpu",
                    "model": "org/Llama-3.1-8B-Instruct",
                    "gpus": [0],
                    "sleep_mode": sleep_mode,
                    "vllm": {"tensor_parallel_size": 1, "gpu_memory_utilization": 0.9},
                }
            },
        }
    )


def test_only_a_model_that_opted_in_may_sleep() -> None:
    assert isinstance(sleeping_model(stack(), "chat"), ModelSpec)
    with pytest.raises(SleepModeError) as err:
        sleeping_model(stack(False), "chat")
    assert err.value.exit_code == 2
    assert "'chat'" in str(err.value)
    assert "models.chat.sleep_mode: true" in str(err.value)
    with pytest.raises(SleepModeError, match="only models sleep"):
        sleeping_model(stack(), "web")
    with pytest.raises(UnknownUnitError):
        sleeping_model(stack(), "nope")


def test_level_1_frees_weights_and_kv_and_keeps_the_weights_in_host_memory() -> None:
    model = stack().models["chat"]
    totals = {0: 80 * GIB}
    one = sleep_release(model, SleepLevel.OFFLOAD_WEIGHTS, (0,), totals)
    two = sleep_release(model, SleepLevel.DISCARD_ALL, (0,), totals)
    weights = 16 * 10**9  # 8 B parameters at 2 bytes, from the name (hxp.startup)
    assert one.weights_bytes_per_gpu == weights
    assert one.kv_basis == "upper bound"
    assert one.kv_bytes_per_gpu == int(0.9 * 80 * GIB) - weights
    assert one.freed_bytes_per_gpu == int(0.9 * 80 * GIB)
    assert one.host_bytes == weights
    assert two.freed_bytes_per_gpu == one.freed_bytes_per_gpu
    assert two.host_bytes == 0
    assert "level 2" in two.explain()
    assert "weights and KV cache discarded" in two.explain()


def test_a_measured_kv_cache_wins_and_unknown_sizes_stay_unknown() -> None:
    model = stack().models["chat"]
    measured = sleep_release(model, SleepLevel.OFFLOAD_WEIGHTS, (0,), {}, 50 * GIB)
    assert (measured.kv_bytes_per_gpu, measured.kv_basis) == (50 * GIB, "measured")
    unknown = sleep_release(model, SleepLevel.OFFLOAD_WEIGHTS, (0,), {})
    assert unknown.kv_bytes_per_gpu is None
    assert unknown.freed_bytes_per_gpu is None
    data: dict[str, Any] = unknown.to_dict()
    assert data["kv_basis"] == "unknown"
    assert data["level"] == 1


def test_sleeping_is_reached_from_draining_and_left_by_a_wake_or_a_stop() -> None:
    check_transition("chat", State.DRAINING, State.SLEEPING)
    for target in (State.STARTING, State.STOPPING, State.FAILED):
        check_transition("chat", State.SLEEPING, target)
    for source in (State.RUNNING, State.STOPPED, State.STARTING):
        with pytest.raises(IllegalTransitionError):
            check_transition("chat", source, State.SLEEPING)
    with pytest.raises(IllegalTransitionError):
        check_transition("chat", State.SLEEPING, State.RUNNING)  # only through a gated start
    assert State.SLEEPING not in path_between(State.DRAINING, State.STOPPED)


def record(state: State) -> LifecycleRecord:
    return LifecycleRecord("s", "chat", "chat", state, "", 0.0, (), None, None, False)


def observed(running: bool) -> ObservedUnit:
    return ObservedUnit(name="chat", exists=True, running=running, config_hash="h", detail="x")


def test_reconcile_leaves_a_sleeping_replica_asleep_whatever_its_health() -> None:
    for health in (None, "healthy", "unhealthy", "unknown"):
        assert reconcile("chat", record(State.SLEEPING), observed(True), health) is None
    # Asleep and not running is a crash, the supervisor's (it was recorded `stopped` before).
    assert reconcile("chat", record(State.SLEEPING), observed(False)) is None


def test_a_sleeping_replica_that_dies_is_a_crash_and_the_operator_is_told_it_wakes() -> None:
    policy = CrashPolicy()
    dead = supervise(record(State.SLEEPING), observed(False), 100.0, policy)
    assert dead.kind == "crashed"
    assert dead.crashes == (100.0,)
    assert dead.next_restart == 100.0  # the first crash: restarted in the same pass
    assert SLEEP_LOST in dead.reason
    # Restarted by its backend (its counter moved): a crash too, and it runs awake now.
    seen = replace(observed(True), restarts=1)
    kept = replace(record(State.SLEEPING), restarts_seen=0)
    assert lost_sleep(kept, seen)
    again = supervise(kept, seen, 100.0, policy)
    assert again.kind == "crashed"
    assert SLEEP_LOST in again.reason
    # Asleep and untouched: nothing to do, and not lost.
    calm = replace(observed(True), restarts=0)
    assert not lost_sleep(kept, calm)
    assert supervise(kept, calm, 100.0, policy).kind == "ok"
    assert not lost_sleep(replace(record(State.RUNNING), restarts_seen=0), seen)


def test_the_store_keeps_what_a_sleeping_replica_freed(tmp_path: Path) -> None:
    store = Store(tmp_path)
    release = sleep_release(stack().models["chat"], SleepLevel.DISCARD_ALL, (0,), {0: 80 * GIB})
    store.record_sleep("s", "chat", "chat", "gpu", release.to_dict())
    held = store.sleeping("s")["chat"]
    assert held["level"] == 2
    assert held["freed_bytes_per_gpu"] == release.freed_bytes_per_gpu
    assert held["gpus"] == [0]
    assert store.sleeping("other") == {}
    assert store.clear_sleep("s", "chat")
    assert not store.clear_sleep("s", "chat")
    assert store.sleeping("s") == {}


def test_leaving_sleeping_drops_the_record_of_freed_memory(tmp_path: Path) -> None:
    store = Store(tmp_path)
    release = sleep_release(stack().models["chat"], SleepLevel.OFFLOAD_WEIGHTS, (0,), {})
    for state in (State.STARTING, State.RUNNING, State.DRAINING, State.SLEEPING):
        store.transition("s", "chat", "chat", state, "test")
    store.record_sleep("s", "chat", "chat", "gpu", release.to_dict())
    store.transition("s", "chat", "chat", State.SLEEPING, "again")  # no move: kept
    assert "chat" in store.sleeping("s")
    store.transition("s", "chat", "chat", State.STOPPING, "stop requested")
    assert store.sleeping("s") == {}
    store.record_sleep("s", "chat", "chat", "gpu", release.to_dict())
    store.forget_lifecycle("s", "chat", "removed")
    assert store.sleeping("s") == {}


def test_a_restart_of_a_sleeping_model_is_refused_naming_it_and_the_wake() -> None:
    asleep = {"chat-0": "chat", "chat-1": "chat"}
    refuse_asleep("restart", ["code"], asleep)  # the other units: allowed
    with pytest.raises(SleepModeError) as err:
        refuse_asleep("rolling restart", ["chat", "code"], asleep)
    assert err.value.exit_code == 2
    message = str(err.value)
    assert message.startswith("rolling restart refused: model 'chat' is asleep")
    assert "`hxp wake chat` first" in message
    assert "nothing was changed" in message


def test_the_plan_says_an_apply_keeps_a_sleeping_replica_asleep_or_starts_it_awake() -> None:
    from hxp.plan import Action, ActionKind, NoOp, Plan
    from hxp.sleep import plan_asleep

    plan = Plan(
        "s",
        "h",
        ("chat", "code"),
        actions=(
            Action("chat", "chat-1-g", "local", ActionKind.REPLACE, "changed", "h2", "chat-1"),
        ),
        noops=(NoOp("chat", "chat-0", "up to date"), NoOp("code", "code", "up to date")),
    )
    assert plan_asleep(plan, {}) is plan
    marked = plan_asleep(plan, {"chat-0": "chat", "chat-1": "chat"})
    assert [n.reason for n in marked.noops] == [
        "up to date; asleep: left asleep (`hxp wake chat` serves it)",
        "up to date",
    ]
    assert marked.actions == plan.actions  # an apply still does what it did: it says so
    assert len(marked.warnings) == 1
    assert marked.warnings[0].startswith("chat-1 is asleep and its spec changed: the new")
    assert "starts awake" in marked.warnings[0]
    assert "`hxp sleep chat`" in marked.warnings[0]


def test_a_reload_that_would_roll_a_sleeping_model_is_refused_pointing_at_apply() -> None:
    with pytest.raises(SleepModeError) as err:
        refuse_asleep(
            "reload", ["chat"], {"chat": "chat"}, "`hxp apply` (its new revision starts awake)"
        )
    assert str(err.value) == (
        "reload refused: model 'chat' is asleep (hxp sleep), and a restart would start it "
        "awake. Run `hxp wake chat` first, or `hxp apply` (its new revision starts awake); "
        "nothing was changed"
    )
