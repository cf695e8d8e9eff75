"""The lifecycle core (pure): state machine, reconciliation, crash policy, rolling batches, the
GPU-aware surge decision, reload planning; the store's transitions; the error classifier."""

from __future__ import annotations

import errno
import itertools
from pathlib import Path
from typing import Any, ClassVar

import pytest

from hxp.config import Document, build_config
from hxp.errors import (
    BackendError,
    GpuAllocationError,
    IllegalTransitionError,
    LifecycleError,
    StackValidationError,
    classify_error,
    classify_message,
)
from hxp.gpu_alloc import GIB, GpuInfo, Reservation
from hxp.lifecycle import (
    STATES,
    TRANSITIONS,
    CrashPolicy,
    LifecycleRecord,
    ReloadKind,
    State,
    check_transition,
    event_name,
    path_between,
    plan_reload,
    reconcile,
    restart_delay,
    rolling_batches,
    supervise,
    surge_decision,
    unit_state,
)
from hxp.plan import ObservedUnit
from hxp.resources import GpuMemory, start_refusal
from hxp.spec import ModelSpec, ServiceSpec, Stack
from hxp.store import Store

S = State

# --------------------------------------------------------------------------- state machine

LEGAL = [
    (S.STOPPED, S.STARTING),
    (S.STARTING, S.RUNNING),
    (S.RUNNING, S.DEGRADED),
    (S.DEGRADED, S.RUNNING),
    (S.RUNNING, S.DRAINING),
    (S.DEGRADED, S.DRAINING),
    (S.DRAINING, S.STOPPING),
    (S.STOPPING, S.STOPPED),
    (S.STARTING, S.FAILED),
    (S.RUNNING, S.FAILED),
    (S.FAILED, S.STARTING),
    (S.FAILED, S.STOPPING),
    (S.DRAINING, S.RUNNING),
]
ILLEGAL = [
    (S.STOPPED, S.RUNNING),
    (S.STOPPED, S.STOPPING),
    (S.RUNNING, S.STOPPED),
    (S.RUNNING, S.STARTING),
    (S.RUNNING, S.STOPPING),
    (S.STOPPING, S.RUNNING),
    (S.DRAINING, S.STARTING),
    (S.STOPPED, S.FAILED),
]


@pytest.mark.parametrize(("a", "b"), LEGAL, ids=lambda s: s.value)
def test_the_issue_s_chain_and_failed_are_legal(a: State, b: State) -> None:
    check_transition("x", a, b)


@pytest.mark.parametrize(("a", "b"), ILLEGAL, ids=lambda s: s.value)
def test_illegal_transitions_are_refused_with_what_is_allowed(a: State, b: State) -> None:
    with pytest.raises(IllegalTransitionError) as err:
        check_transition("chat-0", a, b)
    text = str(err.value)
    assert f"chat-0: illegal lifecycle transition {a.value} -> {b.value}" in text
    for allowed in TRANSITIONS[a]:
        assert allowed.value in text


def test_every_state_reaches_every_other_by_legal_steps() -> None:
    for a, b in itertools.permutations(STATES, 2):
        path = path_between(a, b)
        assert path[-1] is b
        for x, y in itertools.pairwise([a, *path]):
            check_transition("x", x, y)
    assert path_between(S.RUNNING, S.STOPPED) == [S.DRAINING, S.STOPPING, S.STOPPED]
    assert path_between(S.STOPPED, S.RUNNING) == [S.STARTING, S.RUNNING]
    assert path_between(S.RUNNING, S.RUNNING) == []


def test_event_names_follow_the_state() -> None:
    assert event_name(S.DRAINING) == "hxp.lifecycle.draining"


def test_a_unit_state_rolls_up_its_replicas() -> None:
    assert unit_state([]) is S.STOPPED
    assert unit_state([S.RUNNING, S.RUNNING]) is S.RUNNING
    assert unit_state([S.RUNNING, S.DRAINING]) is S.DEGRADED
    assert unit_state([S.RUNNING, S.FAILED]) is S.DEGRADED
    assert unit_state([S.STOPPED, S.FAILED]) is S.FAILED
    assert unit_state([S.STOPPED, S.STOPPING]) is S.STOPPING


# --------------------------------------------------------------------------- reconciliation


def rec(state: State, **kw: object) -> LifecycleRecord:
    return LifecycleRecord("t", "api", "api", state, "", 0.0, **kw)  # type: ignore[arg-type]


def seen(running: bool, exists: bool = True, restarts: int | None = None) -> ObservedUnit:
    return ObservedUnit("api", exists, running, running, "h", 1, "state", restarts=restarts)


@pytest.mark.parametrize(
    ("stored", "observed", "path", "why"),
    [
        (S.DRAINING, True, [S.RUNNING], "interrupted drain"),
        (S.DRAINING, False, [S.STOPPING, S.STOPPED], "interrupted stop"),
        (S.STOPPING, False, [S.STOPPED], "interrupted stop"),
        (S.STARTING, True, [S.RUNNING], "interrupted start"),
        (S.STARTING, False, [S.FAILED], "interrupted start"),
        (S.STOPPED, True, [S.STARTING, S.RUNNING], "observed running"),
        (None, True, [S.STARTING, S.RUNNING], "observed running"),
    ],
)
def test_reconcile_walks_legal_steps_to_what_runs(
    stored: State | None, observed: bool, path: list[State], why: str
) -> None:
    record = rec(stored) if stored is not None else None
    out = reconcile("api", record, seen(observed))
    assert out is not None
    assert list(out.path) == path
    assert why in out.reason
    assert out.back_in_gateway is (stored is S.DRAINING and observed)


def test_reconcile_leaves_crashes_and_settled_states_alone() -> None:
    assert reconcile("api", rec(S.RUNNING), seen(False)) is None  # the supervisor's business
    assert reconcile("api", rec(S.STOPPED), seen(False)) is None
    assert reconcile("api", rec(S.RUNNING), seen(True)) is None
    assert reconcile("api", rec(S.FAILED, held=True), seen(True)) is None
    assert reconcile("api", None, None) is None
    gone = reconcile("api", rec(S.RUNNING), None)
    assert gone is not None
    assert gone.forget


def test_reconcile_follows_the_health_sweep() -> None:
    out = reconcile("api", rec(S.RUNNING), seen(True), "unhealthy")
    assert out is not None
    assert list(out.path) == [S.DEGRADED]
    out = reconcile("api", rec(S.DEGRADED), seen(True), "healthy")
    assert out is not None
    assert list(out.path) == [S.RUNNING]
    assert reconcile("api", rec(S.DEGRADED), seen(True), "unknown") is None


# --------------------------------------------------------------------------- supervision

POLICY = CrashPolicy(max_crashes=3, window=60.0, backoff=1.0, backoff_max=8.0)


def test_backoff_is_zero_first_then_doubles_up_to_the_cap() -> None:
    assert [restart_delay(n, POLICY) for n in range(1, 7)] == [0.0, 1.0, 2.0, 4.0, 8.0, 8.0]


def test_a_crash_is_restarted_at_once_then_with_backoff_then_given_up() -> None:
    first = supervise(rec(S.RUNNING), seen(False), 100.0, POLICY)
    assert first.kind == "crashed"
    assert first.next_restart == 100.0
    second = supervise(rec(S.RUNNING, crashes=(100.0,)), seen(False), 101.0, POLICY)
    assert second.kind == "crashed"
    assert second.next_restart == 102.0
    waiting = supervise(
        rec(S.FAILED, crashes=(100.0, 101.0), next_restart=102.0), seen(False), 101.5, POLICY
    )
    assert waiting.kind == "wait"
    due = supervise(
        rec(S.FAILED, crashes=(100.0, 101.0), next_restart=102.0), seen(False), 102.0, POLICY
    )
    assert due.kind == "restart"
    third = supervise(rec(S.RUNNING, crashes=(100.0, 101.0)), seen(False), 103.0, POLICY)
    assert third.kind == "give-up"
    assert "crash loop: 3 crashes within 60s (limit 3)" in third.reason


def test_old_crashes_leave_the_window() -> None:
    out = supervise(rec(S.RUNNING, crashes=(0.0, 1.0)), seen(False), 100.0, POLICY)
    assert out.kind == "crashed"
    assert out.crashes == (100.0,)


def test_restarts_a_backend_did_itself_count_as_crashes() -> None:
    base = rec(S.RUNNING, restarts_seen=0)
    out = supervise(base, seen(True, restarts=1), 10.0, POLICY)
    assert out.kind == "crashed"
    assert out.restarts_seen == 1
    assert out.crashes == (10.0,)
    out = supervise(
        rec(S.RUNNING, restarts_seen=1, crashes=(9.0,)), seen(True, restarts=3), 10.0, POLICY
    )
    assert out.kind == "give-up"
    # A counter that went back (a fresh supervisor) is a new baseline, not a crash.
    out = supervise(rec(S.RUNNING, restarts_seen=4), seen(True, restarts=0), 10.0, POLICY)
    assert out.kind == "ok"
    assert out.restarts_seen == 0
    # Docker's RestartCount and systemd's NRestarts go back to 0 when the instance is started
    # afresh: a restart the backend did after that is a crash, whatever the old baseline was.
    out = supervise(rec(S.RUNNING, restarts_seen=4), seen(True, restarts=1), 10.0, POLICY)
    assert out.kind == "crashed"
    assert (out.crashes, out.restarts_seen) == ((10.0,), 1)


def test_a_held_crash_loop_is_left_alone() -> None:
    held = rec(S.FAILED, held=True, crashes=(1.0, 2.0, 3.0))
    assert supervise(held, seen(False), 4.0, POLICY).kind == "ok"


# --------------------------------------------------------------------------- rolling


def test_batches_always_leave_one_replica_serving() -> None:
    names = ["a", "b", "c"]
    assert rolling_batches(names, 1) == [["a"], ["b"], ["c"]]
    assert rolling_batches(names, 2) == [["a", "b"], ["c"]]
    assert rolling_batches(names, 5) == [["a", "b"], ["c"]]
    assert rolling_batches(["a"], 3) == [["a"]]
    assert rolling_batches([], 1) == []


def model(**kw: object) -> ModelSpec:
    return ModelSpec.model_validate({"host": "gpu", "model": "org/m", **kw})


def gpu(index: int, total: float, free: float | None) -> GpuInfo:
    return GpuInfo(
        index,
        int(total * GIB),
        None if free is None else int(free * GIB),
        source="nvml" if free is not None else "declared",
    )


def held(*indexes: int) -> list[Reservation]:
    return [Reservation("local", i, "t", f"chat-{i}") for i in indexes]


def test_surge_when_a_spare_gpu_fits_one_more_replica() -> None:
    spec = model(vllm={"gpu_memory_utilization": 0.9})
    devices = [gpu(0, 80, 6), gpu(1, 80, 79.5)]
    out = surge_decision(spec, 1, devices, held(0))
    assert out.surge
    assert out.gpus == (1,)
    assert "GPU 1" in out.reason


def test_no_surge_when_free_memory_is_below_the_budget() -> None:
    spec = model(vllm={"gpu_memory_utilization": 0.9})
    devices = [gpu(0, 80, 6), gpu(1, 80, 40)]  # GPU 1 is half used by something else
    out = surge_decision(spec, 1, devices, held(0))
    assert not out.surge
    assert "below the requested 72.00 GiB" in out.reason
    assert "one at a time while the others serve" in out.reason


def test_no_surge_when_every_gpu_is_held_or_listed() -> None:
    spec = model()
    assert not surge_decision(spec, 1, [gpu(0, 80, None)], held(0)).surge
    assert not surge_decision(spec, 1, [gpu(0, 80, None)], [], listed_elsewhere=[0]).surge
    two = surge_decision(spec, 2, [gpu(0, 80, None), gpu(1, 80, None), gpu(2, 80, None)], held(0))
    assert two.surge
    assert two.gpus == (1, 2)


def test_without_surge_the_detail_names_every_gpu_and_its_memory() -> None:
    spec = model(vllm={"gpu_memory_utilization": 0.9})
    devices = [gpu(0, 80, None), gpu(1, 80, 40), gpu(2, 80, 79)]
    out = surge_decision(spec, 1, devices, held(0), listed_elsewhere=[2])
    assert not out.surge
    assert out.detail == (
        "one more replica needs 1 GPU(s) with 72.00 GiB free on each "
        "(gpu_memory_utilization 0.9 x total); "
        "GPU 0: held by t/chat-0 (80.00 GiB, free unknown); "
        "GPU 1: free memory 40.00 GiB is below the requested 72.00 GiB (0.90 x 80.00 GiB); "
        "vLLM refuses to start; "
        "GPU 2: listed by another model (80.00 GiB, 79.00 GiB free)"
    )
    listed = surge_decision(model(gpus=[0], replicas=1), 1, devices, [])
    assert "GPU 0: listed for this model (80.00 GiB, free unknown)" in listed.detail
    assert surge_decision(spec, 1, devices[2:], []).detail == ""  # it surges: nothing to say


def test_surge_rules_that_need_no_gpu_arithmetic() -> None:
    svc = ServiceSpec.model_validate({"host": "local", "command": ["x"]})
    assert surge_decision(svc, 0, [], []).surge
    assert not surge_decision(svc, 0, [], [], routed=False).surge
    assert not surge_decision(svc, 0, [], [], mode="never").surge
    listed = model(gpus=[0], replicas=1)
    assert not surge_decision(listed, 1, [gpu(0, 80, 79)], []).surge


def test_the_calculator_start_check() -> None:
    assert start_refusal(GpuMemory(80, 79), 0.9) is None
    assert "vLLM refuses to start" in (start_refusal(GpuMemory(80, 30), 0.9) or "")
    assert "CUDA context" in (start_refusal(GpuMemory(80, 80), 0.995) or "")


# --------------------------------------------------------------------------- reload plans


def stack(**services: Any) -> Stack:
    data = {
        "stack": "t",
        "hosts": {"local": {"backend": "process"}},
        "services": {n: {"host": "local", "command": ["x"], **s} for n, s in services.items()},
    }
    return build_config([Document("t", data)]).stack


RELOADABLE = {
    "config_files": [{"path": "/etc/x.conf", "content": "a"}],
    "reload": {"signal": "HUP"},
}


def test_a_config_file_change_of_a_reloadable_service_is_a_reload() -> None:
    old = stack(web=RELOADABLE, db={})
    new = stack(
        web={**RELOADABLE, "config_files": [{"path": "/etc/x.conf", "content": "b"}]}, db={}
    )
    plan = plan_reload(old, new)
    kinds = {c.unit: c.kind for c in plan.units}
    assert kinds == {"web": ReloadKind.RELOAD, "db": ReloadKind.NOOP}
    assert "signal HUP" in plan.summary()


def test_other_changes_roll_and_new_units_deploy() -> None:
    old = stack(web=RELOADABLE, db={})
    new = stack(web={**RELOADABLE, "env": {"A": "1"}}, cache={})
    kinds = {c.unit: c.kind for c in plan_reload(old, new).units}
    assert kinds == {"web": ReloadKind.ROLL, "db": ReloadKind.DEPLOY, "cache": ReloadKind.DEPLOY}
    assert plan_reload(old, old).changes is False


def test_reload_fields_leave_other_units_config_hash_alone() -> None:
    from hxp.config import unit_config_hash

    plain = stack(db={})
    assert "reload" not in plain.services["db"].model_dump(mode="json")
    assert unit_config_hash(plain, "db") == unit_config_hash(stack(db={"config_files": []}), "db")


def test_reload_needs_exactly_one_way_and_a_process_host() -> None:
    with pytest.raises(StackValidationError, match="exactly one of signal or command"):
        stack(web={"reload": {"signal": "HUP", "command": ["true"]}})
    data = {
        "stack": "t",
        "hosts": {"d": {"backend": "docker"}},
        "services": {"web": {"host": "d", "image": "x:1", **RELOADABLE}},
    }
    with pytest.raises(StackValidationError, match="run on process hosts"):
        build_config([Document("t", data)])


# --------------------------------------------------------------------------- the store


def test_store_refuses_an_illegal_transition_and_writes_nothing(tmp_path: Path) -> None:
    store = Store(tmp_path)
    assert store.transition("t", "api", "api-0", S.STARTING, "start") is not None
    with pytest.raises(IllegalTransitionError, match="starting -> stopped"):
        store.transition("t", "api", "api-0", S.STOPPED, "nope")
    assert store.lifecycle("t")["api-0"].state is S.STARTING
    assert [e["message"] for e in store.events("t") if e["kind"] == "lifecycle"] == [
        "api-0: stopped -> starting (start)"
    ]
    assert store.transition("t", "api", "api-0", S.STARTING, "again") is None  # no-op


def test_store_keeps_state_across_instances_of_the_store(tmp_path: Path) -> None:
    Store(tmp_path).transition("t", "api", "api-0", S.STARTING, "start")
    Store(tmp_path).transition("t", "api", "api-0", S.RUNNING, "ready", crashes=(1.0,))
    again = Store(tmp_path).lifecycle("t")["api-0"]
    assert (again.state, again.crashes, again.reason) == (S.RUNNING, (1.0,), "ready")
    assert Store(tmp_path).forget_lifecycle("t", "api-0", "gone") == "api"
    assert Store(tmp_path).lifecycle("t") == {}


class _CounterBackend:
    """A backend whose only instance shows a given restart counter (or cannot be reached)."""

    kind: ClassVar[str] = "fake"

    def __init__(self, restarts: int | None) -> None:
        self.restarts = restarts

    def observe(self, stack: str) -> dict[str, ObservedUnit]:
        if self.restarts is None:
            raise BackendError("host unreachable", transient=True)
        return {"api": seen(True, restarts=self.restarts)}

    def apply(self, action: object) -> None:  # pragma: no cover - never called
        raise AssertionError(action)

    def logs(self, ref: object, lines: int = 50, since: str = "run") -> list[str]:
        return []  # pragma: no cover


def test_a_start_by_hxp_takes_the_restart_counter_as_it_is_as_the_new_baseline(
    tmp_path: Path,
) -> None:
    """Docker's RestartCount and systemd's NRestarts go back to 0 on a start: a baseline kept
    from before would hide the next crash the backend restarts by itself."""
    from hxp.io.lifecycle import rebaseline
    from hxp.units import expand_units
    from tests.support.render_data import stack_from_data

    stack = stack_from_data(
        {
            "stack": "t",
            "hosts": {"local": {"backend": "process"}},
            "services": {"api": {"host": "local", "command": ["true"]}},
        }
    )
    (inst,) = expand_units(stack)
    store = Store(tmp_path)
    store.transition("t", "api", "api", S.STARTING, "start")
    store.transition("t", "api", "api", S.RUNNING, "ready")
    store.note_crashes("t", "api", (5.0,), 3)
    rebaseline(store, _CounterBackend(0), inst)
    record = store.lifecycle("t")["api"]
    assert (record.restarts_seen, record.crashes, record.state) == (0, (5.0,), S.RUNNING)
    assert supervise(record, seen(True, restarts=1), 10.0, POLICY).kind == "crashed"
    rebaseline(store, _CounterBackend(None), inst)
    assert store.lifecycle("t")["api"].restarts_seen == 0  # unreachable: kept as it was


# --------------------------------------------------------------------------- error classes


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        (ConnectionRefusedError(errno.ECONNREFUSED, "Connection refused"), "transient"),
        (ConnectionResetError(errno.ECONNRESET, "Connection reset by peer"), "transient"),
        (TimeoutError("timed out"), "transient"),
        (BackendError("supervisor did not start in time", transient=True), "transient"),
        (
            BackendError("500 Server Error: Internal Server Error (device or resource busy)"),
            "transient",
        ),
        (BackendError("HTTP 503 Service Unavailable"), "transient"),
        (BackendError("409 Conflict: removal of container x is already in progress"), "transient"),
        (BackendError("Failed to connect to bus: Connection timed out"), "transient"),
        (BackendError("port 8000 (http) is already in use by another process"), "permanent"),
        (OSError(errno.EADDRINUSE, "Address already in use"), "permanent"),
        (BackendError("404 Client Error: No such image: vllm/vllm-openai:v9"), "permanent"),
        (BackendError("cannot start: No such file or directory"), "permanent"),
        (
            BackendError("torch.OutOfMemoryError: CUDA out of memory. Tried to allocate"),
            "permanent",
        ),
        (GpuAllocationError("needs 1 GPU(s) with 72.0 GiB on each"), "permanent"),
        (StackValidationError("services.x.health.interval: invalid duration 'soon'"), "input"),
        (BackendError("gateway config rejected by nginx -t: invalid parameter"), "permanent"),
        (RuntimeError("something nobody has seen"), "permanent"),
        (LifecycleError("api: never became ready: status 503, expected 200"), "permanent"),
        (LifecycleError("api: connection refused", "transient"), "transient"),
    ],
    ids=lambda v: type(v).__name__ if isinstance(v, BaseException) else str(v),
)
def test_errors_are_classified_transient_permanent_or_input(
    error: BaseException, expected: str
) -> None:
    assert classify_error(error) == expected


def test_a_permanent_cause_wins_over_a_transient_word() -> None:
    assert classify_message("port 9000 is already in use (timed out waiting)") == "permanent"
    assert classify_message("all good") is None
