"""`make test`'s fault campaign on the docker and systemd backends: on a 3-unit generated stack,
the first run of each fault of a random seed (printed), so every fault applicable to the backend
is injected once; real containers on the session's private engine, real systemd as PID 1 in a
container of it, a real Prefect server. Every run must end consistent, and the teardown must
leave no container or unit of the stack behind."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import docker
import pytest
import yaml

from hxp.backends.base import LABEL_STACK
from hxp.chaos import covering_runs, faults_for, generated_stack
from tests.support.stacks import free_range
from tests.support.systemd_container import unit_files_left

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("prefect_server")]


def campaign(tmp_path: Path, backend: str, stack: dict[str, Any], seed: int) -> list[str]:
    """Runs the covering runs of `seed`; the violations, each with its replay key."""
    from flows.chaos import Campaign, run_campaign

    path = tmp_path / "stack.yaml"
    path.write_text(yaml.safe_dump(stack, sort_keys=False))
    runs = Campaign(path, tmp_path / "state", backend, log=lambda line: None)
    select = covering_runs(seed, runs.faults, runs.deps)
    try:
        results = run_campaign(runs, seed, 0, log=print, select=select)
    finally:
        runs.teardown()
    assert [r.plan.run for r in results] == select
    assert {r.plan.fault for r in results} == set(faults_for(backend))
    return [
        f"--replay {r.plan.key} {r.plan.fault}: {r.violations} {r.error or ''}"
        for r in results
        if not r.consistent
    ]


def announce(capsys: pytest.CaptureFixture[str], backend: str) -> int:
    seed = random.randrange(1, 10**6)
    with capsys.disabled():
        print(f"\nchaos campaign on {backend}: seed {seed} (replay one: --replay {seed}:RUN)")
    return seed


def test_a_campaign_on_the_docker_backend_ends_consistent(
    docker_engine: str,
    chaos_image: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    seed = announce(capsys, "docker")
    base = free_range(3)
    name = f"cd{seed}"
    stack = generated_stack(name, range(base, base + 3), "python3", "docker", image=chaos_image)
    bad = campaign(tmp_path, "docker", stack, seed)
    assert not bad, f"seed {seed}:\n" + "\n".join(bad)
    client = docker.DockerClient(base_url=docker_engine)
    assert client.containers.list(all=True, filters={"label": f"{LABEL_STACK}={name}"}) == []


def test_a_campaign_on_the_systemd_backend_ends_consistent(
    systemd_container: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    seed = announce(capsys, "systemd")
    base = free_range(3)
    name = f"cs{seed}"
    host = {"runner": "docker-exec", "container": systemd_container}
    stack = generated_stack(name, range(base, base + 3), "python3", "systemd", host=host)
    bad = campaign(tmp_path, "systemd", stack, seed)
    assert not bad, f"seed {seed}:\n" + "\n".join(bad)
    assert unit_files_left(systemd_container, name) == ""
