"""The fault campaign's pure parts: replayable draws, invariants, the result table."""

from __future__ import annotations

import pytest

from hxp.chaos import (
    FAULTS,
    PARTNER_STOP_SECONDS,
    Fault,
    InstanceSeen,
    Observation,
    RunPlan,
    RunResult,
    candidate_stack,
    faults_for,
    generated_stack,
    new_revision,
    parse_replay,
    plan_campaign,
    plan_run,
    render_table,
    summary_rows,
    violations,
)

DEPS = {"a": [], "b": ["a"], "c": ["b"]}


def test_a_run_is_the_same_alone_as_inside_its_campaign() -> None:
    campaign = plan_campaign(7, 40, faults_for("process"), DEPS)
    for run in (0, 13, 39):
        assert plan_run(7, run, faults_for("process"), DEPS) == campaign[run]
    assert campaign != plan_campaign(8, 40, faults_for("process"), DEPS)
    assert {p.fault for p in campaign} > {Fault.NONE, Fault.NEVER_READY}


def test_a_rollback_kill_changes_a_unit_and_one_of_its_dependencies() -> None:
    plans = plan_campaign(1, 200, [Fault.KILL_DURING_ROLLBACK], DEPS)
    assert all(p.partner in DEPS[p.unit] for p in plans)
    # no dependencies at all: nothing to roll back in order, it becomes a kill during apply
    alone = plan_run(1, 0, [Fault.KILL_DURING_ROLLBACK], {"a": []})
    assert (alone.fault, alone.partner) == (Fault.KILL_DURING_APPLY, None)


def test_a_rollback_kill_partner_serves_its_own_port_and_is_slow_to_stop() -> None:
    """The partner's new revision must pass its own check (it once got the failing unit's port,
    failed first, and left the rollback one short restore: the kill then came too late, 23:113)
    and take PARTNER_STOP_SECONDS to stop, the window the kill lands in."""
    stack = generated_stack("s", [20001, 20002, 20003], "/usr/bin/python3")
    plan = RunPlan(5, 0, Fault.KILL_DURING_ROLLBACK, "u2", "u0", "5-0")
    ports = {"u0": 20001, "u1": 20002, "u2": 20003}
    new = candidate_stack(stack, plan, "/usr/bin/python3", ports)
    services = new["services"]
    assert isinstance(services, dict)
    assert services["u2"]["command"][4:] == ["20003", "--fault", "immediate-exit", "--delay", "0"]
    assert services["u0"]["command"][3:] == [
        "--port",
        "20001",
        "--stop-delay",
        f"{PARTNER_STOP_SECONDS:g}",
    ]
    assert services["u0"]["env"]["HXP_CHAOS_VERSION"] == "5-0"
    assert services["u1"] == stack["services"]["u1"]  # type: ignore[index]


@pytest.mark.parametrize("text", ["7", "x:1", "7:", "7:-1"])
def test_a_bad_replay_key_is_named(text: str) -> None:
    with pytest.raises(ValueError, match="--replay"):
        parse_replay(text)
    assert parse_replay("42:7") == (42, 7)


def good_observation(**changes: object) -> Observation:
    base: dict[str, object] = {
        "exit_codes": (1,),
        "recovery_exit": None,
        "expected_hash": {"a": "h1"},
        "instances": [InstanceSeen("a", True, "h1", "h1", True, 1)],
        "unit_of": {"a": "a"},
        "leftovers": [],
        "plan_changes": [],
        "history": ["failed"],
        "unfinished": 0,
    }
    base.update(changes)
    return Observation(**base)  # type: ignore[arg-type]


def test_a_consistent_failed_run_breaks_no_invariant() -> None:
    assert violations(FAULTS[Fault.NEVER_READY], good_observation()) == []


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        ({"exit_codes": (0,)}, "exit code [0], expected 1"),
        (
            {"instances": [InstanceSeen("a", True, "h2", "h1", True, 1)]},
            "a: runs h2, the store's good revision is h1",
        ),
        ({"instances": [InstanceSeen("a", True, "h1", "h1", False, 1)]}, "a: does not answer"),
        ({"instances": [InstanceSeen("a", True, "h1", "h1", True, 2)]}, "a: 2 processes"),
        ({"instances": [InstanceSeen("a", False, "h1", "h1", False, 0)]}, "a: not running"),
        ({"leftovers": ["pid 9 of x"]}, "left over: pid 9 of x"),
        ({"plan_changes": ["a: start"]}, "plan not empty: a: start"),
        ({"history": ["failed", "failed"]}, "history rows ['failed', 'failed']"),
        ({"unfinished": 1}, "1 history row(s) still running"),
        ({"routed": frozenset({"a"}), "should_route": frozenset()}, "the gateway routes ['a']"),
        ({"reserved": frozenset({"m-0"})}, "GPU reservations held by ['m-0']"),
    ],
)
def test_each_broken_invariant_is_reported(changes: dict[str, object], expected: str) -> None:
    found = violations(FAULTS[Fault.NEVER_READY], good_observation(**changes))
    assert any(expected in line for line in found), found


def test_a_kill_needs_a_killed_orchestrator_and_a_clean_recovery() -> None:
    spec = FAULTS[Fault.KILL_DURING_APPLY]
    ok = good_observation(exit_codes=(None,), recovery_exit=0, history=["interrupted", "succeeded"])
    assert violations(spec, ok) == []
    late = good_observation(exit_codes=(1,), recovery_exit=1, history=["failed", "failed"])
    found = violations(spec, late)
    assert "the orchestrator was to be killed but exited [1]" in found
    assert "the next apply of the last good stack exited 1" in found


def test_the_table_counts_runs_per_fault_and_names_each_violation() -> None:
    ok = RunResult(RunPlan(5, 0, Fault.NONE, "a", None, "5-0"), [], 2.0)
    ok2 = RunResult(RunPlan(5, 1, Fault.NONE, "b", None, "5-1"), [], 4.0)
    bad = RunResult(RunPlan(5, 2, Fault.NEVER_READY, "a", None, "5-2"), ["a: not running"], 3, 1)
    rows = {r["fault"]: r for r in summary_rows([ok, ok2, bad])}
    assert rows["no-fault"]["runs"] == 2
    assert rows["no-fault"]["median_apply_s"] == "3.00"
    assert rows["never-ready"]["rate"] == 0.0
    assert rows["all"]["consistent"] == 2
    text = render_table([ok, ok2, bad])
    assert "`--replay 5:2` never-ready on a: a: not running" in text
    assert "| never-ready | 1 | 0 | 0.0% | 3.00 | 1.00 |" in text


def test_a_fault_revision_changes_only_its_unit() -> None:
    stack = generated_stack("s", [20001, 20002, 20003], "/usr/bin/python3")
    bad = new_revision(stack, "u1", Fault.NEVER_READY, "9", "/usr/bin/python3", 20002)
    services = bad["services"]
    assert isinstance(services, dict)
    assert services["u1"]["command"][-4:] == ["--fault", "never-ready", "--delay", "0"]
    assert services["u1"]["env"]["HXP_CHAOS_VERSION"] == "9"
    assert services["u0"] == stack["services"]["u0"]  # type: ignore[index]
    missing = new_revision(stack, "u2", Fault.MISSING_EXECUTABLE, "9", "/x", 20003)
    assert missing["services"]["u2"]["command"] == ["/nonexistent/hxp-chaos-missing"]  # type: ignore[index]
    # a clean revision after a fault one serves plainly again
    clean = new_revision(bad, "u1", Fault.NONE, "10", "/usr/bin/python3", 20002)
    assert "--fault" not in clean["services"]["u1"]["command"]  # type: ignore[index]


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--replay", "nine"], "--replay 'nine': expected SEED:RUN"),
        (["--runs", "0"], "--runs 0: must be 1 or more"),
        (["--backend", "docker"], "host local of"),
        (["--backend", "systemd"], "uses backend process (hosts.local.backend)"),
    ],
)
def test_hxp_chaos_refuses_bad_input_with_exit_2(
    tmp_path, capsys: pytest.CaptureFixture[str], extra: list[str], message: str
) -> None:  # type: ignore[no-untyped-def]
    from hxp_cli import main

    stack = tmp_path / "stack.yaml"
    stack.write_text(
        "stack: s\nhosts: {local: {backend: process}}\nservices: {a: {host: local, command: [x]}}\n"
    )
    assert main(["chaos", "-f", str(stack), "--state-dir", str(tmp_path / "st"), *extra]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "st").exists()  # nothing started, nothing written


def test_hxp_chaos_names_a_missing_stack_file(tmp_path, capsys) -> None:  # type: ignore[no-untyped-def]
    from hxp_cli import main

    assert main(["chaos", "-f", str(tmp_path / "nope.yaml")]) == 2
    assert "nope.yaml: no such file" in capsys.readouterr().err


# ================================================================ docker and systemd


def test_the_generated_stack_runs_on_each_backend() -> None:
    import yaml

    from hxp.chaos import CHAOS_PYTHONPATH
    from tests.support.render_data import stack_from_data

    docker = generated_stack("s", [20001, 20002], "python3", "docker", image="img:1")
    host = {"runner": "docker-exec", "container": "box"}
    systemd = generated_stack("s", [20001, 20002], "python3", "systemd", host=host)
    for data, backend in ((docker, "docker"), (systemd, "systemd")):
        stack = stack_from_data(yaml.safe_load(yaml.safe_dump(data)))
        assert stack.hosts["local"].backend == backend
        u1 = stack.unit("u1")
        assert u1.command[:3] == ["python3", "-m", "hxp.io.chaos_unit"]
        assert u1.env["PYTHONPATH"] == CHAOS_PYTHONPATH
        assert u1.depends_on == ["u0"]
    assert stack_from_data(docker).unit("u0").image == "img:1"  # type: ignore[union-attr]
    assert stack_from_data(systemd).hosts["local"].container == "box"
    plain = generated_stack("s", [20001], "/py")
    assert "PYTHONPATH" not in plain["services"]["u0"]["env"]  # type: ignore[index]
    assert stack_from_data(plain).unit("u0").health.start_period == 2.0  # type: ignore[union-attr]
    assert stack_from_data(systemd).unit("u0").health.start_period == 8.0  # type: ignore[union-attr]
    short = generated_stack("s", [20001], "python3", "docker", image="i:1", start_period="3s")
    assert stack_from_data(short).unit("u0").health.start_period == 3.0  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"backend": "docker"}, "image: the docker backend needs an image"),
        ({"backend": "systemd", "image": "x:1"}, "image: only the docker backend"),
        ({"backend": "k8s"}, "backend 'k8s': expected one of process, docker, systemd"),
    ],
)
def test_the_generated_stack_names_a_bad_field(kw: dict[str, str], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        generated_stack("s", [20001], "python3", **kw)  # type: ignore[arg-type]


def test_every_fault_without_needs_applies_to_docker_and_systemd() -> None:
    # the faults every stack gets; the model, gateway and full-disk faults need more
    plain = [f for f, spec in FAULTS.items() if not spec.needs]
    for backend in ("docker", "systemd"):
        assert faults_for(backend) == faults_for("process") == plain


def test_covering_runs_are_the_first_run_of_each_fault() -> None:
    from hxp.chaos import covering_runs

    faults = faults_for("docker")
    runs = covering_runs(11, faults, DEPS)
    plans = [plan_run(11, r, faults, DEPS) for r in runs]
    assert {p.fault for p in plans} == set(faults)
    assert runs == sorted(runs)
    for p in plans:  # no earlier run drew the same fault
        assert all(plan_run(11, r, faults, DEPS).fault is not p.fault for r in range(p.run))
    with pytest.raises(ValueError, match="not drawn in 1 runs"):
        covering_runs(11, faults, DEPS, limit=1)


def test_a_docker_census_counts_running_containers_and_names_leftovers() -> None:
    from hxp.chaos import Holder, census

    names = {"a": "hxp-s-a", "b": "hxp-s-b", "c": "hxp-s-c"}
    seen = census(
        [
            Holder("hxp-s-a", "a", True),
            Holder("hxp-s-b", "b", True),
            Holder("hxp-s-b-previous", "b", True),  # a kept old version still running
            Holder("hxp-s-c-previous", "c", False),  # kept after the deploy ended
            Holder("hxp-s-z", "z", False),  # an instance outside the stack
        ],
        ["a", "b", "c"],
        names,
    )
    assert seen.per_instance == {"a": 1, "b": 2, "c": 0}
    assert seen.leftovers == [
        "container hxp-s-b-previous (running, instance b)",
        "container hxp-s-c-previous (stopped, instance c)",
        "container hxp-s-z (stopped, instance z)",
    ]
    clean = census([Holder("hxp-s-a", "a", True)], ["a"], {"a": "hxp-s-a"})
    assert (clean.per_instance, clean.leftovers) == ({"a": 1}, [])


def test_a_systemd_listing_counts_cgroup_processes_and_kept_files() -> None:
    from hxp.chaos import census
    from hxp.io.chaos import parse_systemd_listing

    text = "\n".join(
        [
            "@units",
            "hxp-s-a.service loaded active running A",
            "hxp-s-b.service loaded active running B",
            "hxp-s-a-g.service not-found inactive dead hxp-s-a-g.service",  # an After= only
            "hxp-s-z.service loaded inactive dead Z",
            "@files",
            "hxp-s-a.service",
            "hxp-s-b.service",
            "hxp-s-c.service",
            "@procs",
            "hxp-s-a.service",
            "hxp-s-b.service",
            "hxp-s-b.service",
            "@kept",
            "/var/lib/hxp-systemd/s/b/previous.service",
        ]
    )
    holders, kept = parse_systemd_listing(text, "s")
    assert [(h.name, h.running, h.processes) for h in holders] == [
        ("hxp-s-a.service", True, 1),
        ("hxp-s-b.service", True, 2),
        ("hxp-s-c.service", False, 0),
        ("hxp-s-z.service", False, 0),
    ]
    names = {i: f"hxp-s-{i}.service" for i in "abc"}
    seen = census(holders, ["a", "b", "c"], names, kept, kind="unit")
    assert seen.per_instance == {"a": 1, "b": 2, "c": 0}
    assert seen.leftovers == [
        "unit hxp-s-z.service (stopped, instance z)",
        "kept file /var/lib/hxp-systemd/s/b/previous.service",
    ]
    spec = FAULTS[Fault.NONE]
    inst = InstanceSeen("b", True, "h", "h", True, seen.per_instance["b"])
    found = violations(
        spec,
        Observation((0,), None, {}, [inst], {}, seen.leftovers, [], ["succeeded"], 0),
    )
    assert "b: 2 processes, expected exactly 1" in found
    assert "left over: kept file /var/lib/hxp-systemd/s/b/previous.service" in found
