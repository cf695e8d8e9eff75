"""`make test`'s fault campaign: 30 seeded runs (a random seed, printed) on a 3-unit stack of the
process backend, real processes and a real Prefect server; every run must end consistent.

Until the deploy bake window (issue 19 item 1) lands, a revision that serves, passes its check
once and then crashes is committed: the crash-after-serving fault is the one known violation,
and only while the stack format has no `bake` setting (then this test asserts it too)."""

from __future__ import annotations

import random
import sys
from pathlib import Path

import pytest
import yaml

from hxp.chaos import MODEL_FAULTS, Fault, generated_stack
from tests.support.stacks import free_port, free_range

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("prefect_server")]

RUNS = 30


def bake_window_exists() -> bool:
    from hxp.spec import Stack

    return "bake" in yaml.safe_dump(Stack.model_json_schema())


def test_a_seeded_campaign_ends_consistent(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from flows.chaos import Campaign, run_campaign

    seed = random.randrange(1, 10**6)
    with capsys.disabled():
        print(f"\nchaos campaign: seed {seed}, {RUNS} runs (replay one: --replay {seed}:RUN)")
    base = free_range(3)
    stack = tmp_path / "stack.yaml"
    stack.write_text(
        yaml.safe_dump(generated_stack("chaos", range(base, base + 3), sys.executable))
    )
    campaign = Campaign(stack, tmp_path / "state", log=lambda line: None)
    try:
        results = run_campaign(campaign, seed, RUNS, log=lambda line: None)
    finally:
        campaign.teardown()
    known = set() if bake_window_exists() else {Fault.CRASH_AFTER_SERVING}
    bad = [
        f"--replay {r.plan.key} {r.plan.fault}: {r.violations} {r.error or ''}"
        for r in results
        if not r.consistent and r.plan.fault not in known
    ]
    assert len(results) == RUNS
    assert not bad, f"seed {seed}:\n" + "\n".join(bad)


NEW_FAULTS = (Fault.STATE_DISK_FULL, Fault.NGINX_KILLED, Fault.STALLED_MODEL)


def test_the_faults_of_a_stack_with_a_model_and_a_gateway_end_consistent(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A stack with an hxp-vllm-sim model behind a real nginx gateway, on a state directory
    the campaign made (a small tmpfs it mounts): the first run of each of state-disk-full,
    nginx-killed and stalled-model of a random seed, and one more run of the seed, all end
    consistent (each fault's expected outcome and every invariant)."""
    from flows.chaos import Campaign

    seed = random.randrange(1, 10**6)
    base = free_range(5)
    stack = tmp_path / "stack.yaml"
    spec = generated_stack(
        "richchaos",
        range(base, base + 3),
        sys.executable,
        model_port=base + 3,
        gateway_port=free_port(),
    )
    stack.write_text(yaml.safe_dump(spec))
    lines: list[str] = []
    campaign = Campaign(stack, tmp_path / "state", log=lines.append, own_state=True)
    assert campaign.mounted
    assert campaign.models == ["m0"]
    assert set(NEW_FAULTS) <= set(campaign.faults)
    runs = [next(r for r in range(2000) if campaign.plan(seed, r).fault is f) for f in NEW_FAULTS]
    runs.append(next(r for r in range(2000) if r not in runs))
    with capsys.disabled():
        print(f"\nrich chaos campaign: seed {seed}, runs {runs}")
    results = []
    try:
        campaign.setup()
        for run in runs:
            plan = campaign.plan(seed, run)
            if plan.fault in MODEL_FAULTS:
                assert plan.unit == "m0"
            results.append(campaign.run(plan))
            if not results[-1].consistent:
                campaign.repair(plan)
    finally:
        campaign.teardown()
    assert not (tmp_path / "state").is_mount()
    bad = [
        f"--replay {r.plan.key} {r.plan.fault}: {r.violations} {r.error or ''}"
        for r in results
        if not r.consistent
    ]
    assert [r.plan.fault for r in results][:3] == list(NEW_FAULTS)
    assert not bad, f"seed {seed}:\n" + "\n".join(bad)


def test_hxp_chaos_replays_one_run_and_names_its_violation(tmp_path: Path) -> None:
    """`hxp chaos --replay SEED:RUN` repeats that run alone: a crash-after-serving run (its
    known violation until the bake window lands) exits 1 and names its replay key; a
    never-ready run exits 0; --out writes the results."""
    import json

    from hxp.chaos import faults_for, plan_run
    from tests.support.orchestrator import hxp_process

    base = free_range(3)
    stack = tmp_path / "stack.yaml"
    spec = generated_stack("clichaos", range(base, base + 3), sys.executable)
    stack.write_text(yaml.safe_dump(spec))
    deps = {"u0": [], "u1": ["u0"], "u2": ["u0", "u1"]}
    assert {u: s["depends_on"] for u, s in spec["services"].items()} == deps  # type: ignore[attr-defined]

    def key(fault: Fault) -> str:
        run = next(
            r for r in range(500) if plan_run(3, r, faults_for("process"), deps).fault is fault
        )
        return f"3:{run}"

    state = tmp_path / "state"
    ready = key(Fault.NEVER_READY)
    proc = hxp_process(
        "chaos", "-f", str(stack), "--replay", ready, "--out", str(tmp_path / "r.json"), state=state
    )
    out = proc.communicate(timeout=240)[0]
    assert proc.returncode == 0, out
    assert f"run {ready:>10} never-ready" in out
    data = json.loads((tmp_path / "r.json").read_text())
    assert [(r["replay"], r["consistent"]) for r in data["runs"]] == [(ready, True)]
    if bake_window_exists():
        return
    crash = key(Fault.CRASH_AFTER_SERVING)
    proc = hxp_process("chaos", "-f", str(stack), "--replay", crash, state=state)
    out = proc.communicate(timeout=240)[0]
    assert proc.returncode == 1, out
    assert f"`--replay {crash}` crash-after-serving" in out
    assert "exit code [0], expected 1" in out
