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

from hxp.chaos import Fault, generated_stack
from tests.support.stacks import free_range

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
