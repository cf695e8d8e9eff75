"""The fault campaign's faults that need more than services (hxp.chaos): a full state disk
(only on a state directory the campaign made), nginx killed mid blue-green and a stalled
model (only on a stack with a routed hxp-vllm-sim model): which campaigns get them, where
they are injected, the revisions they write and what they must end in."""

from __future__ import annotations

import sys
from pathlib import Path

import yaml

from hxp.chaos import (
    FAULTS,
    MODEL_FAULTS,
    STALL_AFTER,
    Fault,
    InstanceSeen,
    Observation,
    faults_for,
    generated_stack,
    new_revision,
    plan_campaign,
    plan_run,
    skipped_faults,
    violations,
)
from hxp.config import load_config

DEPS = {"u0": [], "u1": ["u0"]}
RICH = frozenset({"model", "gateway", "own-state"})


def test_a_stack_of_services_gets_the_same_faults_and_draws_as_before() -> None:
    plain = faults_for("process")
    assert Fault.STATE_DISK_FULL not in plain
    assert not set(plain) & MODEL_FAULTS
    assert plain == [
        f for f in FAULTS if f not in MODEL_FAULTS | {Fault.STATE_DISK_FULL, Fault.DOCKER_RESTART}
    ]
    # the draws of a campaign on a plain stack did not move (replay keys stay valid)
    assert plan_run(3, 11, plain, DEPS) == plan_run(3, 11, plain, DEPS, models=())


def test_each_missing_part_is_named_as_the_reason_a_fault_is_left_out() -> None:
    skipped = skipped_faults("process", frozenset())
    assert set(skipped) == {Fault.STATE_DISK_FULL, Fault.NGINX_KILLED, Fault.STALLED_MODEL}
    assert "not one the campaign made" in skipped[Fault.STATE_DISK_FULL]
    assert "no gateway" in skipped[Fault.NGINX_KILLED]
    assert "model" in skipped[Fault.STALLED_MODEL]
    with_model = skipped_faults("process", frozenset({"model"}))
    assert set(with_model) == {Fault.STATE_DISK_FULL, Fault.NGINX_KILLED}
    assert skipped_faults("process", RICH) == {}
    assert set(faults_for("process", RICH)) == set(FAULTS) - {Fault.DOCKER_RESTART}


def test_a_docker_restart_is_injected_only_into_a_daemon_the_campaign_owns() -> None:
    own = frozenset({"own-dockerd"})
    assert Fault.DOCKER_RESTART not in faults_for("docker")
    skipped = skipped_faults("docker", frozenset())
    assert set(skipped) == {Fault.DOCKER_RESTART}
    assert "not one the campaign started" in skipped[Fault.DOCKER_RESTART]
    assert faults_for("docker", own) == [*faults_for("docker"), Fault.DOCKER_RESTART]
    assert skipped_faults("docker", own) == {}
    for backend in ("process", "systemd"):  # only the docker backend has a daemon to restart
        assert Fault.DOCKER_RESTART not in faults_for(backend, RICH | own)
        assert Fault.DOCKER_RESTART not in skipped_faults(backend, frozenset())
    # a campaign not handed its daemon draws as before (replay keys stay valid)
    assert [plan_run(5, r, faults_for("docker"), DEPS).fault for r in range(50)] == [
        plan_run(
            5, r, [f for f in faults_for("docker", own) if f is not Fault.DOCKER_RESTART], DEPS
        ).fault
        for r in range(50)
    ]


def test_a_docker_restart_must_commit_the_new_revision() -> None:
    spec = FAULTS[Fault.DOCKER_RESTART]
    assert (spec.exit_code, spec.outcome, spec.history, spec.also) == (0, "new", ("succeeded",), ())
    assert not spec.recovers
    good = generated_stack("s", [21001, 21002], "python3", "docker", image="x:1")
    new = new_revision(good, "u1", Fault.DOCKER_RESTART, "7-1", "python3", 21002)
    command = new["services"]["u1"]["command"]  # type: ignore[index]
    assert command[-4:] == ["--fault", "slow", "--delay", "3"]  # a window to restart in
    seen = Observation(
        exit_codes=(1,),
        recovery_exit=None,
        expected_hash={},
        instances=[],
        unit_of={},
        leftovers=["container hxp-s-u1-prev (stopped, instance u1)"],
        plan_changes=[],
        history=["failed"],
        unfinished=0,
    )
    assert violations(spec, seen) == [
        "exit code [1], expected 0",
        "left over: container hxp-s-u1-prev (stopped, instance u1)",
        "history rows ['failed'], expected ['succeeded']",
    ]


def test_model_faults_target_a_model_and_the_others_a_service() -> None:
    plans = plan_campaign(19, 300, faults_for("process", RICH), DEPS, models=["m0"])
    assert {p.fault for p in plans} >= MODEL_FAULTS | {Fault.STATE_DISK_FULL}
    for p in plans:
        assert (p.unit == "m0") == (p.fault in MODEL_FAULTS), p
    assert plans[123] == plan_run(19, 123, faults_for("process", RICH), DEPS, ["m0"])


def test_the_rich_generated_stack_is_valid_and_a_stalled_revision_stalls_only_its_model(
    tmp_path: Path,
) -> None:
    py = sys.executable
    stack = generated_stack("s", [21001, 21002], py, model_port=21010, gateway_port=21020)
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(stack))
    spec = load_config([path], {}).stack
    assert list(spec.models) == ["m0"]
    assert spec.gateway is not None
    assert spec.gateway.routes == {"m0": 21020}
    assert spec.models["m0"].bake is not None

    stalled = new_revision(stack, "m0", Fault.STALLED_MODEL, "7", py, 0)
    model = stalled["models"]["m0"]  # type: ignore[index]
    assert model["simulator_args"][-2:] == ["--stall-after", f"{STALL_AFTER:g}"]
    assert model["env"]["HXP_CHAOS_VERSION"] == "7"
    assert stalled["services"] == stack["services"]
    clean = new_revision(stalled, "m0", Fault.NONE, "8", py, 0)
    assert "--stall-after" not in clean["models"]["m0"]["simulator_args"]  # type: ignore[index]
    path.write_text(yaml.safe_dump(stalled))
    load_config([path], {})  # still a valid stack
    # without a model or gateway it is the stack it always was
    plain = generated_stack("s", [21001, 21002], py)
    assert set(plain) == {"stack", "hosts", "services"}


def observation(**changes: object) -> Observation:
    base: dict[str, object] = {
        "exit_codes": (1,),
        "recovery_exit": 0,
        "expected_hash": {"u0": "h1"},
        "instances": [InstanceSeen("u0", True, "h1", "h1", True, 1)],
        "unit_of": {"u0": "u0"},
        "leftovers": [],
        "plan_changes": [],
        "history": ["failed", "succeeded"],
        "unfinished": 0,
    }
    base.update(changes)
    return Observation(**base)  # type: ignore[arg-type]


def test_a_full_disk_must_fail_clearly_and_the_next_apply_recover() -> None:
    spec = FAULTS[Fault.STATE_DISK_FULL]
    assert violations(spec, observation()) == []
    # the faulty apply could not even write its end: the next apply marks it interrupted
    assert violations(spec, observation(history=["interrupted", "succeeded"])) == []
    assert "the next apply of the last good stack exited 1" in violations(
        spec, observation(recovery_exit=1)
    )
    assert any("history rows" in v for v in violations(spec, observation(history=["failed"])))
    assert any("exit code [0]" in v for v in violations(spec, observation(exit_codes=(0,))))
    # every write still fit: the campaign empties the store's log first so that this cannot
    # happen; a commit under this fault is a violation, whatever the other invariants say
    committed = observation(exit_codes=(0,), history=["succeeded", "succeeded"])
    assert any("exit code [0], expected 1" in v for v in violations(spec, committed))
    assert any("history rows" in v for v in violations(spec, committed))


def test_nginx_killed_must_commit_with_the_gateway_up_and_routing_the_healthy() -> None:
    spec = FAULTS[Fault.NGINX_KILLED]
    ok = observation(
        exit_codes=(0,),
        recovery_exit=None,
        history=["succeeded"],
        routed=frozenset({"m0:21011"}),
        should_route=frozenset({"m0:21011"}),
        gateway_up=True,
    )
    assert violations(spec, ok) == []
    down = observation(**{**ok.__dict__, "gateway_up": False})
    assert any("the gateway is down" in v for v in violations(spec, down))
    stale = observation(**{**ok.__dict__, "routed": frozenset({"m0:21010"})})
    assert any("the gateway routes ['m0:21010']" in v for v in violations(spec, stale))


def test_a_stalled_model_must_fail_and_leave_the_previous_revision() -> None:
    spec = FAULTS[Fault.STALLED_MODEL]
    assert (spec.exit_code, spec.outcome, spec.history) == (1, "previous", ("failed",))
    ok = observation(recovery_exit=None, history=["failed"])
    assert violations(spec, ok) == []
    committed = observation(exit_codes=(0,), recovery_exit=None, history=["succeeded"])
    assert len(violations(spec, committed)) == 2
